"""ckptmgr against its peers on states of many small tensors (issue #16).

Usage (from the repository root)::

    .venv/bin/python benchmarks/peers.py            # states a,b,c (about 8-10 minutes on 2 cores)
    .venv/bin/python benchmarks/peers.py --quick    # states a and c, 2 repetitions each (under 2 minutes)

Every candidate saves the same flat ``dict[str, np.ndarray]`` of float32 arrays into a
fresh file on the same disk and reads it back; every save is durable (file(s) and
directory fsynced, inside the timing). Repetitions are interleaved, the candidate order
rotating every repetition; the figures are medians, and every ratio is
``peer time / ckptmgr time`` (> 1.00x: ckptmgr is faster). Peak memory of a restore is
measured in a fresh child process (this script with a hidden flag). It prints a Markdown
table and writes ``benchmarks/results/peers.md`` and ``peers.json``. See
benchmarks/README.md ("Peers: many small tensors") for what every row measures.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import ckptmgr  # noqa: E402

MiB = 1 << 20
CHUNK = 8 * MiB
PRIME = {"prime": np.zeros(1, np.float32)}  # ckptmgr's untimed first save into each directory
MEMORY_TAG = "PEERS-MEMORY "
PREWARM = 2  # x the state's bytes, touched and freed before every timed operation (see prewarm())
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:5.0f} s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- states


@dataclass(frozen=True)
class StateSpec:
    key: str
    nbytes: int
    ntensors: int
    width: int  # the hidden size: every vector has this many floats
    seed: int
    what: str


STATES = {
    "a": StateSpec("a", 16 * MiB, 2_000, 256, 1, "16 MiB in 2,000 tensors (a small transformer's state_dict)"),
    "b": StateSpec("b", 64 * MiB, 20_000, 256, 2, "64 MiB in 20,000 tensors"),
    "c": StateSpec("c", 256 * MiB, 100, 2048, 3, "256 MiB in 100 tensors"),
}
BLOCK_MATRICES = ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "mlp.fc1.weight",
                  "mlp.fc2.weight")
BLOCK_VECTORS = ("norm1.weight", "norm1.bias", "attn.q.bias", "attn.k.bias", "attn.v.bias", "attn.o.bias",
                 "norm2.weight", "norm2.bias", "mlp.fc2.bias")


def state_shapes(spec: StateSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Transformer-like shapes: blocks of matrices plus many vectors, and an embedding.

    Each block has q/k/v/o (d, d), fc1 (4d, d) and fc2 (d, 4d) matrices; all the other
    tensors are vectors of d floats (norm weights and biases, projection biases, extra
    norms), spread over the blocks; an embedding (rows, d) takes the remaining bytes.
    """
    d = spec.width
    floats = spec.nbytes // 4
    blocks = max(1, int((floats - spec.ntensors * d) * 0.9 // (12 * d * d)))
    vectors = spec.ntensors - 6 * blocks - 1
    rows = (floats - 12 * d * d * blocks - vectors * d) // d
    if vectors < 0 or rows < 1:
        raise ValueError(f"Expected a state that fits its tensor count. Received: spec={spec}")
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (rows, d))]
    for b in range(blocks):
        mats = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]
        shapes += [(f"blocks.{b:03d}.{n}", s) for n, s in zip(BLOCK_MATRICES, mats, strict=True)]
        count = vectors // blocks + (1 if b < vectors % blocks else 0)
        names = [*BLOCK_VECTORS, *(f"extra_norm.{j:04d}.weight" for j in range(max(0, count - len(BLOCK_VECTORS))))]
        shapes += [(f"blocks.{b:03d}.{n}", (d,)) for n in names[:count]]
    return shapes


def make_state(spec: StateSpec) -> dict[str, np.ndarray]:
    """Deterministic random float32 arrays, each one allocated on its own (as a model's)."""
    rng = np.random.default_rng(spec.seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in state_shapes(spec)}


# ------------------------------------------------------------------- files and cache


def files_under(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(Path(root, f) for root, _, fs in os.walk(path) for f in fs)
    return [path] if path.exists() else []


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(path: Path) -> None:
    """fsync a file (or every file and directory below ``path``) and its parent directory."""
    if path.is_dir():
        for root, _, fs in os.walk(path):
            for f in fs:
                fsync_path(Path(root, f))
            fsync_path(Path(root), directory=True)
    else:
        fsync_path(path)
    fsync_path(path.parent, directory=True)


def drop_cache(path: Path) -> None:
    """Evict every file of a checkpoint from the page cache (no root needed)."""
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(path: Path) -> None:
    """Read every file of a checkpoint once (untimed), so that a warm read finds it cached."""
    buf = bytearray(CHUNK)
    for f in files_under(path):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in files_under(path))


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


def read_all(path: Path) -> np.ndarray:
    """One buffer the size of the file, filled by reads (what any restore must at least do)."""
    out = np.empty(os.path.getsize(path), np.uint8)
    view = memoryview(out)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.readv(fd, [view[done:]])
            if n == 0:
                raise EOFError(f"{path}: short read at {done} of {len(view)} bytes")
            done += n
    finally:
        os.close(fd)
    return out


def cold_check(directory: Path, nbytes: int = 64 * MiB) -> dict[str, Any]:
    """Does posix_fadvise(DONTNEED) really make the next read slower here?"""
    path = directory / "cold-check.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, memoryview(np.random.default_rng(0).integers(0, 255, nbytes, np.uint8)))
        os.fsync(fd)
    finally:
        os.close(fd)
    warm: list[float] = []
    cold: list[float] = []
    try:
        for _ in range(3):
            warm_cache(path)
            t0 = time.perf_counter()
            read_all(path)
            warm.append(time.perf_counter() - t0)
            drop_cache(path)
            t0 = time.perf_counter()
            read_all(path)
            cold.append(time.perf_counter() - t0)
    finally:
        remove(path)
    w, c = statistics.median(warm), statistics.median(cold)
    return {"bytes": nbytes, "warm_s": w, "cold_s": c, "ratio": c / w, "ok": c / w >= 1.3}


def prefault(arrays: Any, write: bool = False) -> None:
    """Touch one byte per page of arrays about to be read (or written) by a timed operation.

    On this kind of VM, memory left idle for some seconds faults again on its next touch
    (tens of ms per 256 MiB); without this, a row whose input sat idle (the limit's one
    buffer, the copy's destination) would pay it, and the state's arrays would not.
    """
    if isinstance(arrays, dict):
        arrays = list(arrays.values())
    elif isinstance(arrays, np.ndarray):
        arrays = [arrays]
    for a in arrays:
        if isinstance(a, np.ndarray) and a.flags.c_contiguous and a.nbytes:
            flat = a.reshape(-1).view(np.uint8)
            if write:
                flat[::4096] = 0
            else:
                flat[::4096].max()


def prewarm(nbytes: int) -> None:
    """Allocate, touch and free ``nbytes``, so that the next allocations get host-backed pages.

    On this VM (virtio-balloon free page reporting) memory freed for a second or two is
    handed back to the host, and touching it again costs about 10x an ordinary page fault
    (about 250 ms per 256 MiB instead of 25 ms). Every restore allocates the state and
    every save fills the page cache, so whichever row happened to follow an idle moment
    would pay it. Done right before every timed operation, for every row alike.
    """
    a = np.empty(nbytes, np.uint8)
    a[::4096] = 1
    del a


# ------------------------------------------------------------------------ candidates


@dataclass
class Saved:
    """What one save left on disk, and how to read it back."""

    path: Path  # the file, or the directory holding the checkpoint
    step: int = 1
    handle: Any = None  # an in-process object to restore through (ckptmgr's manager)
    extra: dict[str, float] = field(default_factory=dict)

    def close(self) -> None:
        if self.handle is not None and hasattr(self.handle, "close"):
            self.handle.close()
        self.handle = None


@dataclass
class Restore:
    row: str
    fn: Callable[[Saved], Any]
    checks: str  # what this restore verifies, by default
    optional: str | None = None  # a keyword that may not exist yet: n/a when restore() rejects it
    memory: bool = True  # measure its peak memory in a child process


SaveFn = Callable[[Any, Path, int], "tuple[float, Saved | None]"]


@dataclass
class Candidate:
    key: str
    row: str  # the row of its save (its first restore shares it when it has the same name)
    modules: tuple[str, ...]  # imported to decide whether it is installed
    prepare: Callable[[dict[str, np.ndarray]], Any]
    save: SaveFn
    restores: list[Restore] = field(default_factory=list)
    to_numpy: Callable[[Any, dict[str, np.ndarray]], dict[str, np.ndarray]] = lambda r, s: dict(r)
    touch: Callable[[Any], None] | None = None  # prefault the payload (the state is always prefaulted)
    save_note: str = ""
    missing: str | None = None


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def same(x: Any) -> Any:
    return x


# ckptmgr ------------------------------------------------------------------------------


def ckptmgr_save(state: dict[str, np.ndarray], work: Path, rep: int, async_save: bool = False) -> tuple[float, Saved]:
    """A fresh manager in a fresh directory per repetition; its first save (tiny; for async
    saves the state itself) is untimed."""
    directory = work / f"ckptmgr{'-async' if async_save else ''}-{rep}"
    mgr = ckptmgr.CheckpointManager(directory, keep=None, async_save=async_save)
    # Async: prime with the state itself, so that the timed save is a steady-state one (a
    # training loop saves many times: each snapshot reuses the previous one's memory).
    mgr.save(0, state if async_save else PRIME)
    mgr.wait()
    gc.collect()
    t0 = time.perf_counter()
    mgr.save(1, state)
    blocking = time.perf_counter() - t0
    mgr.wait()
    total = time.perf_counter() - t0
    return blocking, Saved(directory, 1, mgr, {"total": total} if async_save else {})


def _manager(saved: Saved) -> Any:
    if saved.handle is None:  # a memory child: a reader of the directory the parent wrote
        saved.handle = ckptmgr.CheckpointManager(saved.path, read_only=True)
    return saved.handle


def ckptmgr_restore(saved: Saved) -> Any:
    return _manager(saved).restore(saved.step)


def ckptmgr_restore_mmap(saved: Saved) -> Any:
    return _manager(saved).restore(saved.step, mmap=True)


def ckptmgr_restore_mmap_touch(saved: Saved) -> Any:
    out = _manager(saved).restore(saved.step, mmap=True)
    for a in out.values():
        a.sum()
    return out


# peers ------------------------------------------------------------------------------------


def safetensors_save(state: dict[str, np.ndarray], work: Path, rep: int) -> tuple[float, Saved]:
    from safetensors.numpy import save_file

    path = work / f"safetensors-{rep}.safetensors"
    t0 = time.perf_counter()
    save_file(state, str(path))
    make_durable(path)
    return time.perf_counter() - t0, Saved(path)


def safetensors_restore(saved: Saved) -> Any:
    from safetensors.numpy import load_file

    return load_file(str(saved.path))


def torch_prepare(state: dict[str, np.ndarray]) -> Any:
    import torch

    return {k: torch.from_numpy(v) for k, v in state.items()}


def torch_save(tensors: Any, work: Path, rep: int) -> tuple[float, Saved]:
    import torch

    path = work / f"torch-{rep}.pt"
    t0 = time.perf_counter()
    torch.save(tensors, path)
    make_durable(path)
    return time.perf_counter() - t0, Saved(path)


def torch_restore(saved: Saved) -> Any:
    import torch

    return torch.load(saved.path, weights_only=True)


def npz_save(state: dict[str, np.ndarray], work: Path, rep: int) -> tuple[float, Saved]:
    path = work / f"numpy-{rep}.npz"
    t0 = time.perf_counter()
    np.savez(path, **state)
    make_durable(path)
    return time.perf_counter() - t0, Saved(path)


def npz_restore(saved: Saved) -> Any:
    with np.load(saved.path) as z:
        return {k: z[k] for k in z.files}


def h5py_save(state: dict[str, np.ndarray], work: Path, rep: int) -> tuple[float, Saved]:
    import h5py

    path = work / f"h5py-{rep}.h5"
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        for k, v in state.items():
            f.create_dataset(k, data=v)
    make_durable(path)
    return time.perf_counter() - t0, Saved(path)


def h5py_restore(saved: Saved) -> Any:
    import h5py

    with h5py.File(saved.path, "r") as f:
        return {k: f[k][()] for k in f}


_ORBAX: list[Any] = []


def orbax_checkpointer() -> Any:
    if not _ORBAX:
        import logging

        import orbax.checkpoint as ocp

        logging.getLogger("absl").setLevel(logging.ERROR)
        _ORBAX.append(ocp.PyTreeCheckpointer())
    return _ORBAX[0]


def orbax_save(state: dict[str, np.ndarray], work: Path, rep: int) -> tuple[float, Saved]:
    ckptr = orbax_checkpointer()
    path = (work / f"orbax-{rep}").resolve()  # orbax wants an absolute path
    t0 = time.perf_counter()
    ckptr.save(path, state)
    make_durable(path)
    return time.perf_counter() - t0, Saved(path)


def orbax_restore(saved: Saved) -> Any:
    return orbax_checkpointer().restore(saved.path)


# limits -----------------------------------------------------------------------------------


def one_buffer(state: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([a.reshape(-1).view(np.uint8) for a in state.values()])


def split_buffer(buf: np.ndarray, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for k, a in state.items():
        out[k] = buf[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape)
        offset += a.nbytes
    return out


def raw_save(buf: np.ndarray, work: Path, rep: int) -> tuple[float, Saved]:
    path = work / f"raw-{rep}.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, memoryview(buf))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(work, directory=True)
    return time.perf_counter() - t0, Saved(path)


def raw_restore(saved: Saved) -> Any:
    return read_all(saved.path)


def copyto_prepare(state: dict[str, np.ndarray]) -> Any:
    dst = {k: np.empty_like(v) for k, v in state.items()}
    for a in dst.values():
        a.fill(0)  # fault the destination in: this row is a copy into memory already there
    return state, dst


def copyto_save(payload: Any, work: Path, rep: int) -> tuple[float, None]:
    state, dst = payload
    t0 = time.perf_counter()
    for k, v in state.items():
        np.copyto(dst[k], v)
    return time.perf_counter() - t0, None


def copy_save(state: dict[str, np.ndarray], work: Path, rep: int) -> tuple[float, None]:
    t0 = time.perf_counter()
    out = {k: v.copy() for k, v in state.items()}
    t = time.perf_counter() - t0
    del out
    return t, None


# the list ---------------------------------------------------------------------------------

CKPTMGR = "ckptmgr"
ASYNC_ROW = "ckptmgr async_save=True: save() blocks"
MMAP_ROWS = ("ckptmgr restore(mmap=True): return", "ckptmgr restore(mmap=True): return + sum every array")
RAW_ROW = "limit: one os.write + fsync / one read into one buffer"
COPYTO_ROW = "limit: memcpy, np.copyto into preallocated arrays"
COPY_ROW = "limit: memcpy, a fresh copy (allocates)"
NO_CHECK = "none"
MMAP_CHECKS = "metadata and layout; array checksums not (ckptmgr's documented mmap behaviour)"


def candidates() -> list[Candidate]:
    cands = [
        Candidate("ckptmgr", CKPTMGR, ("ckptmgr",), same, ckptmgr_save, [
            Restore(CKPTMGR, ckptmgr_restore, "checksums of every array (verify=True)"),
            Restore(MMAP_ROWS[0], ckptmgr_restore_mmap, MMAP_CHECKS, "mmap"),
            Restore(MMAP_ROWS[1], ckptmgr_restore_mmap_touch, MMAP_CHECKS, "mmap"),
        ], save_note="fsyncs file + directory itself (temp file, rename)"),
        Candidate("ckptmgr-async", ASYNC_ROW, ("ckptmgr",), same,
                  lambda s, w, r: ckptmgr_save(s, w, r, async_save=True),
                  save_note="time until save() returns; the write runs in the background"),
        Candidate("safetensors", "safetensors.numpy save_file / load_file", ("safetensors.numpy",), same,
                  safetensors_save, [Restore("", safetensors_restore, "header and offsets only")]),
        Candidate("torch", "torch.save / torch.load(weights_only=True)", ("torch",), torch_prepare, torch_save,
                  [Restore("", torch_restore, NO_CHECK + " (zip CRC-32 not checked)")],
                  to_numpy=lambda r, s: {k: v.numpy() for k, v in r.items()}),
        Candidate("numpy", "np.savez / np.load", (), same, npz_save,
                  [Restore("", npz_restore, "zip CRC-32 of every array")]),
        Candidate("h5py", "h5py, one dataset per tensor", ("h5py",), same, h5py_save,
                  [Restore("", h5py_restore, NO_CHECK)]),
        Candidate("orbax", "orbax.checkpoint PyTreeCheckpointer", ("orbax.checkpoint",), same, orbax_save,
                  [Restore("", orbax_restore, NO_CHECK)],
                  to_numpy=lambda r, s: {k: np.asarray(v) for k, v in r.items()}),
        Candidate("raw", RAW_ROW, (), one_buffer, raw_save,
                  [Restore("", raw_restore, NO_CHECK)],
                  to_numpy=lambda r, s: split_buffer(r, s), touch=prefault),
        Candidate("copyto", COPYTO_ROW, (), copyto_prepare, copyto_save, save_note="no file",
                  touch=lambda p: prefault(p[1], write=True)),
        Candidate("copy", COPY_ROW, (), same, copy_save, save_note="no file"),
    ]
    for c in cands:
        for r in c.restores:
            r.row = r.row or c.row
    return cands


def check_installed(cands: list[Candidate]) -> None:
    for c in cands:
        for m in c.modules:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    importlib.import_module(m)
            except Exception as exc:  # an ImportError, or a broken install
                c.missing = f"not installed: import {m} failed ({type(exc).__name__}: {str(exc)[:120]})"
                break


# ----------------------------------------------------------------------- measurement


def equal_states(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> str | None:
    """None when equal, else what differs."""
    if set(got) != set(want):
        return f"keys differ ({len(got)} restored, {len(want)} saved)"
    for k, w in want.items():
        g = np.asarray(got[k])
        if g.dtype != w.dtype or g.shape != w.shape or not np.array_equal(g, w):
            return f"array {k!r} differs ({g.dtype}{g.shape} vs {w.dtype}{w.shape})"
    return None


def memory_child(cand: Candidate, restore: Restore, saved: Saved, nbytes: int) -> float | str:
    """Peak resident memory of one restore, over the state's size, in a fresh process."""
    spec = json.dumps({"candidate": cand.key, "restore": restore.row, "path": str(saved.path), "step": saved.step})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            m = json.loads(line[len(MEMORY_TAG):])
            return (m["peak"] - m["baseline"]) / nbytes
    return f"child failed (rc {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}"


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_memory_child(spec_json: str) -> dict[str, Any]:
    spec = json.loads(spec_json)
    cand = next(c for c in candidates() if c.key == spec["candidate"])
    restore = next(r for r in cand.restores if r.row == spec["restore"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in cand.modules:
            importlib.import_module(m)
        if cand.key == "orbax":
            orbax_checkpointer()
    saved = Saved(Path(spec["path"]), spec["step"])
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    baseline = vm_hwm()
    out = restore.fn(saved)
    peak = vm_hwm()
    del out
    return {"baseline": baseline, "peak": peak}


@dataclass
class Row:
    name: str
    save: list[float] = field(default_factory=list)
    save_total: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    cold: list[float] = field(default_factory=list)
    memory: float | str | None = None
    disk: float | None = None
    checks: str = ""
    status: str = "ok"
    restore_status: str = ""
    note: str = ""


class StateRun:
    """One state: its arrays, the candidates' payloads, and every row's measurements."""

    def __init__(
        self, spec: StateSpec, cands: list[Candidate], work: Path, cold: bool, memory: bool, settle: bool = False,
    ) -> None:
        self.spec = spec
        self.settle = settle
        self.state = make_state(spec)
        self.nbytes = sum(a.nbytes for a in self.state.values())
        self.work = work / f"state-{spec.key}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.cold, self.memory = cold, memory
        self.prewarm = PREWARM * self.nbytes
        self.rows: dict[str, Row] = {}
        self.active: list[Candidate] = []
        self.skip: set[str] = set()  # restore rows that are n/a or failed
        self.payloads: dict[str, Any] = {}
        for c in cands:
            self.rows.setdefault(c.row, Row(c.row, note=c.save_note))
            for r in c.restores:
                self.rows.setdefault(r.row, Row(r.row)).checks = r.checks
            if c.missing:
                for name in [c.row, *(r.row for r in c.restores)]:
                    self.rows[name].status = c.missing
            else:
                self.active.append(c)

    def verify(self) -> None:
        """Untimed round: save once, check every restore's arrays, peak memory, size on disk."""
        for c in list(self.active):
            log(f"  {self.spec.key}: check {c.key}")
            try:
                self.payloads[c.key] = c.prepare(self.state)
                _, saved = c.save(self.payloads[c.key], self.work, 0)
            except Exception as exc:
                self.fail(c, [c.row, *(r.row for r in c.restores)], f"save failed: {type(exc).__name__}: {exc}")
                continue
            if saved is None:
                continue
            self.rows[c.row].disk = disk_bytes(saved.path) / self.nbytes
            try:
                for r in c.restores:
                    try:
                        out = r.fn(saved)
                    except TypeError as exc:
                        if r.optional is None or r.optional not in str(exc):
                            self.fail_restore(r.row, f"restore failed: {type(exc).__name__}: {exc}")
                            continue
                        self.rows[r.row].status = f"n/a (restore() has no {r.optional} keyword)"
                        self.skip.add(r.row)
                        continue
                    except Exception as exc:
                        self.fail_restore(r.row, f"restore failed: {type(exc).__name__}: {exc}")
                        continue
                    wrong = equal_states(c.to_numpy(out, self.state), self.state)
                    del out
                    if wrong:
                        self.fail_restore(r.row, f"WRONG RESULT: {wrong}")
                        continue
                    if self.memory and r.memory:
                        self.rows[r.row].memory = memory_child(c, r, saved, self.nbytes)
            finally:
                saved.close()
                remove(saved.path)

    def fail(self, c: Candidate, rows: list[str], why: str) -> None:
        log(f"  {self.spec.key}: {c.key}: {why}")
        for name in rows:
            self.rows[name].status = why[:300]
            self.skip.add(name)
        if c.row in rows and c in self.active:
            self.active.remove(c)

    def fail_restore(self, row: str, why: str) -> None:
        log(f"  {self.spec.key}: {row}: {why}")
        self.rows[row].restore_status = why[:300]
        self.skip.add(row)

    def ready(self) -> None:
        """Just before a timed operation: the same memory conditions for every row."""
        gc.collect()
        prewarm(self.prewarm)

    def measure(self, c: Candidate, rep: int) -> None:
        prefault(self.state)
        if c.touch is not None:
            c.touch(self.payloads[c.key])
        if self.settle:
            os.sync()  # what the rows before wrote goes to the disk first, untimed
        self.ready()
        t, saved = c.save(self.payloads[c.key], self.work, rep)
        row = self.rows[c.row]
        row.save.append(t)
        if saved is None:
            return
        try:
            if "total" in saved.extra:
                row.save_total.append(saved.extra["total"])
            for r in c.restores:
                if r.row in self.skip:
                    continue
                warm_cache(saved.path)
                self.ready()
                t, out = timed(lambda r=r: r.fn(saved))
                del out
                self.rows[r.row].warm.append(t)
                if self.cold:
                    drop_cache(saved.path)
                    self.ready()
                    t, out = timed(lambda r=r: r.fn(saved))
                    del out
                    self.rows[r.row].cold.append(t)
        finally:
            saved.close()
            remove(saved.path)

    def run(self, reps: int) -> None:
        self.verify()
        for rep in range(1, reps + 1):
            k = (rep - 1) % len(self.active)
            order = self.active[k:] + self.active[:k]  # rotate: noise hits every candidate alike
            log(f"  {self.spec.key}: repetition {rep}/{reps}: {', '.join(c.key for c in order)}")
            for c in order:
                self.measure(c, rep)

    def result(self, reps: int) -> dict[str, Any]:
        shapes = [a.shape for a in self.state.values()]
        return {
            "what": self.spec.what,
            "nbytes": self.nbytes,
            "ntensors": len(self.state),
            "vectors": sum(len(s) == 1 for s in shapes),
            "matrices": sum(len(s) == 2 for s in shapes),
            "largest": list(max(shapes, key=lambda s: math.prod(s))),
            "reps": reps,
            "rows": {name: vars(row) for name, row in self.rows.items()},
        }


# ----------------------------------------------------------------------------- report


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def fmt_t(t: float) -> str:
    if t != t:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 0.01:
        return f"{t * 1e3:.2f} ms"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def fmt_ratio(x: float, ref: float) -> str:
    return "-" if x != x or ref != ref or ref <= 0 else f"{x / ref:.2f}x"


def md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]


def state_table(s: dict[str, Any], cold: bool) -> list[str]:
    rows = s["rows"]
    ref = rows[CKPTMGR]
    ref_save, ref_warm, ref_cold = med(ref["save"]), med(ref["warm"]), med(ref["cold"])
    headers = ["candidate", "save (durable)", "peer/ckptmgr", "restore warm", "peer/ckptmgr"]
    if cold:
        headers += ["restore cold", "peer/ckptmgr"]
    headers += ["restore peak RSS / state", "disk / state", "restore checks"]
    out = []
    for name, r in rows.items():
        if r["status"] != "ok" and not (r["save"] or r["warm"]):
            out.append([name, r["status"], *[""] * (len(headers) - 2)])
            continue
        save = fmt_t(med(r["save"])) if r["save"] else ""
        if r["save_total"]:
            save = f"{save} (written: {fmt_t(med(r['save_total']))})"
        cells = [name, save, fmt_ratio(med(r["save"]), ref_save) if r["save"] and name != ASYNC_ROW else "",
                 fmt_t(med(r["warm"])) if r["warm"] else r["restore_status"],
                 fmt_ratio(med(r["warm"]), ref_warm) if r["warm"] else ""]
        if cold:
            cells += [fmt_t(med(r["cold"])) if r["cold"] else "", fmt_ratio(med(r["cold"]), ref_cold) if r["cold"] else ""]
        mem = r["memory"]
        cells += [f"{mem:.2f}x" if isinstance(mem, float) else ("error" if mem else ""),
                  f"{r['disk']:.2f}x" if r["disk"] else "", r["checks"]]
        out.append(cells)
    return md_table(headers, out)


def summary_table(states: dict[str, Any], cold: bool) -> list[str]:
    """Ratios only, states side by side: peer median / ckptmgr median."""
    keys = list(states)
    headers = ["candidate", *(f"save {k}" for k in keys), *(f"warm {k}" for k in keys)]
    if cold:
        headers += [f"cold {k}" for k in keys]
    names = [n for n in next(iter(states.values()))["rows"] if n not in (CKPTMGR, ASYNC_ROW)]
    out = []
    for name in names:
        cells = [name]
        for col in ("save", "warm", *(("cold",) if cold else ())):
            for k in keys:
                r, ref = states[k]["rows"][name], states[k]["rows"][CKPTMGR]
                cells.append(fmt_ratio(med(r[col]), med(ref[col])) if r[col] else "")
        if any(cells[1:]):
            out.append(cells)
    return md_table(headers, out)


def report(res: dict[str, Any]) -> list[str]:
    cold = res["cold"]
    cc = res["cold_check"]
    lines = [
        "## ckptmgr vs peers: states of many small tensors",
        "",
        f"Command: `{res['command']}`  ",
        f"Run: {res['when']}, {res['seconds']:.0f} s in all.",
        "",
        "- **Ratio** `peer/ckptmgr` = the row's median time / ckptmgr's median time in the same column "
        "(save: ckptmgr's sync save; restore: ckptmgr's verified restore()). **> 1.00x: ckptmgr is faster**; "
        "< 1.00x: the row is faster. Limit rows have the same ratio: their time over ckptmgr's.",
        "- **Same durability**: every save row is durable inside its timing: the file(s) and the directory "
        "fsynced. ckptmgr does it itself (temp file, fsync, rename, directory fsync); every peer row is the "
        "peer's own call + an fsync of each file and directory it wrote.",
        "- Times are **medians** of interleaved repetitions (the candidate order rotates every repetition); "
        "every save writes a fresh file; every restore was checked once (untimed) to return arrays equal "
        "to the saved ones (dtype, shape, values)"
        + ("; `os.sync()` ran (untimed) before every save (--settle)." if res.get("settle") else "."),
        "- **warm**: the checkpoint's files are in the page cache; **cold**: `posix_fadvise(DONTNEED)` on "
        "every file of the checkpoint (after an fsync) just before the read. Check on this disk: a "
        f"{cc['bytes'] // MiB} MiB file read in {fmt_t(cc['warm_s'])} warm, {fmt_t(cc['cold_s'])} after the "
        f"drop ({cc['ratio']:.1f}x){'' if cc['ok'] else ': NOT clearly slower, cold figures may be warm'}."
        if cold else "- cold reads: skipped (--no-cold).",
        "- **restore peak RSS / state**: a fresh process per cell imports the library, resets VmHWM "
        "(`/proc/self/clear_refs`), restores the file the parent wrote (in the page cache) and reports "
        "(VmHWM after - VmHWM before) / state bytes.",
        "- **restore checks**: what each restore verifies by default (checked by hand with one flipped byte in "
        "the middle of the data file: \"none\" loads it silently).",
        "",
    ]
    for key, s in res["states"].items():
        lines += [f"### State {key}: {s['what']}", "",
                  f"{s['nbytes'] / MiB:.1f} MiB of float32 in {s['ntensors']:,} arrays ({s['vectors']:,} vectors, "
                  f"{s['matrices']:,} matrices, largest {tuple(s['largest'])}); {s['reps']} repetitions.", "",
                  *state_table(s, cold), ""]
        rows = s["rows"]
        a, c1, c2 = (med(rows[n]["save"]) if n in rows else float("nan") for n in (ASYNC_ROW, COPYTO_ROW, COPY_ROW))
        if a == a:
            lines += [f"ckptmgr async save() blocks {fmt_t(a)}: {fmt_ratio(a, c1)} np.copyto into preallocated "
                      f"arrays ({fmt_t(c1)}), {fmt_ratio(a, c2)} a fresh copy ({fmt_t(c2)}); until wait() "
                      f"returns: {fmt_t(med(rows[ASYNC_ROW]['save_total']))}.", ""]
        bad = [f"{n}: {r['status']}" for n, r in rows.items() if r["status"] != "ok" and (r["save"] or r["warm"])]
        bad += [f"{n}: {r['restore_status']}" for n, r in rows.items() if r["restore_status"]]
        lines += [f"Note: {b}" for b in bad] + ([""] if bad else [])
    if len(res["states"]) > 1:
        lines += ["### All states side by side (peer/ckptmgr, > 1.00x: ckptmgr is faster)", "",
                  *summary_table(res["states"], cold), ""]
    lines += ["### Environment", "", *(f"- {k}: {v}" for k, v in res["environment"].items()), ""]
    return lines


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(work: Path) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    fs = "?"
    try:
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind = line.split()[:3]
            if str(work.resolve()).startswith(mnt) and len(mnt) >= len(best):
                best, fs = mnt, f"{kind} on {dev} (mounted at {mnt})"
    except OSError:
        pass
    libs = ", ".join(f"{d} {version(d)}" for d in ("numpy", "h5py", "safetensors", "torch", "orbax-checkpoint",
                                                    "jax", "tensorstore"))
    return {
        "python": platform.python_version(),
        "libraries": f"ckptmgr {ckptmgr.__version__} (commit {commit or '?'}, working tree as run), {libs}",
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "kernel": platform.release(),
        "scratch": f"{work} ({fs})",
        "load average at start (1, 5, 15 min)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# ------------------------------------------------------------------------------- main

FULL_REPS = {"a": 5, "b": 3, "c": 5}
QUICK_REPS = {"a": 2, "b": 1, "c": 2}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--states", default=None, help="which states, comma-separated (default a,b,c; --quick a,c)")
    p.add_argument("--quick", action="store_true", help="states a,c; 2 repetitions each (under 2 minutes)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per state (default a:5 b:3 c:5; --quick a:2 b:1 c:2)")
    p.add_argument("--only", default=None, help="candidates, comma-separated keys (ckptmgr is always in)")
    p.add_argument("--with-orbax", action="store_true",
                   help="also Orbax (its JAX/tensorstore threads stay in the process and slow the rows after it)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold restores")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--settle", action="store_true",
                   help="os.sync() before every timed save (a disk that throttles after a burst then "
                        "charges each save less for the writes of the rows before it)")
    p.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default benchmarks/results)")
    p.add_argument("--out", default=str(HERE / "results"), help="where peers.md and peers.json go")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def iter_states(arg: str) -> Iterator[StateSpec]:
    for k in arg.split(","):
        if k.strip() not in STATES:
            raise SystemExit(f"Expected --states among {','.join(STATES)}. Received: {k!r}")
        yield STATES[k.strip()]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.memory_child:
        print(MEMORY_TAG + json.dumps(run_memory_child(args.memory_child)), flush=True)
        return 0
    specs = list(iter_states(args.states or ("a,c" if args.quick else "a,b,c")))
    cands = candidates()
    if args.only:
        keep = {"ckptmgr", *args.only.split(",")}
        cands = [c for c in cands if c.key in keep]
    elif not args.with_orbax:
        # Orbax leaves JAX/tensorstore threads running in the process, and every row
        # after it that runs Python (ckptmgr most) slows down: measured at 2,000 tensors,
        # ckptmgr's save 31.5 -> 45.6 ms and restore 15.5 -> 19.8 ms, safetensors' save
        # 30.7 -> 33.8 ms. So it runs only when asked (--with-orbax or --only orbax),
        # best in a run of its own.
        cands = [c for c in cands if c.key != "orbax"]
    check_installed(cands)
    for c in cands:
        if c.missing:
            log(f"{c.key}: {c.missing}")
    parent = Path(args.dir) if args.dir else HERE / "results"
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".peers-", dir=parent)).resolve()
    need = 4 * max(s.nbytes for s in specs)
    if shutil.disk_usage(work).free < need:
        log(f"Not enough free disk under {work}: need about {need / 1e9:.1f} GB")
        shutil.rmtree(work, ignore_errors=True)
        return 2
    started = time.time()
    res: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "benchmarks/peers.py", *argv]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cold": not args.no_cold,
        "settle": args.settle,
        "environment": environment(work),
        "states": {},
    }
    try:
        res["cold_check"] = cold_check(work)
        log(f"cold check: {res['cold_check']}")
        for spec in specs:
            reps = args.reps or (QUICK_REPS if args.quick else FULL_REPS)[spec.key]
            log(f"state {spec.key}: {spec.what}, {reps} repetitions")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the peers' deprecation chatter
                run = StateRun(spec, cands, work, not args.no_cold, not args.no_memory, args.settle)
                run.run(reps)
            res["states"][spec.key] = run.result(reps)
            del run
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    finish(res, started, report, args.out, "peers", "ckptmgr vs peers")
    return 0


def finish(res: dict[str, Any], started: float, report: Callable[[dict[str, Any]], list[str]], out_dir: str,
           stem: str, title: str) -> None:
    """Print a benchmark's tables and write them (and its raw results) to ``out_dir``:
    ``<stem>.md`` and ``<stem>.json``. Shared by the scripts of benchmarks/."""
    res["seconds"] = time.time() - started
    res["environment"]["load average at end (1, 5, 15 min)"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = report(res)
    print("\n".join(lines))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    (out / f"{stem}.md").write_text(f"# {title}\n\nProduced by `benchmarks/{stem}.py`; see "
                                    "benchmarks/README.md.\n\n" + "\n".join(lines) + "\n")
    log(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
