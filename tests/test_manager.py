"""CheckpointManager through its public API, on real files in tmp_path."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest
from _trees import assert_tree_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptmgr
from ckptmgr import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWarning,
    EverySeconds,
    EverySteps,
    FilePayload,
    KeepBest,
    KeepEvery,
    KeepLast,
    MissingMetricWarning,
    OnImprovement,
)
from ckptmgr import codec as codec_module


def state_of(step: int) -> dict[str, Any]:
    return {"step": step, "w": np.full((3, 4), step, dtype=np.float32), "hist": [step, (str(step), b"s")]}


def steps_of(mgr: CheckpointManager) -> list[int]:
    return [c.step for c in mgr.checkpoints]


def reasons_of(mgr: CheckpointManager) -> dict[int, tuple[str, ...]]:
    return {c.step: c.keep_reasons for c in mgr.checkpoints}


class FakeClock(Protocol):
    """The ``clock`` fixture (conftest.py): a clock the test moves by hand."""

    now: float

    def __call__(self) -> float: ...

    def advance(self, seconds: float) -> float: ...


OnDisk = Callable[[Path], list[int]]


@pytest.fixture(scope="session")
def on_disk(checkpoint_files: Callable[[Path], list[str]]) -> OnDisk:
    """``on_disk(directory)``: the steps of the native checkpoint files in it, sorted."""
    return lambda directory: [int(name[5:-3]) for name in checkpoint_files(directory)]


@pytest.fixture
def open_manager(ckpt_dir: Path, clock: FakeClock) -> Iterator[Callable[..., CheckpointManager]]:
    """``open_manager(**kwargs)``: a writer on ``ckpt_dir`` with the fake clock, closed at the end."""
    opened: list[CheckpointManager] = []

    def factory(**kwargs: Any) -> CheckpointManager:
        kwargs.setdefault("clock", clock)
        mgr = CheckpointManager(ckpt_dir, **kwargs)
        opened.append(mgr)
        return mgr

    yield factory
    for mgr in opened:
        mgr.close()


# ----------------------------------------------------------------- save and restore


def test_save_restore_latest_best_checkpoints(ckpt_dir: Path, clock: FakeClock, on_disk: OnDisk) -> None:
    assert not ckpt_dir.exists()
    with CheckpointManager(ckpt_dir, monitor="val_loss", clock=clock) as mgr:
        assert ckpt_dir.is_dir()
        assert (mgr.latest, mgr.best, mgr.checkpoints) == (None, None, [])
        infos = []
        for step, loss in [(10, 0.5), (20, 0.2), (30, 0.4)]:
            clock.advance(7)
            infos.append(mgr.save(step, state_of(step), metrics={"val_loss": loss, "acc": 1 - loss}))
        info = infos[-1]
        assert info is not None
        assert info.step == 30
        assert info.path == ckpt_dir / "ckpt-000000030.h5" and info.path.is_file()
        assert info.metrics == {"val_loss": 0.4, "acc": 0.6}
        assert info.time == clock.now
        assert info.nbytes == 12 * 4 + 8 + 8 + 2 + 1  # w, step, hist[0], "30", b"s": bytes of data
        assert steps_of(mgr) == [10, 20, 30]
        assert mgr.latest == mgr.checkpoints[-1] and mgr.latest.step == 30
        assert mgr.best is not None and mgr.best.step == 20
        assert_tree_equal(mgr.restore(), state_of(30))
        assert_tree_equal(mgr.restore("latest"), state_of(30))
        assert_tree_equal(mgr.restore("best"), state_of(20))
        assert_tree_equal(mgr.restore(10), state_of(10))
        assert_tree_equal(mgr.restore(np.int64(20)), state_of(20))
    assert on_disk(ckpt_dir) == [10, 20, 30]


def test_restore_errors(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir) as mgr:
        with pytest.raises(CheckpointNotFoundError):
            mgr.restore()
        with pytest.raises(FileNotFoundError):  # also a builtin FileNotFoundError
            mgr.restore("latest")
        mgr.save(1, state_of(1))
        with pytest.raises(CheckpointNotFoundError, match="step 2"):
            mgr.restore(2)
        with pytest.raises(CheckpointNotFoundError, match="monitor"):
            mgr.restore("best")  # no monitor, no best
        for bad in ("first", True, 1.0, None):
            with pytest.raises(ValueError, match=r"^Expected which to be .* Received: which="):
                mgr.restore(bad)  # type: ignore[arg-type]


def test_saving_a_step_again_replaces_it(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(5, {"v": 1})
        mgr.save(5, {"v": 2})
        assert steps_of(mgr) == [5]
        assert mgr.restore() == {"v": 2}
    assert CheckpointManager(ckpt_dir, read_only=True).restore(5) == {"v": 2}


def test_restore_or_initialize(ckpt_dir: Path) -> None:
    calls = []

    def init() -> dict[str, Any]:
        calls.append(1)
        return state_of(0)

    with CheckpointManager(ckpt_dir) as mgr:
        assert_tree_equal(mgr.restore_or_initialize(init), state_of(0))
        assert calls == [1]
        mgr.save(4, state_of(4))
    with CheckpointManager(ckpt_dir) as mgr:
        assert_tree_equal(mgr.restore_or_initialize(init), state_of(4))
    assert calls == [1]


def test_context_manager_releases_the_lock_and_close_is_idempotent(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, {"a": 1})
    mgr.close()
    with pytest.raises(CheckpointError, match="closed"):
        mgr.save(2, {"a": 2})
    with CheckpointManager(ckpt_dir) as again:  # the lock was released
        assert steps_of(again) == [1]
    # An exception inside the block propagates; the lock is still released.
    with pytest.raises(RuntimeError, match="boom"), CheckpointManager(ckpt_dir) as mgr2:
        mgr2.save(2, {"a": 2})
        raise RuntimeError("boom")
    with CheckpointManager(ckpt_dir) as again:
        assert steps_of(again) == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "received"),
    [
        pytest.param({"save_every": 100}, "save_every=100", id="save_every-int"),
        pytest.param({"save_every": KeepLast(1)}, "save_every=KeepLast", id="save_every-retention"),
        pytest.param({"keep": 3}, "keep=3", id="keep-int"),
        pytest.param({"keep": EverySteps(1)}, "keep=EverySteps", id="keep-save-policy"),
        pytest.param({"monitor": ""}, "monitor=''", id="monitor-empty"),
        pytest.param({"monitor": 3}, "monitor=3", id="monitor-int"),
        pytest.param({"monitor": "val_loss", "mode": "down"}, "mode='down'", id="mode-bad"),
        pytest.param({"monitor": "speed"}, "monitor='speed'", id="mode-not-inferable"),
        pytest.param({"monitor": "val_loss", "min_delta": -1}, "min_delta=-1", id="min_delta-negative"),
        pytest.param({"monitor": "val_loss", "baseline": float("nan")}, "baseline=nan", id="baseline-nan"),
        pytest.param({"best_only": True}, "monitor=None", id="best_only-without-monitor"),
        pytest.param({"best_only": 1, "monitor": "val_loss"}, "best_only=1", id="best_only-int"),
        pytest.param({"async_save": "yes"}, "async_save='yes'", id="async_save-str"),
        pytest.param({"read_only": None}, "read_only=None", id="read_only-None"),
        pytest.param({"keep": KeepBest(1)}, "monitor=None", id="KeepBest-without-monitor"),
        pytest.param({"save_every": EverySteps(5) & OnImprovement()}, "monitor=None",
                     id="OnImprovement-without-monitor"),
    ],
)
def test_bad_constructor_arguments(ckpt_dir: Path, kwargs: dict[str, Any], received: str) -> None:
    with pytest.raises(ValueError, match=r"^Expected .*Received: ") as excinfo:
        CheckpointManager(ckpt_dir, **kwargs)
    assert received in str(excinfo.value)
    # Nothing is left locked.
    CheckpointManager(ckpt_dir).close()


@pytest.mark.parametrize("directory", ["", None, 3])
def test_bad_directory(directory: Any) -> None:
    with pytest.raises(ValueError, match=r"^Expected directory .*Received: directory="):
        CheckpointManager(directory)


@pytest.mark.parametrize(
    ("call", "received"),
    [
        pytest.param(lambda m: m.save(-1, {}), "step=-1", id="negative-step"),
        pytest.param(lambda m: m.save(1.0, {}), "step=1.0", id="float-step"),
        pytest.param(lambda m: m.save(True, {}), "step=True", id="bool-step"),
        pytest.param(lambda m: m.save("3", {}), "step='3'", id="str-step"),
        pytest.param(lambda m: m.save(1, {}, metrics={"a": "high"}), "metrics['a']='high'", id="metric-str"),
        pytest.param(lambda m: m.save(1, {}, metrics=[("a", 1.0)]), "metrics=[", id="metrics-list"),
        pytest.param(lambda m: m.save(1, {}, metrics={1: 1.0}), "metrics key 1", id="metric-key-int"),
        pytest.param(lambda m: m.save(1, {}, force="yes"), "force='yes'", id="force-str"),
        pytest.param(lambda m: m.should_save(-3), "step=-3", id="should_save-negative"),
    ],
)
def test_bad_save_arguments(ckpt_dir: Path, call: Callable[[CheckpointManager], Any], received: str) -> None:
    with CheckpointManager(ckpt_dir) as mgr:
        with pytest.raises(ValueError, match=r"^Expected .*Received: ") as excinfo:
            call(mgr)
        assert received in str(excinfo.value)
        assert mgr.checkpoints == []


def test_every_step_save_accepts_is_visible_after_reopening(ckpt_dir: Path) -> None:
    steps = [0, 10**9, 2**63 - 1, 10**20 - 1, 10**20]
    with CheckpointManager(ckpt_dir) as mgr:
        accepted = []
        for step in steps:
            try:
                mgr.save(step, {"s": step})
            except ValueError:
                continue
            accepted.append(step)
    with CheckpointManager(ckpt_dir) as mgr:
        assert steps_of(mgr) == accepted
        assert [mgr.restore(s)["s"] for s in accepted] == accepted


# ------------------------------------------------------------------- save policies


def run_saves(mgr: CheckpointManager, clock: FakeClock, steps: range, *, dt: float = 0.0,
              metrics: Callable[[int], dict[str, float]] | None = None) -> list[int]:
    """Call save() for every step (checking should_save agrees first); return the saved steps."""
    saved = []
    for step in steps:
        clock.advance(dt)
        m = metrics(step) if metrics else None
        predicted = mgr.should_save(step, m)
        info = mgr.save(step, {"step": step}, metrics=m)
        assert (info is not None) == predicted, f"should_save({step}) said {predicted}"
        if info is not None:
            saved.append(step)
    return saved


def test_every_steps(open_manager: Callable[..., CheckpointManager], clock: FakeClock) -> None:
    mgr = open_manager(save_every=EverySteps(10))
    assert run_saves(mgr, clock, range(0, 36)) == [0, 10, 20, 30]
    assert run_saves(mgr, clock, range(37, 60, 7)) == [44, 51]  # 44 passed 40, 51 passed 50


def test_every_steps_counts_from_the_last_checkpoint_after_a_restart(ckpt_dir: Path, clock: FakeClock) -> None:
    with CheckpointManager(ckpt_dir, save_every=EverySteps(10), clock=clock) as mgr:
        assert run_saves(mgr, clock, range(1, 25)) == [10, 20]
    with CheckpointManager(ckpt_dir, save_every=EverySteps(10), clock=clock) as mgr:
        assert run_saves(mgr, clock, range(21, 32)) == [30]


def test_every_seconds_uses_the_clock(open_manager: Callable[..., CheckpointManager], clock: FakeClock) -> None:
    mgr = open_manager(save_every=EverySeconds(60))
    # One save() call every 25 s: 75 s after the session start, then every 75 s.
    assert run_saves(mgr, clock, range(1, 10), dt=25) == [3, 6, 9]
    clock.advance(3600)
    assert run_saves(mgr, clock, range(10, 12), dt=1) == [10]


def test_steps_or_seconds(open_manager: Callable[..., CheckpointManager], clock: FakeClock) -> None:
    mgr = open_manager(save_every=EverySteps(100) | EverySeconds(60))
    saved = run_saves(mgr, clock, range(0, 10), dt=1)
    assert saved == [0]
    clock.advance(60)
    assert run_saves(mgr, clock, range(10, 12)) == [10]


def losses(values: dict[int, float]) -> Callable[[int], dict[str, float]]:
    return lambda step: {"val_loss": values[step]}


LOSS_CURVE = {0: 1.0, 1: 0.9, 2: 0.95, 3: 0.8, 4: 0.8, 5: 0.85, 6: 0.7, 7: 0.75, 8: 0.6, 9: 0.9}


def test_on_improvement(open_manager: Callable[..., CheckpointManager], clock: FakeClock) -> None:
    mgr = open_manager(save_every=OnImprovement(), monitor="val_loss")
    assert run_saves(mgr, clock, range(10), metrics=losses(LOSS_CURVE)) == [0, 1, 3, 6, 8]


def test_best_only_is_on_improvement(open_manager: Callable[..., CheckpointManager], clock: FakeClock) -> None:
    mgr = open_manager(best_only=True, monitor="val_loss")
    assert run_saves(mgr, clock, range(10), metrics=losses(LOSS_CURVE)) == [0, 1, 3, 6, 8]


def test_best_only_and_every_steps(open_manager: Callable[..., CheckpointManager], clock: FakeClock) -> None:
    mgr = open_manager(best_only=True, monitor="val_loss", save_every=EverySteps(2))
    # Improvements at 0, 1, 3, 6, 8; 1 is skipped (no 2-step boundary since 0), 3 passed 2.
    saved = run_saves(mgr, clock, range(10), metrics=losses(LOSS_CURVE))
    assert saved == [0, 3, 6, 8]


def test_min_delta_through_the_manager(open_manager: Callable[..., CheckpointManager], clock: FakeClock) -> None:
    mgr = open_manager(best_only=True, monitor="val_loss", min_delta=0.15)
    assert run_saves(mgr, clock, range(10), metrics=losses(LOSS_CURVE)) == [0, 3, 8]


def test_force_bypasses_the_policy(open_manager: Callable[..., CheckpointManager]) -> None:
    mgr = open_manager(save_every=EverySteps(1000), best_only=True, monitor="val_loss")
    mgr.save(0, {"a": 0}, metrics={"val_loss": 1.0})
    assert mgr.save(7, {"a": 7}, metrics={"val_loss": 2.0}) is None
    info = mgr.save(7, {"a": 7}, metrics={"val_loss": 2.0}, force=True)
    assert info is not None and info.step == 7
    with pytest.warns(CheckpointWarning, match="val_loss"):
        assert mgr.save(8, {"a": 8}, force=True) is not None  # even without the metric
    assert steps_of(mgr) == [0, 7, 8]


# ---------------------------------------------------------------------- retention


def test_retention_never_deletes_latest_or_best(ckpt_dir: Path, on_disk: OnDisk) -> None:
    with CheckpointManager(ckpt_dir, keep=KeepLast(2), monitor="val_loss") as mgr:
        mgr.save(1, state_of(1), metrics={"val_loss": 0.1})  # the best, forever
        for step in range(2, 8):
            mgr.save(step, state_of(step), metrics={"val_loss": 0.5 + step})
            assert 1 in steps_of(mgr) and step in steps_of(mgr)
        assert steps_of(mgr) == [1, 6, 7]
        assert reasons_of(mgr) == {1: ("best val_loss",), 6: ("last 2",), 7: ("latest", "last 2")}
        assert on_disk(ckpt_dir) == [1, 6, 7]
        assert_tree_equal(mgr.restore("best"), state_of(1))


def test_latest_is_protected_even_when_no_policy_keeps_it(ckpt_dir: Path, on_disk: OnDisk) -> None:
    with CheckpointManager(ckpt_dir, keep=KeepBest(1), monitor="val_loss") as mgr:
        mgr.save(1, {}, metrics={"val_loss": 0.1})
        mgr.save(2, {}, metrics={"val_loss": 0.5})
        mgr.save(3, {}, metrics={"val_loss": 0.7})
        assert reasons_of(mgr) == {1: ("best val_loss #1",), 3: ("latest",)}
    assert on_disk(ckpt_dir) == [1, 3]


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        pytest.param(None, {0: ("best val_loss", "keep all"), **{s: ("keep all",) for s in range(1, 9)},
                            9: ("latest", "keep all")}, id="keep-all"),
        pytest.param(KeepLast(3), {0: ("best val_loss",), 7: ("last 3",), 8: ("last 3",), 9: ("latest", "last 3")},
                     id="last3"),
        pytest.param(KeepBest(2) | KeepLast(1), {0: ("best val_loss #1",), 1: ("best val_loss #2",),
                                                 9: ("latest", "last 1")}, id="best2-or-last1"),
        pytest.param(KeepEvery(steps=4) | KeepLast(1),
                     {0: ("best val_loss", "every 4 steps"), 4: ("every 4 steps",), 8: ("every 4 steps",),
                      9: ("latest", "last 1")}, id="every4-or-last1"),
    ],
)
def test_keep_reasons(ckpt_dir: Path, keep: Any, expected: dict[int, tuple[str, ...]], on_disk: OnDisk) -> None:
    with CheckpointManager(ckpt_dir, keep=keep, monitor="val_loss") as mgr:
        for step in range(10):
            mgr.save(step, {"s": step}, metrics={"val_loss": float(step)})
        assert reasons_of(mgr) == expected
    assert on_disk(ckpt_dir) == sorted(expected)
    # A restarted writer with the same policies labels them the same way.
    with CheckpointManager(ckpt_dir, keep=keep, monitor="val_loss") as mgr:
        assert reasons_of(mgr) == expected


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(
    values=st.lists(st.one_of(st.none(), st.floats(0, 10), st.just(float("nan"))), min_size=1, max_size=12),
    last=st.integers(1, 3),
    best=st.integers(1, 2),
)
def test_retention_property(tmp_path_factory: pytest.TempPathFactory, on_disk: OnDisk, values: list[float | None],
                            last: int, best: int) -> None:
    """After every save: kept == KeepLast | KeepBest over everything saved so far, plus latest
    and best; the files on disk are exactly the ones listed, and each restores."""
    directory = tmp_path_factory.mktemp("prop")
    with CheckpointManager(directory, keep=KeepLast(last) | KeepBest(best), monitor="score", mode="max") as mgr:
        for step, value in enumerate(values):
            metrics = {} if value is None else {"score": value}
            if value is None:
                with pytest.warns(CheckpointWarning, match="score"):
                    mgr.save(step, {"s": step}, metrics=metrics)
            elif value != value:
                with pytest.warns(CheckpointWarning, match="not finite"):
                    mgr.save(step, {"s": step}, metrics=metrics)
            else:
                mgr.save(step, {"s": step}, metrics=metrics)
            seen = values[: step + 1]
            ranked = sorted(((-v, i) for i, v in enumerate(seen) if v is not None and v == v))
            expected = set(range(step + 1)[-last:]) | {i for _, i in ranked[:best]}
            assert set(steps_of(mgr)) == expected
            assert on_disk(directory) == sorted(expected)
            if ranked:
                assert mgr.best is not None and mgr.best.step == ranked[0][1]
        for step in steps_of(mgr):
            assert mgr.restore(step) == {"s": step}


# ------------------------------------------------------------- metric tracking


def test_restart_keeps_best_value_best_step_and_patience(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir, monitor="val_loss", keep=KeepLast(1)) as mgr:
        for step, loss in [(1, 0.5), (2, 0.3), (3, 0.4), (4, 0.45)]:
            mgr.save(step, {"s": step}, metrics={"val_loss": loss})
        assert mgr.tracker is not None
        assert (mgr.tracker.best, mgr.tracker.best_step, mgr.tracker.wait) == (0.3, 2, 2)
    with CheckpointManager(ckpt_dir, monitor="val_loss", best_only=True) as mgr:
        assert mgr.tracker is not None
        assert (mgr.tracker.best, mgr.tracker.best_step, mgr.tracker.wait) == (0.3, 2, 2)
        assert mgr.best is not None and mgr.best.step == 2
        # keras#17012: a restarted run must not take a worse model for a new best.
        assert mgr.save(5, {"s": 5}, metrics={"val_loss": 0.35}) is None
        assert mgr.tracker.wait == 3
        assert mgr.save(6, {"s": 6}, metrics={"val_loss": 0.25}) is not None
        assert (mgr.tracker.best, mgr.tracker.best_step, mgr.tracker.wait) == (0.25, 6, 0)


@pytest.mark.parametrize("which", [10, "best"])
def test_restoring_an_older_checkpoint_leaves_the_runs_best_and_patience_alone(
    ckpt_dir: Path, which: int | str,
) -> None:
    """Restoring step 10 (or the best) to look at it is no resume: the run goes on after
    step 30 with its own history; taking step 10's would make 0.9 a new best and let
    retention delete the real one (step 20)."""
    with CheckpointManager(ckpt_dir, monitor="val_loss", keep=KeepLast(1) | KeepEvery(steps=100)) as mgr:
        for step, loss in [(10, 1.0), (20, 0.5), (30, 0.8)]:
            mgr.save(step, {"s": step}, metrics={"val_loss": loss})
        assert mgr.tracker is not None
        history = mgr.tracker.state_dict()
        restored = mgr.restore(which)
        assert restored == {"s": 10 if which == 10 else 20}
        assert mgr.tracker.state_dict() == history
        mgr.save(40, {"s": 40}, metrics={"val_loss": 0.9})
        assert (mgr.tracker.best, mgr.tracker.best_step, mgr.tracker.wait) == (0.5, 20, 2)
        assert [c.step for c in mgr.checkpoints] == [10, 20, 40]  # 10: every 100 steps; 20: the best


def test_restoring_past_a_corrupt_newest_resumes_the_history_of_the_one_restored(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir, monitor="val_loss") as mgr:
        for step, loss in [(1, 0.5), (2, 0.3), (3, 0.2)]:
            mgr.save(step, {"s": step}, metrics={"val_loss": loss})
    newest = ckpt_dir / "ckpt-000000003.h5"
    newest.write_bytes(newest.read_bytes()[:-100])
    with CheckpointManager(ckpt_dir, monitor="val_loss") as mgr, pytest.warns(CheckpointWarning, match="corrupt"):
        assert mgr.restore() == {"s": 2}
        assert mgr.tracker is not None and (mgr.tracker.best, mgr.tracker.best_step) == (0.3, 2)


def test_a_schedule_resumed_past_a_corrupt_checkpoint_saves_that_step_again(ckpt_dir: Path) -> None:
    """Step 30 is corrupt: the run resumes at 20, and EverySteps(10) counts from there
    (it used to count from 30, leaving nothing good between 20 and 40)."""
    with CheckpointManager(ckpt_dir, save_every=EverySteps(10)) as mgr:
        for step in range(1, 31):
            mgr.save(step, {"s": step})
    newest = ckpt_dir / "ckpt-000000030.h5"
    newest.write_bytes(newest.read_bytes()[:-100])
    with CheckpointManager(ckpt_dir, save_every=EverySteps(10)) as mgr:
        with pytest.warns(CheckpointWarning, match="corrupt"):
            start = mgr.restore()["s"]
        assert start == 20
        saved = [step for step in range(start + 1, 41) if mgr.save(step, {"s": step}) is not None]
        assert saved == [30, 40]
        assert mgr.restore(30) == {"s": 30}


def test_restart_with_another_monitor_starts_a_new_best(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir, monitor="val_loss") as mgr:
        mgr.save(1, {}, metrics={"val_loss": 0.5, "val_acc": 0.7})
    with pytest.warns(CheckpointWarning, match="starting a new best"):
        mgr = CheckpointManager(ckpt_dir, monitor="val_acc")
    with mgr:
        assert mgr.tracker is not None and mgr.tracker.best is None
        assert mgr.best is not None and mgr.best.step == 1  # ranked by the metric it recorded


def test_missing_metric_warns_saves_and_is_never_best(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir, monitor="val_loss", keep=KeepBest(1) | KeepLast(1)) as mgr:
        mgr.save(1, {"s": 1}, metrics={"val_loss": 0.9})
        with pytest.warns(CheckpointWarning, match=r"save\(step=2\) got no 'val_loss' metric.*never ranked best"):
            info = mgr.save(2, {"s": 2}, metrics={"loss": 0.0})
        assert info is not None
        with pytest.warns(CheckpointWarning, match="val_loss"):
            mgr.save(3, {"s": 3})
        assert mgr.best is not None and mgr.best.step == 1
        assert steps_of(mgr) == [1, 3]
        assert mgr.restore("best") == {"s": 1}
        assert mgr.tracker is not None and (mgr.tracker.best_step, mgr.tracker.wait) == (1, 0)


def test_missing_metric_with_best_only_skips(open_manager: Callable[..., CheckpointManager]) -> None:
    mgr = open_manager(monitor="val_loss", best_only=True)
    with pytest.warns(CheckpointWarning, match="best_only needs it"):
        assert mgr.save(1, {"s": 1}, metrics={}) is None
    assert mgr.should_save(2, {}) is False
    assert mgr.checkpoints == []


def test_non_finite_metric_warns_and_is_never_best(open_manager: Callable[..., CheckpointManager]) -> None:
    mgr = open_manager(monitor="val_loss", keep=KeepLast(1))
    mgr.save(1, {"s": 1}, metrics={"val_loss": 0.5})
    with pytest.warns(CheckpointWarning, match="not finite"):
        mgr.save(2, {"s": 2}, metrics={"val_loss": float("nan")})
    with pytest.warns(CheckpointWarning, match="not finite"):
        mgr.save(3, {"s": 3}, metrics={"val_loss": float("-inf")})
    assert mgr.best is not None and mgr.best.step == 1
    assert steps_of(mgr) == [1, 3]


def test_best_honours_baseline(open_manager: Callable[..., CheckpointManager]) -> None:
    mgr = open_manager(monitor="val_loss", baseline=0.5)
    mgr.save(1, {"s": 1}, metrics={"val_loss": 0.9})
    assert mgr.tracker is not None and mgr.tracker.best is None
    assert mgr.best is None
    assert all(not r.startswith("best") for r in mgr.checkpoints[0].keep_reasons)


def test_best_agrees_with_the_tracker_under_min_delta(open_manager: Callable[..., CheckpointManager]) -> None:
    mgr = open_manager(monitor="val_loss", min_delta=0.1)
    mgr.save(1, {"s": 1}, metrics={"val_loss": 1.0})
    mgr.save(2, {"s": 2}, metrics={"val_loss": 0.95})  # not an improvement by min_delta
    assert mgr.tracker is not None and mgr.tracker.best_step == 1
    assert mgr.best is not None and mgr.best.step == mgr.tracker.best_step


# ------------------------------------------------------------------------ readers


def test_read_only_reader_alongside_a_writer(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir, monitor="val_loss") as writer:
        writer.save(1, state_of(1), metrics={"val_loss": 0.2})
        before = sorted(os.listdir(ckpt_dir))
        reader = CheckpointManager(ckpt_dir, read_only=True)
        assert steps_of(reader) == [1]
        writer.save(2, state_of(2), metrics={"val_loss": 0.4})
        # The reader sees what was committed after it opened.
        assert steps_of(reader) == [1, 2]
        assert_tree_equal(reader.restore(), state_of(2))
        assert_tree_equal(reader.restore("best"), state_of(1))  # adopts the writer's monitor
        with pytest.raises(CheckpointError, match="read-only"):
            reader.save(3, {})
        reader.close()
        assert sorted(os.listdir(ckpt_dir)) == sorted({*before, "ckpt-000000002.h5"})


def test_reader_writes_nothing(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir) as writer:
        writer.save(1, {"a": 1})
    leftover = ckpt_dir / ".ckpt-0123456789abcdef.tmp"
    leftover.write_bytes(b"partial")
    (ckpt_dir / ".ckptmgr-index.json").unlink()
    (ckpt_dir / ".ckptmgr.lock").unlink(missing_ok=True)
    before = {p.name: p.stat().st_mtime_ns for p in ckpt_dir.iterdir()}
    reader = CheckpointManager(ckpt_dir, read_only=True)
    assert reader.restore() == {"a": 1}
    reader.close()
    assert {p.name: p.stat().st_mtime_ns for p in ckpt_dir.iterdir()} == before


def test_read_only_on_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        CheckpointManager(tmp_path / "nothing", read_only=True)
    assert not (tmp_path / "nothing").exists()


# --------------------------------------------------------------- directory hygiene


def test_files_that_are_not_ours_are_never_deleted(ckpt_dir: Path) -> None:
    ckpt_dir.mkdir()
    foreign = ["notes.txt", "ckpt-1.h5", "ckpt-0000000001.h5", "ckpt-000000002.h5.bak", "ckpt-000000003.H5",
               ".ckpt-notours.tmp", ".ckpt-0123.tmp", "model.keras", "ckpt-00000000x.h5"]
    for name in foreign:
        (ckpt_dir / name).write_text("user data")
    (ckpt_dir / "ckpt-000000004.h5").mkdir()  # a directory with a checkpoint's name
    (ckpt_dir / "ckpt-000000004.h5" / "inside").write_text("x")
    outside = ckpt_dir.parent / "outside.h5"
    outside.write_text("outside")
    (ckpt_dir / "ckpt-000000005.h5").symlink_to(outside)
    with CheckpointManager(ckpt_dir, keep=KeepLast(1)) as mgr:
        assert mgr.checkpoints == []
        for step in range(10, 15):
            mgr.save(step, {"s": step})
        assert steps_of(mgr) == [14]
    for name in foreign:
        assert (ckpt_dir / name).read_text() == "user data", name
    assert (ckpt_dir / "ckpt-000000004.h5" / "inside").exists()
    assert (ckpt_dir / "ckpt-000000005.h5").is_symlink() and outside.read_text() == "outside"
    with CheckpointManager(ckpt_dir, read_only=True) as reader:
        assert steps_of(reader) == [14]


def test_leftover_temp_files_are_removed_on_the_next_open(ckpt_dir: Path, temp_files: Callable[[Path], list[str]]) -> None:
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, {"a": 1})
    leftovers = [".ckpt-0123456789abcdef.tmp", ".ckpt-fedcba9876543210.tmp"]
    for name in leftovers:
        (ckpt_dir / name).write_bytes(b"\x89HDF half a checkpoint")
    CheckpointManager(ckpt_dir, read_only=True).close()
    assert temp_files(ckpt_dir) == sorted(leftovers)  # readers leave them alone
    with CheckpointManager(ckpt_dir) as mgr:
        assert temp_files(ckpt_dir) == []
        assert mgr.restore() == {"a": 1}


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(None, id="deleted"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\xffnot json", id="binary"),
        pytest.param(b'{"version": 1, "entries": ', id="truncated"),
        pytest.param(b"[]", id="list"),
        pytest.param(b'{"version": 99, "entries": {}}', id="other-version"),
        pytest.param(b'{"version": 1, "entries": []}', id="entries-list"),
        pytest.param(b'{"version": 1, "entries": {"ckpt-000000002.h5": 5, "x": {"size": "big"}}}', id="bad-entries"),
        pytest.param(b'{"version": 1, "entries": {"ckpt-000000002.h5": {"size": 1, "mtime_ns": 1, "meta": {}}}}',
                     id="stale-entry"),
        pytest.param(b"[" * 100000, id="deeply-nested"),
    ],
)
def test_index_cache_deleted_or_garbage_is_rebuilt(ckpt_dir: Path, garbage: bytes | None) -> None:
    with CheckpointManager(ckpt_dir, monitor="val_loss", keep=KeepLast(2)) as mgr:
        for step in range(1, 5):
            mgr.save(step, {"s": step}, metrics={"val_loss": 1.0 / step})
        expected = mgr.checkpoints
        tracker = mgr.tracker.state_dict() if mgr.tracker else None
    index = ckpt_dir / ".ckptmgr-index.json"
    assert json.loads(index.read_bytes())["version"] == 2
    if garbage is None:
        index.unlink()
    else:
        index.write_bytes(garbage)
    with CheckpointManager(ckpt_dir, read_only=True) as reader:
        # Without the index a reader cannot know the writer's keep reasons; the rest it reads.
        assert [c.with_reasons(()) for c in reader.checkpoints] == [c.with_reasons(()) for c in expected]
        assert reader.best == next(c for c in reader.checkpoints if c.step == 4)
    with CheckpointManager(ckpt_dir, monitor="val_loss", keep=KeepLast(2)) as mgr:
        assert mgr.checkpoints == expected
        assert mgr.tracker is not None and mgr.tracker.state_dict() == tracker
        assert mgr.restore() == {"s": 4}
    rebuilt = json.loads(index.read_bytes())
    assert sorted(rebuilt["entries"]) == [c.path.name for c in expected]


def test_index_entry_for_a_replaced_file_is_not_trusted(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, {"s": 1}, metrics={"m": 1.0})
        mgr.save(2, {"s": 2}, metrics={"m": 2.0})
    # Another copy of the run put a different checkpoint 2 in place (different size and time).
    other = ckpt_dir.parent / "other"
    with CheckpointManager(other) as mgr:
        mgr.save(2, {"s": 2, "extra": np.zeros(10)}, metrics={"m": 22.0})
    os.replace(other / "ckpt-000000002.h5", ckpt_dir / "ckpt-000000002.h5")
    with CheckpointManager(ckpt_dir) as mgr:
        assert mgr.checkpoints[-1].metrics == {"m": 22.0}
        assert mgr.restore()["s"] == 2 and "extra" in mgr.restore()


def test_index_is_rewritten_during_a_run_so_a_crash_leaves_little_to_read(ckpt_dir: Path) -> None:
    mgr = CheckpointManager(ckpt_dir, monitor="val_loss", keep=KeepLast(30))
    for step in range(1, 21):
        mgr.save(step, {"s": step}, metrics={"val_loss": 1.0 / step})
    # Not closed (as after a SIGKILL): the index already describes the first 16 saves.
    entries = json.loads((ckpt_dir / ".ckptmgr-index.json").read_bytes())["entries"]
    assert sorted(entries) == [f"ckpt-{s:09d}.h5" for s in range(1, 17)]
    assert all(entries[f"ckpt-{s:09d}.h5"]["meta"]["metrics"] == {"val_loss": 1.0 / s} for s in range(1, 17))
    # A reader trusts those entries without opening the files: scramble one indexed file's
    # content but keep its size and mtime, and the listing still shows its metadata.
    path = ckpt_dir / "ckpt-000000005.h5"
    st_before = path.stat()
    path.write_bytes(b"\0" * st_before.st_size)
    os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    with CheckpointManager(ckpt_dir, read_only=True) as reader:
        assert [c.step for c in reader.checkpoints] == list(range(1, 21))
        assert reader.checkpoints[4].metrics == {"val_loss": 0.2}
        assert not any(r.startswith("corrupt") for r in reader.checkpoints[4].keep_reasons)
        # ...and the checksums still catch the damage when it is restored.
        with pytest.raises(ckptmgr.CorruptCheckpointError, match=r"ckpt-000000005\.h5"):
            reader.restore(5)
    mgr.close()


# ------------------------------------------------------------------------ async


@pytest.fixture
def gated_writes(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Background writes wait while the returned event is clear (then the real writer runs)."""
    gate = threading.Event()
    real = codec_module.write_file

    def gated(*args: Any, **kwargs: Any) -> int:
        assert gate.wait(30), "the test never opened the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(codec_module, "write_file", gated)
    return gate


def test_async_save_writes_a_snapshot(ckpt_dir: Path, gated_writes: threading.Event) -> None:
    weights = np.zeros((100, 100))
    params = {"w": weights, "layers": [np.ones(3)]}
    with CheckpointManager(ckpt_dir, async_save=True) as mgr:
        info = mgr.save(1, params, metrics={"loss": 1.0})
        assert info is not None and info.step == 1 and info.path == ckpt_dir / "ckpt-000000001.h5"
        # Training goes on while the write waits: mutate everything in place.
        weights += 1
        params["layers"][0][:] = 7
        params["layers"].append("new")
        params["extra"] = 1
        gated_writes.set()
        mgr.wait()
        restored = mgr.restore()
    assert_tree_equal(restored, {"w": np.zeros((100, 100)), "layers": [np.ones(3)]})


def test_async_save_commits_in_order_and_close_waits(ckpt_dir: Path, gated_writes: threading.Event,
                                                     on_disk: OnDisk) -> None:
    gated_writes.set()
    with CheckpointManager(ckpt_dir, async_save=True, keep=KeepLast(2)) as mgr:
        for step in range(6):
            mgr.save(step, state_of(step))
    assert on_disk(ckpt_dir) == [4, 5]
    with CheckpointManager(ckpt_dir, read_only=True) as reader:
        assert_tree_equal(reader.restore(), state_of(5))


@pytest.mark.parametrize("surface", ["wait", "save", "close"])
def test_async_errors_surface_on_the_next_call(ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                               surface: str, on_disk: OnDisk,
                                               temp_files: Callable[[Path], list[str]]) -> None:
    import errno

    real_replace = os.replace
    failing = threading.Event()
    failing.set()

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if failing.is_set() and os.fspath(dst).endswith("ckpt-000000002.h5"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    mgr = CheckpointManager(ckpt_dir, async_save=True)
    mgr.save(1, {"s": 1})
    mgr.wait()
    assert mgr.save(2, {"s": 2}) is not None  # returns at once; the write fails later
    with pytest.raises(ckptmgr.CheckpointIOError, match=r"ckpt-000000002\.h5.*EIO") as excinfo:
        if surface == "wait":
            mgr.wait()
        elif surface == "save":
            mgr.save(3, {"s": 3})
        else:
            mgr.close()
    assert excinfo.value.errno == errno.EIO
    failing.clear()
    if surface != "close":
        # The manager is still usable.
        mgr.save(4, {"s": 4})
        mgr.close()
    assert 2 not in on_disk(ckpt_dir) and 1 in on_disk(ckpt_dir)
    assert temp_files(ckpt_dir) == []
    with CheckpointManager(ckpt_dir, read_only=True) as reader:
        assert reader.restore(1) == {"s": 1}


def test_async_save_follows_the_save_policy(ckpt_dir: Path, gated_writes: threading.Event) -> None:
    with CheckpointManager(ckpt_dir, async_save=True, save_every=EverySteps(10)) as mgr:
        gated_writes.set()
        mgr.save(0, {"s": 0})
        mgr.wait()
        gated_writes.clear()
        assert mgr.save(10, {"s": 10}) is not None  # in flight until the gate opens
        try:
            # Step 11 is not on a new 10-step boundary: the checkpoint of 10 is coming.
            assert mgr.should_save(11) is False
        finally:
            gated_writes.set()


def test_opening_with_a_stricter_policy_deletes_nothing_until_the_next_save(ckpt_dir: Path, on_disk: OnDisk) -> None:
    with CheckpointManager(ckpt_dir) as mgr:
        for step in range(1, 6):
            mgr.save(step, {"s": step})
    with CheckpointManager(ckpt_dir, keep=KeepLast(1)) as mgr:
        assert on_disk(ckpt_dir) == [1, 2, 3, 4, 5]
        assert reasons_of(mgr) == {**{s: ("unretained: deleted at the next save",) for s in range(1, 5)},
                                   5: ("latest", "last 1")}
        mgr.save(6, {"s": 6})
        assert steps_of(mgr) == [6]
    assert on_disk(ckpt_dir) == [6]


def test_checkpoint_deleted_behind_the_writers_back(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"s": step})
        (ckpt_dir / "ckpt-000000003.h5").unlink()
        assert mgr.restore() == {"s": 2}  # listed again: the newest that exists
        with pytest.raises(CheckpointNotFoundError):
            mgr.restore(3)


def test_delete_all_removes_every_checkpoint_and_the_bookkeeping(ckpt_dir: Path) -> None:
    mgr = CheckpointManager(ckpt_dir, monitor="val_loss")
    (ckpt_dir / "notes.txt").write_text("not ours")
    for step in (1, 2, 3):
        mgr.save(step, {"s": step}, metrics={"val_loss": 1.0 / step})
    mgr.save(4, FilePayload("model.bin", lambda p: p.write_bytes(b"w")), metrics={"val_loss": 0.1})
    mgr.delete_all()
    assert sorted(os.listdir(ckpt_dir)) == ["notes.txt"]
    with pytest.raises(CheckpointError, match="closed"):
        mgr.save(5, {"s": 5})
    # The directory is free again, and empty of checkpoints.
    with CheckpointManager(ckpt_dir) as again:
        assert again.checkpoints == []


def test_missing_metric_warning_is_its_own_category(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir, monitor="val_loss") as mgr:
        with pytest.warns(MissingMetricWarning, match="got no 'val_loss'"):
            mgr.save(1, {"s": 1}, metrics={"loss": 0.3})
        assert mgr.best is None and mgr.checkpoints[0].step == 1


def test_async_snapshots_reuse_memory_yet_every_step_keeps_its_own_values(ckpt_dir: Path) -> None:
    """Each async save copies into the previous snapshot's memory once that one is written
    (a big leaf into its array, the small ones into the pack); values, shapes and dtypes
    that change between saves still land in the right step."""
    states: list[dict[str, Any]] = [
        {"w": np.full((256, 256), float(step)), "b": np.arange(4, dtype=np.int32) + step, "s": step}
        for step in range(5)
    ]
    states[3]["w"] = states[3]["w"].astype(np.float32)  # a dtype change in the middle
    states[4]["b"] = np.arange(9, dtype=np.int32)  # and a size change of a packed leaf
    with CheckpointManager(ckpt_dir, async_save=True, keep=None) as mgr:
        first = first_pack = None
        for step, state in enumerate(states):
            mgr.save(step, state)
            snapshot = mgr._writer._spare  # the arrays being written now
            assert snapshot is not None and snapshot.packed is not None
            if step == 1:
                first, first_pack = snapshot.leaves[0].array, snapshot.packed
            if step == 2:  # same shapes and dtypes as step 1's: copied into its memory
                assert snapshot.leaves[0].array is first and snapshot.packed is first_pack
        mgr.wait()
        for step, state in enumerate(states):
            assert_tree_equal(mgr.restore(step), state)
