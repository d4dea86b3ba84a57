"""Shared by test_loop.py, test_torch.py and test_tf_loop.py: run training scripts as
child processes, interrupt them at random steps, and compare their checkpoints.

The scripts print ``starting at step N`` once, then ``step N ...`` after each step
(before ``step_done``), and ``done`` at the end. The parent synchronises on those
lines only: it interrupts a child right after reading a given ``step`` line, then reads
the child's output to the end, so it knows the last step the child finished.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

import ckptmgr

ROOT = Path(__file__).resolve().parents[1]
PREEMPTED = 75  # ckptmgr.adapters.loop.PREEMPTED_EXIT_CODE, spelled out to test it

_STEP = re.compile(r"step (\d+)\b")
_START = re.compile(r"starting at step (\d+)$")
_SIGNALS = {"term": signal.SIGTERM, "int": signal.SIGINT}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # One thread per child: tiny models, two cores, and a reference run alongside.
    env.update(OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def plan_seed() -> int:
    """The seed of the interruption plan: CKPTMGR_TEST_SEED, or a fresh one (reported on failure)."""
    text = os.environ.get("CKPTMGR_TEST_SEED")
    return int(text) if text else random.SystemRandom().randrange(2**32)


class Child:
    """A training script running as a child process, read line by line."""

    def __init__(self, argv: list[str], log: Path, *, stdin: bool = False, deadline: float = 120.0) -> None:
        self.log = log
        self._stderr: IO[bytes] = open(log, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: list[str] = []
        # A safety net, not a synchronisation: a child that hangs (a signal handler that
        # fails to end it, say) is killed, so the test fails instead of hanging.
        self._watchdog = threading.Timer(deadline, self.proc.kill)
        self._watchdog.daemon = True
        self._watchdog.start()

    def readline(self) -> str | None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            return None
        line = line.rstrip("\n")
        self.lines.append(line)
        return line

    def read_until(self, pattern: str) -> str | None:
        """Read up to and including the first line matching ``pattern``; None at EOF."""
        while (line := self.readline()) is not None:
            if re.match(pattern, line):
                return line
        return None

    def start_step(self) -> int:
        line = self.read_until(r"starting at step \d+$")
        assert line is not None, self.describe()
        match = _START.match(line)
        assert match is not None
        return int(match.group(1))

    def wait(self) -> int:
        """Read the output to the end; the exit status (-N: killed by signal N)."""
        while self.readline() is not None:
            pass
        code = self.proc.wait()
        self._watchdog.cancel()
        for stream in (self.proc.stdout, self.proc.stdin, self._stderr):
            if stream is not None:
                stream.close()
        return code

    @property
    def last_step(self) -> int | None:
        steps = [int(m.group(1)) for line in self.lines if (m := _STEP.match(line))]
        return steps[-1] if steps else None

    def describe(self) -> str:
        tail = "\n".join(self.lines[-5:])
        return f"stdout tail:\n{tail}\nstderr:\n{self.log.read_text(errors='replace')[-3000:]}"


@dataclass
class Interrupted:
    """What happened to one child: started at ``start``, stopped after ``last``."""

    how: str
    start: int
    last: int | None
    code: int


@dataclass
class Run:
    history: list[Interrupted] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join(f"{h.how}: {h.start}->{h.last} rc={h.code}" for h in self.history)


def run_interrupted(
    argv: list[str],
    log: Path,
    *,
    plan: list[tuple[str, int]],
    save_every: int,
    seed: int,
) -> Run:
    """Run ``argv`` until it prints ``done``, interrupting it as ``plan`` says.

    ``plan`` holds ``(how, after)``: start a child, read ``after`` more step lines,
    then send ``"kill"`` (SIGKILL), ``"term"`` (SIGTERM) or ``"int"`` (SIGINT). Checks
    after each child: SIGKILL -> it died of it and the next child resumes from the
    newest committed checkpoint, at most ``save_every`` steps back; SIGTERM/SIGINT ->
    exit status 75 and the next child resumes exactly from the last step it printed.
    Keep the plan well short of the end: a signal after the last step is not a
    pre-emption.
    """
    run = Run()
    expected_start = 0
    context = f"seed={seed} plan={plan}"
    for how, after in [*plan, ("finish", 0)]:
        child = Child(argv, log)
        start = child.start_step()
        last_before = run.history[-1].last if run.history else None
        if run.history and run.history[-1].how in _SIGNALS:
            assert start == last_before, f"{context}: SIGTERM saved step {last_before}, resumed at {start}; {run}"
        elif run.history:
            assert last_before is not None and expected_start <= start <= last_before, (
                f"{context}: resumed at {start}, expected a step in [{expected_start}, {last_before}]; {run}"
            )
            assert last_before - start <= save_every, f"{context}: lost more than {save_every} steps; {run}"
        expected_start = start
        if how != "finish":
            line = None
            for _ in range(after):
                line = child.read_until(r"step \d+\b|done$")
                if line is None or line == "done":
                    break
            if line is not None and line != "done":
                os.kill(child.proc.pid, signal.SIGKILL if how == "kill" else _SIGNALS[how])
        code = child.wait()
        run.history.append(Interrupted(how, start, child.last_step, code))
        finished = bool(child.lines) and child.lines[-1] == "done"
        if finished:
            assert code == 0, f"{context}: {run}\n{child.describe()}"
            return run
        if how == "kill":
            assert code == -signal.SIGKILL, f"{context}: {run}\n{child.describe()}"
        elif how in _SIGNALS:
            assert code == PREEMPTED, f"{context}: {run}\n{child.describe()}"
            name = _SIGNALS[how].name
            assert f"{name} received; saved step {child.last_step} " in child.log.read_text(), child.describe()
        else:
            raise AssertionError(f"{context}: the last child did not finish; {run}\n{child.describe()}")
    raise AssertionError("unreachable")


def random_plan(rng: random.Random, hows: list[str], low: int, high: int) -> list[tuple[str, int]]:
    return [(how, rng.randint(low, high)) for how in hows]


def final_tree(directory: Path) -> Any:
    with ckptmgr.CheckpointManager(directory, read_only=True) as mgr:
        for info in mgr.checkpoints:
            mgr.verify(info.step)
        return mgr.restore()


def assert_identical(a: Any, b: Any, where: str = "tree") -> None:
    """Same structure, container types, dtypes, shapes and bytes (NaN == NaN)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), f"{where}: values differ"
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def assert_same_training(run: Any, reference: Any) -> None:
    """The same step, state and named generators. (The global generators of a script
    that never seeds them, Python's in an example say, differ between processes.)"""
    assert run["step"] == reference["step"]
    assert_identical(run["state"], reference["state"], "tree['state']")
    assert_identical(run["rng"]["generators"], reference["rng"]["generators"], "tree['rng']['generators']")
