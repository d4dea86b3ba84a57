"""MetricTracker: which direction is better, the best value so far, and patience."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

from .errors import CheckpointWarning

Mode = Literal["auto", "min", "max"]
Direction = Literal["min", "max"]  # a resolved mode

# Brier and energy scores are better lower: loss-like, and loss-like names win over "score".
_MIN_HINTS = ("loss", "error", "err", "mse", "mae", "rmse", "mape", "msle", "perplexity", "ppl",
              "cer", "wer", "nll", "entropy", "distance", "divergence", "kl", "fid", "bpd", "brier", "energy")
_MAX_HINTS = ("acc", "auc", "precision", "recall", "f1", "fbeta", "iou", "dice", "bleu", "rouge",
              "map", "ndcg", "r2", "score", "reward", "return", "psnr", "ssim", "top_k", "topk",
              "correlation", "kappa", "hit", "mrr", "meteor", "spearman", "pearson", "coverage")


def infer_mode(monitor: str) -> Direction:
    """Infer whether smaller or larger is better from a metric name.

    Names are compared lower-cased, with a ``val_``/``train_``/``test_`` prefix removed.
    A name containing one of ``loss, error, err, mse, mae, rmse, mape, msle, perplexity,
    ppl, cer, wer, nll, entropy, distance, divergence, kl, fid, bpd, brier, energy`` is
    minimised; one containing ``acc, auc, precision, recall, f1, fbeta, iou, dice, bleu,
    rouge, map, ndcg, r2, score, reward, return, psnr, ssim, top_k, topk, correlation,
    kappa, hit, mrr, meteor, spearman, pearson, coverage`` is maximised. Loss-like names
    win (``"acc_loss"`` and ``"brier_score"`` are minimised). Anything else is ambiguous.

    >>> infer_mode("val_loss"), infer_mode("val_accuracy")
    ('min', 'max')

    Raises:
        ValueError: the name matches neither list; pass ``mode="min"`` or ``"max"``.
    """
    name = monitor.lower()
    for prefix in ("val_", "train_", "test_", "eval_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    parts = [p for p in name.replace("-", "_").replace("/", "_").replace(".", "_").split("_") if p]
    if any(h in name for h in _MIN_HINTS if len(h) > 3) or any(p in _MIN_HINTS for p in parts):
        return "min"
    if any(h in name for h in _MAX_HINTS if len(h) > 3) or any(
        p in _MAX_HINTS or p.startswith(("acc", "auc")) for p in parts
    ):
        return "max"
    raise ValueError(
        f"Expected mode='min' or mode='max' for a metric whose direction cannot be inferred "
        f"from its name. Received: monitor={monitor!r} with mode='auto'"
    )


def resolve_mode(monitor: str, mode: str) -> Direction:
    """``mode`` itself when it is "min"/"max"; inferred from ``monitor`` when "auto".

    Raises:
        ValueError: ``mode`` is not one of "auto", "min", "max", or cannot be inferred.
    """
    if mode == "min":
        return "min"
    if mode == "max":
        return "max"
    if mode != "auto":
        raise ValueError(f"Expected mode to be 'auto', 'min' or 'max'. Received: mode={mode!r}")
    return infer_mode(monitor)


def is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MetricTracker:
    """Tracks one monitored metric: the best value, the step it was seen at, and patience.

    ``update`` returns whether a value improves on the best by more than ``min_delta``
    (and beats ``baseline`` while nothing has been seen yet). Values that are NaN or
    infinite never improve (a :class:`CheckpointWarning` says so) but still count
    against patience. The state round-trips through :meth:`state_dict`, which the
    manager stores in every checkpoint so that a restarted job remembers its best.

    Example:

    >>> t = MetricTracker("val_loss", min_delta=0.01)
    >>> [t.update(step, v) for step, v in [(1, 0.5), (2, 0.495), (3, 0.4)]]
    [True, False, True]
    >>> t.best, t.best_step, t.wait
    (0.4, 3, 0)

    Args:
        monitor: the metric's name, e.g. ``"val_loss"``.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (see :func:`infer_mode`).
        min_delta: the smallest change that counts as an improvement (>= 0).
        baseline: a value to beat before anything counts as an improvement.

    Raises:
        ValueError: bad arguments, worded "Expected ... Received: ...".
    """

    def __init__(
        self, monitor: str, *, mode: Mode = "auto", min_delta: float = 0.0,
        baseline: float | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"Expected monitor to be a non-empty str. Received: monitor={monitor!r}")
        if not is_finite_number(min_delta) or min_delta < 0:
            raise ValueError(f"Expected min_delta to be a finite number >= 0. Received: min_delta={min_delta!r}")
        if baseline is not None and not is_finite_number(baseline):
            raise ValueError(f"Expected baseline to be a finite number or None. Received: baseline={baseline!r}")
        self.monitor = monitor
        self.mode: Direction = resolve_mode(monitor, mode)
        self.min_delta = float(min_delta)
        self.baseline = None if baseline is None else float(baseline)
        self.best: float | None = None
        self.best_step: int | None = None
        self.wait = 0

    def __repr__(self) -> str:
        return (f"MetricTracker({self.monitor!r}, mode={self.mode!r}, best={self.best!r}, "
                f"best_step={self.best_step!r}, wait={self.wait})")

    def is_better(self, value: float, reference: float | None) -> bool:
        """Whether ``value`` improves on ``reference`` (None: on the baseline, if any)."""
        if not math.isfinite(value):
            return False
        if reference is None:
            if self.baseline is None:
                return True
            reference = self.baseline
            # Keras' EarlyStopping: the baseline must be beaten, min_delta applies.
        if self.mode == "min":
            return value < reference - self.min_delta
        return value > reference + self.min_delta

    def would_improve(self, value: float | None) -> bool:
        """Whether ``update(step, value)`` would count as an improvement (no state change)."""
        return value is not None and self.is_better(float(value), self.best)

    def update(self, step: int, value: float | None) -> bool:
        """Record an observation; return True if it is a new best.

        ``None`` (the metric was not reported) leaves the state unchanged.
        """
        if value is None:
            return False
        value = float(value)
        if not math.isfinite(value):
            warnings.warn(
                f"ckptmgr: {self.monitor}={value} at step {step} is not finite; "
                "it never counts as an improvement",
                CheckpointWarning,
                stacklevel=3,
            )
        if self.is_better(value, self.best):
            self.best, self.best_step, self.wait = value, step, 0
            return True
        self.wait += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot of the tracker (configuration and state)."""
        return {"monitor": self.monitor, "mode": self.mode, "min_delta": self.min_delta,
                "baseline": self.baseline, "best": self.best, "best_step": self.best_step,
                "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Take over best/best_step/wait from a snapshot of a tracker of the same metric.

        Returns False (and changes nothing) when the snapshot is of another metric or
        direction, or is malformed.
        """
        if not isinstance(state, dict) or state.get("monitor") != self.monitor or state.get("mode") != self.mode:
            return False
        best, best_step, wait = state.get("best"), state.get("best_step"), state.get("wait")
        if best is not None and not is_finite_number(best):
            return False
        if best_step is not None and type(best_step) is not int:
            return False
        if type(wait) is not int or wait < 0:
            return False
        self.best = None if best is None else float(best)
        self.best_step, self.wait = best_step, wait
        return True
