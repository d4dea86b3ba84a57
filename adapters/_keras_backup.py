"""BackupAndRestore: keras.callbacks.BackupAndRestore that resumes exactly."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import ckptmgr

from ._keras_base import (
    BatchCounter,
    CkptCallback,
    check_flags,
    job_coordinator,
    keras_worded,
    next_step,
    open_manager,
)
from .rng import capture_rng, restore_rng
from .tf import load_tree, to_tree

_FORMAT = "ckptmgr.adapters.keras.BackupAndRestore"
_VERSION = 1


class BackupAndRestore(CkptCallback):
    """Back up the whole training state, and resume from it exactly after a crash.

    A drop-in for ``keras.callbacks.BackupAndRestore`` (same arguments and defaults;
    the backup is deleted when training ends, unless ``delete_checkpoint=False``).
    Each backup is one ckptmgr checkpoint in ``backup_dir``, written atomically, that
    holds:

    - the model's variables (weights and ``SeedGenerator`` states), *all* optimizer
      variables (``iterations`` included) and the metrics' running totals;
    - the epoch and the number of batches done in it;
    - the random number generators' states (Python, NumPy, TensorFlow, Keras);
    - the state of this package's :class:`EarlyStopping` and :class:`ModelCheckpoint`
      in the same ``fit()``.

    With an integer ``save_freq``, a resumed run continues at the exact batch of the
    backup: the batches of that epoch already trained are read and replayed, and
    their result thrown away, so that the data position advances and the state is
    then set to the backup's (Keras restarts the epoch from batch 0, training on those
    batches twice). A deterministic run (seeded, ``shuffle=False``) killed at any
    instant and resumed ends with the same weights and ``optimizer.iterations`` as one
    that never stopped. The model need not be built before ``fit()``.

    Example:

    >>> import keras, numpy as np, tempfile
    >>> from ckptmgr.adapters.keras import BackupAndRestore
    >>> class Interrupt(keras.callbacks.Callback):
    ...     def on_epoch_begin(self, epoch, logs=None):
    ...         if epoch == 2:
    ...             raise RuntimeError("pre-empted")
    >>> model = keras.Sequential([keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> x, y = np.ones((8, 1)), np.ones((8, 1))
    >>> backup = BackupAndRestore(tempfile.mkdtemp())
    >>> try:
    ...     _ = model.fit(x, y, epochs=5, batch_size=4, callbacks=[backup, Interrupt()], verbose=0)
    ... except RuntimeError:
    ...     pass
    >>> history = model.fit(x, y, epochs=5, batch_size=4, callbacks=[backup], verbose=0)
    >>> backup.resumed_at, len(history.history["loss"]), int(model.optimizer.iterations)
    ((2, 0), 3, 10)

    Args:
        backup_dir: the directory of the backups. Do not share it with another run
            or callback.
        save_freq: ``"epoch"`` (back up at the end of each epoch), an int (every
            this many batches, counted across epochs), or ``False`` (never on a
            schedule).
        double_checkpoint: keep the previous backup too; if the latest cannot be read,
            training resumes from the previous one.
        delete_checkpoint: delete the backups when ``fit()`` ends normally.
        async_save: write each backup in a background thread (``fit()`` continues
            after an in-memory copy).

    Raises:
        ValueError: bad arguments (the message starts with Keras' wording: ``Empty
            `backup_dir` argument passed``, ``Invalid value for argument `save_freq```);
            at the start of ``fit()``, a backup that does not fit the model or
            optimizer.
        ckptmgr.DirectoryLockedError: another live process writes to ``backup_dir``.
        ckptmgr.CorruptCheckpointError: backups exist but none can be read.
    """

    state_kind = "BackupAndRestore"

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int | bool = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        *,
        async_save: bool = False,
    ) -> None:
        super().__init__()
        # Checked in Keras' order (backup_dir, then save_freq), with Keras' wording first.
        expected_dir = f"Expected backup_dir to be a non-empty str or path. Received: backup_dir={backup_dir!r}"
        if not backup_dir:
            raise ValueError(keras_worded("Empty `backup_dir` argument passed", expected_dir))
        if not isinstance(backup_dir, (str, os.PathLike)):
            raise ValueError(expected_dir)
        if not (save_freq == "epoch" or save_freq is False or (
            isinstance(save_freq, int) and not isinstance(save_freq, bool) and save_freq >= 1
        )):
            raise ValueError(
                keras_worded(
                    f"Invalid value for argument `save_freq`. Received: save_freq={save_freq}. "
                    "Expected either 'epoch' or an integer value.",
                    f"Expected save_freq to be 'epoch', an int >= 1, or False. Received: save_freq={save_freq!r}",
                )
            )
        check_flags(double_checkpoint=double_checkpoint, delete_checkpoint=delete_checkpoint, async_save=async_save)
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.double_checkpoint = bool(double_checkpoint)
        self.delete_checkpoint = bool(delete_checkpoint)
        self.async_save = bool(async_save)
        self._manager: ckptmgr.CheckpointManager | None = None
        self._pending: dict[str, Any] | None = None  # the backup to set once the replayed batches are done
        self._resumed_at: tuple[int, int] | None = None
        self._batches = BatchCounter()  # .total: the batches done in all, the step of a backup
        self._last_step = -1

    def __repr__(self) -> str:
        return f"BackupAndRestore({self.backup_dir!r}, save_freq={self.save_freq!r})"

    @property
    def resumed_at(self) -> tuple[int, int] | None:
        """Where the last ``fit()`` resumed: (0-based epoch, batches of it already done), or None."""
        return self._resumed_at

    @property
    def manager(self) -> ckptmgr.CheckpointManager | None:
        """The engine writing the backups while training runs (None outside ``fit()``)."""
        return self._manager

    # ------------------------------------------------------------------ restore

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        self._close()
        self._pending = None
        self._resumed_at = None
        ctx = self.context
        coordinator = job_coordinator(self.model)
        # Several workers (MultiWorkerMirroredStrategy): the chief writes the one copy
        # (the variables are mirrored), in the foreground, and every worker restores it.
        self._manager = open_manager(
            f"BackupAndRestore(backup_dir={str(self.backup_dir)!r})",
            self.backup_dir, keep=ckptmgr.KeepLast(2 if self.double_checkpoint else 1),
            async_save=self.async_save and coordinator is None, coordinator=coordinator,
        )
        tree = self._manager.restore() if self._manager.latest is not None else None
        if tree is not None:
            if not isinstance(tree, dict) or tree.get("format") != _FORMAT:
                raise ValueError(
                    f"Expected {self.backup_dir} to hold BackupAndRestore backups. "
                    f"Received: a checkpoint of another kind ({self._manager.latest})"
                )
            if tree.get("version") != _VERSION:
                raise ValueError(
                    f"Expected a backup of format version {_VERSION}. Received: version {tree.get('version')!r} "
                    f"in {self.backup_dir}"
                )
        if tree is None or tree["finished"]:
            # No backup, or the last run finished and was deleting it: a fresh start.
            ctx.publish(self.fit_params, {}, None, 0)
            return
        epoch, batch = int(tree["epoch"]), int(tree["batch"])
        self._restore_training_state(tree, metrics=False)
        self._batches.load_state(tree["counters"])
        params = self.params if isinstance(self.params, dict) else {}
        # Stopped (EarlyStopping) before the kill: run no further epoch, only on_train_end.
        self.model._initial_epoch = int(params.get("epochs", epoch)) if tree["stopped"] else epoch
        ctx.publish(self.fit_params, tree["callbacks"], epoch, batch)
        if batch > 0:
            self._pending = tree
        self._resumed_at = (epoch, batch)

    def _restore_training_state(self, tree: dict[str, Any], *, metrics: bool) -> None:
        model = self.model
        if not model.built:
            config = tree.get("build_config")
            if config:
                model.build_from_config(json.loads(config))
            if not model.built:
                raise ValueError(
                    keras_worded(
                        "To use the BackupAndRestore callback, you model must be built before you call `fit()`. "
                        f"Model {model} is unbuilt. You can build it beforehand by calling it on a batch of data.",
                        f"Expected a model that can be built from the backup's build config to resume from "
                        f"{self.backup_dir}. Received: model {model.name!r} is still unbuilt; build it before fit()",
                    )
                )
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            optimizer.build(model.trainable_variables)
        targets: dict[str, Any] = {"model": model}
        if optimizer is not None:
            targets["optimizer"] = optimizer
        if metrics:
            targets["metrics"] = list(model.metrics_variables)
        # Checks every count, shape and dtype before assigning anything.
        load_tree(targets, tree)
        try:
            restore_rng(tree["rng"])
        except ImportError as exc:  # saved by a process that had imported a framework this one lacks
            warnings.warn(
                f"ckptmgr: cannot restore every random number generator saved in {self.backup_dir} ({exc}); "
                "the resumed run may draw different random numbers",
                ckptmgr.CheckpointWarning,
                stacklevel=3,
            )

    def _finish_replay(self) -> None:
        """The replayed batches are done: the data is in place, now set the state of the backup."""
        tree, self._pending = self._pending, None
        if tree is not None:
            self._restore_training_state(tree, metrics=True)

    # ------------------------------------------------------------------- events

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        ctx = self.context
        if ctx.skipping(self.fit_params, self._epoch, batch):
            if batch + 1 >= ctx.skip_batches:
                self._finish_replay()
            return
        super().on_train_batch_end(batch, logs)

    def _handle_batch_end(self, batch: int, logs: dict[str, Any]) -> None:
        every = None if isinstance(self.save_freq, str) or self.save_freq is False else self.save_freq
        if self._batches.count(batch, every=every):
            # The other ckptmgr callbacks handle this batch first, so the backup holds
            # their state after it, whatever their order in the callbacks list.
            for other in self._others():
                other.batch_end_once(batch, logs)
            self._backup(self._epoch or 0, batch + 1)

    def _handle_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        if self._pending is not None:
            warnings.warn(
                f"ckptmgr: epoch {epoch + 1} had fewer batches than the backup in {self.backup_dir} had done "
                f"({self.context.skip_batches}); the data changed, so training cannot resume exactly",
                ckptmgr.CheckpointWarning,
                stacklevel=3,
            )
            self._finish_replay()
        if self.save_freq == "epoch":
            for other in self._others():
                other.epoch_end_once(epoch, logs)
            self._backup(epoch + 1, 0)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._pending = None
        try:
            if self.delete_checkpoint and self._manager is not None:
                self._delete_backups(self._manager)
            else:
                self._close()
        finally:
            self._manager = None
            if self.model is not None and getattr(self.model, "_initial_epoch", None) is not None:
                # Keras leaves it set, so a later fit() of the same model would skip epochs.
                self.model._initial_epoch = None
            if self._ctx is not None:
                self._ctx.clear(self.fit_params)

    # ------------------------------------------------------------------- saving

    def _others(self) -> list[CkptCallback]:
        return [c for c in self.context.members(self.fit_params) if c is not self]

    def _next_step(self, manager: ckptmgr.CheckpointManager) -> int:
        self._last_step = next_step(manager, self._batches.total, self._last_step)
        return self._last_step

    def _backup(self, epoch: int, batch: int) -> None:
        manager = self._manager
        if manager is None:
            return
        coordinator = manager.coordinator
        if coordinator is not None and coordinator.rank != 0:
            # The chief writes the one copy: another worker's state would not be read.
            manager.save(self._next_step(manager), None, force=True)
            return
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        build_config = _json_or_none(model.get_build_config() if hasattr(model, "get_build_config") else None)
        tree = {
            "format": _FORMAT,
            "version": _VERSION,
            "finished": False,
            "epoch": epoch,
            "batch": batch,
            "stopped": bool(getattr(model, "stop_training", False)),
            "build_config": build_config,
            "model": to_tree(model),
            "optimizer": to_tree(optimizer) if optimizer is not None else [],
            "metrics": to_tree(list(model.metrics_variables)),
            "rng": capture_rng(),
            "counters": self._batches.state(total=True),
            "callbacks": {self.context.key(c): c.callback_state() for c in self._others()},
        }
        manager.save(self._next_step(manager), tree, force=True)

    def _close(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            manager.close()

    def _delete_backups(self, manager: ckptmgr.CheckpointManager) -> None:
        """Delete every backup, crash-safely: first a "finished" marker becomes the latest.

        Killed part-way, the next fit() finds the marker (or nothing) and starts
        afresh, as Keras would after deleting; it never resumes an older backup.
        """
        marker = {"format": _FORMAT, "version": _VERSION, "finished": True}
        manager.save(self._next_step(manager), marker, force=True)
        coordinator = manager.coordinator
        if coordinator is not None and coordinator.rank != 0:
            manager.close()  # the chief deletes
            return
        manager.delete_all()  # oldest first: the marker goes last
        directory = Path(manager.directory)
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if empty: anything else in it is not ours


def _json_or_none(config: Any) -> str | None:
    """``config`` as JSON, or None when it is empty or not JSON-able (a custom layer's)."""
    if not config:
        return None
    try:
        return json.dumps(config)
    except (TypeError, ValueError):
        return None
