"""Save and retention policies, as tables: inputs -> decision / kept steps and reasons."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptmgr import (
    CheckpointInfo,
    EverySeconds,
    EverySteps,
    KeepBest,
    KeepEvery,
    KeepLast,
    OnImprovement,
    RetentionContext,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
)
from ckptmgr.policies import AllOf, AnyOf, AnyRetention

# ----------------------------------------------------------------------- save policies


def ctx(step: int, *, now: float = 0.0, last_step: int | None = None, last_time: float | None = None,
        improved: bool = False) -> SaveContext:
    return SaveContext(step=step, now=now, last_step=last_step, last_time=last_time, improved=improved)


SAVE_TABLE = [
    # EverySteps: multiples of n, or a multiple passed since the last checkpoint.
    pytest.param(EverySteps(10), ctx(0), True, id="steps10-first-step0"),
    pytest.param(EverySteps(10), ctx(5), False, id="steps10-first-step5"),
    pytest.param(EverySteps(10), ctx(10), True, id="steps10-first-step10"),
    pytest.param(EverySteps(10), ctx(15), True, id="steps10-first-step15-past-a-multiple"),
    pytest.param(EverySteps(10), ctx(10, last_step=0), True, id="steps10-10-after-0"),
    pytest.param(EverySteps(10), ctx(19, last_step=10), False, id="steps10-19-after-10"),
    pytest.param(EverySteps(10), ctx(20, last_step=10), True, id="steps10-20-after-10"),
    pytest.param(EverySteps(10), ctx(27, last_step=15), True, id="steps10-27-after-15-skipped-over-20"),
    pytest.param(EverySteps(10), ctx(15, last_step=10), False, id="steps10-15-after-10"),
    pytest.param(EverySteps(10), ctx(10, last_step=10), False, id="steps10-same-step-again"),
    pytest.param(EverySteps(1), ctx(3, last_step=2), True, id="steps1-every-step"),
    # EverySeconds: since the last save of the session (or its start).
    pytest.param(EverySeconds(60), ctx(1, now=100.0), True, id="seconds60-no-reference"),
    pytest.param(EverySeconds(60), ctx(1, now=130.0, last_time=100.0), False, id="seconds60-after-30s"),
    pytest.param(EverySeconds(60), ctx(1, now=160.0, last_time=100.0), True, id="seconds60-after-60s-exactly"),
    pytest.param(EverySeconds(60), ctx(1, now=400.0, last_time=100.0), True, id="seconds60-after-300s"),
    pytest.param(EverySeconds(0.5), ctx(1, now=100.4, last_time=100.0), False, id="seconds-fractional-early"),
    # OnImprovement: whatever the manager says "improved" is.
    pytest.param(OnImprovement(), ctx(3, improved=True), True, id="improvement-yes"),
    pytest.param(OnImprovement(), ctx(3, improved=False), False, id="improvement-no"),
    # | is any, & is all.
    pytest.param(EverySteps(10) | OnImprovement(), ctx(5, last_step=0, improved=True), True, id="or-improved"),
    pytest.param(EverySteps(10) | OnImprovement(), ctx(5, last_step=0), False, id="or-neither"),
    pytest.param(EverySteps(10) | OnImprovement(), ctx(10, last_step=0), True, id="or-schedule"),
    pytest.param(EverySteps(10) & OnImprovement(), ctx(10, last_step=0), False, id="and-schedule-only"),
    pytest.param(EverySteps(10) & OnImprovement(), ctx(5, last_step=0, improved=True), False, id="and-improved-only"),
    pytest.param(EverySteps(10) & OnImprovement(), ctx(10, last_step=0, improved=True), True, id="and-both"),
    pytest.param(EverySteps(100) | EverySeconds(60), ctx(50, now=200.0, last_step=0, last_time=100.0), True,
                 id="steps-or-seconds-time-first"),
    pytest.param(EverySteps(100) | EverySeconds(60), ctx(50, now=120.0, last_step=0, last_time=100.0), False,
                 id="steps-or-seconds-neither"),
    pytest.param((EverySteps(100) | EverySeconds(60)) & OnImprovement(),
                 ctx(50, now=200.0, last_step=0, last_time=100.0, improved=True), True, id="nested-all-true"),
    pytest.param((EverySteps(100) | EverySeconds(60)) & OnImprovement(),
                 ctx(50, now=200.0, last_step=0, last_time=100.0), False, id="nested-not-improved"),
]


@pytest.mark.parametrize(("policy", "context", "expected"), SAVE_TABLE)
def test_save_policy_table(policy: SavePolicy, context: SaveContext, expected: bool) -> None:
    assert isinstance(policy, SavePolicy)
    assert policy.should_save(context) is expected


def test_composition_flattens_and_keeps_order() -> None:
    a, b, c = EverySteps(1), EverySeconds(2), OnImprovement()
    assert (a | b) | c == AnyOf((a, b, c))
    assert a | (b | c) == AnyOf((a, b, c))
    assert (a & b) & c == AllOf((a, b, c))
    # Mixed operators nest instead of flattening.
    assert (a | b) & c == AllOf((AnyOf((a, b)), c))
    assert (KeepLast(1) | KeepBest(2)) | KeepEvery(steps=3) == AnyRetention(
        (KeepLast(1), KeepBest(2), KeepEvery(steps=3))
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(lambda: EverySteps(1) | KeepLast(1), "Expected a save policy", id="save-or-retention"),
        pytest.param(lambda: EverySteps(1) & 3, "Expected a save policy", id="save-and-int"),
        pytest.param(lambda: KeepLast(1) | EverySteps(1), "Expected a retention policy", id="retention-or-save"),
        pytest.param(lambda: KeepLast(1) | "x", "Expected a retention policy", id="retention-or-str"),
    ],
)
def test_mixing_policy_kinds_is_a_type_error(make: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        make()


# ------------------------------------------------------------------ retention policies


def infos(*specs: tuple[int, dict[str, float]] | tuple[int, dict[str, float], float] | int) -> list[CheckpointInfo]:
    """Checkpoint records: ``step`` or ``(step, metrics)`` or ``(step, metrics, time)``."""
    out = []
    for spec in specs:
        if isinstance(spec, int):
            spec = (spec, {})
        step, metrics, *time = spec
        out.append(CheckpointInfo(step, f"ckpt-{step}", metrics, time[0] if time else float(step)))
    return out


MIN_LOSS = RetentionContext(now=0.0, monitor="val_loss", mode="min")
LOSSES = infos((1, {"val_loss": 0.5}), (2, {"val_loss": 0.3}), (3, {"val_loss": 0.4}), (4, {"val_loss": 0.3}),
               (5, {"val_loss": math.nan}), (6, {}), (7, {"val_loss": 0.6, "acc": 0.9}))
NO_MONITOR = RetentionContext()
H = 3600.0

RETENTION_TABLE = [
    pytest.param(KeepLast(2), infos(1, 2, 3, 4), NO_MONITOR, {3: ["last 2"], 4: ["last 2"]}, id="last2-of-4"),
    pytest.param(KeepLast(5), infos(1, 2, 3), NO_MONITOR, {1: ["last 5"], 2: ["last 5"], 3: ["last 5"]},
                 id="last5-of-3"),
    pytest.param(KeepLast(1), [], NO_MONITOR, {}, id="last1-of-none"),
    pytest.param(KeepLast(1), infos(10, 20), NO_MONITOR, {20: ["last 1"]}, id="last1"),
    # Best: NaN and missing metrics are never ranked; ties go to the earlier step.
    pytest.param(KeepBest(2), LOSSES, MIN_LOSS, {2: ["best val_loss #1"], 4: ["best val_loss #2"]},
                 id="best2-min-tie-earlier-first"),
    pytest.param(KeepBest(10), LOSSES, MIN_LOSS,
                 {2: ["best val_loss #1"], 4: ["best val_loss #2"], 3: ["best val_loss #3"],
                  1: ["best val_loss #4"], 7: ["best val_loss #5"]}, id="best10-skips-nan-and-missing"),
    pytest.param(KeepBest(1, mode="max"), LOSSES, MIN_LOSS, {7: ["best val_loss #1"]}, id="best1-mode-override"),
    pytest.param(KeepBest(1, monitor="acc"), LOSSES, MIN_LOSS, {7: ["best acc #1"]}, id="best1-own-monitor-auto-max"),
    pytest.param(KeepBest(1, monitor="acc", mode="min"), LOSSES, NO_MONITOR, {7: ["best acc #1"]},
                 id="best1-own-monitor-without-manager-monitor"),
    pytest.param(KeepBest(3), LOSSES, NO_MONITOR, {}, id="best-without-any-monitor-keeps-nothing"),
    pytest.param(KeepBest(1), infos((1, {"val_loss": math.inf}), (2, {"val_loss": -math.inf})), MIN_LOSS, {},
                 id="best-never-ranks-infinities"),
    # Every n steps: the first checkpoint in each interval.
    pytest.param(KeepEvery(steps=10), infos(0, 5, 10, 12, 25, 31), NO_MONITOR,
                 {0: ["every 10 steps"], 10: ["every 10 steps"], 25: ["every 10 steps"], 31: ["every 10 steps"]},
                 id="every10steps"),
    pytest.param(KeepEvery(steps=1000), infos(0, 500, 1000, 1500, 2100), NO_MONITOR,
                 {0: ["every 1000 steps"], 1000: ["every 1000 steps"], 2100: ["every 1000 steps"]},
                 id="every1000steps-doc-example"),
    # Every n seconds of checkpoint time.
    pytest.param(KeepEvery(seconds=H), infos((1, {}, 0.0), (2, {}, 1800.0), (3, {}, 3600.0), (4, {}, 9000.0)),
                 NO_MONITOR, {1: ["every 1 h"], 3: ["every 1 h"], 4: ["every 1 h"]}, id="every-hour"),
    pytest.param(KeepEvery(seconds=120), infos((1, {}, 0.0), (2, {}, 119.0), (3, {}, 130.0)), NO_MONITOR,
                 {1: ["every 2 min"], 3: ["every 2 min"]}, id="every-2-min"),
    pytest.param(KeepEvery(seconds=90), infos((1, {}, 0.0), (2, {}, 95.0)), NO_MONITOR,
                 {1: ["every 90 s"], 2: ["every 90 s"]}, id="every-90-s"),
    pytest.param(KeepEvery(seconds=86400), infos((1, {}, 10.0), (2, {}, 86399.0), (3, {}, 86400.0)), NO_MONITOR,
                 {1: ["every 1 d"], 3: ["every 1 d"]}, id="every-day"),
    pytest.param(KeepEvery(seconds=100), infos((5, {}, 150.0), (6, {}, 120.0)), NO_MONITOR,
                 {6: ["every 100 s"]}, id="every-seconds-orders-by-time"),
    # | : kept if any policy keeps it; reasons merged in policy order.
    pytest.param(KeepLast(1) | KeepEvery(steps=20), infos(0, 10, 20, 30, 40), NO_MONITOR,
                 {40: ["last 1", "every 20 steps"], 0: ["every 20 steps"], 20: ["every 20 steps"]},
                 id="last1-or-every20"),
    pytest.param(KeepLast(2) | KeepBest(1), LOSSES, MIN_LOSS,
                 {6: ["last 2"], 7: ["last 2"], 2: ["best val_loss #1"]}, id="last2-or-best1"),
    pytest.param(KeepBest(1) | KeepLast(1) | KeepLast(1), infos((1, {"val_loss": 0.1}), (2, {"val_loss": 0.2})),
                 MIN_LOSS, {1: ["best val_loss #1"], 2: ["last 1"]}, id="duplicate-reasons-merged-once"),
    pytest.param(KeepBest(1) | KeepLast(1), infos((1, {"val_loss": 0.2}), (2, {"val_loss": 0.1})), MIN_LOSS,
                 {2: ["best val_loss #1", "last 1"]}, id="best-and-last-same-checkpoint"),
]


@pytest.mark.parametrize(("policy", "checkpoints", "context", "expected"), RETENTION_TABLE)
def test_retention_table(policy: RetentionPolicy, checkpoints: Sequence[CheckpointInfo], context: RetentionContext,
                         expected: dict[int, list[str]]) -> None:
    assert isinstance(policy, RetentionPolicy)
    kept = {step: list(reasons) for step, reasons in policy.keep(checkpoints, context).items()}
    assert kept == expected


# -------------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.integers(0, 500), min_size=1, max_size=30, unique=True).map(sorted),
    n=st.integers(1, 60),
    cut=st.integers(1, 30),
)
def test_keep_every_steps_never_changes_its_mind(steps: list[int], n: int, cut: int) -> None:
    """Later checkpoints never change which checkpoint an interval keeps."""
    records = infos(*steps)
    prefix = records[: min(cut, len(records))]
    policy = KeepEvery(steps=n)
    full = set(policy.keep(records, NO_MONITOR))
    partial = set(policy.keep(prefix, NO_MONITOR))
    assert partial == full & {c.step for c in prefix}
    # One per interval, and the first of it.
    assert len(full) == len({s // n for s in steps})
    assert all(min(s for s in steps if s // n == k // n) == k for k in full)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)), min_size=0, max_size=20),
    n=st.integers(1, 5),
    last=st.integers(1, 5),
    mode=st.sampled_from(["min", "max"]),
)
def test_last_or_best_keeps_exactly_the_union(values: list[float | None], n: int, last: int, mode: str) -> None:
    records = infos(*[(i, {} if v is None else {"m": v}) for i, v in enumerate(values)])
    context = RetentionContext(monitor="m", mode=mode)  # type: ignore[arg-type]
    kept = set((KeepLast(last) | KeepBest(n)).keep(records, context))
    finite = [(v, i) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    ranked = sorted(finite, key=lambda t: (t[0] if mode == "min" else -t[0], t[1]))
    expected = {i for _, i in ranked[:n]} | set(range(len(values))[-last:])
    assert kept == expected


# -------------------------------------------------------------------- validation


INVALID = [
    pytest.param(lambda: EverySteps(0), "n=0", id="EverySteps-0"),
    pytest.param(lambda: EverySteps(-5), "n=-5", id="EverySteps-negative"),
    pytest.param(lambda: EverySteps(2.5), "n=2.5", id="EverySteps-float"),
    pytest.param(lambda: EverySteps(True), "n=True", id="EverySteps-bool"),
    pytest.param(lambda: EverySteps("10"), "n='10'", id="EverySteps-str"),
    pytest.param(lambda: EverySeconds(0), "seconds=0", id="EverySeconds-0"),
    pytest.param(lambda: EverySeconds(-1.0), "seconds=-1.0", id="EverySeconds-negative"),
    pytest.param(lambda: EverySeconds(math.nan), "seconds=nan", id="EverySeconds-nan"),
    pytest.param(lambda: EverySeconds(math.inf), "seconds=inf", id="EverySeconds-inf"),
    pytest.param(lambda: EverySeconds(True), "seconds=True", id="EverySeconds-bool"),
    pytest.param(lambda: EverySeconds("60"), "seconds='60'", id="EverySeconds-str"),
    pytest.param(lambda: KeepLast(0), "n=0", id="KeepLast-0"),
    pytest.param(lambda: KeepLast(None), "n=None", id="KeepLast-None"),
    pytest.param(lambda: KeepBest(0), "n=0", id="KeepBest-0"),
    pytest.param(lambda: KeepBest(1, mode="up"), "mode='up'", id="KeepBest-bad-mode"),
    pytest.param(lambda: KeepBest(1, monitor=""), "monitor=''", id="KeepBest-empty-monitor"),
    pytest.param(lambda: KeepBest(1, monitor="throughput"), "monitor='throughput'", id="KeepBest-ambiguous-monitor"),
    pytest.param(lambda: KeepBest(1, monitor="acc", mode="best"), "mode='best'", id="KeepBest-monitor-bad-mode"),
    pytest.param(lambda: KeepEvery(), "steps=None, seconds=None", id="KeepEvery-neither"),
    pytest.param(lambda: KeepEvery(steps=10, seconds=60), "steps=10, seconds=60", id="KeepEvery-both"),
    pytest.param(lambda: KeepEvery(steps=0), "steps=0", id="KeepEvery-steps-0"),
    pytest.param(lambda: KeepEvery(steps=1.5), "steps=1.5", id="KeepEvery-steps-float"),
    pytest.param(lambda: KeepEvery(seconds=-1), "seconds=-1", id="KeepEvery-seconds-negative"),
    pytest.param(lambda: KeepEvery(seconds=math.inf), "seconds=inf", id="KeepEvery-seconds-inf"),
]


@pytest.mark.parametrize(("make", "received"), INVALID)
def test_bad_arguments_raise_value_error_expected_received(make: Any, received: str) -> None:
    with pytest.raises(ValueError, match=r"^Expected .*Received: ") as excinfo:
        make()
    assert received in str(excinfo.value)


def test_policies_are_immutable_values() -> None:
    policy = EverySteps(10)
    with pytest.raises(AttributeError):
        policy.n = 5  # type: ignore[misc]
    assert EverySeconds(60) == EverySeconds(60.0)
    assert hash(KeepLast(3)) == hash(KeepLast(3))
