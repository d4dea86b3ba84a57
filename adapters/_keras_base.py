"""Machinery shared by the Keras callbacks of :mod:`ckptmgr.adapters.keras`.

- :class:`FitContext`: how the ckptmgr callbacks of one ``fit()`` find each other, so
  that ``BackupAndRestore`` can save and restore the state of ``EarlyStopping`` and
  ``ModelCheckpoint`` with the model's, and so that all of them skip the batches a
  resumed epoch replays.
- :class:`CkptCallback`: the base of the three callbacks (state hooks, once-per-event
  processing); :class:`MonitorCallback`, on it, the base of the two that monitor a
  metric (``ModelCheckpoint``, ``EarlyStopping``): ``monitor``/``mode`` checked once,
  the direction decided Keras' way (:func:`resolve_direction`) and exposed as Keras'
  ``monitor_op`` (:data:`MONITOR_OPS`), and the :class:`ckptmgr.MetricTracker` that
  decides every improvement. No callback compares metric values itself.
- :class:`BatchCounter`: batches counted across epochs for ``save_freq=N``, as Keras
  counts them (``ModelCheckpoint`` and ``BackupAndRestore`` each hold one).
- :func:`keras_worded`, :func:`check_flags`: argument errors, starting with Keras'
  own wording where Keras raises too.
"""

from __future__ import annotations

import logging
import math
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal

import keras
import numpy as np

import ckptmgr

Direction = Literal["min", "max"]

_log = logging.getLogger("ckptmgr.adapters.keras")


def keras_worded(keras_message: str, ours: str) -> str:
    """An error message that starts with ``keras_message``, Keras' exact wording, then ours.

    Code that matches on Keras' wording (``pytest.raises(ValueError, match=...)``, a
    ``str(error).startswith(...)``) keeps working; ckptmgr's detail follows.

    >>> keras_worded("Empty `backup_dir` argument passed", "Expected a non-empty str.")
    'Empty `backup_dir` argument passed. Expected a non-empty str.'
    """
    return f"{keras_message}{'' if keras_message.endswith('.') else '.'} {ours}"


def print_msg(message: str) -> None:
    """Print like Keras' callbacks: to stdout, or to logging when Keras' interactive logging is off."""
    if keras.config.is_interactive_logging_enabled():
        sys.stdout.write(message + "\n")
        sys.stdout.flush()
    else:
        _log.info(message)


# ------------------------------------------------------------------- fit context


class FitContext:
    """The ckptmgr callbacks attached to one model, and the resume state of its fit.

    Keras hands every callback of one ``fit()`` the same ``params`` dict, so "the
    callbacks of this fit" are the registered ones whose ``params`` is that object;
    their order is the order of the ``callbacks=`` list (the order ``set_model`` was
    called in).
    """

    def __init__(self) -> None:
        self._members: list[weakref.ref[CkptCallback]] = []
        # Published by BackupAndRestore.on_train_begin for the fit identified by `params`.
        self.params: object = None
        self.restored_states: Mapping[str, Any] = {}
        self.skip_epoch: int | None = None
        self.skip_batches = 0

    def register(self, callback: CkptCallback) -> None:
        alive = [ref for ref in self._members if ref() is not None]
        if not any(ref() is callback for ref in alive):
            alive.append(weakref.ref(callback))
        self._members = alive

    def members(self, params: object) -> list[CkptCallback]:
        """The registered callbacks of the fit whose ``params`` object is ``params``."""
        found = [ref() for ref in self._members]
        return [c for c in found if c is not None and params is not None and c.fit_params is params]

    def key(self, callback: CkptCallback) -> str:
        """The callback's name in a backup: its class and its rank among those of its fit."""
        kind = callback.state_kind
        peers = [c for c in self.members(callback.fit_params) if c.state_kind == kind]
        rank = next((i for i, c in enumerate(peers) if c is callback), len(peers))
        return f"{kind}#{rank}"

    def publish(self, params: object, states: Mapping[str, Any], skip_epoch: int | None, skip_batches: int) -> None:
        self.params = params
        self.restored_states = dict(states)
        self.skip_epoch = skip_epoch if skip_batches > 0 else None
        self.skip_batches = skip_batches

    def restored_state(self, callback: CkptCallback) -> Any:
        if self.params is None or callback.fit_params is not self.params:
            return None
        return self.restored_states.get(self.key(callback))

    def skipping(self, params: object, epoch: int | None, batch: int) -> bool:
        """Whether batch ``batch`` of ``epoch`` is one a resumed epoch replays."""
        return (
            self.skip_epoch is not None
            and params is self.params
            and epoch == self.skip_epoch
            and batch < self.skip_batches
        )

    def end_skip(self) -> None:
        self.skip_epoch = None
        self.skip_batches = 0

    def clear(self, params: object) -> None:
        if self.params is params:
            self.params = None
            self.restored_states = {}
            self.end_skip()


_CONTEXTS: weakref.WeakKeyDictionary[Any, FitContext] = weakref.WeakKeyDictionary()
_CONTEXTS_BY_ID: dict[int, tuple[weakref.ref[Any] | None, FitContext]] = {}


def context_for(model: Any) -> FitContext:
    """The FitContext of ``model`` (created on first use, dropped with the model)."""
    try:
        ctx = _CONTEXTS.get(model)
        if ctx is None:
            ctx = _CONTEXTS[model] = FitContext()
        return ctx
    except TypeError:  # not hashable or not weak-referenceable: keyed by id instead
        entry = _CONTEXTS_BY_ID.get(id(model))
        if entry is None or entry[0] is None or entry[0]() is not model:
            try:
                ref: weakref.ref[Any] | None = weakref.ref(model)
            except TypeError:
                ref = None
            entry = (ref, FitContext())
            _CONTEXTS_BY_ID[id(model)] = entry
        return entry[1]


# ------------------------------------------------------------------ the base class


class CkptCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Base of the ckptmgr Keras callbacks: fit membership, backed-up state, epoch tracking.

    Subclasses implement ``_handle_epoch_end``/``_handle_batch_end`` (called once per
    event, whoever calls first: Keras, or ``BackupAndRestore`` just before it takes a
    backup) and ``callback_state``/``load_callback_state`` for the backup.
    """

    state_kind = "Callback"

    def __init__(self) -> None:
        super().__init__()
        self._ctx: FitContext | None = None
        self._epoch: int | None = None
        self._synced = True
        self._epoch_done: int | None = None
        self._batch_done: tuple[int | None, int] | None = None

    # ---------------------------------------------------------- membership

    @property
    def fit_params(self) -> object:
        """The ``params`` dict Keras gave this callback (identifies the fit)."""
        return getattr(self, "params", None)

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        self._ctx = context_for(model)
        self._ctx.register(self)

    @property
    def context(self) -> FitContext:
        if self._ctx is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a model; pass it to model.fit(callbacks=...)")
        return self._ctx

    def callback_state(self) -> dict[str, Any]:
        """The state a backup holds for this callback (a ckptmgr state tree)."""
        return {}

    def load_callback_state(self, state: Any) -> None:
        """Take over a state that :meth:`callback_state` returned in an earlier process."""

    def _begin_fit(self) -> None:
        self._synced = False
        self._epoch = None
        self._epoch_done = None
        self._batch_done = None

    def _sync(self) -> None:
        """Load this callback's state from the backup being resumed, once per fit."""
        if self._synced:
            return
        self._synced = True
        state = self._ctx.restored_state(self) if self._ctx is not None else None
        if state is not None:
            self.load_callback_state(state)

    def _skipping(self, batch: int) -> bool:
        return self._ctx is not None and self._ctx.skipping(self.fit_params, self._epoch, batch)

    # ---------------------------------------------------------- events

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._begin_fit()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._sync()
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.batch_end_once(batch, logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch_end_once(epoch, logs)

    def batch_end_once(self, batch: int, logs: dict[str, Any] | None) -> None:
        self._sync()
        if self._skipping(batch) or self._batch_done == (self._epoch, batch):
            return
        self._batch_done = (self._epoch, batch)
        self._handle_batch_end(batch, logs or {})

    def epoch_end_once(self, epoch: int, logs: dict[str, Any] | None) -> None:
        self._sync()
        if self._epoch_done == epoch:
            return
        self._epoch_done = epoch
        self._handle_epoch_end(epoch, logs or {})

    def _handle_batch_end(self, batch: int, logs: dict[str, Any]) -> None:
        pass

    def _handle_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        pass


# ----------------------------------------------------------------- shared helpers


_COORDINATORS: weakref.WeakKeyDictionary[Any, ckptmgr.Coordinator] = weakref.WeakKeyDictionary()


def job_coordinator(model: Any) -> ckptmgr.Coordinator | None:
    """The coordinator of a ``fit()`` that runs on several workers, or None.

    A model built under ``tf.distribute.MultiWorkerMirroredStrategy`` with more than one
    worker trains in every worker's process: the callbacks there open their managers
    with this coordinator (one per strategy), so the chief (rank 0) decides and writes,
    and every worker restores the same backup. Any other strategy: None.
    """
    strategy = getattr(model, "distribute_strategy", None)
    tf = sys.modules.get("tensorflow")
    if strategy is None or tf is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    coordinator = _COORDINATORS.get(strategy)
    if coordinator is None:
        from .tf import MultiWorkerCoordinator

        coordinator = MultiWorkerCoordinator(strategy)
        _COORDINATORS[strategy] = coordinator
    return coordinator if coordinator.world_size > 1 else None


def check_flags(**flags: object) -> None:
    """Keras' bool arguments: a bool, or an int as Keras code sometimes passes; nothing else.

    >>> check_flags(save_best_only=True, async_save=0)
    >>> check_flags(save_best_only="yes")
    Traceback (most recent call last):
    ValueError: Expected save_best_only to be a bool. Received: save_best_only='yes'
    """
    for name, flag in flags.items():
        if not isinstance(flag, (bool, int)):
            raise ValueError(f"Expected {name} to be a bool. Received: {name}={flag!r}")


class BatchCounter:
    """Batches counted across epochs, as Keras' callbacks count them for ``save_freq=N``.

    Keras reports the index of a batch within its epoch; an index that does not grow
    means that a new epoch began. ``ModelCheckpoint`` and ``BackupAndRestore`` each
    hold one, and a backup holds its :meth:`state`, so that a resumed run saves at the
    same batches.

    >>> counter = BatchCounter()
    >>> [counter.count(batch, every=3) for batch in (0, 1, 2, 3, 0, 1)]  # 4 batches, then a new epoch
    [False, False, True, False, False, True]
    >>> counter.total, counter.state()
    (6, {'batches_seen_since_last_saving': 0, 'last_batch_seen': 1})
    """

    def __init__(self) -> None:
        self.since_last_save = 0
        self.last_batch_seen: int | None = None
        self.total = 0

    def count(self, batch: int, every: int | None) -> bool:
        """Count batch ``batch`` of the current epoch; True when ``every`` batches have passed
        since the last True (then counting starts over). ``every=None``: count, never True."""
        if self.last_batch_seen is None or batch <= self.last_batch_seen:
            added = batch + 1
        else:
            added = batch - self.last_batch_seen
        self.last_batch_seen = batch
        self.total += added
        if every is None:
            return False
        self.since_last_save += added
        if self.since_last_save < every:
            return False
        self.since_last_save = 0
        return True

    def state(self, *, total: bool = False) -> dict[str, Any]:
        """The counts, as a backup holds them (with ``total``: also the batches counted in all)."""
        state: dict[str, Any] = {
            "batches_seen_since_last_saving": self.since_last_save,
            "last_batch_seen": self.last_batch_seen,
        }
        if total:
            state["global_batch"] = self.total
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Take over the counts of :meth:`state` (``total`` only where it holds it)."""
        self.since_last_save = int(state["batches_seen_since_last_saving"])
        last = state["last_batch_seen"]
        self.last_batch_seen = None if last is None else int(last)
        if "global_batch" in state:
            self.total = int(state["global_batch"])


def next_step(manager: ckptmgr.CheckpointManager, wanted: int, last_step: int) -> int:
    """The step to save at: ``wanted``, or above the last step saved (by us or in ``manager``).

    Steps only grow, even when a new run in the same directory starts from 0: a step
    that existed would replace (and delete) that step's file.
    """
    latest = manager.latest
    return max(wanted, last_step + 1, latest.step + 1 if latest is not None else 0)


# ------------------------------------------------------- monitored metric, Keras' way


def check_mode(owner: str, mode: str, stacklevel: int = 3) -> str:
    """Keras' rule: an unknown mode warns and falls back to "auto"."""
    if mode not in ("auto", "min", "max"):
        import warnings

        warnings.warn(f"{owner} mode '{mode}' is unknown, fallback to auto mode.", stacklevel=stacklevel)
        return "auto"
    return mode


MonitorOp = Callable[[Any, Any], Any]

#: The comparator of each direction, as Keras' ``MonitorCallback.monitor_op`` holds it.
#: Exposed as ``monitor_op`` for code that reads it; no decision is made with it (a
#: :class:`ckptmgr.MetricTracker` of the same direction decides improvements).
MONITOR_OPS: dict[Direction, MonitorOp] = {"min": keras.ops.less, "max": keras.ops.greater}


def monitor_op_of(direction: Direction | None) -> MonitorOp | None:
    """Keras' ``monitor_op`` for ``direction``: ``keras.ops.less``, ``keras.ops.greater``, or None (not yet known)."""
    return None if direction is None else MONITOR_OPS[direction]


def direction_of_op(owner: str, op: Any) -> Direction | None:
    """The direction a ``monitor_op`` set by the user stands for (None: decide it again, as Keras does).

    Keras' ``keras.ops.less``/``greater`` and NumPy's ``np.less``/``np.greater`` (Keras 2's)
    are understood; any other comparator is refused, because improvements are decided
    by a :class:`ckptmgr.MetricTracker`, which knows only a direction.
    """
    if op is None:
        return None
    if op is keras.ops.less or op is np.less:
        return "min"
    if op is keras.ops.greater or op is np.greater:
        return "max"
    raise ValueError(
        f"Expected {owner}.monitor_op to be keras.ops.less (mode='min'), keras.ops.greater (mode='max') or None "
        f"(decide from mode at the next epoch end). Received: monitor_op={op!r}"
    )


def resolve_direction(monitor: str, mode: str, model: Any) -> Direction | None:
    """"min"/"max" for ``monitor`` as Keras decides it, or None when it cannot tell.

    ``mode="auto"``: ``loss``/``val_loss`` are minimised; a compiled metric of that name
    declares its own direction; otherwise ckptmgr infers it from the name, as
    ``ckptmgr.MetricTracker(monitor, mode="auto")`` does
    (:func:`ckptmgr.metrics.infer_mode`), where Keras would give up.
    """
    if mode in ("min", "max"):
        return mode  # type: ignore[return-value]
    name = monitor.removeprefix("val_")
    direction: Direction | None = "min" if name == "loss" else None
    for metric in _compiled_metrics(model):
        if getattr(metric, "name", None) == name and hasattr(metric, "_direction"):
            direction = "max" if metric._direction == "up" else "min"
    if direction is None:
        try:
            direction = ckptmgr.MetricTracker(monitor, mode="auto").mode
        except ValueError:
            return None
    return direction


def open_manager(owner: str, directory: Any, **kwargs: Any) -> ckptmgr.CheckpointManager:
    """The callback's writer on ``directory``; a directory another writer holds (often
    another ckptmgr callback of the same fit()) is refused with what to do instead.

    Raises:
        DirectoryLockedError: another writer holds ``directory``.
    """
    try:
        return ckptmgr.CheckpointManager(directory, **kwargs)
    except ckptmgr.DirectoryLockedError as exc:
        raise ckptmgr.DirectoryLockedError(
            f"{owner} cannot write to {directory}: {exc}. Each ckptmgr callback needs a directory of its "
            "own (one writer per directory): e.g. ModelCheckpoint('ckpt/best/model.keras', "
            "save_best_only=True) beside ModelCheckpoint('ckpt/last/model.keras') and "
            "BackupAndRestore('ckpt/backup')",
            lock_path=exc.lock_path,
        ) from exc


def direction_error(owner: str, monitor: str) -> ValueError:
    return ValueError(
        keras_worded(
            f"{owner} callback received monitor={monitor}, but Keras isn't able to automatically determine "
            "whether that metric should be maximized or minimized. Pass `mode='max'` in order to monitor based "
            "on the highest metric value, or pass `mode='min'` in order to use the lowest value.",
            f"Expected mode='min' or mode='max' for {owner}: the direction of monitor={monitor!r} cannot "
            "be inferred from its name or from the model's metrics. Received: mode='auto'",
        )
    )


def _compiled_metrics(model: Any) -> list[Any]:
    found: list[Any] = []
    for metric in getattr(model, "metrics", None) or []:
        inner = getattr(metric, "metrics", None)  # Keras' CompileMetrics / MetricsList containers
        if isinstance(inner, list):
            found.extend(inner)
    return found


def scalar_metrics(logs: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``logs`` that are finite-or-not real scalars, as floats."""
    out: dict[str, float] = {}
    for key, value in logs.items():
        if not isinstance(key, str) or isinstance(value, (str, bytes, bool)):
            continue
        try:
            # .numpy(): framework tensors and variables (np.asarray of a TF variable warns).
            array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
        except Exception:  # not a number; not a metric
            continue
        if array.shape == () and array.dtype.kind in "fiu":
            out[key] = float(array)
    return out


def monitored_value(monitor: str, value: Any) -> float:
    """The value of ``monitor`` in ``logs`` as the float a :class:`ckptmgr.MetricTracker` takes.

    Keras compares what ``logs`` holds with ``keras.ops``, so a one-element array (an
    ``F1Score`` of one class, shape ``(1,)``) counts as its element; so it does here.

    Raises:
        ValueError: ``value`` is not one number (Keras cannot compare it either).
    """
    try:
        # .numpy(): framework tensors and variables (np.asarray of a TF variable warns).
        array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
        if array.size == 1 and array.dtype.kind in "biuf":
            return float(array.reshape(()))
    except (TypeError, ValueError):
        pass
    raise ValueError(
        f"Expected {monitor} in logs to be one number, to compare it with the best so far. Received: "
        f"{monitor}={value!r}"
    )


class MonitorCallback(CkptCallback):
    """Base of the callbacks that monitor a metric: ``ModelCheckpoint`` and ``EarlyStopping``.

    Holds ``monitor`` (a non-empty str), ``mode`` (Keras' rule: an unknown one warns and
    becomes ``"auto"``), ``min_delta`` (kept positive; Keras negates it in ``"min"``
    mode) and :attr:`direction`, decided Keras' way when first needed
    (:meth:`decide_direction`) or set through ``monitor_op``.

    Whether a value improves is decided by a :class:`ckptmgr.MetricTracker` of that
    direction and ``min_delta``, and by nothing else: for ``ModelCheckpoint`` the
    tracker of its :class:`ckptmgr.CheckpointManager` (``save_best_only`` is the
    manager's ``best_only``), for ``EarlyStopping`` one of its own
    (:meth:`new_tracker`). ``monitor_op`` reads as Keras' (``keras.ops.less`` or
    ``keras.ops.greater``) for code that inspects it; it decides nothing.
    """

    def __init__(self, monitor: str, mode: str, min_delta: object = 0) -> None:
        super().__init__()
        # What the MetricTracker will require, checked now rather than at the first epoch end.
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"Expected monitor to be a non-empty str. Received: monitor={monitor!r}")
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, (int, float, np.integer, np.floating))
            or not math.isfinite(min_delta)
        ):
            raise ValueError(f"Expected min_delta to be a finite number. Received: min_delta={min_delta!r}")
        self.monitor: str = monitor
        # Warns at the line that built the callback: check_mode < here < subclass __init__ < caller.
        self.mode: str = check_mode(type(self).__name__, mode, stacklevel=4)
        self.min_delta: float = abs(float(min_delta))
        self._direction: Direction | None = None

    @property
    def direction(self) -> Direction | None:
        """``"min"`` or ``"max"``: which way ``monitor`` improves; None until decided."""
        return self._direction

    @direction.setter
    def direction(self, direction: Direction | None) -> None:
        if direction not in (None, "min", "max"):
            raise ValueError(f"Expected direction to be 'min', 'max' or None. Received: direction={direction!r}")
        self._set_direction(direction, f"direction={direction!r}")

    def _set_direction(self, direction: Direction | None, received: str = "") -> None:
        """Every change of the direction goes through here (``received``: what the user set, for
        error messages); subclasses keep what depends on it in step."""
        self._direction = direction

    @property
    def monitor_op(self) -> MonitorOp | None:
        """Keras' ``monitor_op``: the comparator of :attr:`direction` (None until it is decided).

        Setting it (to ``keras.ops.less``/``greater``, NumPy's ``np.less``/``np.greater``,
        or None to decide again at the next epoch end) sets the direction.
        """
        return monitor_op_of(self._direction)

    @monitor_op.setter
    def monitor_op(self, op: MonitorOp | None) -> None:
        self._set_direction(direction_of_op(type(self).__name__, op), f"monitor_op={op!r}")

    def decide_direction(self, *, required: bool) -> Direction | None:
        """The direction, decided now (Keras' way) if it is not yet.

        Raises:
            ValueError: ``required`` and it cannot be told (Keras' wording first).
        """
        if self._direction is None:
            direction = resolve_direction(self.monitor, self.mode, self.model)
            if direction is not None:
                self._set_direction(direction)
        if self._direction is None and required:
            raise direction_error(type(self).__name__, self.monitor)
        return self._direction

    def new_tracker(self, direction: Direction) -> ckptmgr.MetricTracker:
        """A :class:`ckptmgr.MetricTracker` of ``monitor`` in ``direction`` with this ``min_delta``."""
        return ckptmgr.MetricTracker(self.monitor, mode=direction, min_delta=abs(float(self.min_delta)))
