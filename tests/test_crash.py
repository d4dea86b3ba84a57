"""kill -9 at random instants: every save that returned survives, nothing partial shows.

A real child process (``_crash_child.py``) runs a save loop with retention and prints
each step once ``save()`` has returned for it. The parent kills it with SIGKILL at a
random instant (while it starts up, opens the directory, writes, renames, deletes),
then checks the directory before the next child resumes from it.
"""

from __future__ import annotations

import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _crash_child as child
import pytest
from conftest import assert_tree_equal

import ckptmgr
from ckptmgr import codec

CHILD = Path(__file__).with_name("_crash_child.py")
CKPT_RE = re.compile(r"ckpt-(\d{9,})\.h5")
OURS = {".ckptmgr.lock", ".ckptmgr-index.json"}


@dataclass
class Run:
    directory: Path
    keep_every: int
    stderr: Path
    printed: set[int] = field(default_factory=set)
    kills: int = 0
    cycles: int = 0


def _read_lines(fd: int, pending: bytearray, out: set[int], timeout: float) -> bool:
    """Read what the child printed within ``timeout``; False at end of file."""
    ready, _, _ = select.select([fd], [], [], max(timeout, 0.0))
    if not ready:
        return True
    chunk = os.read(fd, 65536)
    if not chunk:
        return False
    pending.extend(chunk)
    *lines, rest = bytes(pending).split(b"\n")
    pending[:] = rest
    out.update(int(line) for line in lines)
    return True


def _one_cycle(run: Run, rng: random.Random) -> None:
    """Start a child, kill it at a random instant, collect every step it printed."""
    args = [sys.executable, str(CHILD), str(run.directory), str(run.keep_every)]
    if rng.random() < 0.25:
        args.append("async")
    with open(run.stderr, "ab") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, bufsize=0)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    printed: set[int] = set()
    pending = bytearray()
    alive = True
    if rng.random() < 0.2:
        # Kill during start-up: imports, lock, clean-up of leftovers, restore.
        wait_for, window = 0, rng.uniform(0.2, 0.7)
    else:
        # Kill in the middle of the save loop: a random point of a write/commit/retain cycle.
        wait_for, window = rng.randint(1, 6), rng.uniform(0.0, 0.03)
    while alive and len(printed) < wait_for:
        alive = _read_lines(fd, pending, printed, 60.0)
    # The kill instant: a random moment within the window, reading output meanwhile.
    deadline = time.monotonic() + window
    while alive and (remaining := deadline - time.monotonic()) > 0:
        alive = _read_lines(fd, pending, printed, remaining)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    # Everything printed before the kill counts: drain the pipe.
    while _read_lines(fd, pending, printed, 60.0):
        pass
    proc.stdout.close()
    run.cycles += 1
    if proc.returncode == -signal.SIGKILL:
        run.kills += 1
    else:
        pytest.fail(f"the child exited with {proc.returncode} before the kill:\n{run.stderr.read_text()[-3000:]}")
    run.printed |= printed


def _check_directory(run: Run) -> None:
    """The invariants after a kill, checked before the next child touches the directory."""
    names = os.listdir(run.directory)
    files = {int(m.group(1)): n for n in names if (m := CKPT_RE.fullmatch(n))}
    strays = [n for n in names if n not in files.values() and n not in OURS and not n.startswith(".ckpt-")]
    assert strays == [], f"unexpected files {strays}"
    if not files:
        assert not run.printed, f"steps {sorted(run.printed)} were promised, the directory is empty"
        return
    # Nothing partial under a checkpoint name: every such file is complete and verifies.
    for step, name in files.items():
        tree, manifest = codec.read_file(run.directory / name)
        assert manifest["step"] == step
        assert_tree_equal(tree, child.state_for(step))
    latest = max(files)
    assert latest >= max(run.printed, default=0)
    # The child resumes after the latest checkpoint, so every step up to it was committed.
    best = min(range(1, latest + 1), key=lambda s: (child.metric_for(s), s))
    required = {best} | {
        s for s in run.printed if s % run.keep_every == 0 or s > latest - child.KEEP_LAST
    }
    missing = sorted(required - set(files))
    assert missing == [], f"steps {missing} were saved (and retention keeps them) but are gone"
    reader = ckptmgr.CheckpointManager(run.directory, read_only=True)
    assert [c.step for c in reader.checkpoints] == sorted(files)
    assert reader.best is not None and reader.best.step == best
    for step in sorted(required):
        assert_tree_equal(reader.restore(step), child.state_for(step))
    assert_tree_equal(reader.restore(), child.state_for(latest))


def _final_check(run: Run) -> None:
    """A writer opens after the last kill: the lock is free, leftovers go, the best and
    the patience counter are those of an uninterrupted run."""
    with ckptmgr.CheckpointManager(run.directory, monitor="val_loss",
                                   keep=child.keep_policy(run.keep_every)) as mgr:
        assert [n for n in os.listdir(run.directory) if n.startswith(".ckpt-")] == []
        latest = mgr.latest
        assert latest is not None
        best = min(range(1, latest.step + 1), key=lambda s: (child.metric_for(s), s))
        tracker = mgr.tracker
        assert tracker is not None
        assert (tracker.best_step, tracker.best, tracker.wait) == (best, child.metric_for(best), latest.step - best)


def _kill_loop(tmp_path: Path, kills: int, keep_every: int, seed: int) -> Run:
    run = Run(tmp_path / "run", keep_every, tmp_path / "child-stderr.txt")
    rng = random.Random(seed)
    while run.kills < kills:
        _one_cycle(run, rng)
        _check_directory(run)
    _final_check(run)
    return run


def test_sigkill_at_random_instants(tmp_path: Path) -> None:
    run = _kill_loop(tmp_path, kills=32, keep_every=10, seed=1234)
    assert run.kills >= 30
    assert len(run.printed) > run.kills  # the kills landed in a running save loop


@pytest.mark.slow
def test_sigkill_at_random_instants_long(tmp_path: Path) -> None:
    seed = int(os.environ.get("CKPTMGR_CRASH_SEED", "0")) or random.randrange(2**32)
    print(f"seed={seed}")
    run = _kill_loop(tmp_path, kills=300, keep_every=50, seed=seed)
    assert run.kills >= 300
