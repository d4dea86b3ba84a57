"""Shared by the reliability harness (tests/test_reliability_*.py) and test_lock.py.

- Counting: :func:`record` appends what a test tried (and what it found) to a JSON-lines
  file under ``$CKPTMGR_RELIABILITY_RESULTS``; ``tools/reliability_report.py`` sets it,
  runs the harness and turns the counts into RELIABILITY.md. Without it, nothing is
  written.
- Content: the state, metric and payload bytes of every step are pure functions of the
  step, so any checkpoint found after a crash can be checked bit for bit.
- :class:`Plan`: one writer workload (native or payload checkpoints, retention, async,
  prune) and a model of what its directory must hold after the save of any step.
- :class:`Hooks`: wraps the ``os`` and ckptmgr functions the commit protocol goes through
  (write, fsync, rename, unlink, open, index update), labels each call by the kind of
  file it touches, and lets a test crash (``os._exit``), fail (raise ``OSError``) or
  just mark the call. Crash children use it, and so do the fault tests.
- Child processes: forked from a ``multiprocessing`` fork server that has imported
  NumPy, h5py and ckptmgr once, so a child starts in milliseconds; they are real
  processes, killed with SIGKILL and reaped like any other.
- :class:`OutsideWatch`: inotify on a directory outside the checkpoint directory, to
  prove that nothing there was opened, read or written.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import json
import mmap
import multiprocessing
import multiprocessing.context
import os
import re
import shutil
import struct
import sys
import threading
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from _trees import assert_tree_equal

import ckptmgr
from ckptmgr import codec, storage

RESULTS_ENV = "CKPTMGR_RELIABILITY_RESULTS"
CRASH_EXIT = 86  # what a child exits with at a deterministic crash point
MONITOR = "val_loss"

# ----------------------------------------------------------------------- counting


def record(area: str, test: str, counts: Mapping[str, Any]) -> None:
    """Append ``counts`` (what ``test`` tried and found) to the results, if collecting."""
    directory = os.environ.get(RESULTS_ENV)
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    line = json.dumps({"area": area, "test": test, "counts": dict(counts)}, sort_keys=True)
    with open(os.path.join(directory, f"results-{os.getpid()}.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


# ------------------------------------------------------------------------ content


def leaf_offset(path: str | os.PathLike[str], h5path: str) -> int:
    """Where the bytes of the leaf at ``h5path`` (``"/state/params/w"``) start in the file:
    its own dataset's offset, or for a packed leaf the pack's offset plus its place."""
    import h5py

    with h5py.File(path, "r") as f:
        if h5path in f:
            return int(f[h5path].id.get_offset())
        manifest = json.loads(f[codec.MANIFEST][()].tobytes())
        for _keys, where, node in codec.iter_leaves(manifest["tree"]):
            if where == h5path:
                return int(f["ckptmgr_packed"].id.get_offset()) + int(node["at"])
    raise KeyError(h5path)


def state_for(step: int, n: int = 2000) -> dict[str, Any]:
    """The state saved at ``step``: arrays, scalars, strings, bytes, nesting."""
    return {
        "step": step,
        "w": np.arange(n, dtype=np.float64) * (step + 0.5),
        "b": np.full((5, 3), step % 251, dtype=np.uint8),
        "opt": [np.float32(step / 7), (step, f"s{step}", b"x" * (step % 5)), None],
        "rng": {"seed": 2**70 + step, "flag": step % 2 == 0},
    }


def metric_for(step: int, shared: bool = False) -> float:
    """``val_loss`` of ``step``: scrambled, so a new best turns up now and then. Steps that
    reuse a payload name are never an improvement, so a replaced step is never the best."""
    value = ((step * 2654435761) % 9973) / 9973
    return 10.0 + value if shared else value


def payload_bytes(step: int, size: int = 48_000) -> bytes:
    """The content of the payload file of ``step``."""
    head = f"payload of step {step}\n".encode()
    body = np.random.default_rng(step).integers(0, 256, size, dtype=np.uint8).tobytes()
    return head + body


# ---------------------------------------------------------------------- workloads


SHARED_NAME = "shared.bin"


@dataclass(frozen=True)
class Plan:
    """A writer workload and the model of the directory it leaves.

    Steps are saved in order from 1 with ``val_loss = metric_for(step)``, retention
    ``KeepLast(keep_last)``, or ``KeepLast(keep_last) | KeepEvery(steps=keep_every)``
    (the manager adds: latest and best are never deleted).
    Payload plans save every step as a :class:`ckptmgr.FilePayload`; every third step
    reuses one name (so it replaces the earlier checkpoint of that name), the others
    have their own.
    """

    name: str
    keep_last: int
    array_len: int = 2000
    payload: bool = False
    async_save: bool = False
    prune: bool = False
    share: bool = True  # payloads: every third step reuses one name
    keep_every: int | None = None  # and KeepEvery(steps=keep_every): the long view

    def policy(self) -> ckptmgr.RetentionPolicy:
        keep = ckptmgr.KeepLast(self.keep_last)
        return keep if self.keep_every is None else keep | ckptmgr.KeepEvery(steps=self.keep_every)

    def open(self, directory: str | os.PathLike[str], **kwargs: Any) -> ckptmgr.CheckpointManager:
        kwargs.setdefault("async_save", self.async_save)
        return ckptmgr.CheckpointManager(directory, keep=self.policy(), monitor=MONITOR, **kwargs)

    def file_name(self, step: int) -> str:
        if not self.payload:
            return storage.checkpoint_name(step)
        return SHARED_NAME if self.shared(step) else f"model-{step}.bin"

    def shared(self, step: int) -> bool:
        return self.payload and self.share and step % 3 == 0

    def metric(self, step: int) -> float:
        return metric_for(step, self.shared(step))

    def save(self, mgr: ckptmgr.CheckpointManager, step: int, hooks: Hooks | None = None) -> None:
        metrics = {MONITOR: self.metric(step)}
        if self.payload:
            data = payload_bytes(step)

            def write(path: Path) -> None:
                if hooks is None:
                    path.write_bytes(data)
                else:
                    hooks.call("write", path, lambda: path.write_bytes(data))

            mgr.save(step, ckptmgr.FilePayload(self.file_name(step), write), metrics=metrics)
        else:
            mgr.save(step, state_for(step, self.array_len), metrics=metrics)
        if self.prune:
            mgr.prune()

    def tracker_best(self, last: int) -> int | None:
        """The step the tracker holds as best after the save of ``last``."""
        if last < 1:
            return None
        return min(range(1, last + 1), key=lambda s: (self.metric(s), s))

    def present(self, last: int) -> set[int]:
        """The steps on disk once the save of ``last`` (and its retention) completed."""
        present: set[int] = set()
        for step in range(1, last + 1):
            present = {s for s in present if self.file_name(s) != self.file_name(step)} | {step}
            best = self.tracker_best(step)
            kept = set(sorted(present)[-self.keep_last:]) | ({best} if best in present else set())
            if self.keep_every is not None:
                # KeepEvery: the first checkpoint of each interval of keep_every steps.
                firsts: dict[int, int] = {}
                for s in sorted(present):
                    firsts.setdefault(s // self.keep_every, s)
                kept |= set(firsts.values())
            present = kept
        return present

    def bounds(self, last: int) -> tuple[set[int], set[int]]:
        """``(must, may)``: what must be on disk when ``last`` is the newest checkpoint,
        and what may be (retention of ``last`` may have been cut short)."""
        if last < 1:
            return set(), set()
        before = {s for s in self.present(last - 1) if self.file_name(s) != self.file_name(last)}
        return self.present(last), before | {last}

    def check_content(self, mgr: ckptmgr.CheckpointManager, step: int, value: Any) -> None:
        if self.payload:
            assert isinstance(value, Path), f"step {step}: restore returned {value!r}"
            assert value.parent == mgr.directory and value.name == self.file_name(step)
            assert value.read_bytes() == payload_bytes(step), f"step {step}: wrong payload content"
        else:
            assert_tree_equal(value, state_for(step, self.array_len))


PLANS: dict[str, Plan] = {
    "native": Plan("native", keep_last=2, array_len=200),
    "native-async": Plan("native-async", keep_last=2, array_len=200, async_save=True),
    "save": Plan("save", keep_last=2, array_len=40_000),
    "retention": Plan("retention", keep_last=1, array_len=200),
    "index": Plan("index", keep_last=2, array_len=200, prune=True),
    "payload": Plan("payload", keep_last=3, payload=True),
    "payload-unique": Plan("payload-unique", keep_last=2, payload=True, share=False),
    "async": Plan("async", keep_last=2, array_len=40_000, async_save=True),
    # A plain training loop's retention, KeepLast(2) | KeepEvery: the long view kept
    # through the kills (test_sigkill_at_random_instants[_long]).
    "keep-every-10": Plan("keep-every-10", keep_last=2, array_len=20_000, keep_every=10),
    "keep-every-50": Plan("keep-every-50", keep_last=2, array_len=20_000, keep_every=50),
}


# ------------------------------------------------------------ directory checks


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def pending_commits(directory: Path) -> list[str]:
    return [n for n in listing(directory) if n.startswith(".ckpt-") and n.endswith(".commit")]


def check_reader_view(directory: Path, plan: Plan, findings: Counter[str]) -> None:
    """Right after a crash, before any writer opens: a reader sees only complete
    checkpoints with the right content. The one exception, counted: a payload being
    replaced under its own name between the two renames of its commit (the old metadata
    next to the new file) is reported corrupt, with a warning, never returned."""
    if not directory.exists():
        return
    window = bool(pending_commits(directory))
    reader = ckptmgr.CheckpointManager(directory, read_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = [c.step for c in reader.checkpoints]
        for step in steps:
            try:
                value = reader.restore(step)
            except ckptmgr.CorruptCheckpointError:
                assert window and plan.shared(step), f"step {step} is corrupt after a crash"
                findings["reader: replaced payload seen corrupt (commit window)"] += 1
                continue
            except ckptmgr.CheckpointNotFoundError:
                # The old step's file now holds the step a pending commit describes.
                assert window and plan.shared(step), f"step {step} vanished after a crash"
                findings["reader: replaced payload is no longer the old step (commit window)"] += 1
                continue
            plan.check_content(reader, step, value)
            findings["reader: checkpoints verified"] += 1
        if steps:
            try:
                value = reader.restore()
            except ckptmgr.CorruptCheckpointError:
                assert window and all(plan.shared(s) for s in steps), "restore() found nothing good"
            else:
                assert reader.restored is not None
                plan.check_content(reader, reader.restored.step, value)
    for w in caught:
        assert issubclass(w.category, ckptmgr.CheckpointWarning), f"unexpected warning {w.message}"
        assert window, f"a reader warned after a crash: {w.message}"


def check_writer_view(directory: Path, plan: Plan, promised: set[int], findings: Counter[str],
                      *, save_next: bool = False, previous: set[int] | None = None) -> tuple[int, set[int]]:
    """A writer opens (finishing or discarding what the crash interrupted): no leftover,
    every checkpoint the model requires is there and verifies, nothing else is, best and
    patience are those of an uninterrupted run. Returns the latest step (0: none) and
    the steps on disk.

    ``previous``: the steps on disk at the last check, when several crashes may have
    cut retention short one after the other (a checkpoint retention let go may then
    stay until a retention completes); without it, one crash since a complete save."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mgr = plan.open(directory) if directory.exists() else None
    if mgr is None:
        assert not promised, f"steps {sorted(promised)} were promised; the directory is gone"
        return 0, set()
    try:
        names = listing(directory)
        assert [n for n in names if n.startswith(".ckpt-")] == [], f"leftovers after open: {names}"
        steps = sorted(c.step for c in mgr.checkpoints)
        last = steps[-1] if steps else 0
        assert last >= max(promised, default=0), f"promised {max(promised)} but the latest is {last}"
        must, may = plan.bounds(last)
        if previous is not None:
            # Anything seen before, or saved since, unless a later save took its name.
            candidates = previous | set(range(max(previous, default=0) + 1, last + 1))
            may |= {s for s in candidates if s <= last and not any(
                plan.file_name(t) == plan.file_name(s) for t in range(s + 1, last + 1))}
        assert must <= set(steps) <= may, f"on disk {steps}; must hold {sorted(must)}, may hold {sorted(may)}"
        expected_files = {plan.file_name(s) for s in steps} | {".ckptmgr.lock", ".ckptmgr-index.json"}
        if plan.payload:
            expected_files |= {storage.sidecar_name(plan.file_name(s)) for s in steps}
        strays = sorted(set(names) - expected_files)
        assert strays == [], f"unexpected files {strays}"
        for step in steps:
            plan.check_content(mgr, step, mgr.restore(step))
        findings["writer: checkpoints verified"] += len(steps)
        if last:
            best = plan.tracker_best(last)
            tracker = mgr.tracker
            assert best is not None and tracker is not None and tracker.best_step == best and tracker.wait == last - best
            assert mgr.best is not None and mgr.best.step == best
            plan.check_content(mgr, last, mgr.restore())
        if save_next:
            plan.save(mgr, last + 1)
            mgr.wait()
            after = sorted(c.step for c in mgr.checkpoints)
            assert set(after) == plan.present(last + 1), f"after the next save: {after}"
            findings["writer: usable after the crash"] += 1
        return last, set(steps)
    finally:
        mgr.close()


def writes(data: bytes) -> Callable[[Path], object]:
    """A payload writer that writes ``data``."""
    return lambda path: path.write_bytes(data)


def codec_sidecar(name: str, step: int = 99, content: bytes = b"") -> tuple[str, bytes]:
    """The file name and bytes of a well-formed sidecar for a payload ``name``."""
    meta = {"name": name, "step": step, "time": 1.0, "metrics": {}, "tracker": None,
            "size": len(content), "crc32": zlib.crc32(content), "nbytes": len(content)}
    return storage.sidecar_name(name), codec.encode_sidecar(meta)


def copy_directory(src: Path, dst: Path) -> Path:
    """A copy with the same names, sizes and mtimes (the index stays valid)."""
    if dst.exists():
        shutil.rmtree(dst)
    if src.exists():
        shutil.copytree(src, dst, symlinks=True)
    return dst


# ------------------------------------------------------------------------- hooks


_CLASSES = ("dir", "ckpt", "sidecar", "commit", "tmp", "payload-tmp", "index", "index-tmp", "lock", "payload")


class Hooks:
    """Interposes on the calls ckptmgr's commit protocol makes on a directory's files.

    Each call on a file in ``directory`` (or on the directory) gets a label, "KIND
    CLASS": KIND is write, fsync, rename, link, unlink, open or index; CLASS says which
    file (ckpt, tmp, payload, payload-tmp, commit, sidecar, index, index-tmp, dir;
    a rename's or a link's is "SRC>DST"). ``before(n, label, path)`` and ``after(n, label)`` run
    around the n-th such call (numbered from 0, over all threads); ``before`` may raise
    (an injected fault) or exit (a crash). Calls on other files pass straight through.

    ``writes="whole"`` labels a native checkpoint's whole HDF5 write as one "write tmp"
    call; ``"calls"`` labels every write HDF5 makes to the file instead. ``opens`` adds
    the opens (``os.open`` and ``open`` in codec and storage).
    """

    def __init__(self, directory: Path, *, writes: str = "whole", opens: bool = False) -> None:
        self.directory = os.path.realpath(directory)
        self.writes = writes
        self.opens = opens
        self.labels: list[str] = []
        self.before: Callable[[int, str, str], None] | None = None
        self.after: Callable[[int, str], None] | None = None
        self.marker: Marker | None = None
        self.enabled = True
        self._lock = threading.Lock()
        self._local = threading.local()

    # -- labelling

    def classify(self, path: str | os.PathLike[str] | None) -> str | None:
        if path is None or isinstance(path, int):
            return None
        raw = os.path.abspath(os.fspath(path))
        # The parent resolved, not the file: a planted symbolic link is classified by its name.
        text = os.path.join(os.path.realpath(os.path.dirname(raw)), os.path.basename(raw))
        if text == self.directory:
            return "dir"
        parent, name = os.path.split(text)
        if parent != self.directory:
            return None
        if name == storage.INDEX_NAME:
            return "index"
        if name == storage.LOCK_NAME:
            return "lock"
        if storage.parse_name(name) is not None:
            return "ckpt"
        if storage._layout._SIDECAR_RE.fullmatch(name):
            return "sidecar"
        if storage._layout._COMMIT_RE.fullmatch(name):
            return "commit"
        match = storage._layout._TMP_RE.fullmatch(name)
        if match:
            if getattr(self._local, "in_index", False):
                return "index-tmp"
            return "payload-tmp" if match.group(1) else "tmp"
        return "payload"

    @staticmethod
    def fd_path(fd: int) -> str | None:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        return target[: -len(" (deleted)")] if target.endswith(" (deleted)") else target

    # -- the interposition

    def call(self, kind: str, path: str | os.PathLike[str] | None, fn: Callable[[], Any],
             cls: str | None = None) -> Any:
        """Run ``fn``, a call of ``kind`` on ``path``, through the hooks."""
        if cls is None:
            cls = self.classify(path)
        if cls is None or not self.enabled:
            return fn()
        label = f"{kind} {cls}"
        with self._lock:
            n = len(self.labels)
            self.labels.append(label)
        previous = self.marker.set(label) if self.marker is not None else 0
        try:
            if self.before is not None:
                self.before(n, label, os.fspath(path) if path is not None else "")
            return fn()
        finally:
            if self.after is not None:
                self.after(n, label)
            if self.marker is not None:
                self.marker.restore(previous)

    def install(self, setattr: Callable[[object, str, Any], None]) -> None:
        """Patch the functions with ``setattr`` (``monkeypatch.setattr``, or the builtin
        in a child process)."""
        real_replace, real_unlink, real_fsync, real_write = os.replace, os.unlink, os.fsync, os.write
        real_link = os.link
        real_open, real_write_file, real_save_index = os.open, codec.write_file, storage.save_index

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            s, d = self.classify(src), self.classify(dst)
            cls = None if s is None and d is None else f"{s}>{d}"
            self.call("rename", dst, lambda: real_replace(src, dst, *args, **kwargs), cls)

        def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
            self.call("unlink", path, lambda: real_unlink(path, *args, **kwargs))

        def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            s, d = self.classify(src), self.classify(dst)
            cls = None if s is None and d is None else f"{s}>{d}"
            self.call("link", dst, lambda: real_link(src, dst, *args, **kwargs), cls)

        def fsync(fd: Any) -> None:
            path = self.fd_path(fd) if isinstance(fd, int) else None
            self.call("fsync", path, lambda: real_fsync(fd))

        def write(fd: int, data: Any) -> int:
            path = self.fd_path(fd)
            return int(self.call("write", path, lambda: real_write(fd, data)))

        def os_open(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
            return int(self.call("open", path, lambda: real_open(path, flags, mode, *args, **kwargs)))

        def write_file(path: Any, *args: Any, **kwargs: Any) -> int:
            return int(self.call("write", path, lambda: real_write_file(path, *args, **kwargs)))

        def save_index(directory: Path, entries: dict[str, Any]) -> None:
            def run() -> None:
                self._local.in_index = True
                try:
                    real_save_index(directory, entries)
                finally:
                    self._local.in_index = False

            self.call("index", directory / storage.INDEX_NAME, run)

        setattr(os, "replace", replace)
        setattr(os, "unlink", unlink)
        setattr(os, "link", link)
        setattr(os, "fsync", fsync)
        setattr(os, "write", write)
        setattr(storage, "save_index", save_index)
        if self.writes == "whole":
            setattr(codec, "write_file", write_file)
        if self.opens:
            setattr(os, "open", os_open)
        if self.writes == "calls" or self.opens:
            for module in (codec, codec._write, storage, storage._local):  # wherever files are opened with open()
                setattr(module, "open", self._wrapping_open())

    def _wrapping_open(self) -> Callable[..., Any]:
        import builtins

        real = builtins.open
        hooks = self

        class File:
            """A file object whose writes go through the hooks."""

            def __init__(self, fh: Any, path: Any) -> None:
                self._fh, self._path = fh, path

            def write(self, data: Any) -> int:
                if hooks.writes != "calls":
                    return int(self._fh.write(data))
                return int(hooks.call("write", self._path, lambda: self._fh.write(data)))

            def __getattr__(self, name: str) -> Any:
                return getattr(self._fh, name)

            def __enter__(self) -> File:
                return self

            def __exit__(self, *exc: object) -> None:
                self._fh.close()

            def __iter__(self) -> Iterator[Any]:
                return iter(self._fh)

        def wrapped_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if hooks.opens:
                fh = hooks.call("open", path, lambda: real(path, mode, *args, **kwargs))
            else:
                fh = real(path, mode, *args, **kwargs)
            if isinstance(path, int) or not any(c in mode for c in "wxa+"):
                return fh
            return File(fh, path)

        return wrapped_open


def crash_at(target: int, when: str) -> tuple[Callable[[int, str, str], None], Callable[[int, str], None]]:
    """``before``/``after`` hooks that end the process at call ``target``."""

    def before(n: int, label: str, path: str) -> None:
        if n == target and when == "before":
            os._exit(CRASH_EXIT)

    def after(n: int, label: str) -> None:
        if n == target and when == "after":
            os._exit(CRASH_EXIT)

    return before, after


class Marker:
    """One shared byte: what a child is doing (the parent reads it after a kill)."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 1)
            self._map = mmap.mmap(fd, 1)
        finally:
            os.close(fd)

    TABLE: ClassVar[list[str]] = [
        "between calls",
        *(f"phase {p}" for p in ("start-up", "restore", "save", "prune", "close")),
        *(f"{k} {c}" for k in ("write", "fsync", "unlink", "index", "open") for c in _CLASSES),
        *(f"rename {a}>{b}" for a in _CLASSES for b in _CLASSES),
    ]
    CODES: ClassVar[dict[str, int]] = {label: code for code, label in enumerate(TABLE)}

    def set(self, label: str) -> int:
        code = self.CODES.get(label, 255)
        previous = self._map[0]
        self._map[0] = code
        return previous

    def restore(self, code: int) -> None:
        self._map[0] = code

    def read(self) -> str:
        code = self._map[0]
        return self.TABLE[code] if code < len(self.TABLE) else "other"


@contextlib.contextmanager
def phase(marker: Marker | None, name: str) -> Iterator[None]:
    if marker is None:
        yield
        return
    previous = marker.set(f"phase {name}")
    try:
        yield
    finally:
        marker.restore(previous)


# -------------------------------------------------------------- child processes


_CONTEXT: multiprocessing.context.ForkServerContext | None = None


def processes() -> multiprocessing.context.ForkServerContext:
    """Child processes forked from a server that has imported NumPy, h5py and ckptmgr."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing.forkserver

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["numpy", "h5py", "ckptmgr", "_reliability"])
        # The server imports the preloads before it learns our sys.path (Python 3.11):
        # tell it where this module is through the environment it starts with.
        saved = os.environ.get("PYTHONPATH")
        here = os.path.dirname(os.path.abspath(__file__))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, saved]))
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        _CONTEXT = context
    return _CONTEXT


def crash_child(conn: Connection, directory: str, plan_name: str, options: dict[str, Any]) -> None:
    """A writer that saves the plan's steps (resuming after the latest) and reports each
    step once ``save`` returned for it (with ``async_save``: once the next ``save`` or
    ``wait`` returned). Options: ``steps`` (stop after that many and close, else run
    until killed), ``crash`` ((n, "before"|"after"): exit at that hooked call),
    ``trace`` (send the labels of the hooked calls at the end), ``marker`` (a file for
    :class:`Marker`), ``async_save`` (True or False: instead of the plan's)."""
    plan = PLANS[plan_name]
    if options.get("async_save") is not None:
        plan = dataclasses.replace(plan, async_save=bool(options["async_save"]))
    try:
        _crash_child(conn, Path(directory), plan, options)
    except BaseException:
        import traceback

        conn.send(("error", traceback.format_exc()))
        raise


def _crash_child(conn: Connection, path: Path, plan: Plan, options: dict[str, Any]) -> None:
    hooks = Hooks(path)
    marker = Marker(options["marker"]) if options.get("marker") else None
    if options.get("crash") is not None:
        hooks.before, hooks.after = crash_at(*options["crash"])
    hooks.marker = marker
    hooks.install(setattr)
    warnings.simplefilter("always")
    with phase(marker, "start-up"):
        mgr = plan.open(path)
    with phase(marker, "restore"):
        last = 0
        if mgr.latest is not None:
            value = mgr.restore()
            assert mgr.restored is not None
            last = mgr.restored.step
            plan.check_content(mgr, last, value)
    conn.send(("ready", last))
    steps = options.get("steps")
    step = last
    while steps is None or step < last + steps:
        step += 1
        with phase(marker, "save"):
            plan.save(mgr, step, hooks)
        if plan.async_save:
            if step > last + 1:
                conn.send(("promise", step - 1))
        else:
            conn.send(("promise", step))
    with phase(marker, "close"):
        mgr.close()
    if plan.async_save:
        conn.send(("promise", step))
    if options.get("trace"):
        conn.send(("trace", hooks.labels))
    conn.send(("done", step))


@dataclass
class ChildRun:
    """What the parent saw of one child: promises, trace, the marker at the end."""

    exitcode: int | None = None
    ready: int | None = None
    promised: set[int] = field(default_factory=set)
    trace: list[str] = field(default_factory=list)
    done: bool = False
    error: str | None = None


def drain(conn: Connection, run: ChildRun, timeout: float = 0.0) -> bool:
    """Take what the child sent; False once it closed its end."""
    try:
        while conn.poll(timeout):
            kind, value = conn.recv()
            if kind == "ready":
                run.ready = value
            elif kind == "promise":
                run.promised.add(value)
            elif kind == "trace":
                run.trace = value
            elif kind == "done":
                run.done = True
            elif kind == "error":
                run.error = value
            timeout = 0.0
    except (EOFError, OSError):
        return False
    return True


def run_child(directory: Path, plan_name: str, options: dict[str, Any], timeout: float = 120.0) -> ChildRun:
    """Run :func:`crash_child` to its end (or its crash point); return what it reported."""
    ctx = processes()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=crash_child, args=(child, str(directory), plan_name, options), daemon=True)
    proc.start()
    child.close()
    run = ChildRun()
    while drain(parent, run, timeout):
        if not proc.is_alive() and not parent.poll(0):
            break
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    parent.close()
    run.exitcode = proc.exitcode
    return run


# ------------------------------------------------------------------- inotify


class OutsideWatch:
    """inotify on a directory: what was opened, read, written, created, deleted there.

    Events are queued by the system call itself, so reading them right after an
    operation returns sees everything it did."""

    IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x1, 0x2, 0x4, 0x8
    IN_OPEN, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x20, 0x40, 0x80, 0x100, 0x200
    IN_NONBLOCK = 0o4000
    NAMES: ClassVar[dict[int, str]] = {0x1: "read", 0x2: "write", 0x4: "attrib", 0x8: "close-write", 0x20: "open",
             0x40: "moved-from", 0x80: "moved-to", 0x100: "create", 0x200: "delete"}

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = libc.inotify_init1(self.IN_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = sum(self.NAMES)
        if libc.inotify_add_watch(self._fd, os.fsencode(directory), mask) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")

    def events(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return out
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16: offset + 16 + length].rstrip(b"\0").decode()
                offset += 16 + length
                kinds = [v for k, v in self.NAMES.items() if mask & k]
                out.append(f"{'/'.join(kinds)} {name}")

    def close(self) -> None:
        os.close(self._fd)


# ------------------------------------------------------------------- utilities


def snapshot(directory: Path, names: list[str] | None = None) -> dict[str, tuple[int, int, int]]:
    """Inode, mtime and CRC of the files (all, or ``names``): proof nothing was touched."""
    out = {}
    for name in names if names is not None else listing(directory):
        path = directory / name
        if not path.is_file() or path.is_symlink():
            continue
        st = os.stat(path)
        out[name] = (st.st_ino, st.st_mtime_ns, zlib.crc32(path.read_bytes()))
    return out


def errno_name(code: int) -> str:
    return errno.errorcode[code]


def python() -> str:
    return sys.executable


def _replaced_since(plan: Plan, step: int, value: Any) -> bool:
    """Whether the payload file ``restore`` returned for ``step`` now holds exactly a
    later step saved under the same name (a path can go stale once returned)."""
    if not plan.payload or not isinstance(value, Path):
        return False
    try:
        data = value.read_bytes()
    except FileNotFoundError:
        return True
    head = data.split(b"\n", 1)[0].decode(errors="replace")
    match = re.fullmatch(r"payload of step (\d+)", head)
    later = int(match.group(1)) if match else -1
    return later > step and plan.file_name(later) == plan.file_name(step) and data == payload_bytes(later)


def reader_child(conn: Connection, directory: str, plan_name: str, restores: int, which: str) -> None:
    """Restore ``which`` ("latest", "best" or "each": every listed step) ``restores``
    times from a directory another process writes to; report what was seen. Any warning
    or error is reported as a failure, and so is a tree that is not exactly the one
    saved at the step the manager says it restored."""
    plan = PLANS[plan_name]
    seen: Counter[int] = Counter()
    stale = 0
    try:
        warnings.simplefilter("error")
        mgr = ckptmgr.CheckpointManager(directory, read_only=True, monitor=MONITOR)
        conn.send(("ready", None))
        for _ in range(restores):
            if which == "each":
                steps = [c.step for c in mgr.checkpoints]
                step = steps[len(steps) // 2]
                try:
                    value = mgr.restore(step)
                except ckptmgr.CheckpointNotFoundError:
                    stale += 1  # deleted by retention since the listing: allowed for a step asked by number
                    continue
            else:
                value = mgr.restore("best" if which == "best" else "latest")
                assert mgr.restored is not None
                step = mgr.restored.step
            try:
                plan.check_content(mgr, step, value)
            except FileNotFoundError:
                stale += 1  # a payload's path, deleted by retention after restore returned it
                continue
            except AssertionError:
                if not _replaced_since(plan, step, value):
                    raise
                stale += 1  # a payload's path, replaced by a later save of that name since
                continue
            seen[step] += 1
        conn.send(("done", {"restores": restores, "distinct steps": len(seen), "stale": stale}))
    except BaseException:
        import traceback

        conn.send(("error", traceback.format_exc()))
