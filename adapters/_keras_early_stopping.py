"""EarlyStopping: keras.callbacks.EarlyStopping whose state survives a kill."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

import ckptmgr

from ._keras_base import Direction, MonitorCallback, monitored_value, print_msg


class EarlyStopping(MonitorCallback):
    """Stop training when a monitored metric has stopped improving.

    A drop-in for ``keras.callbacks.EarlyStopping``: the same arguments, defaults and
    decisions (the same stopping epoch, the same restored weights, on the same run).
    Whether an epoch improves is decided by a :class:`ckptmgr.MetricTracker` of its
    own (:attr:`tracker`: the direction, ``min_delta``, the best value and the patience
    count ``wait``), the engine's comparator; ``baseline`` keeps Keras' meaning.
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
            it (as in Keras). It reads as Keras' but decides nothing (:attr:`tracker`
            does); setting it (to one of those, NumPy's ``np.less``/``np.greater``, or
            None) sets the direction.
        direction: the same, as ``"min"``, ``"max"`` or None.
        best, wait: the best value so far and the epochs monitored since the last
            improvement (that also beat ``baseline``): :attr:`tracker`'s.

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
        super().__init__(monitor, mode, min_delta)
        self.patience = patience
        self.verbose = verbose
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        # Holds best and wait from the start; its direction is a placeholder until the
        # real one is decided (_set_direction), and it decides nothing before.
        self._tracker = self.new_tracker("min")
        self.stopped_epoch = 0
        self.best = baseline  # as in Keras, until on_train_begin
        self.best_weights: list[np.ndarray] | None = None
        self.best_epoch = 0

    # ------------------------------------------------------------ the tracker

    @property
    def tracker(self) -> ckptmgr.MetricTracker | None:
        """The :class:`ckptmgr.MetricTracker` that decides improvements (None until the
        direction is decided). Its steps are 0-based epochs."""
        return self._tracker if self.direction is not None else None

    def _set_direction(self, direction: Direction | None, received: str = "") -> None:
        super()._set_direction(direction)
        self._sync_tracker()

    def _sync_tracker(self) -> ckptmgr.MetricTracker:
        """The tracker, made anew (keeping its best and wait) if the direction, ``monitor``
        or ``min_delta`` changed since it was made."""
        old = self._tracker
        direction = self.direction or old.mode
        if (old.monitor, old.mode, old.min_delta) != (self.monitor, direction, abs(float(self.min_delta))):
            self._tracker = self.new_tracker(direction)
            self._tracker.best, self._tracker.best_step, self._tracker.wait = old.best, old.best_step, old.wait
        return self._tracker

    @property
    def best(self) -> float | None:
        """The best value of ``monitor`` so far (None: nothing monitored yet)."""
        return self._tracker.best

    @best.setter
    def best(self, value: float | None) -> None:
        self._tracker.best = None if value is None else float(value)

    @property
    def wait(self) -> int:
        """Epochs monitored since the last improvement that also beat ``baseline``."""
        return self._tracker.wait

    @wait.setter
    def wait(self, value: int) -> None:
        self._tracker.wait = int(value)

    # ------------------------------------------------------------ events

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        # Like Keras, a new fit() starts over (a resumed one gets its state back below).
        self.wait = 0
        self.stopped_epoch = 0
        self.best = None
        self._tracker.best_step = None
        self.best_weights = None
        self.best_epoch = 0

    def _handle_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        self.decide_direction(required=True)
        current = self.get_monitor_value(logs)
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            # Until something improves, the first monitored epoch is the best one.
            self.best_weights = self.model.get_weights()
            self.best_epoch = epoch
        tracker = self._sync_tracker()
        wait = tracker.wait
        value = monitored_value(self.monitor, current)
        if tracker.update(epoch, value):  # the one decision: better than the best by more than min_delta
            self.best_epoch = epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            # Patience restarts only once the baseline, too, is beaten (Keras' rule).
            if self.baseline is not None and not tracker.is_better(value, float(self.baseline)):
                tracker.wait = wait + 1
            return
        if tracker.wait >= self.patience and epoch > 0:
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
        self._tracker.best_step = None if self.best is None else self.best_epoch
        weights = state["best_weights"]
        self.best_weights = None if weights is None else [np.asarray(w) for w in weights]
