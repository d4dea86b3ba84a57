"""Crashes at chosen and at random instants: invariants 1, 2, 5 and 6 under ``kill -9``.

The crash harness: every test here runs one child program, :func:`_reliability.crash_child`
(a writer running one of the workloads of ``_reliability.PLANS``, resuming from the
directory's latest checkpoint and reporting each step once ``save`` returned for it), on
real files, and checks what a crash leaves with the same reader and writer checks:

- Deterministic crash points. A child runs a workload with every call of the commit
  protocol hooked (write, fsync, rename, directory fsync, index update, delete; for
  payloads each phase of the two-phase commit; the async writer's thread; a writer's
  recovery at open) and ends itself with ``os._exit`` right before or right after the
  n-th call, for every n. Each crash is checked, first as a reader sees it (before any
  writer cleans up), then after a writer reopens, then once more after the next save.
- Random SIGKILLs. A child runs a workload in a loop (resuming from the directory's
  latest checkpoint each time) and the parent kills it at a random instant: during
  start-up and recovery, inside a save, inside retention, inside an index update, inside
  a payload commit, inside the async writer. A shared byte says where each kill landed.
  Also a plain training loop (``KeepLast(2) | KeepEvery``, sync or async at random),
  where each kill is also checked exactly as a reader sees it (every file under a
  checkpoint name complete, every promised step that retention keeps present, the best
  and the latest restored), and the final writer's tracker is that of a run never killed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time
import warnings
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from _reliability import (
    CRASH_EXIT,
    PLANS,
    ChildRun,
    Marker,
    Plan,
    check_reader_view,
    check_writer_view,
    codec_sidecar,
    copy_directory,
    crash_child,
    drain,
    payload_bytes,
    processes,
    record,
    run_child,
    state_for,
)
from _trees import assert_tree_equal

import ckptmgr
from ckptmgr import codec

# Deterministic workloads: (plan, steps saved before the crash child starts, steps the
# crash child saves). The first steps are set up once; every crash run starts from a copy.
DETERMINISTIC = [
    pytest.param("native", 2, 2, id="native-save-retention-index"),
    pytest.param("native-async", 2, 2, id="async-writer"),
    pytest.param("retention", 2, 2, id="retention-keep-last-1"),
    pytest.param("index", 2, 2, id="index-update-on-prune"),
    pytest.param("payload", 5, 2, id="payload-two-phase-commit"),
]


def _setup(directory: Path, plan: str, steps: int) -> None:
    if steps:
        run = run_child(directory, plan, {"steps": steps})
        assert run.exitcode == 0 and run.done, run.error


def _crash_points(template: Path, work: Path, plan_name: str, steps: int) -> tuple[list[str], Counter[str]]:
    """Trace the workload from ``template``, then crash it before and after every call."""
    plan = PLANS[plan_name]
    trace = run_child(copy_directory(template, work / "trace"), plan_name, {"steps": steps, "trace": True})
    assert trace.exitcode == 0 and trace.done, trace.error
    labels = trace.trace
    findings: Counter[str] = Counter()
    failures = []
    for n, label in enumerate(labels):
        for when in ("before", "after"):
            directory = copy_directory(template, work / f"crash-{n}-{when}")
            run = run_child(directory, plan_name, {"steps": steps, "crash": (n, when)})
            where = f"crash {when} call {n} ({label})"
            try:
                assert run.exitcode == CRASH_EXIT, f"exit {run.exitcode}, not the crash: {run.error}"
                check_reader_view(directory, plan, findings)
                check_writer_view(directory, plan, run.promised, findings, save_next=True)
            except AssertionError as exc:
                failures.append(f"{where}: {exc}")
            findings[f"point: {when} {label}"] += 1
            shutil.rmtree(directory)
    assert failures == [], "\n".join(failures)
    return labels, findings


@pytest.mark.parametrize(("plan_name", "before", "steps"), DETERMINISTIC)
def test_crash_before_and_after_every_protocol_call(tmp_path: Path, plan_name: str, before: int,
                                                    steps: int) -> None:
    template = tmp_path / "template"
    _setup(template, plan_name, before)
    labels, findings = _crash_points(template, tmp_path, plan_name, steps)
    kinds = {label.split()[0] for label in labels}
    assert {"write", "fsync", "rename", "index"} <= kinds, labels
    if plan_name != "native-async":
        assert "unlink" in kinds, labels  # the workload reaches retention
    record("crash-points", f"deterministic[{plan_name}]", {
        "calls": len(labels), "crash points": 2 * len(labels), **findings,
    })


def test_crash_before_and_after_every_call_of_recovery_at_open(tmp_path: Path) -> None:
    """A writer opens a directory with an interrupted payload commit (its file renamed,
    its metadata not yet), leftovers of interrupted saves and a sidecar whose payload is
    gone; it is crashed at every call of finishing, cleaning up and rewriting the index."""
    template = tmp_path / "template"
    _setup(template, "payload", 5)
    # Interrupt step 6 (it replaces step 3's payload) between its two renames.
    probe = run_child(copy_directory(template, tmp_path / "probe"), "payload", {"steps": 1, "trace": True})
    n = probe.trace.index("rename payload-tmp>payload")
    run = run_child(template, "payload", {"steps": 1, "crash": (n, "after")})
    assert run.exitcode == CRASH_EXIT
    assert len([p for p in os.listdir(template) if p.endswith(".commit")]) == 1
    (template / ".ckpt-00000000000000aa.tmp").write_bytes(b"half a checkpoint")
    (template / ".ckpt-00000000000000bb.tmp-model-99.bin").write_bytes(b"half a payload")
    (template / codec_sidecar("gone.bin")[0]).write_bytes(codec_sidecar("gone.bin")[1])
    labels, findings = _crash_points(template, tmp_path, "payload", 1)
    assert labels[0] == "rename commit>sidecar", labels  # the commit is finished first
    assert {"unlink tmp", "unlink payload-tmp", "unlink sidecar", "index index"} <= set(labels), labels
    record("crash-points", "deterministic[recovery-at-open]", {
        "calls": len(labels), "crash points": 2 * len(labels), **findings,
    })


def test_a_reader_after_a_crash_between_the_two_renames(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    _setup(directory, "payload", 5)
    probe = run_child(copy_directory(directory, tmp_path / "probe"), "payload", {"steps": 1, "trace": True})
    n = probe.trace.index("rename payload-tmp>payload")
    assert run_child(directory, "payload", {"steps": 1, "crash": (n, "after")}).exitcode == CRASH_EXIT
    reader = ckptmgr.CheckpointManager(directory, read_only=True)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for step in [c.step for c in reader.checkpoints]:
            try:
                value = reader.restore(step)
            except (ckptmgr.CorruptCheckpointError, ckptmgr.CheckpointNotFoundError):
                continue
            assert value.read_bytes() == payload_bytes(step), f"restore({step}) returned another step's file"


# ------------------------------------------------------------------ random kills


KILL_PLANS = ["save", "retention", "index", "payload", "async"]
DEFAULT_KILLS = 45  # per workload: 225 in the default run
SLOW_KILLS = 250  # per workload: 1,250 with -m slow


def _wait_until(conn: Connection, run: ChildRun, deadline: float) -> bool:
    """Take what the child sends until ``deadline``; False if it closed its end first."""
    while (remaining := deadline - time.monotonic()) > 0:
        if not drain(conn, run, remaining):
            return False
    return True


def _kill_loop(tmp_path: Path, plan_name: str, kills: int, seed: int, *, async_share: float = 0.0,
               exact: bool = False) -> Counter[str]:
    """Start a writer on the workload, SIGKILL it at a random instant, check the
    directory (as a reader right after the kill, then as a writer on a copy), ``kills``
    times. ``async_share``: the share of children saving with ``async_save`` (else the
    plan's). ``exact``: also :func:`_check_reader_exact` after every kill."""
    plan = PLANS[plan_name]
    directory = tmp_path / plan_name
    marker_path = str(tmp_path / f"{plan_name}.marker")
    marker = Marker(marker_path)
    rng = random.Random(seed)
    ctx = processes()
    findings: Counter[str] = Counter()
    promised: set[int] = set()
    on_disk: set[int] = set()
    startup, per_save = 0.05, 0.05
    while findings["kills"] < kills:
        marker.restore(0)
        options: dict[str, object] = {"marker": marker_path}
        if async_share:
            options["async_save"] = rng.random() < async_share
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=crash_child, args=(child, str(directory), plan_name, options), daemon=True)
        started = time.monotonic()
        proc.start()
        child.close()
        run = ChildRun()
        if rng.random() < 0.15:
            # During start-up: lock, recovery of interrupted commits, clean-up, index, restore.
            findings["kills during start-up"] += 1
            alive = _wait_until(parent, run, started + rng.uniform(0.0, startup * 1.5))
        else:
            alive = True
            while alive and run.ready is None:
                alive = drain(parent, run, 60.0)
            startup = 0.8 * startup + 0.2 * (time.monotonic() - started)
            wanted, begun = rng.randint(0, 3), time.monotonic()
            while alive and len(run.promised) < wanted:
                alive = drain(parent, run, 60.0)
            if wanted and run.promised:
                per_save = 0.8 * per_save + 0.2 * (time.monotonic() - begun) / len(run.promised)
            if alive:
                alive = _wait_until(parent, run, time.monotonic() + rng.uniform(0.0, per_save * 1.5))
        proc.kill()
        proc.join(60)
        while drain(parent, run, 5.0):
            pass
        parent.close()
        assert proc.exitcode == -signal.SIGKILL, (
            f"the child exited with {proc.exitcode} before the kill:\n{run.error}"
        )
        findings["kills"] += 1
        findings[f"landed: {marker.read()}"] += 1
        promised |= run.promised
        check_reader_view(directory, plan, findings)
        if exact:
            _check_reader_exact(directory, plan, promised)
        latest, on_disk = check_writer_view(copy_directory(directory, tmp_path / "check"), plan, promised, findings,
                                            previous=on_disk)
        findings["checkpoints committed"] = latest
    findings["steps promised"] = len(promised)
    return findings


def _kills(tmp_path: Path, kills: int, seed: int, name: str) -> None:
    print(f"seed={seed}")
    for plan_name in KILL_PLANS:
        findings = _kill_loop(tmp_path, plan_name, kills, seed)
        assert findings["checkpoints committed"] > kills // 3, findings  # the kills landed in a working loop
        record("random-kills", f"{name}[{plan_name}]", findings)


def test_sigkill_at_random_instants_of_every_workload(tmp_path: Path) -> None:
    seed = int(os.environ.get("CKPTMGR_CRASH_SEED", "0")) or 20240611
    _kills(tmp_path, DEFAULT_KILLS, seed, "sigkill")


@pytest.mark.slow
def test_sigkill_at_random_instants_of_every_workload_long(tmp_path: Path) -> None:
    seed = int(os.environ.get("CKPTMGR_CRASH_SEED", "0")) or random.randrange(2**32)
    _kills(tmp_path, SLOW_KILLS, seed, "sigkill-long")


# A plain training loop, KeepLast(2) | KeepEvery, checked exactly after every kill.

CKPT_RE = re.compile(r"ckpt-(\d{9,})\.h5")
OURS = {".ckptmgr.lock", ".ckptmgr-index.json"}


def _check_reader_exact(directory: Path, plan: Plan, promised: set[int]) -> None:
    """Right after a kill, before any writer opens: nothing partial under a checkpoint
    name (every such file is complete and verifies), nothing else but leftovers of
    interrupted saves; every promised step that retention keeps (the best, the last
    ones, the multiples of ``keep_every``) is there; a reader lists exactly these files,
    names the best, restores each one kept and the latest. Native plans with KeepEvery."""
    assert not plan.payload and plan.keep_every is not None, plan
    names = os.listdir(directory) if directory.exists() else []
    files = {int(m.group(1)): n for n in names if (m := CKPT_RE.fullmatch(n))}
    strays = [n for n in names if n not in files.values() and n not in OURS and not n.startswith(".ckpt-")]
    assert strays == [], f"unexpected files {strays}"
    if not files:
        assert not promised, f"steps {sorted(promised)} were promised, the directory is empty"
        return
    for step, name in files.items():
        tree, manifest = codec.read_file(directory / name)
        assert manifest["step"] == step
        assert_tree_equal(tree, state_for(step, plan.array_len))
    latest = max(files)
    assert latest >= max(promised, default=0)
    # The child resumes after the latest checkpoint, so every step up to it was committed.
    best = plan.tracker_best(latest)
    required = {best} | {s for s in promised if s % plan.keep_every == 0 or s > latest - plan.keep_last}
    missing = sorted(required - set(files))
    assert missing == [], f"steps {missing} were saved (and retention keeps them) but are gone"
    with ckptmgr.CheckpointManager(directory, read_only=True) as reader:
        assert [c.step for c in reader.checkpoints] == sorted(files)
        assert reader.best is not None and reader.best.step == best
        for step in sorted(required):
            assert_tree_equal(reader.restore(step), state_for(step, plan.array_len))
        assert_tree_equal(reader.restore(), state_for(latest, plan.array_len))


def _check_final_writer(directory: Path, plan: Plan) -> None:
    """A writer opens after the last kill: the lock is free, leftovers go, the best and
    the patience counter are those of an uninterrupted run."""
    with plan.open(directory, async_save=False) as mgr:
        assert [n for n in os.listdir(directory) if n.startswith(".ckpt-")] == []
        latest = mgr.latest
        assert latest is not None
        best = plan.tracker_best(latest.step)
        tracker = mgr.tracker
        assert best is not None and tracker is not None
        assert (tracker.best_step, tracker.best, tracker.wait) == (best, plan.metric(best), latest.step - best)


def _plain_loop(tmp_path: Path, plan_name: str, kills: int, seed: int) -> Counter[str]:
    findings = _kill_loop(tmp_path, plan_name, kills, seed, async_share=0.25, exact=True)
    _check_final_writer(tmp_path / plan_name, PLANS[plan_name])
    return findings


def test_sigkill_at_random_instants(tmp_path: Path) -> None:
    findings = _plain_loop(tmp_path, "keep-every-10", kills=32, seed=1234)
    assert findings["kills"] >= 30
    assert findings["steps promised"] > findings["kills"]  # the kills landed in a running save loop


@pytest.mark.slow
def test_sigkill_at_random_instants_long(tmp_path: Path) -> None:
    seed = int(os.environ.get("CKPTMGR_CRASH_SEED", "0")) or random.randrange(2**32)
    print(f"seed={seed}")
    findings = _plain_loop(tmp_path, "keep-every-50", kills=300, seed=seed)
    assert findings["kills"] >= 300
