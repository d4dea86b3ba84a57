"""ModelCheckpoint: keras.callbacks.ModelCheckpoint, written through the ckptmgr engine."""

from __future__ import annotations

import errno
import os
import string
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import ckptmgr

from ._keras_base import (
    BatchCounter,
    Direction,
    MonitorCallback,
    check_flags,
    job_coordinator,
    keras_worded,
    next_step,
    open_manager,
    print_msg,
    resolve_direction,
    scalar_metrics,
)

_MAX_NAME = 200


class FilepathFormatError(KeyError, ValueError):
    """A ``ModelCheckpoint`` file path could not be formatted (a ``KeyError``, as in Keras, and a ``ValueError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _template_fields(template: str, what: str) -> list[str]:
    """The field names of a ``str.format`` template; only plain names are allowed.

    Raises:
        ValueError: a malformed template, a positional field (``{}``, ``{0}``), or
            attribute or index access (``{a.b}``, ``{a[0]}``).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"Expected {what} to be a valid str.format template ({exc}). Received: {what}={template!r}") from None
    fields: list[str] = []
    for _literal, field, spec, _conversion in parsed:
        if field is None:
            continue
        if not field or field.isdigit() or any(c in field for c in ".[]"):
            raise ValueError(
                f"Expected {what} to use named placeholders such as {{epoch:02d}} or {{val_loss:.2f}}, "
                f"without attribute or index access. Received: placeholder {{{field}}} in {what}={template!r}"
            )
        fields.append(field)
        if spec:
            fields.extend(_template_fields(spec, what))
    return fields


class ModelCheckpoint(MonitorCallback):
    """Save the Keras model or its weights at some frequency, atomically, keeping what you choose.

    A drop-in for ``keras.callbacks.ModelCheckpoint``: the same arguments, defaults,
    file names (``filepath`` is formatted with the 1-based ``epoch``, the 1-based
    ``batch`` when saving by batch, and any key of ``logs``, with format specs such as
    ``{val_loss:.2f}``) and files (``.keras`` / ``.h5`` for
    ``keras.models.load_model``, ``.weights.h5`` for ``model.load_weights``). What
    differs, through the ckptmgr engine whose directory is ``filepath``'s directory:

    - Each file is written under a temporary name, fsynced and renamed: a crash in
      the middle of a save leaves the previous file intact, never a truncated one.
    - ``keep=`` is a retention policy for templated names, e.g.
      ``ckptmgr.KeepLast(3) | ckptmgr.KeepBest(1)``; the latest and the best file are
      never deleted.
    - ``save_best_only`` is the engine's ``best_only`` (its
      :class:`ckptmgr.OnImprovement` policy): the manager's
      :class:`ckptmgr.MetricTracker` decides whether ``monitor`` improved, and it
      remembers its best across restarts: a new process never overwrites the best
      file with a worse model (the best value is stored with every file).
    - Used with :class:`ckptmgr.adapters.keras.BackupAndRestore`, its batch counter
      is backed up too, so a resumed run saves at the same batches.

    Example:

    >>> import ckptmgr, keras, numpy as np, os, tempfile
    >>> from ckptmgr.adapters.keras import ModelCheckpoint
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> directory = tempfile.mkdtemp()
    >>> callback = ModelCheckpoint(os.path.join(directory, "model-{epoch:02d}.keras"),
    ...                            monitor="loss", keep=ckptmgr.KeepLast(2))
    >>> _ = model.fit(np.ones((8, 1)), np.ones((8, 1)), epochs=4, callbacks=[callback], verbose=0)
    >>> sorted(f for f in os.listdir(directory) if f.endswith(".keras"))
    ['model-03.keras', 'model-04.keras']

    Args:
        filepath: where to save; its file name may hold ``str.format`` placeholders
            (``{epoch:02d}-{val_loss:.2f}.keras``), its directory may not. Must end
            with ``.weights.h5`` if ``save_weights_only``, else with ``.keras`` or
            ``.h5``.
        monitor: the metric that decides "best", e.g. ``"val_loss"``.
        verbose: 1 prints a message when the callback saves or skips.
        save_best_only: save only when ``monitor`` improves on the best so far (a
            missing ``monitor`` warns and saves).
        save_weights_only: save ``model.save_weights`` files instead of whole models.
        mode: ``"auto"``, ``"min"`` or ``"max"``: which direction of ``monitor`` is
            better (``"auto"``: ``loss`` is minimised, compiled metrics know their
            direction, other names are inferred).
        save_freq: ``"epoch"``, or save every this many batches (counted across
            epochs).
        initial_value_threshold: a value of ``monitor`` the first saved model must
            beat (``save_best_only``).
        keep: a ckptmgr retention policy for the files; None keeps all, like Keras.
        async_save: commit each file in a background thread (the model is still
            serialised before ``on_epoch_end`` returns).

    Attributes:
        monitor_op: Keras' comparator for the direction of ``monitor``:
            ``keras.ops.less`` (``"min"``) or ``keras.ops.greater`` (``"max"``), None
            until it is decided (at the first save or epoch end) or where it cannot be
            told and is not needed. It reads as Keras' but decides nothing: the
            engine's :class:`ckptmgr.MetricTracker`, of the same direction, decides
            "best". Setting it (outside ``fit()``) sets the direction.
        direction: the same, as ``"min"``, ``"max"`` or None.

    Raises:
        ValueError: bad arguments; the message starts with Keras' wording where Keras
            raises too (``Unrecognized save_freq: ...``, ``The filepath provided must
            end in `.keras` ...``), then says what ckptmgr expects.
        FilepathFormatError: while training, ``filepath`` names a key that ``logs``
            lacks (a ``KeyError`` too, and worded as Keras' ``Failed to format this
            callback filepath: ...``), or formats to a name that is not a plain file
            name in its directory.
        ckptmgr.CheckpointIOError: the file to save is an existing directory (an
            ``OSError``, worded as Keras' ``Please specify a non-directory filepath
            ...``), or the file system failed.
        ckptmgr.DirectoryLockedError: another process writes to the directory.
    """

    state_kind = "ModelCheckpoint"

    def __init__(
        self,
        filepath: str | os.PathLike[str],
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        *,
        keep: ckptmgr.RetentionPolicy | None = None,
        async_save: bool = False,
    ) -> None:
        # Checked in Keras' order (save_freq, then the suffix), with Keras' wording first.
        if not isinstance(filepath, (str, os.PathLike)):
            raise ValueError(f"Expected filepath to be a non-empty str or path. Received: filepath={filepath!r}")
        path = os.fspath(filepath)
        if not isinstance(path, str):
            raise ValueError(f"Expected filepath to be a str path, not bytes. Received: filepath={filepath!r}")
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1):
            raise ValueError(
                keras_worded(
                    f"Unrecognized save_freq: {save_freq}. Expected save_freq are 'epoch' or integer values",
                    f"Expected save_freq to be 'epoch' or an int >= 1. Received: save_freq={save_freq!r}",
                )
            )
        if save_weights_only and not path.endswith(".weights.h5"):
            raise ValueError(
                keras_worded(
                    "When using `save_weights_only=True` in `ModelCheckpoint`, the filepath provided must end in "
                    f"`.weights.h5` (Keras weights format). Received: filepath={path}",
                    f"Expected a filepath ending in `.weights.h5` with save_weights_only=True. Received: filepath={path!r}",
                )
            )
        if not save_weights_only and not path.endswith((".keras", ".h5")):
            raise ValueError(
                keras_worded(
                    f"The filepath provided must end in `.keras` (Keras model format). Received: filepath={path}",
                    f"Expected a filepath ending in `.keras` (or the legacy `.h5`). Received: filepath={path!r}",
                )
            )
        directory, template = os.path.split(path)
        if "{" in directory or "}" in directory:
            raise ValueError(
                "Expected placeholders only in the file name of filepath, not in its directory. "
                f"Received: filepath={path}"
            )
        if not template:
            raise ValueError(f"Expected filepath to name a file. Received: filepath={path}")
        self._fields = _template_fields(template, "filepath")
        if keep is not None and not isinstance(keep, ckptmgr.RetentionPolicy):
            raise ValueError(
                f"Expected keep to be a retention policy such as ckptmgr.KeepLast(3), or None. Received: keep={keep!r}"
            )
        check_flags(save_best_only=save_best_only, save_weights_only=save_weights_only, async_save=async_save)
        super().__init__(monitor, mode)  # checks monitor, then mode (an unknown one warns)
        self.filepath = path
        self.verbose = verbose
        self.save_best_only = bool(save_best_only)
        self.save_weights_only = bool(save_weights_only)
        self.save_freq = save_freq
        self.initial_value_threshold = initial_value_threshold
        self.keep = keep
        self.async_save = bool(async_save)
        self.directory = Path(os.path.abspath(directory or os.curdir))
        self._template = template
        self._manager: ckptmgr.CheckpointManager | None = None
        self._last_step = -1
        self._best_seen: float | None = None  # the engine's best when it was last closed
        self._batches = BatchCounter()

    def __repr__(self) -> str:
        return f"ModelCheckpoint({self.filepath!r}, monitor={self.monitor!r})"

    # ------------------------------------------------------------ introspection

    @property
    def best(self) -> float | None:
        """The best ``monitor`` value saved so far (this run or an earlier one), or the threshold."""
        tracker = self._manager.tracker if self._manager is not None else None
        if tracker is not None and tracker.best is not None:
            return tracker.best
        return self._best_seen if self._best_seen is not None else self.initial_value_threshold

    def _set_direction(self, direction: Direction | None, received: str = "") -> None:
        if received and self._manager is not None and direction != self._direction:
            # The open engine's MetricTracker keeps the direction it was opened with.
            raise ValueError(
                f"Expected {type(self).__name__}.monitor_op to be changed outside fit(): the direction of "
                f"{self.monitor!r} is {self._direction!r} until this fit() ends. Received: {received}"
            )
        super()._set_direction(direction)

    @property
    def manager(self) -> ckptmgr.CheckpointManager | None:
        """The engine writing the files while training runs (None outside ``fit()``)."""
        return self._manager

    @property
    def checkpoints(self) -> list[ckptmgr.CheckpointInfo]:
        """The files saved in the directory, oldest first, with the reasons they are kept."""
        if self._manager is not None:
            return self._manager.checkpoints
        if not self.directory.is_dir():
            return []
        direction = self._direction or resolve_direction(self.monitor, self.mode, self.model if self._ctx else None)
        with ckptmgr.CheckpointManager(
            self.directory, read_only=True, keep=self.keep if direction else None,
            monitor=self.monitor if direction else None, mode=direction or "auto",
        ) as reader:
            return reader.checkpoints

    # ------------------------------------------------------------------ events

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        self._close()  # left open by a fit() that raised

    def _handle_batch_end(self, batch: int, logs: dict[str, Any]) -> None:
        if self.save_freq == "epoch":
            return
        assert isinstance(self.save_freq, int)
        if self._batches.count(batch, every=self.save_freq):
            self._save(self._epoch or 0, batch, logs)

    def _handle_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        self.decide_direction(required=False)  # as Keras sets monitor_op; required only by save_best_only
        if self.save_freq == "epoch":
            self._save(epoch, None, logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._close()

    def _close(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            if manager.tracker is not None and manager.tracker.best is not None:
                self._best_seen = manager.tracker.best
            manager.close()

    # ------------------------------------------------------------------ saving

    def format_filepath(self, epoch: int, batch: int | None, logs: dict[str, Any]) -> str:
        """The path of the file saved at 0-based ``epoch`` (and ``batch``) with ``logs``.

        Raises:
            FilepathFormatError: a placeholder that ``logs`` lacks, or a formatted name
                that is not a plain file name (it would leave the directory).
        """
        values = dict(logs)
        values["epoch"] = epoch + 1
        if batch is not None and "batch" not in logs:
            values["batch"] = batch + 1
        try:
            name = self._template.format(**values)
        except KeyError as exc:
            key = exc.args[0] if exc.args else "?"
            hint = " ({batch} is known only with an integer save_freq)" if key == "batch" else ""
            raise FilepathFormatError(
                keras_worded(
                    f'Failed to format this callback filepath: "{self.filepath}". Reason: {key!r}',
                    f"Expected a value for every placeholder of filepath: {{{key}}} is not `epoch`"
                    f"{', `batch`' if batch is not None else ''} or a key of logs{hint}. "
                    f"Received: filepath={self.filepath!r}, logs keys {sorted(logs)}",
                )
            ) from None
        except (ValueError, TypeError, IndexError) as exc:
            # Keras lets str.format's own error through: its message comes first.
            raise FilepathFormatError(
                keras_worded(str(exc), f"Cannot format filepath={self.filepath!r} with logs {logs}")
            ) from None
        if (
            not name
            or len(name) > _MAX_NAME
            or name.startswith(".")
            or any(c in name for c in ("/", "\\", "\0", os.sep))
            or (os.altsep is not None and os.altsep in name)
            or not name.endswith(".weights.h5" if self.save_weights_only else (".keras", ".h5"))
        ):
            raise FilepathFormatError(
                f"Expected filepath to format to a plain file name in {self.directory} (no path "
                f"separator, not hidden, at most {_MAX_NAME} characters, same suffix). "
                f"Received: filepath={self.filepath!r} formatted as {name!r}"
            )
        return os.path.join(os.path.dirname(self.filepath), name)

    def _open(self) -> ckptmgr.CheckpointManager:
        if self._manager is None:
            direction = self.decide_direction(required=self.save_best_only)
            coordinator = job_coordinator(self.model)
            manager = open_manager(
                f"ModelCheckpoint(filepath={self.filepath!r})",
                self.directory,
                keep=self.keep,
                monitor=self.monitor if direction else None,
                mode=direction or "auto",
                min_delta=abs(float(self.min_delta)),
                baseline=self.initial_value_threshold,
                # The engine decides what is saved: its OnImprovement policy, its MetricTracker.
                best_only=self.save_best_only,
                # Several workers (MultiWorkerMirroredStrategy): the chief writes the
                # file, in the foreground, once every worker agreed to save it.
                async_save=self.async_save and coordinator is None,
                coordinator=coordinator,
            )
            tracker = manager.tracker
            if tracker is not None and tracker.best is None and self._best_seen is not None and self.save_best_only:
                # The directory lost the history of the best this callback saved in an
                # earlier fit() (files deleted meanwhile): a worse model still must not
                # replace it, as with Keras, which keeps its best across fit() calls.
                tracker.load_state_dict({**tracker.state_dict(), "best": self._best_seen, "best_step": None})
            self._manager = manager
        return self._manager

    def _save(self, epoch: int, batch: int | None, logs: dict[str, Any]) -> None:
        filepath = self.format_filepath(epoch, batch, logs)
        manager = self._open()
        metrics = scalar_metrics(logs)
        step = next_step(manager, self._iterations(), self._last_step)
        force = True  # save whatever the engine's policy says, as Keras would
        if self.save_best_only:
            current = logs.get(self.monitor)
            if current is None:
                warnings.warn(f"Can save best model only with {self.monitor} available.", stacklevel=4)
            elif len(getattr(current, "shape", None) or ()) > 0:
                warnings.warn(
                    f"Can save best model only when `monitor` is a scalar value. Received: {current}. "
                    "Falling back to `save_best_only=False`.",
                    stacklevel=4,
                )
            else:
                best = self.best
                best_text = "None" if best is None else f"{best:.5f}"
                # The engine decides (best_only: its MetricTracker, through OnImprovement);
                # save() below, with the same metrics, decides the same.
                if not manager.should_save(step, metrics):
                    if self.verbose > 0:
                        print_msg(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best_text}")
                    return
                force = False
                if self.verbose > 0:
                    print_msg(
                        f"\nEpoch {epoch + 1}: {self.monitor} improved from {best_text} to {current:.5f}, "
                        f"saving model to {filepath}"
                    )
        elif self.verbose > 0:
            print_msg(f"\nEpoch {epoch + 1}: saving model to {filepath}")
        if os.path.isdir(filepath):
            raise ckptmgr.CheckpointIOError(
                keras_worded(
                    "Please specify a non-directory filepath for ModelCheckpoint. Filepath used is an existing "
                    f"directory: {filepath}",
                    "ckptmgr: nothing was written.",
                ),
                filepath,
                IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), filepath),
            )
        self._write(manager, step, os.path.basename(filepath), metrics, force=force)
        if self.verbose > 0:
            print_msg(f"\nEpoch {epoch + 1}: finished saving model to {filepath}")

    def _iterations(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        return int(np.asarray(optimizer.iterations.numpy())) if optimizer is not None else 0

    def _write(self, manager: ckptmgr.CheckpointManager, step: int, name: str, metrics: dict[str, float], *,
               force: bool) -> None:
        model = self.model

        def write(path: Path) -> None:
            if self.save_weights_only:
                model.save_weights(str(path), overwrite=True)
            else:
                model.save(str(path), overwrite=True)

        self._last_step = step
        with warnings.catch_warnings():
            # Keras' own warning about a missing monitor was given above.
            warnings.simplefilter("ignore", ckptmgr.MissingMetricWarning)
            manager.save(step, ckptmgr.FilePayload(name, write), metrics=metrics, force=force)

    # ------------------------------------------------------------ backed-up state

    def callback_state(self) -> dict[str, Any]:
        return {"filepath": self.filepath, **self._batches.state()}

    def load_callback_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("filepath") != self.filepath:
            warnings.warn(
                f"ckptmgr: the backup's ModelCheckpoint state is for filepath "
                f"{state.get('filepath') if isinstance(state, dict) else '?'!r}, not {self.filepath!r}; "
                "its batch count starts afresh",
                stacklevel=5,
            )
            return
        self._batches.load_state(state)
