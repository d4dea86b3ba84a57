"""Shared by the tests of multi-process jobs: run a script under ``torchrun`` (CPU ranks over
gloo on this machine), bounded by a deadline, and collect what its workers reported.

Test side: :func:`run_torchrun` starts::

    python -m torch.distributed.run --standalone --nproc_per_node=N [extra args]
        --log-dir JOB/logs --tee 3  SCRIPT RESULTS [args...]

with ``GLOO_SOCKET_IFNAME=lo``, ``MASTER_ADDR=127.0.0.1``, ``OMP_NUM_THREADS=1`` and the
repository and ``tests/`` on ``PYTHONPATH``. A job that outlives its deadline is a failure:
torchrun and every worker (found by a marker in their environment, since torchrun starts
each worker in a session of its own, and an orphaned worker no longer has torchrun as its
parent) are killed with SIGKILL, by PID, and :class:`TorchrunTimeout` (an
``AssertionError``) is raised with everything the job printed.

Worker side: the script's first argument is the RESULTS directory; a worker reports
with ``report(sys.argv[1], name, value)`` (one JSON file per name, written atomically, so
a worker killed mid-report leaves no half file); the test reads them back as
``result.results[name]``. Names are the worker's choice, e.g. ``f"rank{rank}"``, or
``f"rank{rank}-attempt{restart}"`` under ``--max-restarts``. Workers that exit early on
purpose should use ``os._exit``: an interpreter that exits without
``torch.distributed.destroy_process_group()`` may abort in gloo's destructors (SIGABRT,
"terminate called without an active exception"; pytorch/pytorch#190489).

Restart tests: pass ``extra_torchrun_args=("--max-restarts=1",)`` and
``env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}`` (pytorch/pytorch#135712). The
per-rank output of every attempt is in ``result.logs``.

Nothing here imports pytest or torch: the workers import :func:`report` from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

# Every process of a job inherits this variable, with the job's own value.
_MARKER = "CKPTMGR_TEST_TORCHRUN_JOB"
_LOG = re.compile(r"attempt_(\d+)/(\d+)/(stdout|stderr)\.log$")


class TorchrunTimeout(AssertionError):
    """A job ran past its deadline (it was killed; the message holds its output)."""


@dataclass
class RankLog:
    """What one local rank printed in one attempt (``--tee`` log files)."""

    attempt: int
    local_rank: int
    stdout: str = ""
    stderr: str = ""


@dataclass
class TorchrunResult:
    """A finished job: torchrun's exit status and output, the workers' reports and logs.

    ``results`` maps each report's name to its value; ``killed`` lists processes of the
    job still alive after torchrun exited (killed then; a clean job leaves none).
    """

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    job_dir: Path
    results_dir: Path
    results: dict[str, Any]
    logs: list[RankLog] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)

    def output(self, local_rank: int, attempt: int | None = None) -> str:
        """The stdout then stderr of ``local_rank`` (in ``attempt``, or all attempts in order)."""
        return "".join(
            log.stdout + log.stderr
            for log in sorted(self.logs, key=lambda log: log.attempt)
            if log.local_rank == local_rank and (attempt is None or log.attempt == attempt)
        )

    def describe(self) -> str:
        """Everything about the job, for an assertion message."""
        parts = [
            f"command: {' '.join(self.args)}",
            f"exit status {self.returncode} after {self.elapsed:.1f} s; reports: {sorted(self.results)}",
        ]
        if self.killed:
            parts.append(f"processes of the job killed by the harness (SIGKILL): {self.killed}")
        parts += [f"--- torchrun stdout\n{self.stdout}", f"--- torchrun stderr\n{self.stderr}"]
        for log in sorted(self.logs, key=lambda log: (log.attempt, log.local_rank)):
            parts.append(f"--- attempt {log.attempt}, local rank {log.local_rank}\n{log.stdout}{log.stderr}")
        return "\n".join(parts)

    def check(self) -> TorchrunResult:
        """``self``, if the job exited 0 and left no process behind.

        Raises:
            AssertionError: otherwise, with :meth:`describe` as the message.
        """
        if self.returncode != 0 or self.killed:
            raise AssertionError(f"torchrun job failed\n{self.describe()}")
        return self


def report(results_dir: str | os.PathLike[str], name: str, value: Any) -> None:
    """Worker side: write ``value`` as JSON to ``results_dir/name.json``, atomically."""
    directory = Path(results_dir)
    text = json.dumps(value, allow_nan=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, directory / f"{name}.json")


def run_torchrun(
    script: str | os.PathLike[str],
    args: Sequence[str] = (),
    *,
    nproc: int = 2,
    timeout: float = 90.0,
    env: Mapping[str, str | None] | None = None,
    extra_torchrun_args: Sequence[str] = (),
    workdir: str | os.PathLike[str] | None = None,
    results_arg: bool = True,
) -> TorchrunResult:
    """Run ``script`` under torchrun with ``nproc`` ranks, for at most ``timeout`` seconds.

    The job's files (results, per-rank logs, torchrun's output) go to a new directory
    in ``workdir`` (a test's ``tmp_path``; default: the system's temporary directory).
    ``results_arg=False``: the script gets only ``args`` (a script of the project's own,
    such as an example, that reports nothing). ``env`` adds to this process's environment (a None value
    removes a variable). The exit status is not checked: call :meth:`TorchrunResult.check`.

    Raises:
        TorchrunTimeout: the job ran past ``timeout`` (everything was killed first).
    """
    script = Path(script).resolve()
    job_dir = Path(tempfile.mkdtemp(dir=workdir, prefix=f"torchrun-{script.stem}-"))
    results_dir = job_dir / "results"
    log_dir = job_dir / "logs"
    results_dir.mkdir()
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        *extra_torchrun_args, "--log-dir", str(log_dir), "--tee", "3",
        str(script), *([str(results_dir)] if results_arg else []), *args,
    ]  # fmt: skip
    marker = uuid.uuid4().hex
    child_env = _job_env(env, marker)
    start = time.monotonic()
    with open(job_dir / "torchrun.out", "wb") as out, open(job_dir / "torchrun.err", "wb") as err:
        # Files, not pipes: a worker that outlives torchrun cannot hold the reads open.
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=child_env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True,
        )  # fmt: skip
        try:
            returncode = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            killed = _kill_job(marker, proc)
            returncode = proc.wait()
            timed_out = True
    elapsed = time.monotonic() - start
    if not timed_out:
        # torchrun has exited: any process of the job still there was left behind.
        killed = _kill_job(marker, None)
    result = TorchrunResult(
        args=argv,
        returncode=returncode,
        stdout=(job_dir / "torchrun.out").read_text(errors="replace"),
        stderr=(job_dir / "torchrun.err").read_text(errors="replace"),
        elapsed=elapsed,
        job_dir=job_dir,
        results_dir=results_dir,
        results=_read_results(results_dir),
        logs=_read_logs(log_dir),
        killed=killed,
    )
    if timed_out:
        raise TorchrunTimeout(f"torchrun job ran past its {timeout:g} s deadline (killed)\n{result.describe()}")
    return result


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1, below the kernel's ephemeral range (so that
    no client connection takes one as its local port before its server binds it, or while
    the server is down for a restart)."""
    low, high = 20000, 32000
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            ephemeral_low = int(fh.read().split()[0])
        high = min(high, ephemeral_low)
    rng = random.Random()
    for _attempt in range(200):
        ports = rng.sample(range(low, high), count)
        sockets: list[socket.socket] = []
        try:
            for port in ports:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return ports
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} free ports found on 127.0.0.1 in [{low}, {high})")


def run_workers(
    script: str | os.PathLike[str],
    args: Sequence[str],
    envs: Sequence[Mapping[str, str | None]],
    *,
    timeout: float = 90.0,
    workdir: str | os.PathLike[str] | None = None,
) -> TorchrunResult:
    """Run ``script`` as one process per entry of ``envs`` (e.g. each with its ``TF_CONFIG``),
    for at most ``timeout`` seconds in all, as :func:`run_torchrun` runs a torchrun job.

    Each process gets ``RESULTS *args`` as arguments; its output is ``logs[i]`` (attempt 0,
    local rank i); ``returncode`` is the first non-zero exit status (0 if none).

    Raises:
        TorchrunTimeout: a process ran past ``timeout`` (everything was killed first).
    """
    script = Path(script).resolve()
    job_dir = Path(tempfile.mkdtemp(dir=workdir, prefix=f"workers-{script.stem}-"))
    results_dir = job_dir / "results"
    results_dir.mkdir()
    argv = [sys.executable, str(script), str(results_dir), *args]
    marker = uuid.uuid4().hex
    start = time.monotonic()
    procs = []
    for i, extra in enumerate(envs):
        with open(job_dir / f"{i}.out", "wb") as out:
            procs.append(subprocess.Popen(argv, cwd=ROOT, env=_job_env(extra, marker), stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    timed_out = False
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.0, timeout - (time.monotonic() - start))))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    killed = _kill_job(marker, None)
    codes = [proc.wait() for proc in procs]
    result = TorchrunResult(
        args=argv, returncode=next((c for c in codes if c != 0), 0), stdout="", stderr="",
        elapsed=time.monotonic() - start, job_dir=job_dir, results_dir=results_dir,
        results=_read_results(results_dir),
        logs=[RankLog(0, i, (job_dir / f"{i}.out").read_text(errors="replace")) for i in range(len(procs))],
        killed=killed,
    )
    if timed_out:
        raise TorchrunTimeout(f"job ran past its {timeout:g} s deadline (killed)\n{result.describe()}")
    return result


def wait_for(
    procs: Sequence[subprocess.Popen[bytes]], *, start: float, deadline: float,
) -> tuple[dict[int, float], dict[int, float]]:
    """Wait for processes started (each in a session of its own) at ``time.monotonic()``
    ``start``, until ``deadline`` seconds after it; SIGKILL the process group of any still
    running then. Returns, by index, the wall time (from ``start``) and the ``time.time()``
    at which each process that ended by itself ended (a process missing from them hung)."""
    walls: dict[int, float] = {}
    ended_at: dict[int, float] = {}
    while len(walls) < len(procs) and time.monotonic() - start < deadline:
        for i, proc in enumerate(procs):
            if i not in walls and proc.poll() is not None:
                walls[i], ended_at[i] = time.monotonic() - start, time.time()
        time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return walls, ended_at


def _job_env(extra: Mapping[str, str | None] | None, marker: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GLOO_SOCKET_IFNAME="lo",
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(TESTS), env.get("PYTHONPATH")])),
    )
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env[_MARKER] = marker
    return env


def _job_pids(marker: str) -> list[int]:
    """The processes whose environment holds the job's marker."""
    needle = f"{_MARKER}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        # Processes of other users, zombies and processes that just exited: not ours.
        with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as f:
            if needle in f.read().split(b"\0"):
                pids.append(int(entry))
    return pids


def _kill_job(marker: str, torchrun: subprocess.Popen[bytes] | None) -> list[int]:
    """SIGKILL torchrun (first, so that it restarts nothing) and every process of the job."""
    killed: list[int] = []
    if torchrun is not None and torchrun.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(torchrun.pid, signal.SIGKILL)
        killed.append(torchrun.pid)
    for _ in range(50):  # until no process of the job is left (one could be starting)
        pids = [pid for pid in _job_pids(marker) if pid not in killed or _alive(pid)]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if pid not in killed:
                killed.append(pid)
        time.sleep(0.05)
    return killed


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _read_results(results_dir: Path) -> dict[str, Any]:
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(results_dir.glob("*.json"))}


def _read_logs(log_dir: Path) -> list[RankLog]:
    logs: dict[tuple[int, int], RankLog] = {}
    for path in sorted(log_dir.rglob("*.log")):
        match = _LOG.search(path.as_posix())
        if match is None:
            continue
        attempt, local_rank, stream = int(match[1]), int(match[2]), match[3]
        log = logs.setdefault((attempt, local_rank), RankLog(attempt, local_rank))
        setattr(log, stream, path.read_text(errors="replace"))
    return [logs[key] for key in sorted(logs)]
