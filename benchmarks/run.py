"""ckptmgr side by side with the incumbents and with the hardware's limits, in one run.

Usage (from the repository root)::

    .venv/bin/python benchmarks/run.py            # full run, about 8-10 minutes
    .venv/bin/python benchmarks/run.py --quick    # 16 MB only, fewer repetitions, < 1 minute

It prints a table of medians and ratios, and writes ``benchmarks/results/REPORT.md``,
``results.json`` and (with matplotlib installed) ``chart.png``. See benchmarks/README.md
for what every row measures.

Method: every competitor saves the same arrays (a Keras model's weights, or arrays of
the same shapes without Keras) into a fresh file on the same disk; the repetitions are
interleaved (competitor order rotates every repetition) so that a noisy neighbour
slows all of them alike; the figure reported is the median. "durable" times include an
fsync of everything the competitor wrote (Keras, TensorFlow and NumPy do not fsync by
themselves; their own call time is reported next to it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
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
import tracemalloc
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import h5py  # noqa: E402

import ckptmgr  # noqa: E402
from ckptmgr import codec, storage  # noqa: E402

MB = 1 << 20
KERAS_WIDTH = 2048  # Dense(2048) on 2048 inputs: 16 MiB of float32 kernel per layer


# ----------------------------------------------------------------------------- helpers


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:5.0f} s] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def fsync_path(path: Path) -> None:
    """fsync a file, or every file below a directory and the directories themselves."""
    if path.is_dir():
        for sub in sorted(path.rglob("*")):
            if sub.is_file():
                storage.fsync_file(sub)
        for sub in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
            storage.fsync_directory(sub)
    else:
        storage.fsync_file(path)
        storage.fsync_directory(path.parent)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def settle() -> None:
    """Let the disk finish what earlier measurements left (deletions, discards)."""
    os.sync()
    gc.collect()


_DROP = Path("/proc/sys/vm/drop_caches")


def drop_caches() -> bool:
    """Drop the page cache (needs root); False where that is not allowed."""
    try:
        os.sync()
        _DROP.write_text("3\n")
        return True
    except OSError:
        return False


def state_nbytes(arrays: list[np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays)


def layer_shapes(nbytes: int) -> list[tuple[int, ...]]:
    """Dense-layer weight shapes (kernel, bias, ...) totalling about ``nbytes`` of float32."""
    layers = max(1, round(nbytes / (KERAS_WIDTH * KERAS_WIDTH * 4)))
    width = KERAS_WIDTH if nbytes >= KERAS_WIDTH * KERAS_WIDTH * 4 else max(8, int(math.sqrt(nbytes / 4)))
    shapes: list[tuple[int, ...]] = []
    for _ in range(layers):
        shapes += [(width, width), (width,)]
    return shapes


# ---------------------------------------------------------------------------- keras


class KerasSide:
    """A Keras model whose weights are the benchmark's state, and its savers/loaders."""

    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import logging

        import keras
        import tensorflow as tf

        logging.getLogger("absl").setLevel(logging.ERROR)  # the legacy .h5 format warning
        self.keras, self.tf = keras, tf
        width = shapes[0][0]
        layers = [keras.layers.Dense(width) for _ in range(len(shapes) // 2)]
        self.model = keras.Sequential([keras.Input((width,)), *layers])
        self.model.compile(optimizer="sgd", loss="mse")

    def weights(self) -> list[np.ndarray]:
        return self.model.get_weights()

    def checkpoint_callback(self, path: Path) -> Callable[[], None]:
        cb = self.keras.callbacks.ModelCheckpoint(
            str(path), save_weights_only=path.name.endswith(".weights.h5"), verbose=0
        )
        cb.set_model(self.model)

        def save() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # legacy .h5 format warning
                cb.on_epoch_end(0, logs={"loss": 1.0})

        return save

    def tf_manager(self, directory: Path) -> Any:
        ckpt = self.tf.train.Checkpoint(model=self.model)
        return ckpt, self.tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=1)

    def load(self, path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.name.endswith(".weights.h5"):
                self.model.load_weights(str(path))
            else:
                self.keras.models.load_model(str(path), compile=False)


def try_keras(shapes: list[tuple[int, ...]], enabled: bool) -> KerasSide | None:
    if not enabled:
        return None
    try:
        return KerasSide(shapes)
    except ImportError as exc:
        log(f"  (no Keras rows: {exc})")
        return None


# ------------------------------------------------------------------------ competitors


class Bench:
    """One size: the state, the scratch directory, and the save/restore competitors."""

    def __init__(self, nbytes_target: int, scratch: Path, keras: bool) -> None:
        shapes = layer_shapes(nbytes_target)
        self.ks = try_keras(shapes, keras)
        if self.ks is not None:
            self.arrays = self.ks.weights()
        else:
            rng = np.random.default_rng(0)
            self.arrays = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
        self.nbytes = state_nbytes(self.arrays)
        self.state = {"params": list(self.arrays), "step": 0}
        self.dir = scratch / f"size-{self.nbytes}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.counter = 0
        self._last_raw = math.nan
        self.paired_copy: list[float] = []
        self.keep: dict[str, Path] = {}  # one saved copy per format, for the restore rows

    def fresh(self, name: str) -> Path:
        self.counter += 1
        return self.dir / f"{self.counter:05d}-{name}"

    # Each saver returns (call seconds, durable seconds, path written).

    def save_raw(self) -> tuple[float, float, Path]:
        """os.write of every array into one file, then fsync: the disk's limit."""
        path = self.fresh("raw.bin")
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for a in self.arrays:
                view = memoryview(a).cast("B")
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
            t1 = time.perf_counter()
            os.fsync(fd)
        finally:
            os.close(fd)
        t2 = time.perf_counter()
        self._last_raw = t2 - t0
        return t1 - t0, t2 - t0, path

    def save_raw_atomic(self) -> tuple[float, float, Path]:
        """The same, plus what crash safety adds: a rename and an fsync of the directory."""
        _, _, tmp = self.save_raw()
        t0 = time.perf_counter()
        final = tmp.with_name(tmp.name + ".final")
        os.replace(tmp, final)
        storage.fsync_directory(final.parent)
        extra = time.perf_counter() - t0
        return math.nan, self._last_raw + extra, final

    def save_dd(self) -> tuple[float, float, Path]:
        path = self.fresh("dd.bin")
        bs = 4 * MB
        count = -(-self.nbytes // bs)
        t0 = time.perf_counter()
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={path}", f"bs={bs}", f"count={count}", "conv=fsync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        t = time.perf_counter() - t0
        return t, t, path

    def save_ckpt(self, async_save: bool) -> tuple[float, float, Path]:
        directory = self.fresh("ckptmgr-async" if async_save else "ckptmgr")
        mgr = ckptmgr.CheckpointManager(directory, async_save=async_save)
        if async_save:
            # The same copy just before, in the same conditions: the paired reference.
            self.paired_copy.append(self.copy_state()[0])
        try:
            t0 = time.perf_counter()
            info = mgr.save(1, self.state, force=True)
            t1 = time.perf_counter()
            mgr.wait()
            t2 = time.perf_counter()
        finally:
            mgr.close()
        assert info is not None
        return t1 - t0, t2 - t0, directory

    def save_h5py(self) -> tuple[float, float, Path]:
        path = self.fresh("raw.h5")
        t0 = time.perf_counter()
        with h5py.File(path, "w") as f:
            for i, a in enumerate(self.arrays):
                f.create_dataset(str(i), data=a)
        t1 = time.perf_counter()
        fsync_path(path)
        return t1 - t0, time.perf_counter() - t0, path

    def save_npz(self) -> tuple[float, float, Path]:
        path = self.fresh("state.npz")
        t0 = time.perf_counter()
        np.savez(path, *self.arrays)
        t1 = time.perf_counter()
        fsync_path(path)
        return t1 - t0, time.perf_counter() - t0, path

    def save_keras(self, suffix: str) -> tuple[float, float, Path]:
        assert self.ks is not None
        directory = self.fresh("keras")
        directory.mkdir()
        path = directory / f"model{suffix}"
        save = self.ks.checkpoint_callback(path)
        t0 = time.perf_counter()
        save()
        t1 = time.perf_counter()
        fsync_path(directory)
        return t1 - t0, time.perf_counter() - t0, path

    def save_tf(self) -> tuple[float, float, Path]:
        assert self.ks is not None
        directory = self.fresh("tfckpt")
        _ckpt, mgr = self.ks.tf_manager(directory)
        t0 = time.perf_counter()
        mgr.save()
        t1 = time.perf_counter()
        fsync_path(directory)
        return t1 - t0, time.perf_counter() - t0, directory

    def copy_state(self) -> tuple[float, float, None]:
        """A NumPy copy of every array into fresh memory: what an async snapshot costs."""
        t0 = time.perf_counter()
        copies = [a.copy() for a in self.arrays]
        t = time.perf_counter() - t0
        del copies
        return t, t, None

    def savers(self) -> dict[str, Callable[[], tuple[float, float, Any]]]:
        rows: dict[str, Callable[[], tuple[float, float, Any]]] = {
            "limit: os.write+fsync": self.save_raw,
            "limit: os.write+fsync+rename+dir fsync": self.save_raw_atomic,
            "limit: dd conv=fsync": self.save_dd,
            "limit: numpy copy": self.copy_state,
            "ckptmgr sync save": lambda: self.save_ckpt(False),
            "ckptmgr async save": lambda: self.save_ckpt(True),
            "h5py create_dataset": self.save_h5py,
            "np.savez": self.save_npz,
        }
        if self.ks is not None:
            rows["keras ModelCheckpoint .keras"] = lambda: self.save_keras(".keras")
            rows["keras ModelCheckpoint .h5"] = lambda: self.save_keras(".h5")
            rows["keras ModelCheckpoint .weights.h5"] = lambda: self.save_keras(".weights.h5")
            rows["tf.train.CheckpointManager"] = self.save_tf
        return rows

    # Restore: each loader reads what the matching saver wrote.

    def loaders(self) -> dict[str, Callable[[], Any]]:
        k = self.keep
        rows: dict[str, Callable[[], Any]] = {}

        # Every loader keeps all the arrays it read, as a restore must: one that dropped
        # each array would reuse its memory and skip the page faults of the whole state.
        def raw() -> list[Any]:
            fd = os.open(k["limit: os.write+fsync"], os.O_RDONLY)
            arrays = []
            try:
                for a in self.arrays:
                    out = np.empty(a.shape, a.dtype)
                    view = memoryview(out).cast("B")
                    done = 0
                    while done < len(view):
                        done += os.readv(fd, [view[done:]])
                    arrays.append(out)
            finally:
                os.close(fd)
            return arrays

        rows["limit: os.readv"] = raw

        def h5raw() -> list[Any]:
            with h5py.File(k["h5py create_dataset"], "r") as f:
                return [f[str(i)][()] for i in range(len(self.arrays))]

        rows["h5py read (raw)"] = h5raw
        reader = ckptmgr.CheckpointManager(k["ckptmgr sync save"], read_only=True)
        rows["ckptmgr restore (verified)"] = lambda: reader.restore(1)
        rows["ckptmgr restore (verify=False)"] = lambda: reader.restore(1, verify=False)

        def npload() -> list[Any]:
            with np.load(k["np.savez"]) as z:
                return [z[name] for name in z.files]

        rows["np.load"] = npload
        if self.ks is not None:
            for suffix in (".keras", ".h5", ".weights.h5"):
                path = k[f"keras ModelCheckpoint {suffix}"]
                rows[f"keras load {suffix}"] = lambda path=path: self.ks.load(path)  # type: ignore[union-attr]
            ckpt, mgr = self.ks.tf_manager(k["tf.train.CheckpointManager"])
            rows["tf.train.Checkpoint restore"] = lambda: ckpt.restore(mgr.latest_checkpoint).assert_consumed()
        return rows


def rotate(names: list[str], rep: int) -> list[str]:
    r = rep % len(names)
    return names[r:] + names[:r]


# Cold reads only for these rows: the Keras/TensorFlow loaders are CPU-bound and slow.
_COLD_ROWS = ("limit", "h5py", "ckptmgr", "np.load")


def run_size(nbytes_target: int, scratch: Path, reps: int, keras: bool, cold: bool, first: bool) -> dict[str, Any]:
    bench = Bench(nbytes_target, scratch, keras)
    log(f"size {bench.nbytes / MB:.0f} MiB ({len(bench.arrays)} arrays)")
    savers = bench.savers()
    calls: dict[str, list[float]] = {n: [] for n in savers}
    durable: dict[str, list[float]] = {n: [] for n in savers}
    for rep in range(reps):
        for name in rotate(list(savers), rep):
            settle()
            t_call, t_durable, path = savers[name]()
            calls[name].append(t_call)
            durable[name].append(t_durable)
            if path is not None:
                old = bench.keep.get(name)
                bench.keep[name] = path
                if old is not None:
                    remove(old)
        log(f"  save rep {rep + 1}/{reps} done")
    settle()
    loaders = bench.loaders()
    warm: dict[str, list[float]] = {n: [] for n in loaders}
    coldt: dict[str, list[float]] = {n: [] for n in loaders}
    if first:
        for fn in loaders.values():  # once untimed: lazy imports and first-call costs
            fn()
    can_drop = cold and drop_caches()
    for rep in range(reps):
        for name in rotate(list(loaders), rep):
            # Cold first, then warm: the cold read brings the file back into the page
            # cache. Rows without a cold reading are read once untimed first, since
            # another row's drop_caches() evicted their file too.
            if can_drop and name.startswith(_COLD_ROWS):
                gc.collect()
                drop_caches()
                t0 = time.perf_counter()
                result = loaders[name]()
                coldt[name].append(time.perf_counter() - t0)  # before the result is freed
                del result
            elif can_drop:
                loaders[name]()
            gc.collect()
            t0 = time.perf_counter()
            result = loaders[name]()
            warm[name].append(time.perf_counter() - t0)
            del result
        log(f"  restore rep {rep + 1}/{reps} done")
    for path in bench.keep.values():
        remove(path)
    remove(bench.dir)
    return {
        "nbytes": bench.nbytes,
        "arrays": len(bench.arrays),
        "save_call": {n: median(v) for n, v in calls.items()},
        "save_durable": {n: median(v) for n, v in durable.items()},
        "save_durable_all": durable,
        "save_call_all": calls,
        "async_vs_paired_copy": median([c / p for c, p in zip(calls["ckptmgr async save"], bench.paired_copy,
                                                               strict=True)]),
        "restore_warm": {n: median(v) for n, v in warm.items()},
        "restore_cold": {n: median(v) for n, v in coldt.items() if v},
        "restore_warm_all": warm,
        "cold_dropped": can_drop,
    }


# --------------------------------------------------------------------------- checksums


def bench_checksums(nbytes: int, reps: int) -> dict[str, float]:
    """GB/s of each candidate checksum over one buffer (median of interleaved runs)."""
    buf = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    fns: dict[str, Callable[[Any], Any]] = {"zlib.crc32": zlib.crc32}
    try:
        import crc32c

        fns["crc32c"] = crc32c.crc32c
    except ImportError:
        pass
    try:
        import xxhash

        fns["xxh3_64"] = xxhash.xxh3_64_intdigest
        fns["xxh64"] = xxhash.xxh64_intdigest
    except ImportError:
        pass
    fns["sha256"] = lambda b: hashlib.sha256(b).digest()
    fns["numpy copy (reference)"] = lambda b: np.copy(b)
    times: dict[str, list[float]] = {n: [] for n in fns}
    for rep in range(reps):
        for name in rotate(list(fns), rep):
            t0 = time.perf_counter()
            fns[name](buf)
            times[name].append(time.perf_counter() - t0)
    return {n: nbytes / median(t) / 1e9 for n, t in times.items()}


# ------------------------------------------------------------------------- bookkeeping


def _populate(directory: Path, count: int, rng: np.random.Generator) -> None:
    state = {"w": np.zeros(4, np.float32), "step": 0}
    now = time.time() - count
    for step in range(1, count + 1):
        meta = {"step": step, "time": now + step, "metrics": {"val_loss": float(rng.random())}, "tracker": None}
        codec.write_file(directory / storage.checkpoint_name(step), state, meta, writeback=storage.Writeback)


def bench_bookkeeping(counts: list[int], saves: int, base: Path) -> dict[str, Any]:
    """save() of a tiny state with N checkpoints present, minus the bare write+commit."""
    out: dict[str, Any] = {}
    rng = np.random.default_rng(2)
    state = {"w": np.zeros(4, np.float32), "step": 0}
    for count in counts:
        directory = Path(tempfile.mkdtemp(prefix=f"ckptmgr-bk-{count}-", dir=base))
        try:
            _populate(directory, count, rng)
            t0 = time.perf_counter()
            mgr = ckptmgr.CheckpointManager(
                directory, save_every=ckptmgr.EverySteps(1),
                keep=ckptmgr.KeepLast(count) | ckptmgr.KeepBest(2), monitor="val_loss",
            )
            t_open = time.perf_counter() - t0
            save_t, raw_t = [], []
            step = count
            for _ in range(saves):
                # Alternate: a full save(), then the same bytes written and committed alone.
                step += 1
                t0 = time.perf_counter()
                mgr.save(step, state, metrics={"val_loss": float(rng.random())})
                save_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                storage.write_atomic(directory, "bare.h5", lambda tmp: codec.write_file(tmp, state, {"step": 0}, writeback=storage.Writeback))
                raw_t.append(time.perf_counter() - t0)
            present = len(mgr.checkpoints)
            n = 2000
            t0 = time.perf_counter()
            for i in range(n):
                mgr.should_save(step + 1 + i, {"val_loss": 0.5})
            should_save = (time.perf_counter() - t0) / n
            n = 20
            t0 = time.perf_counter()
            for _ in range(n):
                mgr.best  # noqa: B018
            best = (time.perf_counter() - t0) / n
            mgr.close()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        out[str(count)] = {
            "present": present,
            "save": median(save_t),
            "write": median(raw_t),
            "bookkeeping": max(median(save_t) - median(raw_t), 0.0),
            "should_save": should_save,
            "best": best,
            "setup_s": t_open,
        }
        log(f"  bookkeeping with {count} checkpoints: {out[str(count)]['bookkeeping'] * 1e3:.2f} ms")
    return out


# ------------------------------------------------------------------------ callback cost


def bench_callbacks(batches: int, reps: int) -> dict[str, Any]:
    """Per-batch cost of checkpoint callbacks that do not save, in a real fit()."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    out: dict[str, Any] = {}
    try:
        import keras
    except ImportError as exc:
        return {"error": str(exc)}
    try:
        from ckptmgr.adapters import keras as ck_keras  # type: ignore[attr-defined]
    except ImportError:
        ck_keras = None
    out["adapter"] = ck_keras is not None
    x = np.random.default_rng(3).standard_normal((batches * 8, 16)).astype(np.float32)
    y = x[:, :1].copy()
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    tmp = Path(tempfile.mkdtemp(prefix="ckptmgr-cb-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    never = 10**9  # batches: the callbacks run every batch but never save
    factories: dict[str, Callable[[], list[Any]]] = {
        "fit() without callbacks": lambda: [],
        "keras ModelCheckpoint": lambda: [
            keras.callbacks.ModelCheckpoint(str(tmp / "k.weights.h5"), save_weights_only=True, save_freq=never)
        ],
        "keras BackupAndRestore": lambda: [keras.callbacks.BackupAndRestore(str(tmp / "bk"), save_freq=never)],
    }
    if ck_keras is not None:
        factories["ckptmgr.adapters.keras.ModelCheckpoint"] = lambda: [ck_keras.ModelCheckpoint(
            str(tmp / f"ck-{time.monotonic_ns()}" / "m.weights.h5"), save_weights_only=True, save_freq=never)]
        factories["ckptmgr.adapters.keras.BackupAndRestore"] = lambda: [ck_keras.BackupAndRestore(
            str(tmp / f"bk-{time.monotonic_ns()}"), save_freq=never)]
    times: dict[str, list[float]] = {n: [] for n in factories}
    cpu: dict[str, list[float]] = {n: [] for n in factories}
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # trace and warm up
    failed: dict[str, str] = {}
    for rep in range(reps):
        for name in rotate([n for n in factories if n not in failed], rep):
            cbs = factories[name]()
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=cbs)
            except Exception as exc:  # a callback under development: report, go on
                failed[name] = f"{type(exc).__name__}: {exc}"
                log(f"  {name} failed: {failed[name]}")
                continue
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            for cb in cbs:
                with contextlib.suppress(Exception):
                    cb.model = None
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(exist_ok=True)
    base = median(times["fit() without callbacks"])
    cpu_base = median(cpu["fit() without callbacks"])
    out["fit"] = {
        n: {"seconds": median(t), "per_batch_us": median(t) / batches * 1e6,
            "overhead": median(t) / base - 1.0, "cpu_overhead": median(cpu[n]) / cpu_base - 1.0,
            "min_overhead": min(t) / min(times["fit() without callbacks"]) - 1.0,
            "spread": (max(t) - min(t)) / median(t)}
        for n, t in times.items() if n not in failed
    }
    out["failed"] = failed
    # The callbacks' own per-batch cost, called directly: precise where fit() is noisy.
    direct = {}
    for name, make in factories.items():
        cbs = make()
        if not cbs or name in failed:
            continue
        cb = cbs[0]
        cb.set_model(model)
        cb.set_params({"epochs": 1, "steps": 10**7, "verbose": 0})
        cb.on_train_begin({})
        cb.on_epoch_begin(0, {})
        n = 20_000
        logs = {"loss": 0.5}
        t0 = time.perf_counter()
        for i in range(n):
            cb.on_train_batch_begin(i, None)
            cb.on_train_batch_end(i, logs)
        direct[name] = (time.perf_counter() - t0) / n * 1e6
        with contextlib.suppress(Exception):
            cb.on_train_end({})
    out["direct_us"] = direct
    # The core's own per-call cost, which any adapter pays per batch at least.
    mgr = ckptmgr.CheckpointManager(tmp / "core", save_every=ckptmgr.EverySteps(never))
    n = 100_000
    t0 = time.perf_counter()
    for step in range(n):
        mgr.should_save(step)
    out["should_save_us"] = (time.perf_counter() - t0) / n * 1e6
    mgr.close()
    shutil.rmtree(tmp, ignore_errors=True)
    out["batches"] = batches
    return out


# ----------------------------------------------------------------------------- memory


def memory_child(op: str, nbytes_target: int, directory: str) -> dict[str, float]:
    """Run in a fresh process: extra peak memory of one operation, over the state itself."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s, dtype=np.float32) for s in layer_shapes(nbytes_target)]
    state = {"params": arrays, "step": 0}
    nbytes = state_nbytes(arrays)
    d = Path(directory)
    if op == "restore":
        with ckptmgr.CheckpointManager(d) as mgr:
            mgr.save(1, state, force=True)
        del state, arrays
        gc.collect()
    # ru_maxrss is useless here: exec keeps the parent's peak. Reset the kernel's
    # high-water mark instead (Linux >= 4.0), and read it back from /proc.
    gc.collect()
    reset = _reset_peak_rss()
    before_rss = _status_kb("VmRSS")
    tracemalloc.start()
    t_base = tracemalloc.get_traced_memory()[0]
    if op in ("sync", "async"):
        with ckptmgr.CheckpointManager(d, async_save=op == "async") as mgr:
            mgr.save(1, state, force=True)
            mgr.wait()
    elif op == "restore":
        reader = ckptmgr.CheckpointManager(d, read_only=True)
        result = reader.restore(1)
        del result
    elif op == "h5py":
        with h5py.File(d / "raw.h5", "w") as f:
            for i, a in enumerate(arrays):
                f.create_dataset(str(i), data=a)
    elif op == "savez":
        np.savez(d / "s.npz", *arrays)
    peak = tracemalloc.get_traced_memory()[1] - t_base
    tracemalloc.stop()
    peak_rss = _status_kb("VmHWM")
    return {
        "nbytes": nbytes,
        "tracemalloc_peak": peak,
        "rss_peak_over_start": peak_rss - before_rss if reset else math.nan,
    }


def _status_kb(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5\n")
        return True
    except OSError:
        return False


def bench_memory(sizes: list[int], scratch: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in sizes:
        row = {}
        for op in ("sync", "async", "restore", *(("h5py", "savez") if size <= 256 * MB else ())):
            directory = Path(tempfile.mkdtemp(prefix=f"mem-{op}-", dir=scratch))
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-child", op, str(size), str(directory)],
                capture_output=True, text=True, check=False,
            )
            shutil.rmtree(directory, ignore_errors=True)
            if proc.returncode != 0:
                log(f"  memory child {op} failed: {proc.stderr[-500:]}")
                continue
            row[op] = json.loads(proc.stdout.strip().splitlines()[-1])
        out[str(size)] = row
        log(f"  memory at {size / MB:.0f} MiB done")
    return out


# ---------------------------------------------------------------------------- reports


def warm_memory(nbytes: int) -> None:
    """Touch and free memory once before measuring.

    On this kind of virtual machine the first touch of memory the guest has not used
    for a while costs several times an ordinary page fault (the host backs it then);
    without this, whichever competitor runs first pays for it.
    """
    nbytes = min(nbytes, int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.4))
    chunk = 256 * MB
    blocks = [np.ones(chunk, np.uint8) for _ in range(max(1, nbytes // chunk))]
    del blocks
    gc.collect()


def environment(scratch: Path) -> dict[str, Any]:
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "h5py": h5py.version.version,
        "hdf5": h5py.version.hdf5_version,
        "ckptmgr_format": codec.FORMAT_VERSION,
        "ckptmgr_checksum": getattr(codec, "LEAF_CHECKSUM_NAME", codec.CHECKSUM_NAME),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "load average at start (1, 5, 15 min)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "scratch": str(scratch),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        env["memory_gb"] = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9, 1)
    with contextlib.suppress(Exception):
        df = subprocess.run(["df", "-hT", str(scratch)], capture_output=True, text=True).stdout.splitlines()[-1]
        env["disk"] = " ".join(df.split())
    return env


def fmt_t(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 10:
        return f"{seconds * 1e3:.1f} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.1f} s"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines, padded so that it reads well in a terminal too."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *[line(r) for r in rows]]


def save_section(results: dict[str, Any]) -> list[str]:
    sizes = results["sizes"]
    names = list(next(iter(sizes.values()))["save_durable"])
    headers = ["save (durable, median)"]
    for s in sizes.values():
        mb = f"{s['nbytes'] / MB:.0f} MiB"
        headers += [mb, "MB/s", "vs limit"]
    rows = []
    for name in names:
        row = [name]
        for s in sizes.values():
            t = s["save_durable"].get(name, math.nan)
            limit = s["save_durable"]["limit: os.write+fsync"]
            cell = fmt_t(t)
            if name == "ckptmgr async save":
                cell = f"{fmt_t(s['save_call'][name])} blocking / {fmt_t(t)} total"
            durable = t == t and name != "limit: numpy copy"
            row += [cell, f"{s['nbytes'] / t / 1e6:.0f}" if durable else "", f"{limit / t:.2f}x" if durable else ""]
        rows.append(row)
    lines = ["### Save", "", *table(headers, rows), ""]
    lines += ["Own call time without the fsync (what the library itself does; not durable):", ""]
    headers2 = ["call only (median)", *[f"{s['nbytes'] / MB:.0f} MiB" for s in sizes.values()]]
    rows2 = [[n, *[fmt_t(s["save_call"][n]) for s in sizes.values()]]
             for n in names if not n.startswith("limit") and n != "ckptmgr sync save"]
    return [*lines, *table(headers2, rows2), ""]


def restore_section(results: dict[str, Any]) -> list[str]:
    sizes = results["sizes"]
    names = list(next(iter(sizes.values()))["restore_warm"])
    cold = any(s["restore_cold"] for s in sizes.values())
    headers = ["restore (median)"]
    for s in sizes.values():
        mb = f"{s['nbytes'] / MB:.0f} MiB"
        headers += [f"{mb} warm", "vs h5py"] + ([f"{mb} cold", "vs h5py"] if cold else [])
    rows = []
    for name in names:
        row = [name]
        for s in sizes.values():
            t, ref = s["restore_warm"][name], s["restore_warm"]["h5py read (raw)"]
            row += [fmt_t(t), f"{ref / t:.2f}x"]
            if cold:
                tc, refc = s["restore_cold"].get(name, math.nan), s["restore_cold"].get("h5py read (raw)", math.nan)
                row += [fmt_t(tc), f"{refc / tc:.2f}x" if tc == tc else ""]
        rows.append(row)
    note = ("warm: the file is in the page cache (the CPU-side cost); cold: page cache dropped "
            "before each read (`echo 3 > /proc/sys/vm/drop_caches`)." if cold else
            "warm only: the page cache could not be dropped here.")
    return ["### Restore", "", *table(headers, rows), "", note, ""]


def targets(results: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    out = []
    for s in results["sizes"].values():
        mb = f"{s['nbytes'] / MB:.0f} MiB"
        d, c, w = s["save_durable"], s["save_call"], s["restore_warm"]
        r = d["limit: os.write+fsync"] / d["ckptmgr sync save"]
        out.append((f"durable sync save vs os.write+fsync, {mb}", r, ">= 0.90x", r >= 0.90))
        r = d["limit: os.write+fsync+rename+dir fsync"] / d["ckptmgr sync save"]
        out.append((f"durable sync save vs os.write+fsync+rename+dir fsync, {mb}", r, ">= 0.90x", r >= 0.90))
        r = d["limit: dd conv=fsync"] / d["ckptmgr sync save"]
        out.append((f"durable sync save vs dd conv=fsync, {mb}", r, ">= 0.90x", r >= 0.90))
        r = c["ckptmgr async save"] / c["limit: numpy copy"]
        out.append((f"async save() blocking vs numpy copy (row medians), {mb}", r, "<= 1.5x", r <= 1.5))
        r = s["async_vs_paired_copy"]
        out.append((f"async save() blocking vs numpy copy just before it (median of pairs), {mb}", r, "<= 1.5x",
                    r <= 1.5))
        r = w["h5py read (raw)"] / w["ckptmgr restore (verified)"]
        out.append((f"verified restore vs raw h5py read (warm), {mb}", r, ">= 0.75x", r >= 0.75))
        if s["restore_cold"]:
            cold = s["restore_cold"]
            r = cold["h5py read (raw)"] / cold["ckptmgr restore (verified)"]
            out.append((f"verified restore vs raw h5py read (cold), {mb}", r, ">= 0.75x", r >= 0.75))
    bk = results.get("bookkeeping") or {}
    if "10" in bk and "2000" in bk:
        r = bk["2000"]["save"] / bk["10"]["save"]
        out.append(("save() on tmpfs with 2,000 checkpoints vs with 10", r, "<= 1.5x", r <= 1.5))
        r = bk["2000"]["bookkeeping"] / max(bk["10"]["bookkeeping"], 1e-6)
        out.append(("bookkeeping (save() - write) with 2,000 vs with 10", r, "<= 1.5x", r <= 1.5))
    cb = results.get("callbacks") or {}
    if cb.get("fit"):
        batch_us = cb["fit"]["fit() without callbacks"]["per_batch_us"]
        for name, row in cb["fit"].items():
            if name.startswith("ckptmgr"):
                out.append((f"{name} in fit(), not saving (wall)", row["overhead"] * 100, "<= 2 %",
                            row["overhead"] <= 0.02))
                if name in cb.get("direct_us", {}):
                    v = cb["direct_us"][name] / batch_us * 100
                    out.append((f"{name} hooks per batch (direct)", v, "<= 2 %", v <= 2))
    return out


def report_lines(results: dict[str, Any]) -> list[str]:
    lines = ["## Results", "", f"Command: `{results['command']}`  ", f"Run: {results['when']}, "
             f"{results['seconds']:.0f} s, {results['reps']} repetitions per row (median).", ""]
    if results.get("sizes"):
        lines += save_section(results) + restore_section(results)
    if results.get("checksums"):
        cs = results["checksums"]
        lines += [f"### Checksum throughput ({results['checksum_bytes'] / MB:.0f} MiB buffer, one core)", "",
                  *table(["checksum", "GB/s", "vs zlib.crc32"],
                         [[n, f"{v:.2f}", f"{v / cs['zlib.crc32']:.1f}x"] for n, v in cs.items()]), ""]
    if results.get("bookkeeping"):
        bk = results["bookkeeping"]
        base = max(bk[min(bk, key=int)]["bookkeeping"], 1e-9)
        save_base = bk[min(bk, key=int)]["save"]
        lines += ["### Per-save bookkeeping (tiny state on tmpfs, KeepLast(N) | KeepBest(2))", "",
                  *table(["checkpoints present", "save()", "vs fewest", "bare write+commit", "bookkeeping",
                          "vs fewest", "should_save()", "mgr.best", "first open (no index)"],
                         [[f"{v['present']:,}", fmt_t(v["save"]), f"{v['save'] / save_base:.1f}x", fmt_t(v["write"]),
                           fmt_t(v["bookkeeping"]), f"{v['bookkeeping'] / base:.0f}x", fmt_t(v["should_save"]),
                           fmt_t(v["best"]), fmt_t(v["setup_s"])] for v in bk.values()]), "",
                  "bookkeeping = median save() minus the median of the same tiny file written and committed "
                  "alone (storage.write_atomic), alternating.", ""]
    if results.get("callbacks"):
        cb = results["callbacks"]
        if "fit" in cb:
            base = cb["fit"]["fit() without callbacks"]["seconds"]
            batch_us = base / cb["batches"] * 1e6
            direct = cb.get("direct_us", {})
            lines += [f"### Callback cost in fit() when not saving ({cb['batches']} batches per epoch)", "",
                      *table(["callbacks", "fit() epoch", "per batch", "overhead (wall)", "(fastest run)",
                              "overhead (CPU)", "run-to-run spread", "hooks called directly", "of a batch"],
                             [[n, fmt_t(v["seconds"]), f"{v['per_batch_us']:.0f} us", f"{v['overhead'] * 100:+.1f} %",
                               f"{v['min_overhead'] * 100:+.1f} %",
                               f"{v['cpu_overhead'] * 100:+.1f} %", f"{v['spread'] * 100:.0f} %",
                               f"{direct[n]:.2f} us" if n in direct else "",
                               f"{direct[n] / batch_us * 100:.3f} %" if n in direct else ""]
                              for n, v in cb["fit"].items()]), "",
                      "Callbacks never reach their save_freq. 'hooks called directly': "
                      "on_train_batch_begin + on_train_batch_end in a loop, per batch; fit()'s own wall "
                      "and CPU time vary by the spread shown between runs on this machine.", ""]
            if not cb.get("adapter"):
                lines += ["ckptmgr.adapters.keras was not importable: no ckptmgr callback row.", ""]
            lines += [f"Core `should_save()` per call: {cb['should_save_us']:.2f} us "
                      f"({cb['should_save_us'] / (base / cb['batches'] * 1e6) * 100:.2f} % of a batch).", ""]
        else:
            lines += [f"Callback benchmark skipped: {cb.get('error')}", ""]
    if results.get("memory"):
        rows = []
        for size, ops in results["memory"].items():
            for op, m in ops.items():
                rows.append([f"{int(size) / MB:.0f} MiB", op, f"{m['tracemalloc_peak'] / MB:.1f} MiB",
                             f"{m['tracemalloc_peak'] / m['nbytes']:.2f}x",
                             f"{m['rss_peak_over_start'] / MB:.1f} MiB", f"{m['rss_peak_over_start'] / m['nbytes']:.2f}x"])
        lines += ["### Peak memory (fresh process per row; state already in memory)", "",
                  "tracemalloc: Python and NumPy allocations (virtual: a buffer allocated but never "
                  "touched counts in full); RSS: the kernel's peak resident set (VmHWM, reset just "
                  "before the operation) over the resident set at its start, page cache excluded.", "",
                  *table(["state", "operation", "tracemalloc peak", "x state", "RSS peak over start", "x state"],
                         rows), ""]
    t = targets(results)
    if t:
        lines += ["### Targets", "", *table(["target", "measured", "goal", "met"],
                                            [[n, f"{v:.2f}" + (" %" if "%" in g else "x"), g, "yes" if ok else "NO"]
                                             for n, v, g, ok in t]), ""]
    for name, error in (results.get("errors") or {}).items():
        lines += [f"Section {name} failed: {error}", ""]
    fails = (results.get("callbacks") or {}).get("failed") or {}
    for name, error in fails.items():
        lines += [f"Callback row {name} failed: {error}", ""]
    env = results["environment"]
    lines += ["### Environment", "", *[f"- {k}: {v}" for k, v in env.items()],
              f"- page cache dropped for cold reads: {results.get('cold_dropped')}", ""]
    return lines


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = results["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    for ax, key, title in ((axes[0], "save_durable", "durable save (MB/s, higher is better)"),
                           (axes[1], "restore_warm", "restore, warm cache (MB/s)")):
        names = [n for n in next(iter(sizes.values()))[key] if n != "limit: numpy copy"]
        width = 0.8 / len(sizes)
        for i, s in enumerate(sizes.values()):
            vals = [s["nbytes"] / s[key][n] / 1e6 for n in names]
            ax.barh([j + i * width for j in range(len(names))], vals, height=width,
                    label=f"{s['nbytes'] / MB:.0f} MiB")
        ax.set_yticks([j + width * (len(sizes) - 1) / 2 for j in range(len(names))])
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 MiB, 3 repetitions, short sections (< 1 minute)")
    p.add_argument("--sizes", default=None, help="state sizes in MiB, comma-separated (default 16,256,1024)")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions per row (default 5, and 3 above 64 MiB; --quick 3)")
    p.add_argument("--only", default="save,checksums,bookkeeping,callbacks,memory",
                   help="sections to run, comma-separated (save includes restore)")
    p.add_argument("--bookkeeping", default=None, help="checkpoint counts (default 10,2000,10000; --quick 10,2000)")
    p.add_argument("--no-keras", action="store_true", help="skip the Keras/TensorFlow rows")
    p.add_argument("--no-cold", action="store_true", help="do not drop the page cache for cold reads")
    p.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: under benchmarks/)")
    p.add_argument("--out", default=str(HERE / "results"), help="where REPORT.md, results.json, chart.png go")
    p.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.memory_child:
        op, size, directory = args.memory_child
        print(json.dumps(memory_child(op, int(size), directory)))
        return 0
    sizes = [int(float(s) * MB) for s in (args.sizes or ("16" if args.quick else "16,256,1024")).split(",")]
    reps = args.reps or (3 if args.quick else 5)
    counts = [int(c) for c in (args.bookkeeping or ("10,2000" if args.quick else "10,2000,10000")).split(",")]
    only = set(args.only.split(","))
    scratch_parent = Path(args.dir) if args.dir else HERE
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=scratch_parent))
    free = shutil.disk_usage(scratch).free
    need = max(sizes) * 12 if "save" in only else 0
    if need > free:
        log(f"Not enough free disk under {scratch}: need about {need / 1e9:.1f} GB, have {free / 1e9:.1f} GB")
        return 2
    started = time.time()
    if "save" in only:
        warm_memory(3 * max(sizes))
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/run.py", *argv]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "reps": reps,
        "environment": environment(scratch),
        "sizes": {},
    }

    def section(name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # keep what the other sections measured
            import traceback

            traceback.print_exc()
            results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"

    def run_checksums() -> None:
        log("checksums")
        results["checksum_bytes"] = min(max(sizes), 256 * MB)
        results["checksums"] = bench_checksums(results["checksum_bytes"], max(reps, 5))

    def run_sizes() -> None:
        for i, size in enumerate(sizes):
            # Fewer repetitions of the large sizes keep the full run under ~10 minutes.
            n = args.reps or (reps if size <= 64 * MB else 3)
            r = run_size(size, scratch, n, not args.no_keras, not args.no_cold, i == 0)
            results["cold_dropped"] = r["cold_dropped"]
            results["sizes"][str(size)] = r
            gc.collect()

    def run_bookkeeping() -> None:
        log("bookkeeping")
        tmpfs = Path("/dev/shm") if os.path.isdir("/dev/shm") else scratch
        results["bookkeeping"] = bench_bookkeeping(counts, 15 if args.quick else 40, tmpfs)

    def run_callbacks() -> None:
        log("callbacks")
        results["callbacks"] = bench_callbacks(200 if args.quick else 500, 3 if args.quick else 7)

    def run_memory() -> None:
        log("memory")
        results["memory"] = bench_memory(sizes if not args.quick else sizes[:1], scratch)

    try:
        if "checksums" in only:
            section("checksums", run_checksums)
        if "save" in only:
            section("save", run_sizes)
        if "bookkeeping" in only:
            section("bookkeeping", run_bookkeeping)
        if "callbacks" in only and not args.no_keras:
            section("callbacks", run_callbacks)
        if "memory" in only:
            section("memory", run_memory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["seconds"] = time.time() - started
    results["environment"]["load average at end (1, 5, 15 min)"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = report_lines(results)
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    has_chart = bool(results["sizes"]) and chart(results, out / "chart.png")
    head = ["# ckptmgr benchmark report", "", "Produced by `benchmarks/run.py`; see benchmarks/README.md.", ""]
    if has_chart:
        head += ["![throughput](chart.png)", ""]
    (out / "REPORT.md").write_text("\n".join(head + lines) + "\n")
    log(f"wrote {out / 'REPORT.md'}" + (f" and {out / 'chart.png'}" if has_chart else " (no chart)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
