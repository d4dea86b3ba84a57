"""MetricTracker: direction, min_delta, baseline, non-finite values, patience, state."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptmgr import CheckpointWarning, MetricTracker
from ckptmgr.metrics import infer_mode, resolve_mode


@pytest.mark.parametrize(
    ("monitor", "mode"),
    [
        ("loss", "min"), ("val_loss", "min"), ("train_loss", "min"), ("mse", "min"), ("val_mae", "min"),
        ("mean_absolute_error", "min"), ("error_rate", "min"), ("perplexity", "min"), ("val_rmse", "min"),
        ("cross_entropy", "min"), ("kl_divergence", "min"), ("wer", "min"), ("val/loss", "min"),
        ("Val_Loss", "min"), ("acc_loss", "min"),  # loss-like names win
        ("acc", "max"), ("val_acc", "max"), ("accuracy", "max"), ("val_accuracy", "max"), ("auc", "max"),
        ("val_AUC", "max"), ("precision", "max"), ("recall", "max"), ("f1", "max"), ("f1_score", "max"),
        ("top_k_categorical_accuracy", "max"), ("mean_iou", "max"), ("bleu", "max"), ("eval_reward", "max"),
        ("test_map", "max"), ("r2", "max"), ("r2_score", "max"), ("roc_auc_score", "max"),
        ("val_brier_score", "min"), ("val_energy_score", "min"), ("val_score", "max"),
    ],
)
def test_auto_mode_is_inferred_from_the_name(monitor: str, mode: str) -> None:
    assert infer_mode(monitor) == mode
    assert resolve_mode(monitor, "auto") == mode
    assert MetricTracker(monitor).mode == mode


@pytest.mark.parametrize("monitor", ["lr", "throughput", "epoch_time", "val_foo", "x"])
def test_ambiguous_names_ask_for_an_explicit_mode(monitor: str) -> None:
    with pytest.raises(ValueError, match=r"^Expected mode='min' or mode='max'.*Received: monitor="):
        MetricTracker(monitor)
    assert MetricTracker(monitor, mode="max").mode == "max"


@pytest.mark.parametrize(
    ("kwargs", "received"),
    [
        pytest.param({"monitor": ""}, "monitor=''", id="empty-monitor"),
        pytest.param({"monitor": None}, "monitor=None", id="none-monitor"),
        pytest.param({"monitor": "loss", "mode": "smallest"}, "mode='smallest'", id="bad-mode"),
        pytest.param({"monitor": "loss", "min_delta": -0.1}, "min_delta=-0.1", id="negative-min-delta"),
        pytest.param({"monitor": "loss", "min_delta": math.nan}, "min_delta=nan", id="nan-min-delta"),
        pytest.param({"monitor": "loss", "min_delta": "0"}, "min_delta='0'", id="str-min-delta"),
        pytest.param({"monitor": "loss", "baseline": math.inf}, "baseline=inf", id="inf-baseline"),
        pytest.param({"monitor": "loss", "baseline": "1"}, "baseline='1'", id="str-baseline"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict[str, Any], received: str) -> None:
    monitor = kwargs.pop("monitor")
    with pytest.raises(ValueError, match=r"^Expected .*Received: ") as excinfo:
        MetricTracker(monitor, **kwargs)
    assert received in str(excinfo.value)


def run(tracker: MetricTracker, values: list[float | None]) -> list[bool]:
    return [tracker.update(step, value) for step, value in enumerate(values, 1)]


@pytest.mark.parametrize(
    ("kwargs", "values", "improved", "best", "best_step", "wait"),
    [
        pytest.param({"mode": "min"}, [0.5, 0.4, 0.45, 0.4, 0.3], [True, True, False, False, True], 0.3, 5, 0,
                     id="min-equal-is-not-better"),
        pytest.param({"mode": "max"}, [0.5, 0.4, 0.6, 0.6], [True, False, True, False], 0.6, 3, 1, id="max"),
        pytest.param({"mode": "min", "min_delta": 0.1}, [1.0, 0.95, 0.91, 0.89, 0.85],
                     [True, False, False, True, False], 0.89, 4, 1, id="min-delta-min"),
        pytest.param({"mode": "max", "min_delta": 0.1}, [0.5, 0.55, 0.61], [True, False, True], 0.61, 3, 0,
                     id="min-delta-max"),
        pytest.param({"mode": "min", "baseline": 0.5}, [0.9, 0.5, 0.49, 0.6], [False, False, True, False], 0.49, 3,
                     1, id="baseline-must-be-beaten"),
        pytest.param({"mode": "max", "baseline": 0.8, "min_delta": 0.05}, [0.84, 0.86, 0.9], [False, True, False],
                     0.86, 2, 1, id="baseline-with-min-delta"),
        pytest.param({"mode": "min"}, [None, 0.5, None, 0.6], [False, True, False, False], 0.5, 2, 1,
                     id="missing-values-change-nothing"),
    ],
)
def test_update_table(kwargs: dict[str, Any], values: list[float | None], improved: list[bool], best: float,
                      best_step: int, wait: int) -> None:
    tracker = MetricTracker("m", **kwargs)
    assert run(tracker, values) == improved
    assert (tracker.best, tracker.best_step, tracker.wait) == (best, best_step, wait)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_non_finite_values_never_improve_and_warn(bad: float, mode: str) -> None:
    tracker = MetricTracker("m", mode=mode)  # type: ignore[arg-type]
    with pytest.warns(CheckpointWarning, match=r"m=.* at step 1 is not finite"):
        assert tracker.update(1, bad) is False
    assert (tracker.best, tracker.best_step, tracker.wait) == (None, None, 1)
    assert tracker.update(2, 0.5) is True
    with pytest.warns(CheckpointWarning, match="step 3"):
        assert tracker.update(3, bad) is False
    assert (tracker.best, tracker.best_step, tracker.wait) == (0.5, 2, 1)
    assert tracker.would_improve(bad) is False


def test_would_improve_changes_nothing() -> None:
    tracker = MetricTracker("val_loss")
    tracker.update(1, 0.5)
    before = tracker.state_dict()
    assert tracker.would_improve(0.4) is True
    assert tracker.would_improve(0.6) is False
    assert tracker.would_improve(None) is False
    assert tracker.state_dict() == before


def test_numpy_scalars_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    tracker = MetricTracker("val_loss")
    assert tracker.update(1, np.float32(0.5)) is True
    assert type(tracker.best) is float


@settings(max_examples=150, deadline=None)
@given(
    first=st.lists(st.floats(-1e6, 1e6) | st.none(), max_size=15),
    rest=st.lists(st.floats(-1e6, 1e6) | st.none(), max_size=15),
    mode=st.sampled_from(["min", "max"]),
    min_delta=st.sampled_from([0.0, 0.5, 10.0]),
    baseline=st.none() | st.floats(-1e3, 1e3),
)
def test_state_dict_round_trip_continues_identically(first: list[float | None], rest: list[float | None], mode: str,
                                                     min_delta: float, baseline: float | None) -> None:
    """A tracker restored from a (JSON-serialised) snapshot behaves exactly like the original."""
    original = MetricTracker("score", mode=mode, min_delta=min_delta, baseline=baseline)  # type: ignore[arg-type]
    run(original, first)
    snapshot = json.loads(json.dumps(original.state_dict()))
    restored = MetricTracker("score", mode=mode, min_delta=min_delta, baseline=baseline)  # type: ignore[arg-type]
    assert restored.load_state_dict(snapshot) is True
    assert restored.state_dict() == original.state_dict()
    steps = range(len(first) + 1, len(first) + 1 + len(rest))
    assert [restored.update(s, v) for s, v in zip(steps, rest, strict=True)] == [
        original.update(s, v) for s, v in zip(steps, rest, strict=True)
    ]
    assert restored.state_dict() == original.state_dict()


@pytest.mark.parametrize(
    "snapshot",
    [
        pytest.param({"monitor": "other", "mode": "min", "best": 1.0, "best_step": 1, "wait": 0}, id="other-metric"),
        pytest.param({"monitor": "val_loss", "mode": "max", "best": 1.0, "best_step": 1, "wait": 0}, id="other-mode"),
        pytest.param({"monitor": "val_loss", "mode": "min", "best": "x", "best_step": 1, "wait": 0}, id="bad-best"),
        pytest.param({"monitor": "val_loss", "mode": "min", "best": math.nan, "best_step": 1, "wait": 0},
                     id="nan-best"),
        pytest.param({"monitor": "val_loss", "mode": "min", "best": 1.0, "best_step": "1", "wait": 0},
                     id="bad-step"),
        pytest.param({"monitor": "val_loss", "mode": "min", "best": 1.0, "best_step": 1, "wait": -1},
                     id="negative-wait"),
        pytest.param({"monitor": "val_loss", "mode": "min", "best": 1.0, "best_step": 1}, id="no-wait"),
        pytest.param(["val_loss"], id="not-a-dict"),
    ],
)
def test_load_state_dict_refuses_other_or_malformed_snapshots(snapshot: Any) -> None:
    tracker = MetricTracker("val_loss")
    tracker.update(1, 0.5)
    before = tracker.state_dict()
    assert tracker.load_state_dict(snapshot) is False
    assert tracker.state_dict() == before
