"""ckptmgr in a job of several processes: scale-out, coordinator overhead, and a simulation to 1,024 ranks.

Usage (from the repository root)::

    .venv/bin/python benchmarks/distributed.py           # about 3-4 minutes on 2 cores
    .venv/bin/python benchmarks/distributed.py --quick   # under 1 minute: fewer repetitions, up to 128 ranks

Three parts, each printed as a Markdown table (also written to
``benchmarks/results/distributed.md`` and ``distributed.json``):

1. **Scale-out**: 2 ranks under ``torchrun`` (gloo on loopback,
   ``ckptmgr.adapters.torch.TorchCoordinator``), each saving its own 128 MiB part
   (``sharded=True``), against one process saving both parts (256 MiB, the same 200
   arrays) with a plain ``CheckpointManager``, and one process saving one part (128 MiB:
   what each rank would take with a disk of its own).
2. **Coordinator overhead**: the same 2 ranks save a tiny state (a few scalars) with the
   coordinator (sharded and replicated) and without (rank 0 alone); ``should_save()`` (a
   broadcast) with and without; the coordinator's collectives alone.
3. **Simulation**: ``ThreadCoordinator.group(n)`` for n up to 1,024, one thread and one
   ``CheckpointManager(sharded=True)`` per rank on one directory, a tiny state per rank:
   the wall time and each rank's CPU time of a save and of a restore, the collectives
   and JSON bytes per rank per save (counted by a wrapping coordinator), the files per
   step and the commit record's size.

Every save is durable (ckptmgr always fsyncs) and goes to a fresh step; retention is
``KeepLast(1)``, so each save also deletes the previous step's files. Repetitions are
interleaved (the order rotates every repetition); figures are medians. The torchrun job
runs under a hard deadline and is SIGKILLed (torchrun's process group and each worker
by PID) if it passes it; every rank thread is joined with a timeout. Scratch directories
are removed at the end. See benchmarks/README.md ("Many processes").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import importlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (ROOT, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import peers  # noqa: E402  (benchmarks/peers.py: states, memory pre-touch, table and environment helpers)

import ckptmgr  # noqa: E402
from ckptmgr import codec, storage  # noqa: E402
from ckptmgr.coordinator import Coordinator, ThreadCoordinator, encode_message  # noqa: E402

MiB = peers.MiB
log = peers.log
med, fmt_t, md_table = peers.med, peers.fmt_t, peers.md_table

# One rank's shard: transformer-like arrays as in peers.py (d = 1024: 2 blocks, 87 vectors, an embedding).
SHARD = peers.StateSpec("shard", 128 * MiB, 100, 1024, 0, "128 MiB in 100 float32 tensors")
WORLD = 2  # torchrun ranks (the machine has 2 cores)
COORD_TIMEOUT = 60.0  # seconds a collective of the torchrun job waits for the other rank
PID_PREFIX = "worker-pid-"

# Part 1 rows.
JOB = "2 ranks (torchrun), sharded: 128 MiB each, one commit"
ONE = "1 process, plain manager: 256 MiB (both parts, same 200 arrays)"
HALF = "1 process, plain manager: 128 MiB (one part: a rank with a disk of its own)"

# Part 2 rows.
SAVE_SHARDED = "save(), 2 ranks, sharded=True (2 parts + commit record)"
SAVE_REPLICATED = "save(), 2 ranks, sharded=False (rank 0 writes the one copy)"
SAVE_ONE = "save(), 1 process, no coordinator"
SHOULD_JOB = "should_save(), 2 ranks (one broadcast)"
SHOULD_ONE = "should_save(), 1 process, no coordinator"
GATHER = "TorchCoordinator.all_gather of a small dict, alone"
BCAST = "TorchCoordinator.broadcast of a small dict, alone"

FULL_SIZES = (2, 8, 32, 128, 512, 1024)
QUICK_SIZES = (2, 8, 32, 128)


def sim_reps(n: int, quick: bool) -> tuple[int, int]:
    """(timed saves, timed restores) at n simulated ranks: fewer where one takes seconds."""
    if quick:
        return (3, 2) if n <= 32 else (2, 1)
    if n <= 8:
        return 7, 5
    if n <= 128:
        return 5, 3
    return 3, 2


def rotate(items: list[Any], k: int) -> list[Any]:
    k %= len(items)
    return items[k:] + items[:k]


def state_bytes(state: dict[str, Any]) -> int:
    return sum(a.nbytes for a in state.values() if isinstance(a, np.ndarray))


def tiny_state(rank: int, step: int) -> dict[str, Any]:
    return {"step": step, "rank": rank, "loss": 0.25, "lr": 1e-3}


def ready(state: dict[str, np.ndarray], nbytes: int) -> None:
    """Right before a timed save, the same for every row (see peers.prewarm)."""
    peers.prefault(state)
    peers.prewarm(nbytes)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ parts 1 and 2: torchrun


def shard_state(rank: int) -> dict[str, np.ndarray]:
    return peers.make_state(dataclasses.replace(SHARD, seed=100 + rank))


def worker_scaleout(c: Coordinator, work: Path, reps: int) -> dict[str, Any]:
    """Part 1, on every rank. Rank 0 also holds every rank's shard, for the one-process rows."""
    rank = c.rank
    mine = shard_state(rank)
    nbytes = state_bytes(mine)
    both = {f"rank-{r}": mine if r == rank else shard_state(r) for r in range(c.world_size)} if rank == 0 else {}
    keep = ckptmgr.KeepLast(1)
    job = ckptmgr.CheckpointManager(work / "scaleout-job", coordinator=c, sharded=True, keep=keep)
    alone = {
        ONE: ckptmgr.CheckpointManager(work / "scaleout-one", keep=keep),
        HALF: ckptmgr.CheckpointManager(work / "scaleout-half", keep=keep),
    } if rank == 0 else {}
    # The first save into each directory is untimed (peers.PRIME), as in peers.py.
    job.save(0, peers.PRIME)
    for mgr in alone.values():
        mgr.save(0, peers.PRIME)
    times: dict[str, list[float]] = {JOB: [], ONE: [], HALF: []}
    for rep in range(reps):
        for row in rotate(list(times), rep):
            # Both ranks wait at the barrier while rank 0 saves alone, so neither
            # pre-touch nor anything else of rank 1 runs during a one-process save.
            if row == JOB:
                ready(mine, 2 * nbytes)
            elif rank == 0:
                ready(mine, 2 * (2 * nbytes if row == ONE else nbytes))
                if row == ONE:
                    for part in both.values():
                        peers.prefault(part)
            c.barrier()
            if row == JOB:
                t = timed(functools.partial(job.save, rep + 1, mine))
            elif rank == 0:
                t = timed(functools.partial(alone[row].save, rep + 1, both if row == ONE else mine))
            if rank == 0:
                times[row].append(t)
            c.barrier()
    for mgr in [job, *alone.values()]:
        mgr.close()
    return {"times": times, "shard_bytes": nbytes, "shard_tensors": len(mine), "reps": reps}


def worker_overhead(c: Coordinator, work: Path, calls: int) -> dict[str, Any]:
    """Part 2, on every rank: rank 0's time of each call, the calls interleaved."""
    rank = c.rank
    keep = ckptmgr.KeepLast(1)
    sharded = ckptmgr.CheckpointManager(work / "tiny-sharded", coordinator=c, sharded=True, keep=keep)
    replicated = ckptmgr.CheckpointManager(work / "tiny-replicated", coordinator=c, sharded=False, keep=keep)
    one = ckptmgr.CheckpointManager(work / "tiny-one", keep=keep) if rank == 0 else None
    for mgr in (sharded, replicated, one):
        if mgr is not None:
            mgr.save(0, tiny_state(rank, 0))
    ops: dict[str, tuple[bool, Callable[[int], Any]]] = {  # row: (every rank calls it, call)
        SAVE_SHARDED: (True, lambda s: sharded.save(s, tiny_state(rank, s))),
        SAVE_REPLICATED: (True, lambda s: replicated.save(s, tiny_state(rank, s))),
        SAVE_ONE: (False, lambda s: one.save(s, tiny_state(rank, s)) if one else None),
        SHOULD_JOB: (True, lambda s: sharded.should_save(s)),
        SHOULD_ONE: (False, lambda s: one.should_save(s) if one else None),
        GATHER: (True, lambda s: c.all_gather({"step": s, "force": False})),
        BCAST: (True, lambda s: c.broadcast({"info": {"step": s, "nbytes": 0}} if rank == 0 else None)),
    }
    times: dict[str, list[float]] = {row: [] for row in ops}
    waited: list[list[float]] = []  # [CPU, wall] seconds
    for i in range(calls):
        for row in rotate(list(ops), i):
            every, call = ops[row]
            c.barrier()
            if every or rank == 0:
                t = timed(functools.partial(call, i + 1))
                if rank == 0:
                    times[row].append(t)
            if not every and i == calls - 1:
                # Once, an extra barrier, which rank 1 reaches at once and rank 0 after its
                # call alone: does rank 1's wait burn CPU that a one-process row would lose?
                cpu0, wall0 = time.process_time(), time.perf_counter()
                c.barrier()
                waited.append([time.process_time() - cpu0, time.perf_counter() - wall0])
    idle = c.all_gather(waited)
    for mgr in (sharded, replicated, one):
        if mgr is not None:
            mgr.close()
    return {"times": times, "calls": calls, "rank1_cpu_while_waiting": idle[1] if len(idle) > 1 else []}


def worker(spec: dict[str, Any]) -> int:
    """A torchrun rank (this script with --worker): parts 1 and 2; rank 0 writes the results."""
    import torch.distributed as dist

    # (through importlib: ckptmgr.adapters lives in adapters/, a package-dir mapping type checkers miss)
    TorchCoordinator = importlib.import_module("ckptmgr.adapters.torch").TorchCoordinator
    work = Path(spec["work"])
    (work / f"{PID_PREFIX}{os.getpid()}").touch()  # for the parent's kill, should the deadline pass
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COORD_TIMEOUT))
    try:
        c = TorchCoordinator(timeout=COORD_TIMEOUT)
        out: dict[str, Any] = {"world_size": c.world_size}
        t0 = time.perf_counter()
        out["scaleout"] = worker_scaleout(c, work, spec["reps"])
        out["scaleout"]["seconds"] = time.perf_counter() - t0
        gc.collect()
        t0 = time.perf_counter()
        out["overhead"] = worker_overhead(c, work, spec["calls"])
        out["overhead"]["seconds"] = time.perf_counter() - t0
        if c.rank == 0:
            Path(spec["out"]).write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()
    return 0


class JobFailed(RuntimeError):
    """The torchrun job failed or passed its deadline (the message has its log's tail)."""


def kill_job(proc: subprocess.Popen[bytes], work: Path) -> None:
    """SIGKILL torchrun's process group, and each worker (torchrun starts each in a session of its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for f in work.glob(f"{PID_PREFIX}*"):
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.killpg(int(f.name[len(PID_PREFIX):]), signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def run_job(work: Path, reps: int, calls: int, deadline: float) -> dict[str, Any]:
    """Parts 1 and 2: one torchrun job of 2 ranks, under a hard deadline."""
    job = work / "job"
    job.mkdir()
    out = job / "result.json"
    spec = {"work": str(job), "out": str(out), "reps": reps, "calls": calls}
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    log_path = work / "torchrun.log"
    started = time.perf_counter()
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(deadline)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            kill_job(proc, job)  # also after a clean exit: nothing of the job outlives it
    tail = log_path.read_text(errors="replace")[-3000:]
    if rc is None:
        raise JobFailed(f"the torchrun job passed its {deadline:.0f} s deadline and was killed; its log ends:\n{tail}")
    if rc != 0 or not out.exists():
        raise JobFailed(f"the torchrun job exited with {rc}; its log ends:\n{tail}")
    res: dict[str, Any] = json.loads(out.read_text())
    res["job_seconds"] = time.perf_counter() - started
    return res


# --------------------------------------------------------------------- part 3: simulation


@dataclass
class Sent:
    """One collective as one rank saw it: its JSON message's bytes (0 for a broadcast's receivers)."""

    method: str
    nbytes: int
    src: int = 0


class CountingCoordinator:
    """A :class:`ckptmgr.Coordinator` around another one that logs every collective.

    Each rank logs the bytes of the JSON message it sends (one ``encode_message`` of its
    own value, O(1) per call); what each rank receives is derived afterwards from every
    rank's log (the collectives are the same, in the same order, on every rank). With
    ``keep_values`` it also keeps the values, to replay the same collectives alone.
    """

    def __init__(self, inner: Coordinator) -> None:
        self.inner = inner
        self.sent: list[Sent] = []
        self.keep_values = False
        self.values: list[tuple[str, Any, int]] = []

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def timeout(self) -> float:
        return self.inner.timeout

    def barrier(self) -> None:
        self.sent.append(Sent("barrier", 0))
        self.inner.barrier()

    def broadcast(self, value: Any, src: int = 0) -> Any:
        self.sent.append(Sent("broadcast", len(encode_message(value)) if self.rank == src else 0, src))
        if self.keep_values:
            self.values.append(("broadcast", value, src))
        return self.inner.broadcast(value, src)

    def all_gather(self, value: Any) -> list[Any]:
        self.sent.append(Sent("all_gather", len(encode_message(value))))
        if self.keep_values:
            self.values.append(("all_gather", value, 0))
        return self.inner.all_gather(value)


def traffic(logs: list[list[Sent]]) -> dict[str, Any]:
    """Collectives and bytes per rank of one operation, from every rank's log of it.

    ``padded``: what TorchCoordinator would move into each rank: an all_gather sends the
    lengths (8 bytes each), then every message padded to the longest; a broadcast sends
    the length, then the message.
    """
    n = len(logs)
    if len({len(x) for x in logs}) != 1:
        raise RuntimeError(f"the ranks logged different numbers of collectives: {sorted({len(x) for x in logs})}")
    sent, received, padded = [0] * n, [0] * n, [0] * n
    kinds: dict[str, int] = {}
    for i in range(len(logs[0])):
        entries = [log_[i] for log_ in logs]
        method = entries[0].method
        kinds[method] = kinds.get(method, 0) + 1
        if method == "all_gather":
            sizes = [e.nbytes for e in entries]
            total, longest = sum(sizes), max(sizes)
            for r in range(n):
                sent[r] += sizes[r]
                received[r] += total - sizes[r]
                padded[r] += (n - 1) * (8 + longest)
        elif method == "broadcast":
            src = entries[0].src
            size = entries[src].nbytes
            sent[src] += size
            for r in range(n):
                if r != src:
                    received[r] += size
                    padded[r] += 8 + size
    last = n - 1
    return {"collectives": kinds, "sent": [sent[0], sent[last]], "received": [received[0], received[last]],
            "padded": [padded[0], padded[last]]}


@dataclass
class RankRecord:
    """One simulated rank's timings: per operation, (start, end, thread CPU seconds) of each call."""

    ops: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    logs: dict[str, list[list[Sent]]] = field(default_factory=dict)
    error: str | None = None


def replay(c: Coordinator, values: list[tuple[str, Any, int]]) -> None:
    for method, value, src in values:
        if method == "broadcast":
            c.broadcast(value, src)
        else:
            c.all_gather(value)


def sim_rank(c: CountingCoordinator, directory: Path, saves: int, restores: int, rec: RankRecord) -> None:
    raw = c.inner

    def op(name: str, fn: Callable[[], Any]) -> Any:
        raw.barrier()  # every rank starts together; not counted, not timed
        first = len(c.sent)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        out = fn()
        rec.ops.setdefault(name, []).append((t0, time.perf_counter(), time.thread_time() - cpu0))
        rec.logs.setdefault(name, []).append(c.sent[first:])
        return out

    try:
        keep = ckptmgr.KeepLast(1)
        mgr = op("open", lambda: ckptmgr.CheckpointManager(directory, coordinator=c, sharded=True, keep=keep))
        try:
            # Steady state: the first save (untimed) leaves a step that each timed save's
            # retention then deletes, as in a training run.
            op("first save", lambda: mgr.save(1, tiny_state(c.rank, 1)))
            for k in range(saves):
                c.keep_values = k == 0
                op("save", functools.partial(mgr.save, k + 2, tiny_state(c.rank, k + 2)))
                c.keep_values = False
            for _ in range(saves):
                op("collectives", lambda: replay(raw, c.values))
            last = saves + 1
            for _ in range(restores):
                got = op("restore", lambda: mgr.restore(last))
                if got != tiny_state(c.rank, last):
                    raise RuntimeError(f"rank {c.rank} restored {got!r}, expected its own part of step {last}")
        finally:
            mgr.close()
    except BaseException as exc:  # reported by the main thread
        rec.error = f"{type(exc).__name__}: {exc}"


def commit_record_size(directory: Path, step: int) -> tuple[int, int, int]:
    """(files of ``step``, bytes of its commit record file, bytes of the record's manifest as JSON)."""
    name = storage.checkpoint_name(step)
    files = sum(1 for f in os.listdir(directory)
                if f == name or ((p := storage.parse_part_name(f)) is not None and p[0] == step))
    manifest = codec.read_meta(directory / name)
    return files, (directory / name).stat().st_size, len(json.dumps(manifest, separators=(",", ":")))


def simulate(n: int, work: Path, saves: int, restores: int, limit: float) -> dict[str, Any]:
    """Part 3 at ``n`` ranks: one thread and one manager per rank, on one directory."""
    directory = work / f"sim-{n}"
    group = [CountingCoordinator(c) for c in ThreadCoordinator.group(n, timeout=min(120.0, limit))]
    records = [RankRecord() for _ in range(n)]
    threads = [threading.Thread(target=sim_rank, args=(c, directory, saves, restores, records[c.rank]),
                                name=f"rank-{c.rank}", daemon=True) for c in group]
    started = time.perf_counter()
    for t in threads:
        t.start()
    deadline = started + limit
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    alive = sum(t.is_alive() for t in threads)
    if alive:
        # Daemon threads: they raise CoordinatorError within the timeout and never block exit.
        raise RuntimeError(f"{alive} of {n} rank threads still running after {limit:.0f} s")
    errors = [f"rank {r}: {rec.error}" for r, rec in enumerate(records) if rec.error]
    if errors:
        raise RuntimeError(f"{len(errors)} rank(s) failed, e.g. {errors[0]}")
    out: dict[str, Any] = {"n": n, "saves": saves, "restores": restores, "seconds": time.perf_counter() - started}
    for name in records[0].ops:
        calls = len(records[0].ops[name])
        wall = [max(r.ops[name][i][1] for r in records) - min(r.ops[name][i][0] for r in records)
                for i in range(calls)]
        cpu0 = [records[0].ops[name][i][2] for i in range(calls)]
        # Each other rank's median CPU per call, then the median and the max over those ranks.
        others = [statistics.median(x[2] for x in r.ops[name]) for r in records[1:]]
        out[name] = {
            "wall": wall, "cpu_rank0": cpu0,
            "cpu_others_median": statistics.median(others) if others else None,
            "cpu_others_max": max(others) if others else None,
            "traffic": traffic([r.logs[name][0] for r in records]),
        }
    out["files"], out["record_bytes"], out["manifest_bytes"] = commit_record_size(directory, saves + 1)
    index = directory / storage.INDEX_NAME
    out["index_bytes"] = index.stat().st_size if index.exists() else 0
    shutil.rmtree(directory, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------- report


def fmt_ms(t: float | None) -> str:
    return "-" if t is None else fmt_t(t)


def fmt_bytes(b: float) -> str:
    if b < 10_000:
        return f"{b:,.0f} B"
    if b < 10 * MiB:
        return f"{b / 1024:,.1f} KiB"
    return f"{b / MiB:,.1f} MiB"


def scaleout_table(s: dict[str, Any]) -> list[str]:
    t = s["times"]
    ref = med(t[ONE])
    rows = []
    for row, nbytes in ((JOB, 2 * s["shard_bytes"]), (ONE, 2 * s["shard_bytes"]), (HALF, s["shard_bytes"])):
        m = med(t[row])
        rows.append([row, fmt_t(m), f"{fmt_t(min(t[row]))} - {fmt_t(max(t[row]))}", f"{nbytes / m / 1e6:,.0f}",
                     peers.fmt_ratio(m, ref), f"{ref / m:.2f}x"])
    return md_table(["row", "save (durable), median", "min - max", "MB/s", "time / 1 process 256 MiB",
                     "speed-up"], rows)


def overhead_table(o: dict[str, Any]) -> list[str]:
    t = o["times"]
    ref_save, ref_should = med(t[SAVE_ONE]), med(t[SHOULD_ONE])
    rows = []
    for row, xs in t.items():
        m = med(xs)
        ref = ref_save if row.startswith("save") else ref_should if row.startswith("should") else None
        p90 = float(np.percentile(xs, 90)) if xs else float("nan")
        rows.append([row, fmt_ms(m), fmt_ms(p90),
                     "" if ref is None or row in (SAVE_ONE, SHOULD_ONE) else f"+{fmt_ms(m - ref)}",
                     "" if ref is None or row in (SAVE_ONE, SHOULD_ONE) else peers.fmt_ratio(m, ref)])
    return md_table(["call (rank 0's time)", "median", "p90", "over 1 process", "ratio"], rows)


def sim_tables(sims: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    timing, traffic_rows = [], []
    for s in sims:
        n = s["n"]
        save, coll, rest = s["save"], s["collectives"], s.get("restore")
        w = med(save["wall"])
        timing.append([
            f"{n:,}", f"{fmt_ms(w)} ({s['saves']})", fmt_ms(w / n), fmt_ms(med(save["cpu_rank0"])),
            f"{fmt_ms(save['cpu_others_median'])} / {fmt_ms(save['cpu_others_max'])}",
            fmt_ms(med(coll["wall"])),
            f"{fmt_ms(med(rest['wall']))} ({s['restores']})" if rest else "-",
            f"{fmt_ms(med(rest['cpu_rank0']))} / {fmt_ms(rest['cpu_others_median'])}" if rest else "-",
            fmt_ms(med(s["open"]["wall"])),
        ])
        tr = save["traffic"]
        kinds = tr["collectives"]
        rt = rest["traffic"] if rest else None
        traffic_rows.append([
            f"{n:,}", " + ".join(f"{v} {k}" for k, v in sorted(kinds.items())),
            f"{fmt_bytes(tr['sent'][0])} / {fmt_bytes(tr['sent'][1])}",
            f"{fmt_bytes(tr['received'][0])} / {fmt_bytes(tr['received'][1])}",
            fmt_bytes(tr["padded"][0]),
            f"{s['files']:,}", fmt_bytes(s["record_bytes"]), fmt_bytes(s["manifest_bytes"]),
            fmt_bytes(s["index_bytes"]),
            f"{sum(rt['collectives'].values())}, {fmt_bytes(rt['received'][1])}" if rt else "-",
        ])
    t1 = md_table(["ranks", "save wall (reps)", "wall / ranks", "rank 0 CPU / save",
                   "other ranks' CPU / save (median / max)", "its collectives alone, wall",
                   "restore wall (reps)", "restore CPU rank 0 / others (median)", "open wall"], timing)
    t2 = md_table(["ranks", "collectives per rank per save", "JSON sent: rank 0 / rank n-1",
                   "JSON received: rank 0 / rank n-1", "TorchCoordinator would receive, each rank",
                   "files per step", "commit record file", "its manifest (JSON)", "index file",
                   "restore: collectives, bytes received by a rank"], traffic_rows)
    return t1, t2


def report(res: dict[str, Any]) -> list[str]:
    env = res["environment"]
    lines = [
        "## ckptmgr with many processes",
        "",
        f"Command: `{res['command']}`  ",
        f"Run: {res['when']}, {res['seconds']:.0f} s in all.  ",
        f"Machine: {env['cpu']}; one disk ({env['scratch']}). **2 cores and one disk**: the 2 ranks share "
        "both, so part 1 shows what coordination costs here, not what a second node's disk would add.",
        "",
    ]
    job = res.get("job")
    if isinstance(job, dict):
        s, o = job["scaleout"], job["overhead"]
        lines += [
            f"### 1. Scale-out: {WORLD} ranks under torchrun vs one process ({s['reps']} repetitions, "
            "interleaved)", "",
            f"Each rank's part: {s['shard_bytes'] / MiB:.0f} MiB in {s['shard_tensors']} float32 tensors; the "
            "one-process 256 MiB save writes both parts' arrays (as a tree of two dicts) in one file. Durable "
            "saves, a fresh step each, KeepLast(1); rank 0's time from a barrier to save() returning (for "
            "the job: committed on every rank).", "",
            *scaleout_table(s), "",
            f"### 2. Coordinator overhead: tiny state, {WORLD} ranks (gloo on loopback) vs one process "
            f"({o['calls']} calls each, interleaved)", "",
            "State: 4 scalars per rank. Every call starts at a barrier of both ranks; the one-process "
            "rows run on rank 0 while rank 1 waits at the next barrier (its process's CPU time while "
            "waiting, checked once per row: "
            + ", ".join(f"{fmt_ms(cpu)} in {fmt_ms(wall)}" for cpu, wall in o["rank1_cpu_while_waiting"]) + ").", "",
            *overhead_table(o), "",
            f"torchrun job: {job['job_seconds']:.0f} s in all (start-up included; part 1 "
            f"{s['seconds']:.0f} s, part 2 {o['seconds']:.0f} s).", "",
        ]
    else:
        lines += ["### 1-2. torchrun parts: not run", "", f"{job}", ""]
    sims = res["sims"]
    if sims:
        t1, t2 = sim_tables(sims)
        lines += [
            "### 3. Simulation: n ranks as threads of one process (ThreadCoordinator)", "",
            "One CheckpointManager(sharded=True, keep=KeepLast(1)) per rank on one directory, a tiny state "
            "(4 scalars) per rank; one untimed first save, then the timed saves (each to a fresh step, "
            "deleting the previous step's files), then the restores of the last step. *wall*: first "
            "rank's start (after a barrier) to last rank's return, median; *CPU*: `time.thread_time()` "
            "of the rank's thread around its call (what the rank itself computes, user + system; waits "
            "excluded), median per rank. Every rank holds the GIL in turn, so the wall time here is "
            "roughly the sum of all ranks' CPU: *wall / ranks* approximates one rank's share. *its "
            "collectives alone*: the same collectives with the same messages as a save, replayed "
            "through the ThreadCoordinator without the manager.", "",
            *t1, "",
            "Messages and files per save (counted by a wrapping coordinator: each rank logs the JSON "
            "bytes of what it sends; what each rank receives follows from every rank's log):", "",
            *t2, "",
        ]
    for note in res["notes"]:
        lines += [f"Note: {note}", ""]
    lines += ["### Environment", "", *(f"- {k}: {v}" for k, v in env.items()), ""]
    return lines


# --------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="3 scale-out repetitions, 50 overhead calls, 2 to 128 simulated ranks (about 1 minute)")
    p.add_argument("--reps", type=int, default=None, help="scale-out repetitions (default 7; --quick 3)")
    p.add_argument("--calls", type=int, default=None, help="overhead calls per row (default 200; --quick 50)")
    p.add_argument("--sizes", default=None,
                   help="simulated world sizes, comma-separated (default 2,8,32,128,512,1024; --quick 2,8,32,128)")
    p.add_argument("--no-job", action="store_true", help="skip the torchrun parts (1 and 2)")
    p.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default under "
                                               "benchmarks/results, removed at the end)")
    p.add_argument("--out", default=str(HERE / "results"), help="where distributed.md and distributed.json go")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def iter_sizes(arg: str) -> Iterator[int]:
    for text in arg.split(","):
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise SystemExit(f"Expected --sizes to be world sizes >= 1, comma-separated. Received: {text!r}")
        yield n


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: the job is killed, scratch removed


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    quick = args.quick
    reps = args.reps or (3 if quick else 7)
    calls = args.calls or (50 if quick else 200)
    sizes = list(iter_sizes(args.sizes)) if args.sizes else list(QUICK_SIZES if quick else FULL_SIZES)
    parent = Path(args.dir) if args.dir else HERE / "results"
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".distributed-", dir=parent)).resolve()
    need = 8 * SHARD.nbytes * WORLD
    if not args.no_job and shutil.disk_usage(work).free < need:
        log(f"Not enough free disk under {work}: need about {need / 1e9:.1f} GB")
        shutil.rmtree(work, ignore_errors=True)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    started = time.time()
    res: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "benchmarks/distributed.py", *argv]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": peers.environment(work),
        "notes": [],
        "sims": [],
    }
    try:
        if args.no_job:
            res["job"] = "skipped (--no-job)"
        else:
            log(f"parts 1-2: torchrun, {WORLD} ranks, {reps} scale-out repetitions, {calls} calls per row")
            try:
                res["job"] = run_job(work, reps, calls, deadline=150.0 if quick else 300.0)
            except JobFailed as exc:
                res["job"] = f"failed: {exc}"
                log(str(exc))
        for n in sizes:
            saves, restores = sim_reps(n, quick)
            log(f"part 3: {n} simulated ranks, {saves} saves, {restores} restores")
            try:
                res["sims"].append(simulate(n, work, saves, restores, limit=300.0))
            except RuntimeError as exc:
                res["notes"].append(f"simulation at {n} ranks failed: {exc}; larger sizes skipped")
                log(res["notes"][-1])
                break
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peers.finish(res, started, report, args.out, "distributed", "ckptmgr with many processes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
