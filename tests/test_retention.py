"""Incremental retention (``ckptmgr/_retention.py``) against the policies' own ``keep()``.

A save relabels only the checkpoints its change can affect. These tests run the same
random sequence of operations through two managers in two directories: one with a
built-in policy (incremental), one with the same policy behind an opaque wrapper, which
the manager cannot look into and so evaluates with ``keep()`` over every checkpoint.
After every operation both must list the same checkpoints with the same keep reasons,
and their directories must hold the same files.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptmgr
from ckptmgr import CheckpointInfo, FilePayload, RetentionContext, RetentionPolicy
from ckptmgr._retention import Catalog, IncrementalKeep, Record


@dataclasses.dataclass(frozen=True)
class Opaque:
    """A user-defined policy as far as the manager can tell: always evaluated in full."""

    inner: RetentionPolicy

    def keep(self, checkpoints: Sequence[CheckpointInfo], context: RetentionContext) -> Mapping[int, list[str]]:
        return self.inner.keep(checkpoints, context)


def _random_leaf(rng: random.Random) -> RetentionPolicy:
    kind = rng.choice(["last", "best", "best_other", "every_steps", "every_seconds"])
    if kind == "last":
        return ckptmgr.KeepLast(rng.randint(1, 5))
    if kind == "best":
        return ckptmgr.KeepBest(rng.randint(1, 4))
    if kind == "best_other":
        return ckptmgr.KeepBest(rng.randint(1, 3), monitor="acc", mode="max")
    if kind == "every_steps":
        return ckptmgr.KeepEvery(steps=rng.randint(2, 9))
    return ckptmgr.KeepEvery(seconds=rng.choice([3, 5.5, 10]))


def _random_policy(rng: random.Random) -> RetentionPolicy | None:
    if rng.random() < 0.1:
        return None
    policy = _random_leaf(rng)
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        policy = policy | _random_leaf(rng)
    return policy


def _metric(rng: random.Random) -> float:
    # Few distinct values, so ties (broken by the earlier step) are common.
    return rng.choice([0.1, 0.2, 0.2, 0.3, 0.5, 0.8, float("nan")])


def _listing(mgr: ckptmgr.CheckpointManager) -> list[tuple[int, str, tuple[str, ...]]]:
    return [(c.step, c.path.name, c.keep_reasons) for c in mgr.checkpoints]


def _files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if not n.startswith(".ckptmgr-index") and n != ".ckptmgr.lock")


def _run_sequence(seed: int, base: Path, ops: int) -> int:
    """Run one random sequence through both managers; return the number of saves."""
    rng = random.Random(seed)
    policy = _random_policy(rng)
    save_every = rng.choice([None, None, ckptmgr.EverySteps(2), ckptmgr.EverySteps(3)])
    kwargs: dict[str, Any] = dict(
        monitor="val_loss", mode="min", save_every=save_every,
        min_delta=rng.choice([0.0, 0.0, 0.15]), baseline=rng.choice([None, None, 0.45]),
    )
    now = [1000.0]
    dirs = [base / f"{seed}-incremental", base / f"{seed}-full"]
    policies = [policy, None if policy is None else Opaque(policy)]
    if policy is None:
        # "keep all" has no opaque twin: compare against the labels the full path gives
        # a manager that was just reopened.
        policies = [None, None]
    managers = [ckptmgr.CheckpointManager(d, keep=p, clock=lambda: now[0], **kwargs)
                for d, p in zip(dirs, policies, strict=True)]
    step = 0
    saves = 0
    context = f"seed={seed} policy={policy!r} save_every={save_every!r} {kwargs}"
    try:
        for op in range(ops):
            now[0] += rng.choice([0.0, 0.5, 1.0, 2.5, 4.0, -6.0])  # the clock may step back (NTP)
            roll = rng.random()
            if roll < 0.06:
                # Continued from an older checkpoint: roll back to it (steps only move forward).
                back = max(0, step - rng.randint(1, 6))
                kept = [c.step for c in managers[0].checkpoints if c.step <= back]
                if kept:
                    for mgr in managers:
                        mgr.rollback(kept[-1])
                    step = back
                else:
                    step += 1
            elif roll < 0.10:
                pass  # the same step again: replaces it
            else:
                step += rng.randint(1, 3)
            metrics = {"val_loss": _metric(rng), "acc": _metric(rng)}
            if rng.random() < 0.1:
                del metrics["val_loss"]
            if rng.random() < 0.1:
                del metrics["acc"]
            force = rng.random() < 0.1
            payload = rng.random() < 0.1
            name = f"model-{rng.randint(0, 2)}.bin"  # payload names are reused: replaced at another step
            data = np.float32(step).tobytes()
            action = rng.random()
            for mgr in managers:
                if action < 0.03:
                    mgr.close()
                elif action < 0.06 and policy is not None:
                    mgr.prune(dry_run=True)
                elif payload:
                    mgr.save(step, FilePayload(name, lambda path, data=data: path.write_bytes(data)), metrics=metrics, force=force)
                else:
                    mgr.save(step, {"step": step}, metrics=metrics, force=force)
            if action < 0.03:
                # Reopen both; sometimes with a narrower policy, so some checkpoints are
                # "unretained" until the next save deletes them.
                if policy is not None and rng.random() < 0.5:
                    policy = policy | ckptmgr.KeepLast(1) if rng.random() < 0.3 else _random_policy(rng)
                    policies = [policy, None if policy is None else Opaque(policy)]
                    if policy is None:
                        policies = [None, None]
                    context += f" -> {policy!r}"
                managers = [ckptmgr.CheckpointManager(d, keep=p, clock=lambda: now[0], **kwargs)
                            for d, p in zip(dirs, policies, strict=True)]
            else:
                saves += 1
            incremental, full = (_listing(m) for m in managers)
            assert incremental == full, f"{context}, after op {op} (step {step})"
            assert _files(dirs[0]) == _files(dirs[1]), f"{context}, after op {op}"
    finally:
        for mgr in managers:
            mgr.close()
    return saves


@pytest.mark.filterwarnings("ignore::ckptmgr.MissingMetricWarning")
@pytest.mark.filterwarnings("ignore:.*is not finite:ckptmgr.CheckpointWarning")
@pytest.mark.parametrize("block", range(4))
def test_incremental_labels_and_deletions_match_a_full_evaluation(tmp_path: Path, block: int) -> None:
    saves = sum(_run_sequence(seed, tmp_path, ops=40) for seed in range(block * 25, block * 25 + 25))
    assert saves > 25 * 40 * 0.8  # the sequences did save (not mostly skipped)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ckptmgr.MissingMetricWarning")
@pytest.mark.filterwarnings("ignore:.*is not finite:ckptmgr.CheckpointWarning")
@pytest.mark.parametrize("block", range(8))
def test_incremental_retention_long_sequences(tmp_path: Path, block: int) -> None:
    for seed in range(1000 + block * 40, 1000 + block * 40 + 40):
        _run_sequence(seed, tmp_path, ops=150)


def _catalog(infos: list[CheckpointInfo]) -> Catalog:
    catalog = Catalog()
    catalog.reset({c.step: Record(c, {}) for c in infos})
    return catalog


def test_reasons_per_step_equal_keep_over_all_checkpoints() -> None:
    rng = random.Random(7)
    for _ in range(300):
        infos = [
            CheckpointInfo(step, f"ckpt-{step}", {"val_loss": _metric(rng), "acc": _metric(rng)},
                           time=rng.choice([0.0, 3.0, 7.5, 12.0]) + step * 0.1)
            for step in sorted(rng.sample(range(60), rng.randint(1, 25)))
        ]
        policy = _random_policy(rng)
        evaluator = IncrementalKeep.build(policy, "val_loss", "min")
        assert evaluator is not None
        catalog = _catalog(infos)
        expected = (
            {c.step: ["keep all"] for c in infos} if policy is None
            else policy.keep(infos, RetentionContext(monitor="val_loss", mode="min"))
        )
        got = {c.step: r for c in infos if (r := evaluator.reasons(catalog, c.step)) is not None}
        assert got == {s: list(r) for s, r in expected.items()}, policy


def test_catalog_views_stay_sorted_through_adds_and_removes() -> None:
    rng = random.Random(3)
    catalog = Catalog()
    live: dict[int, CheckpointInfo] = {}
    catalog.ranking("val_loss", "min")  # built empty, then maintained
    catalog.by_time()
    for _ in range(2000):
        step = rng.randrange(200)
        if step in live and rng.random() < 0.6:
            catalog.remove(step)
            del live[step]
        elif step not in live:
            info = CheckpointInfo(step, f"f{step}", {"val_loss": _metric(rng)}, time=rng.random())
            catalog.add(Record(info, {}))
            live[step] = info
    assert catalog.steps == sorted(live)
    fresh = _catalog(list(live.values()))
    assert catalog.ranking("val_loss", "min") == fresh.ranking("val_loss", "min")
    assert catalog.ranking("val_loss", "min")[0] == min(
        (v.metrics["val_loss"], s) for s, v in live.items() if v.metrics["val_loss"] == v.metrics["val_loss"]
    )
    assert catalog.by_time() == fresh.by_time()
    assert all(catalog.step_of_file(f"f{s}") == s for s in live)


def test_a_policy_the_evaluator_does_not_know_is_evaluated_in_full() -> None:
    assert IncrementalKeep.build(Opaque(ckptmgr.KeepLast(2)), None, "min") is None
    assert IncrementalKeep.build(ckptmgr.KeepLast(2) | Opaque(ckptmgr.KeepLast(1)), None, "min") is None
    assert IncrementalKeep.build(ckptmgr.KeepLast(2) | ckptmgr.KeepEvery(steps=5), None, "min") is not None


@dataclasses.dataclass(frozen=True)
class KeepEvenSilently:
    """A user policy that keeps even steps and gives no reason."""

    def keep(self, checkpoints: Sequence[CheckpointInfo], context: RetentionContext) -> Mapping[int, list[str]]:
        return {c.step: [] for c in checkpoints if c.step % 2 == 0}


def test_a_user_policy_may_keep_without_reasons(tmp_path: Path) -> None:
    with ckptmgr.CheckpointManager(tmp_path, keep=KeepEvenSilently()) as mgr:
        for step in range(1, 8):
            mgr.save(step, {"s": step})
        assert [(c.step, c.keep_reasons) for c in mgr.checkpoints] == [
            (2, ()), (4, ()), (6, ()), (7, ("latest",)),
        ]
