"""EarlyStopping: keras.callbacks.EarlyStopping whose state survives a kill."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ._keras_base import (
    CkptCallback,
    Direction,
    MonitorOp,
    check_mode,
    direction_error,
    direction_of_op,
    improved,
    monitor_op_of,
    print_msg,
    resolve_direction,
)


class EarlyStopping(CkptCallback):
    """Stop training when a monitored metric has stopped improving.

    A drop-in for ``keras.callbacks.EarlyStopping``: the same arguments, defaults and
    decisions (the same stopping epoch, the same restored weights, on the same run).
    Used in the same ``fit()`` as :class:`ckptmgr.adapters.keras.BackupAndRestore`,
    its state (patience count, best value and epoch, best weights, stopped epoch) is
    saved in every backup and restored with it, so a run killed and resumed stops at
    the same epoch, with the same weights, as one that never stopped.

    Example:

    >>> import keras, numpy as np
    >>> from ckptmgr.adapters.keras import EarlyStopping
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    >>> callback = EarlyStopping(monitor="loss", patience=2, min_delta=10.0)
    >>> history = model.fit(np.ones((8, 1)), np.ones((8, 1)), epochs=10, callbacks=[callback], verbose=0)
    >>> len(history.history["loss"]), callback.stopped_epoch
    (3, 2)

    Args:
        monitor: the quantity to monitor, e.g. ``"val_loss"``.
        min_delta: the smallest change of ``monitor`` that counts as an improvement.
        patience: epochs without improvement after which training stops.
        verbose: 1 prints when it stops and when it restores weights.
        mode: ``"auto"``, ``"min"`` or ``"max"``; ``"auto"`` takes the direction from
            the metric (``loss`` is minimised; compiled metrics know their direction;
            otherwise it is inferred from the name).
        baseline: a value the metric must beat; until it does, patience runs out
            even though the metric improves.
        restore_best_weights: at the end of training, set the weights of the best
            epoch (of the epochs monitored).
        start_from_epoch: epochs to wait before monitoring starts.

    Attributes:
        monitor_op: Keras' comparator for the direction: ``keras.ops.less`` (``"min"``)
            or ``keras.ops.greater`` (``"max"``), None until the first epoch end decides
            it (as in Keras). It is the comparator that decides improvements; setting
            it (to one of those, NumPy's ``np.less``/``np.greater``, or None) sets the
            direction.
        direction: the same, as ``"min"``, ``"max"`` or None.

    Raises:
        ValueError: at the first epoch end, ``mode="auto"`` and the direction of
            ``monitor`` cannot be told.
    """

    state_kind = "EarlyStopping"

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ) -> None:
        super().__init__()
        self.monitor = monitor
        self.mode = check_mode(type(self).__name__, mode)
        self.min_delta = abs(min_delta)
        self.patience = patience
        self.verbose = verbose
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.direction: Direction | None = None
        self.wait = 0
        self.stopped_epoch = 0
        self.best: Any = baseline  # as in Keras, until on_train_begin
        self.best_weights: list[np.ndarray] | None = None
        self.best_epoch = 0

    @property
    def monitor_op(self) -> MonitorOp | None:
        """Keras' ``monitor_op``: the comparator of :attr:`direction` (None until it is decided)."""
        return monitor_op_of(self.direction)

    @monitor_op.setter
    def monitor_op(self, op: MonitorOp | None) -> None:
        self.direction = direction_of_op(type(self).__name__, op)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        # Like Keras, a new fit() starts over (a resumed one gets its state back below).
        self.wait = 0
        self.stopped_epoch = 0
        self.best = None
        self.best_weights = None
        self.best_epoch = 0

    def _handle_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        if self.direction is None:
            self.direction = resolve_direction(self.monitor, self.mode, self.model)
            if self.direction is None:
                raise direction_error(type(self).__name__, self.monitor)
        current = self.get_monitor_value(logs)
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            # Until something improves, the first monitored epoch is the best one.
            self.best_weights = self.model.get_weights()
            self.best_epoch = epoch
        self.wait += 1
        if improved(self.direction, current, self.best, self.min_delta):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            # Patience restarts only once the baseline, too, is beaten.
            if self.baseline is None or improved(self.direction, current, self.baseline, self.min_delta):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._sync()
        if self.stopped_epoch > 0 and self.verbose > 0:
            print_msg(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                print_msg(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self.model.set_weights(self.best_weights)

    def get_monitor_value(self, logs: dict[str, Any] | None) -> Any:
        """The monitored value in ``logs``, or None (with Keras' warning)."""
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            warnings.warn(
                f"Early stopping conditioned on metric `{self.monitor}` which is not available. "
                f"Available metrics are: {','.join(logs)}",
                stacklevel=2,
            )
        return value

    # ------------------------------------------------------------ backed-up state

    def callback_state(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "direction": self.direction,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "best": None if self.best is None else float(self.best),
            "best_epoch": self.best_epoch,
            "best_weights": None if self.best_weights is None else [np.asarray(w) for w in self.best_weights],
        }

    def load_callback_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("monitor") != self.monitor:
            warnings.warn(
                f"ckptmgr: the backup's EarlyStopping state is for monitor "
                f"{state.get('monitor') if isinstance(state, dict) else '?'!r}, not {self.monitor!r}; "
                "starting EarlyStopping afresh",
                stacklevel=5,
            )
            return
        if state.get("direction") in ("min", "max") and self.direction is None:
            self.direction = state["direction"]
        self.wait = int(state["wait"])
        self.stopped_epoch = int(state["stopped_epoch"])
        self.best = state["best"]
        self.best_epoch = int(state["best_epoch"])
        weights = state["best_weights"]
        self.best_weights = None if weights is None else [np.asarray(w) for w in weights]
