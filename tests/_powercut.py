"""Helpers of test_powercut.py: the workload under the shim, and the power-cut replayer.

Run as a script, this is the child process: ``python _powercut.py KIND DIRECTORY
PHASES`` saves the steps of each phase (``1-4,5-6``: steps 1 to 4 with one manager, then
5 and 6 with a second one; ``KeepLast(2)`` retention throughout), calling ``powercut_mark`` of the preloaded shim
(``powercut/shim.c``) with ``saving N`` before and ``returned N`` after each save (with
``async``, after ``wait()``), and ``closed N`` after each manager is closed. KIND:

- ``sync``: state trees, synchronous saves;
- ``async``: state trees, ``async_save=True``;
- ``payload``: ``FilePayload`` checkpoints, one file name per step;
- ``payload-replace``: ``FilePayload`` checkpoints that all have the same file name,
  so each save replaces the previous checkpoint (the two-phase payload commit).

The state and the payload bytes are pure functions of the step (:func:`state_for`,
:func:`payload_for`), so the parent can check any checkpoint it finds.

The replayer (:class:`Trace`) reads the shim's log and answers, for a power cut after
any number of logged events, which directories and files a file system with POSIX
minimum durability would still have (see test_powercut.py for the model).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# "makedirs": the caller creates the directory itself (os.makedirs, no fsync) just before
# opening the manager, a common pattern; the manager must make it durable all the same.
KINDS = ("sync", "async", "payload", "payload-replace", "makedirs")
PHASES = "1-4,5-6"
KEEP_LAST = 2
LOG_ENV = "CKPTMGR_POWERCUT_LOG"
ROOT_ENV = "CKPTMGR_POWERCUT_ROOT"
SNAPSHOTS_ENV = "CKPTMGR_POWERCUT_SNAPSHOTS"


# ----------------------------------------------------------------------- workload


def state_for(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {
        "step": step,
        "w": rng.standard_normal((16, 8)).astype(np.float32),
        "b": np.full(5, step % 251, dtype=np.uint8),
        "note": f"state of step {step}",
    }


def payload_for(step: int) -> bytes:
    return f"payload of step {step}\n".encode() * 50 + bytes(range(256)) * step


def payload_name(kind: str, step: int) -> str:
    return "model.bin" if kind == "payload-replace" else f"model-{step:02d}.bin"


def parse_phases(spec: str) -> list[list[int]]:
    """``"1-4,5-6"`` -> ``[[1, 2, 3, 4], [5, 6]]``."""
    phases = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        phases.append(list(range(int(first), int(last or first) + 1)))
    return phases


def _child(kind: str, directory: str, phases: str) -> None:
    import ctypes

    import ckptmgr

    mark_fn = ctypes.CDLL(None).powercut_mark  # AttributeError: the shim is not preloaded
    mark_fn.argtypes = (ctypes.c_char_p,)
    mark_fn.restype = None

    def mark(text: str) -> None:
        mark_fn(text.encode())

    if kind == "makedirs":
        os.makedirs(directory, exist_ok=True)
    for phase, steps in enumerate(parse_phases(phases), 1):
        with ckptmgr.CheckpointManager(
            directory, keep=ckptmgr.KeepLast(KEEP_LAST), async_save=kind == "async"
        ) as mgr:
            for step in steps:
                mark(f"saving {step}")
                if kind.startswith("payload"):
                    data = payload_for(step)
                    mgr.save(step, ckptmgr.FilePayload(payload_name(kind, step), lambda p, d=data: p.write_bytes(d)))
                else:
                    mgr.save(step, state_for(step))
                mgr.wait()
                mark(f"returned {step}")
        mark(f"closed {phase}")


# ----------------------------------------------------------------------- replayer


class NotModelled(Exception):
    """The log holds an operation the replayer does not model."""


@dataclass(frozen=True)
class Event:
    index: int
    kind: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"#{self.index} {self.kind} {' '.join(self.args)}"


def read_log(path: Path) -> list[Event]:
    events = []
    for index, line in enumerate(path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()):
        kind, *args = line.split("\t")
        events.append(Event(index, kind, tuple(args)))
    return events


# A directory entry: ("file", file id) or ("dir", absolute path).
Entry = tuple[str, Any]


@dataclass
class Trace:
    """One run's log, as entry operations per directory, directory fsyncs, and content
    snapshots per file.

    Directories are identified by path (the workload never renames or removes one:
    that raises :class:`NotModelled`), files by a file id: one per creation, so that a
    recycled inode number is a new file.
    """

    events: list[Event]
    root: str
    snapshots_dir: Path
    # directory -> [(event index, name, entry or None for removed)]
    dir_ops: dict[str, list[tuple[int, str, Entry | None]]] = field(default_factory=dict)
    dir_syncs: dict[str, list[int]] = field(default_factory=dict)
    # file id -> [(event index, snapshot file name)]
    file_syncs: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    file_paths: dict[int, str] = field(default_factory=dict)  # file id -> path at creation

    @classmethod
    def load(cls, log: Path, root: str, snapshots_dir: Path) -> Trace:
        trace = cls(read_log(log), root, snapshots_dir)
        trace._build()
        return trace

    def _build(self) -> None:
        volatile: dict[str, dict[str, Entry]] = {self.root: {}}
        inodes: dict[str, int] = {}

        def split(path: str, event: Event) -> tuple[str, str]:
            parent, name = os.path.split(path)
            if parent not in volatile:
                raise NotModelled(f"{event}: in a directory made before the run or outside {self.root}")
            return parent, name

        def op(directory: str, index: int, name: str, entry: Entry | None) -> None:
            self.dir_ops.setdefault(directory, []).append((index, name, entry))

        for event in self.events:
            i, args = event.index, event.args
            if event.kind == "create":
                parent, name = split(args[1], event)
                fid = len(self.file_paths)
                self.file_paths[fid] = args[1]
                inodes[args[0]] = fid
                volatile[parent][name] = ("file", fid)
                op(parent, i, name, ("file", fid))
            elif event.kind == "mkdir":
                parent, name = split(args[0], event)
                if args[0] in volatile:
                    raise NotModelled(f"{event}: a directory made twice")
                volatile[parent][name] = ("dir", args[0])
                volatile[args[0]] = {}
                op(parent, i, name, ("dir", args[0]))
            elif event.kind == "rename":
                (src_dir, src), (dst_dir, dst) = split(args[0], event), split(args[1], event)
                if args[0] == args[1]:
                    continue
                if volatile[src_dir].get(src) is not None and volatile[dst_dir].get(dst) == volatile[src_dir][src]:
                    continue  # two names of one file: rename does nothing (POSIX)
                entry = volatile[src_dir].pop(src, None)
                if entry is None:
                    raise NotModelled(f"{event}: renames a file the log never created")
                if entry[0] == "dir":
                    raise NotModelled(f"{event}: renames a directory")
                volatile[dst_dir][dst] = entry
                op(src_dir, i, src, None)
                op(dst_dir, i, dst, entry)
            elif event.kind == "link":
                (src_dir, src), (dst_dir, dst) = split(args[0], event), split(args[1], event)
                entry = volatile[src_dir].get(src)
                if entry is None or entry[0] != "file":
                    raise NotModelled(f"{event}: links a file the log never created")
                volatile[dst_dir][dst] = entry  # the same file under a second name
                op(dst_dir, i, dst, entry)
            elif event.kind == "unlink":
                parent, name = split(args[0], event)
                if volatile[parent].pop(name, None) is None:
                    raise NotModelled(f"{event}: removes a file the log never created")
                op(parent, i, name, None)
            elif event.kind == "fsyncdir":
                if args[0] not in volatile:
                    raise NotModelled(f"{event}: a directory made before the run")
                self.dir_syncs.setdefault(args[0], []).append(i)
            elif event.kind == "fsync":
                if args[0] not in inodes:
                    raise NotModelled(f"{event}: a file the log never created")
                self.file_syncs.setdefault(inodes[args[0]], []).append((i, args[1]))
            elif event.kind != "mark":
                raise NotModelled(str(event))

    def marks(self, before: int) -> list[str]:
        return [e.args[0] for e in self.events[:before] if e.kind == "mark"]

    def durable(self, cut: int, prefix: int = 0) -> dict[str, str | None]:
        """What survives a power cut after the first ``cut`` events.

        Returns ``{path relative to root: None for a directory, else the snapshot file
        holding its content ("" for an empty file)}``. A directory's entries are those
        its last fsync before the cut saw; with ``prefix`` > 0, every entry operation
        among the first ``prefix`` events is durable too (a journal that committed that
        far on its own). A file's content is its last fsynced snapshot before the cut.
        """
        assert 0 <= prefix <= cut <= len(self.events)
        entries: dict[str, dict[str, Entry]] = {}
        for directory, ops in self.dir_ops.items():
            syncs = [s for s in self.dir_syncs.get(directory, []) if s < cut]
            upto = max(prefix, syncs[-1] + 1 if syncs else 0)
            current: dict[str, Entry] = {}
            for index, name, entry in ops:
                if index >= upto:
                    break
                if entry is None:
                    current.pop(name, None)
                else:
                    current[name] = entry
            entries[directory] = current
        result: dict[str, str | None] = {}

        def walk(directory: str, rel: str) -> None:
            for name, (kind, what) in sorted(entries.get(directory, {}).items()):
                path = f"{rel}/{name}" if rel else name
                if kind == "dir":
                    result[path] = None
                    walk(what, path)
                else:
                    snaps = [s for index, s in self.file_syncs.get(what, []) if index < cut]
                    result[path] = snaps[-1] if snaps else ""

        walk(self.root, "")
        return result

    def materialize(self, state: dict[str, str | None], destination: Path) -> None:
        """Write a :meth:`durable` state under ``destination`` (which must not exist)."""
        destination.mkdir(parents=True)
        for rel, snap in state.items():  # parents come before their entries
            target = destination / rel
            if snap is None:
                target.mkdir()
            elif snap:
                shutil.copyfile(self.snapshots_dir / snap, target)
            else:
                target.touch()


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3])
