"""The ``ckptmgr`` command: look after checkpoint directories without writing Python.

Usage::

    ckptmgr ls DIR [--json]
    ckptmgr show DIR [STEP|latest|best] [--json]
    ckptmgr verify DIR [STEP|latest|best ...] [--progress | --no-progress] [-q] [--json]
    ckptmgr prune DIR [--keep-last N] [--keep-best K] [--keep-every-steps S] [--dry-run] [--json]
    ckptmgr diff DIR A B [--all] [--json]

Also installed as ``python -m ckptmgr``. Everything goes through the library's public
API: a read-only :class:`~ckptmgr.CheckpointManager` for looking (it needs no lock, so
it is safe while a training job writes), a writing one for ``prune`` (it takes the
writer lock, so ``prune`` refuses while a training job holds it).

Exit status:

====  ===================================================================================
0     success
1     a checkpoint is corrupt or unreadable, or the operation failed (I/O error, the
      directory is locked by a running writer)
2     usage error: bad arguments, no such directory, not a ckptmgr directory, no such
      checkpoint
====  ===================================================================================

Errors are one line on stderr (``ckptmgr: error: ...``), never a traceback. ``--json``
output is strict JSON: metrics that are NaN or infinite are written as ``null``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, TextIO

import numpy as np

from . import __version__, codec, storage
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    DirectoryLockedError,
)
from .info import CheckpointInfo
from .manager import CheckpointManager
from .metrics import MetricTracker
from .policies import AnyRetention, KeepBest, KeepEvery, KeepLast, RetentionPolicy

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "CliError", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Which = int | Literal["latest", "best"]
KeyPath = tuple[str | int, ...]


class CliError(Exception):
    """An error the command reports as one line and an exit status.

    Args:
        message: what went wrong, one line.
        status: the exit status (``EXIT_FAILURE`` or ``EXIT_USAGE``).
    """

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


class _UsageError(CliError):
    """A command-line error found by the parser of ``prog`` (e.g. ``"ckptmgr verify"``)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message} (see '{prog} --help')", EXIT_USAGE)
        self.prog = prog


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.prog, message)


# ------------------------------------------------------------------------ formatting


def _human_bytes(n: int | None) -> str:
    """A byte count for people, in binary units.

    >>> _human_bytes(512), _human_bytes(65536), _human_bytes(3 * 2**30 // 2), _human_bytes(None)
    ('512 B', '64.0 KiB', '1.5 GiB', '-')
    """
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _number(value: object) -> str:
    """A metric or statistic, compactly.

    >>> _number(0.3125), _number(1.234e-7), _number(float("nan")), _number(123456789), _number(None)
    ('0.3125', '1.234e-07', 'nan', '123456789', 'None')
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return format(float(value), ".6g")
    return str(value)


def _local_datetime(posix: float) -> datetime.datetime | None:
    """A checkpoint's time in the local time zone; None when unknown (0) or absurd."""
    if not posix or not math.isfinite(posix):
        return None
    try:
        return datetime.datetime.fromtimestamp(posix).astimezone()
    except (OverflowError, OSError, ValueError):  # metadata from a damaged or hostile file
        return None


def _local_time(posix: float) -> str:
    """``2025-01-31 14:05:09`` in the local time zone; ``-`` when unknown."""
    moment = _local_datetime(posix)
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _iso_time(posix: float) -> str | None:
    """ISO 8601 with the local UTC offset (``2025-01-31T14:05:09+01:00``); None when unknown."""
    moment = _local_datetime(posix)
    return moment.isoformat(timespec="seconds") if moment else None


def _metrics_text(metrics: Mapping[str, object]) -> str:
    return "  ".join(f"{k}={_number(v)}" for k, v in metrics.items()) or "-"


def _key_text(path: KeyPath) -> str:
    """A state-tree key path for people: dict keys and list indices joined by ``/``.

    Keys that could be misread (empty, holding ``/`` or spaces, all digits like a list
    index) are quoted.

    >>> _key_text(("params", "dense/kernel", 0, "7")), _key_text(())
    ("params/'dense/kernel'/0/'7'", '(root)')
    """
    if not path:
        return "(root)"
    parts = []
    for part in path:
        if isinstance(part, int):
            parts.append(str(part))
        elif part and part.isprintable() and not part.isdigit() and not any(c in part for c in "/'\" []"):
            parts.append(part)
        else:
            parts.append(repr(part))
    return "/".join(parts)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    """Rows as aligned text columns (``right``: the columns aligned right)."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _jsonable(value: Any) -> Any:
    """``value`` with NaN/infinity as None and paths, tuples, NumPy scalars made JSON types."""
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(_jsonable(value), indent=2, allow_nan=False))


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -------------------------------------------------------------------- the directory


def _open_reader(directory: str) -> CheckpointManager:
    """A read-only manager of ``directory``, which must look like a ckptmgr directory.

    Raises:
        CliError: no such directory, not a directory, or not a ckptmgr directory.
        CheckpointError: the directory cannot be listed.
    """
    path = Path(directory)
    if not path.exists():
        raise CliError(f"no such directory: {directory}", EXIT_USAGE)
    if not path.is_dir():
        raise CliError(f"not a directory: {directory}", EXIT_USAGE)
    mgr = CheckpointManager(path, read_only=True)
    if not mgr.checkpoints and not _has_marker(path):
        raise CliError(
            f"{directory} is not a ckptmgr checkpoint directory (no ckpt-*.h5 checkpoints, "
            f"no {storage.LOCK_NAME})",
            EXIT_USAGE,
        )
    return mgr


def _has_marker(path: Path) -> bool:
    """Whether a CheckpointManager has written to ``path`` (it leaves a lock file)."""
    return any((path / name).exists() for name in (storage.LOCK_NAME, storage.INDEX_NAME))


def _is_native(info: CheckpointInfo) -> bool:
    """Whether ``info`` is a state-tree checkpoint in ckptmgr's own HDF5 format.

    Anything else the manager lists is a payload (a framework-native file such as a
    ``.keras`` file, with its metadata in a hidden sidecar file) that only the manager
    knows how to verify and restore. Payload names never look like ``ckpt-<step>.h5``.
    """
    return storage.parse_name(info.path.name) is not None


def _file_size(path: Path) -> int | None:
    try:
        return os.lstat(path).st_size
    except OSError:
        return None


def _corrupt_reason(info: CheckpointInfo) -> str | None:
    for reason in info.keep_reasons:
        if reason.startswith("corrupt"):
            return reason.partition(": ")[2] or reason
    return None


def _resolve(mgr: CheckpointManager, which: Which) -> CheckpointInfo:
    """The checkpoint ``which`` names: exactly the newest for "latest", no fallback.

    Raises:
        CliError: there is no such checkpoint (exit status 2).
    """
    if which == "latest":
        info = mgr.latest
        if info is None:
            raise CliError(f"no checkpoint in {mgr.directory}", EXIT_USAGE)
        return info
    if which == "best":
        info = mgr.best
        if info is None:
            why = "" if mgr.tracker else " (its checkpoints recorded no monitored metric)"
            raise CliError(f"no best checkpoint in {mgr.directory}{why}", EXIT_USAGE)
        return info
    for info in mgr.checkpoints:
        if info.step == which:
            return info
    steps = [c.step for c in mgr.checkpoints]
    shown = ", ".join(map(str, steps[:6])) + (f", ... ({len(steps)} in all)" if len(steps) > 6 else "")
    raise CliError(f"no checkpoint of step {which} in {mgr.directory} (steps: {shown or 'none'})", EXIT_USAGE)


def _describe(info: CheckpointInfo, latest: int | None, best: int | None) -> dict[str, Any]:
    """What ``ls --json`` and ``show --json`` say about one checkpoint."""
    return {
        "step": info.step,
        "path": str(info.path),
        "kind": "native" if _is_native(info) else "payload",
        "time": info.time,
        "time_local": _iso_time(info.time),
        "file_bytes": _file_size(info.path),
        "nbytes": info.nbytes,
        "metrics": dict(info.metrics),
        "keep_reasons": list(info.keep_reasons),
        "latest": info.step == latest,
        "best": info.step == best,
        "corrupt": _corrupt_reason(info),
    }


def _marks(info: CheckpointInfo, latest: int | None, best: int | None) -> str:
    marks = [m for m, on in (("latest", info.step == latest), ("best", info.step == best)) if on]
    if _corrupt_reason(info) is not None:
        marks.append("CORRUPT")
    return ",".join(marks)


def _tracker_json(tracker: MetricTracker | None) -> dict[str, Any] | None:
    return None if tracker is None else {"monitor": tracker.monitor, "mode": tracker.mode}


# -------------------------------------------------------------------------------- ls


def _cmd_ls(args: argparse.Namespace) -> int:
    """``ckptmgr ls DIR``: one row per checkpoint (``--all``: and those rollbacks set aside)."""
    mgr = _open_reader(args.directory)
    aside = [CheckpointManager(folder, read_only=True) for folder in mgr.rolled_back] if args.all else []
    if args.json:
        listing = _ls_json(mgr)
        if args.all:
            listing["rolled_back"] = [_ls_json(m) for m in aside]
        _print_json(listing)
        return EXIT_OK
    _ls_print(mgr)
    for m in aside:
        print()
        print(f"rolled back (set aside by rollback, not used by the run): {m.directory}")
        _ls_print(m)
    return EXIT_OK


def _ls_json(mgr: CheckpointManager) -> dict[str, Any]:
    infos = mgr.checkpoints
    latest = infos[-1].step if infos else None
    best_info = mgr.best
    best = best_info.step if best_info is not None else None
    return {
        "directory": str(mgr.directory),
        "tracker": _tracker_json(mgr.tracker),
        "latest": latest,
        "best": best,
        "checkpoints": [_describe(c, latest, best) for c in infos],
    }


def _ls_print(mgr: CheckpointManager) -> None:
    infos = mgr.checkpoints
    if not infos:
        print(f"no checkpoints in {mgr.directory}")
        return
    latest = infos[-1].step
    best_info = mgr.best
    best = best_info.step if best_info is not None else None
    rows = [
        [str(c.step), _marks(c, latest, best), _local_time(c.time), _human_bytes(_file_size(c.path)),
         _metrics_text(c.metrics), ", ".join(r for r in c.keep_reasons if not r.startswith("corrupt"))
         + (f" (corrupt: {_corrupt_reason(c)})" if _corrupt_reason(c) is not None else "")]
        for c in infos
    ]
    for line in _table(["STEP", "MARK", "SAVED", "SIZE", "METRICS", "KEEP"], rows, right={0, 3}):
        print(line)
    total = sum(_file_size(c.path) or 0 for c in infos)
    tracker = mgr.tracker
    monitored = f"; best by {tracker.monitor} ({tracker.mode})" if tracker else ""
    print(f"{len(infos)} checkpoint{'s' * (len(infos) != 1)}, {_human_bytes(total)}{monitored}")


# ------------------------------------------------------------------------------ show


def _dtype_name(text: object) -> str:
    if isinstance(text, str) and text[:1] in "<>|=":
        try:
            return str(np.dtype(text).name)
        except TypeError:
            pass
    return str(text)


def _itemsize(text: object) -> int | None:
    if not isinstance(text, str):
        return None
    if text[:1] in "<>|=":
        try:
            return np.dtype(text).itemsize
        except TypeError:
            return None
    try:  # bfloat16 and friends, where installed
        import ml_dtypes
        return int(np.dtype(getattr(ml_dtypes, text)).itemsize)
    except (ImportError, AttributeError, TypeError):
        return None


def _leaves(manifest: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """Key path, kind, dtype, shape and bytes of every stored leaf of a manifest's tree.

    Raises:
        CorruptCheckpointError: the tree description is malformed.
    """
    out = []
    for keys, _h5path, node in codec.iter_leaves(manifest.get("tree"), where):
        shape = node.get("shape")
        itemsize = _itemsize(node.get("dtype"))
        dims: list[int] = shape if isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape) else []
        valid_shape = isinstance(shape, list) and len(dims) == len(shape)
        out.append({
            "key": _key_text(keys),
            "path": list(keys),
            "kind": node.get("t"),
            "dtype": _dtype_name(node.get("dtype")),
            "shape": shape,
            "bytes": math.prod(dims) * itemsize if valid_shape and itemsize is not None else None,
        })
    return out


def _cmd_show(args: argparse.Namespace) -> int:
    """``ckptmgr show DIR [STEP|latest|best]``: metadata and the state tree."""
    mgr = _open_reader(args.directory)
    info = _resolve(mgr, args.which)
    latest_info, best_info = mgr.latest, mgr.best
    latest = latest_info.step if latest_info else None
    best = best_info.step if best_info else None
    record = _describe(info, latest, best)
    meta: dict[str, Any]
    leaves: list[dict[str, Any]] | None = None
    if _is_native(info):
        manifest = _read_meta(info)
        meta = {k: v for k, v in manifest.items() if k != "tree"}
        leaves = _leaves(manifest, str(info.path))
    else:
        meta = _read_meta(info)
    if args.json:
        _print_json({**record, "directory": str(mgr.directory), "meta": meta, "leaves": leaves})
        return EXIT_OK

    fields = [
        ("checkpoint", str(info.path) + ("" if leaves is not None else "  (payload: a framework-native file)")),
        ("step", str(info.step) + (f"  ({_marks(info, latest, best)})" if _marks(info, latest, best) else "")),
        ("saved", _local_time(info.time)),
        ("size", f"{_human_bytes(record['file_bytes'])} on disk"
                 + (f", {_human_bytes(info.nbytes)} of arrays" if leaves is not None else "")),
        ("metrics", _metrics_text(info.metrics)),
        ("keep", ", ".join(info.keep_reasons) or "-"),
    ]
    tracker = meta.get("tracker")
    if isinstance(tracker, dict):
        fields.append(("tracker", f"{tracker.get('monitor')} ({tracker.get('mode')}): best "
                                  f"{_number(tracker.get('best'))} at step {tracker.get('best_step')}, "
                                  f"wait {tracker.get('wait')}"))
    if leaves is None:
        fields.append(("metadata", f"{info.path.parent / storage.sidecar_name(info.path.name)}  "
                                   f"({meta.get('size')} bytes, crc32 {meta.get('crc32')})"))
    fields.append(("format", f"{meta.get('format')}, checksums {meta.get('checksum')}"))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name.ljust(width)}  {value}")
    if leaves is not None:
        print()
        rows = [[leaf["key"], str(leaf["kind"]), leaf["dtype"], _shape_text(leaf["shape"]),
                 str(leaf["bytes"]) if leaf["bytes"] is not None else "?"] for leaf in leaves]
        for line in _table(["KEY", "KIND", "DTYPE", "SHAPE", "BYTES"], rows, right={4}):
            print(line)
        total = sum(leaf["bytes"] or 0 for leaf in leaves)
        print(f"{len(leaves)} lea{'ves' if len(leaves) != 1 else 'f'}, {_human_bytes(total)}")
    return EXIT_OK


def _shape_text(shape: object) -> str:
    if isinstance(shape, (list, tuple)):
        return "[" + ", ".join(map(str, shape)) + "]"
    return str(shape)


def _read_meta(info: CheckpointInfo) -> dict[str, Any]:
    """The metadata of a checkpoint, checksum-verified, without reading its arrays.

    For a native checkpoint, the manifest of its HDF5 file (with the ``tree``); for a
    payload, its sidecar (``name``, ``size`` and ``crc32`` of the file, ``step``, ...).

    Raises:
        CorruptCheckpointError: the metadata is damaged, or not ckptmgr's.
        CliError: the file vanished or cannot be read.
    """
    if _is_native(info):
        path = info.path
        read: Callable[[], dict[str, Any]] = lambda: codec.read_meta(path)  # noqa: E731
    else:
        path = info.path.parent / storage.sidecar_name(info.path.name)
        read = lambda: codec.decode_sidecar(storage.read_small(path), str(path))  # noqa: E731
    try:
        return read()
    except FileNotFoundError as exc:
        raise CliError(f"checkpoint {info.path} no longer exists") from exc
    except CorruptCheckpointError:
        raise
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------------------- verify


class _Progress:
    """``[3/120] ckpt-000000300.h5`` on stderr: one redrawn line on a terminal, lines otherwise."""

    def __init__(self, total: int, *, enabled: bool, stream: TextIO) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream
        self.tty = enabled and stream.isatty()
        self._drawn = False

    def update(self, done: int, label: str) -> None:
        """Show that item ``done`` (1-based) of ``total``, ``label``, is being worked on."""
        if not self.enabled:
            return
        text = f"verifying [{done}/{self.total}] {label}"
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the progress line (before printing a result on the same terminal)."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def _cmd_verify(args: argparse.Namespace) -> int:
    """``ckptmgr verify DIR [STEP ...]``: check every checksum; exit 1 if any is corrupt."""
    mgr = _open_reader(args.directory)
    explicit = bool(args.which)
    if explicit:
        # Resolve everything first: a typo is a usage error, before any slow work.
        infos = list({info.step: info for info in (_resolve(mgr, w) for w in args.which)}.values())
    else:
        infos = mgr.checkpoints
    progress = _Progress(
        len(infos),
        enabled=args.progress if args.progress is not None else sys.stderr.isatty(),
        stream=sys.stderr,
    )
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    for done, info in enumerate(infos, 1):
        progress.update(done, info.path.name)
        status, error = _verify_one(mgr, info)
        results.append({"step": info.step, "path": str(info.path), "status": status, "error": error,
                        "file_bytes": _file_size(info.path)})
        if not args.json and (status != "ok" or not args.quiet):
            progress.clear()
            label = {"ok": "ok", "corrupt": "CORRUPT", "error": "ERROR", "gone": "gone"}[status]
            print(f"{label:<8} {info.step:>9}  {error if error else info.path}", flush=True)
    progress.clear()
    failed = [r for r in results if r["status"] in ("corrupt", "error") or (r["status"] == "gone" and explicit)]
    if args.json:
        _print_json({"directory": str(mgr.directory), "ok": not failed, "checkpoints": results})
    else:
        counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "corrupt", "error", "gone")}
        parts = [f"{n} {s}" for s, n in counts.items() if n or s == "ok"]
        total = sum(r["file_bytes"] or 0 for r in results)
        print(f"verified {len(results)} checkpoint{'s' * (len(results) != 1)} ({_human_bytes(total)}) "
              f"in {time.monotonic() - started:.1f} s: {', '.join(parts)}")
    return EXIT_FAILURE if failed else EXIT_OK


def _verify_one(mgr: CheckpointManager, info: CheckpointInfo) -> tuple[str, str | None]:
    """``(status, error)``: status is "ok", "corrupt", "error" (unreadable) or "gone"."""
    try:
        mgr.verify(info.step)
    except CheckpointNotFoundError:
        # Deleted since the listing, typically by a running writer's retention.
        return "gone", f"{info.path}: deleted while verifying"
    except CorruptCheckpointError as exc:
        return "corrupt", _one_line(str(exc))
    except (CheckpointError, OSError) as exc:
        return "error", _one_line(str(exc))
    return "ok", None


# ----------------------------------------------------------------------------- prune


def _open_pruner(
    directory: Path, policy: RetentionPolicy, tracker: MetricTracker | None, *, read_only: bool
) -> CheckpointManager:
    """A manager of ``directory`` with ``policy`` as its retention and the run's metric.

    Without ``read_only`` it takes the writer lock.

    Raises:
        CliError: a live process (a training job) holds the writer lock.
        CheckpointError: the directory cannot be locked or read.
    """
    try:
        return CheckpointManager(
            directory,
            keep=policy,
            monitor=tracker.monitor if tracker else None,
            mode=tracker.mode if tracker else "auto",
            min_delta=tracker.min_delta if tracker else 0.0,
            baseline=tracker.baseline if tracker else None,
            read_only=read_only,
        )
    except DirectoryLockedError as exc:
        raise CliError(
            f"cannot prune {directory}: another process (a training job?) holds its writer lock "
            f"{directory / storage.LOCK_NAME}; try again when it has finished, or use --dry-run"
        ) from exc


def _cmd_prune(args: argparse.Namespace) -> int:
    """``ckptmgr prune DIR --keep-last N ...``: delete what the retention policies drop."""
    policies: list[RetentionPolicy] = []
    if args.keep_last is not None:
        policies.append(KeepLast(args.keep_last))
    if args.keep_best is not None:
        policies.append(KeepBest(args.keep_best))
    if args.keep_every_steps is not None:
        policies.append(KeepEvery(steps=args.keep_every_steps))
    if not policies:
        raise CliError(
            "ckptmgr prune: give at least one of --keep-last, --keep-best, --keep-every-steps "
            "(see 'ckptmgr prune --help')",
            EXIT_USAGE,
        )
    policy: RetentionPolicy = policies[0] if len(policies) == 1 else AnyRetention(tuple(policies))
    reader = _open_reader(args.directory)
    tracker = reader.tracker
    if args.keep_best is not None and tracker is None:
        raise CliError(
            f"--keep-best needs the metric the run monitored, and the checkpoints in {reader.directory} "
            "recorded none",
            EXIT_USAGE,
        )
    # A dry run needs no lock: it works while a training job is running.
    mgr = _open_pruner(reader.directory, policy, tracker, read_only=args.dry_run)
    try:
        before = {c.step: c for c in mgr.checkpoints}
        sizes = {step: _file_size(c.path) for step, c in before.items()}
        with warnings.catch_warnings():
            # A file that cannot be deleted is reported below, from its keep reason.
            warnings.simplefilter("ignore", CheckpointWarning)
            removed = mgr.prune(dry_run=args.dry_run)
        removed_steps = {c.step for c in removed}
        after = [] if args.dry_run else mgr.checkpoints
        if args.dry_run:
            after = [c for c in mgr.checkpoints if c.step not in removed_steps]
    finally:
        mgr.close()
    errors = {c.step: r[len("not deleted: "):] for c in after for r in c.keep_reasons
              if r.startswith("not deleted: ")}
    kept = [c for c in after if c.step not in errors]
    failed = [before[step] for step in errors]
    if args.json:
        _print_json({
            "directory": str(reader.directory),
            "dry_run": args.dry_run,
            "policy": repr(policy),
            "tracker": _tracker_json(tracker),
            "kept": [{"step": c.step, "path": str(c.path), "keep_reasons": list(c.keep_reasons)} for c in kept],
            "removed": [{"step": c.step, "path": str(c.path), "file_bytes": sizes.get(c.step)} for c in removed],
            "failed": [{"step": c.step, "path": str(c.path), "error": errors[c.step]} for c in failed],
        })
    else:
        verb = "would remove" if args.dry_run else "removed"
        rows = [["keep", str(c.step), ", ".join(c.keep_reasons)] for c in kept]
        rows += [["FAILED", str(c.step), errors[c.step]] for c in failed]
        rows += [[verb, str(c.step), _human_bytes(sizes.get(c.step))] for c in removed]
        rows.sort(key=lambda row: int(row[1]))
        for line in _table(["ACTION", "STEP", "DETAIL"], rows, right={1}):
            print(line)
        freed = sum(sizes.get(c.step) or 0 for c in removed)
        print(f"{'dry run: ' if args.dry_run else ''}{verb} {len(removed)} checkpoint{'s' * (len(removed) != 1)} "
              f"({_human_bytes(freed)}), kept {len(kept)}"
              + (f", {len(failed)} could not be removed" if failed else ""))
    return EXIT_FAILURE if errors else EXIT_OK


# ------------------------------------------------------------------------------ diff


@dataclasses.dataclass
class _Leaf:
    """One leaf of a restored state tree, described for comparison."""

    value: Any
    kind: str
    array: np.ndarray[Any, Any] | None  # None for str, bytes, None and ints beyond int64

    @property
    def text(self) -> str:
        """``float32[3, 4]`` for arrays, ``int 200`` for Python scalars, ``str 'abc'``."""
        if self.kind in ("ndarray", "npscalar") and self.array is not None:
            return f"{self.array.dtype.name}{_shape_text(list(self.array.shape))}"
        if self.kind == "none":
            return "None"
        shown = repr(self.value)
        return f"{self.kind} {shown if len(shown) <= 24 else shown[:21] + '...'}"


def _leaf(value: Any) -> _Leaf:
    if isinstance(value, np.ndarray):
        return _Leaf(value, "ndarray", value)
    if isinstance(value, np.generic):
        return _Leaf(value, "npscalar", np.asarray(value))
    if value is None:
        return _Leaf(value, "none", None)
    kind = type(value).__name__
    if type(value) in (bool, int, float, complex):
        array = np.asarray(value)
        return _Leaf(value, kind, array if array.dtype.kind in "biufc" else None)  # big ints: object
    return _Leaf(value, kind, None)


def _flatten(tree: Any) -> tuple[dict[KeyPath, _Leaf], dict[KeyPath, str]]:
    """The leaves of a state tree by key path, and the container types by key path."""
    leaves: dict[KeyPath, _Leaf] = {}
    containers: dict[KeyPath, str] = {}
    stack: list[tuple[KeyPath, Any]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            containers[path] = "dict"
            stack.extend(reversed([((*path, k), v) for k, v in node.items()]))
        elif isinstance(node, (list, tuple)):
            containers[path] = type(node).__name__
            stack.extend(reversed([((*path, i), v) for i, v in enumerate(node)]))
        else:
            leaves[path] = _leaf(node)
    return leaves, containers


def _as_numbers(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
    """``array`` as float64 (complex128 for complex), or None if it holds no numbers."""
    kind = array.dtype.kind
    if kind == "c":
        return array.astype(np.complex128)
    if kind in "biuf":
        return array.astype(np.float64)
    if kind == "V":  # bfloat16 and the other ml_dtypes
        try:
            return array.astype(np.float64)
        except (TypeError, ValueError):
            return None
    return None


def _norm(x: np.ndarray[Any, Any]) -> float:
    with np.errstate(all="ignore"):
        return float(np.linalg.norm(x.reshape(-1)))


def _entry(path: KeyPath, a: str | None, b: str | None, status: str | None = None) -> dict[str, Any]:
    """A diff entry with every field (``None`` where a statistic does not apply)."""
    return {
        "key": _key_text(path), "path": list(path), "status": status, "a": a, "b": b,
        "dtype_changed": None, "shape_changed": None, "max_abs_diff": None,
        "norm_a": None, "norm_b": None, "norm_diff": None, "changed_elements": None, "elements": None,
    }


def _compare(path: KeyPath, a: _Leaf | None, b: _Leaf | None) -> dict[str, Any]:
    """One diff entry: status (changed/unchanged/added/removed) and the statistics that apply."""
    entry = _entry(path, a.text if a else None, b.text if b else None)
    if a is None or b is None:
        present = a or b
        assert present is not None
        numbers = _as_numbers(present.array) if present.array is not None else None
        entry["status"] = "added" if a is None else "removed"
        entry["norm_a" if b is None else "norm_b"] = _norm(numbers) if numbers is not None else None
        return entry
    x = _as_numbers(a.array) if a.array is not None else None
    y = _as_numbers(b.array) if b.array is not None else None
    if a.array is None or b.array is None or x is None or y is None:
        if a.kind != b.kind:
            same_value = False
        elif a.array is not None and b.array is not None:  # arrays of a dtype with no float view
            same_value = (a.array.dtype, a.array.shape, a.array.tobytes()) == (
                b.array.dtype, b.array.shape, b.array.tobytes())
        else:  # str, bytes, None, big int
            same_value = type(a.value) is type(b.value) and a.value == b.value
        entry["status"] = "unchanged" if same_value else "changed"
        return entry
    entry["dtype_changed"] = a.array.dtype != b.array.dtype
    entry["shape_changed"] = a.array.shape != b.array.shape
    entry["norm_a"], entry["norm_b"] = _norm(x), _norm(y)
    changed = a.kind != b.kind or entry["dtype_changed"] or entry["shape_changed"]
    if not entry["shape_changed"]:
        with np.errstate(all="ignore"):
            if a.array.dtype == b.array.dtype and a.array.dtype.kind in "biu":
                same = np.asarray(a.array == b.array)  # exact, even beyond float64's 2**53
            else:
                same = np.asarray((x == y) | (np.isnan(x) & np.isnan(y)))
            delta = np.where(same, 0.0, np.abs(y - x))
        entry["elements"] = int(same.size)
        entry["changed_elements"] = int(same.size - np.count_nonzero(same))
        entry["max_abs_diff"] = float(delta.max()) if delta.size else 0.0
        entry["norm_diff"] = _norm(delta)
        changed = changed or entry["changed_elements"] > 0
    entry["status"] = "changed" if changed else "unchanged"
    return entry


def _load_tree(mgr: CheckpointManager, info: CheckpointInfo) -> Any:
    """The verified state tree of a native checkpoint.

    Raises:
        CliError: ``info`` is a payload checkpoint (a framework-native file).
        CorruptCheckpointError, CheckpointError: as :meth:`CheckpointManager.restore`.
    """
    if not _is_native(info):
        raise CliError(
            f"diff compares native checkpoints only; step {info.step} is a payload ({info.path})", EXIT_USAGE
        )
    tree = mgr.restore(info.step)
    if isinstance(tree, os.PathLike):  # a payload restores to the path of its verified file
        raise CliError(f"diff compares native checkpoints only; step {info.step} is a payload ({tree})", EXIT_USAGE)
    return tree


def _cmd_diff(args: argparse.Namespace) -> int:
    """``ckptmgr diff DIR A B``: which arrays changed between two checkpoints, and by how much."""
    mgr = _open_reader(args.directory)
    info_a, info_b = _resolve(mgr, args.a), _resolve(mgr, args.b)
    leaves_a, containers_a = _flatten(_load_tree(mgr, info_a))
    leaves_b, containers_b = _flatten(_load_tree(mgr, info_b))
    entries = [_compare(p, leaves_a.get(p), leaves_b.get(p)) for p in {**leaves_a, **leaves_b}]
    for path, kind in containers_a.items():
        other = containers_b.get(path)
        if other is not None and other != kind:
            entries.append(_entry(path, kind, other, "changed"))  # e.g. a list became a tuple
    counts = {s: sum(e["status"] == s for e in entries) for s in ("changed", "added", "removed", "unchanged")}
    metric_names = list({**info_a.metrics, **info_b.metrics})
    if args.json:

        def side(info: CheckpointInfo) -> dict[str, Any]:
            return {"step": info.step, "path": str(info.path), "metrics": dict(info.metrics)}

        _print_json({"directory": str(mgr.directory), "a": side(info_a), "b": side(info_b),
                     "summary": counts, "entries": entries})
        return EXIT_OK
    print(f"a  step {info_a.step}  {info_a.path}")
    print(f"b  step {info_b.step}  {info_b.path}")
    for name in metric_names:
        print(f"   {name}: {_number(info_a.metrics.get(name, '-'))} -> {_number(info_b.metrics.get(name, '-'))}")
    shown = [e for e in entries if args.all or e["status"] != "unchanged"]
    if shown:
        print()

        def stat(entry: Mapping[str, Any], name: str) -> str:
            value = entry.get(name)
            return "-" if value is None else _number(value)

        rows = [
            [e["status"], e["key"], e["a"] or "-", e["b"] or "-", stat(e, "max_abs_diff"),
             stat(e, "norm_a"), stat(e, "norm_b"), stat(e, "norm_diff"),
             f"{e['changed_elements']}/{e['elements']}" if e.get("elements") is not None else "-"]
            for e in shown
        ]
        headers = ["STATUS", "KEY", "A", "B", "MAX|B-A|", "L2(A)", "L2(B)", "L2(B-A)", "CHANGED"]
        for line in _table(headers, rows, right={4, 5, 6, 7, 8}):
            print(line)
    differences = counts["changed"] + counts["added"] + counts["removed"]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    print(f"\n{summary}" if differences else f"\nno differences ({counts['unchanged']} keys)")
    return EXIT_OK


# ------------------------------------------------------------------------------ main


def _which(text: str) -> Which:
    """An argparse type: a step number (int >= 0), "latest" or "best"."""
    if text in ("latest", "best"):
        return text  # type: ignore[return-value]
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number, 'latest' or 'best'; got {text!r}") from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"expected a step number >= 0; got {text!r}")
    return step


def _positive(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``ckptmgr {ls,show,verify,prune,diff} ...``."""
    parser = _ArgumentParser(
        prog="ckptmgr",
        description="Inspect, verify, prune and compare the checkpoints of a ckptmgr directory.",
        epilog="Exit status: 0 success; 1 a checkpoint is corrupt or the operation failed; 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"ckptmgr {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=func)
        sub.add_argument("directory", metavar="DIR", help="the checkpoint directory")
        sub.add_argument("--json", action="store_true", help="print JSON for scripts (NaN as null)")
        return sub

    ls = command("ls", "List the checkpoints: step, time, size, metrics, why each is kept.", _cmd_ls)
    ls.add_argument("--all", action="store_true",
                    help="also list the checkpoints rollback() set aside (under rolled-back/)")
    show = command("show", "Show one checkpoint's metadata and state tree.", _cmd_show)
    show.add_argument("which", metavar="STEP", nargs="?", type=_which, default="latest",
                      help="a step number, 'latest' (default) or 'best'")
    verify = command("verify", "Verify checksums (exit 1 if any checkpoint is corrupt).", _cmd_verify)
    verify.add_argument("which", metavar="STEP", nargs="*", type=_which,
                        help="step numbers, 'latest' or 'best' (default: every checkpoint)")
    verify.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress on stderr (default: when stderr is a terminal)")
    verify.add_argument("-q", "--quiet", action="store_true", help="print only the failures and the summary")
    prune = command("prune", "Delete the checkpoints the retention policies drop "
                             "(never the latest or the best).", _cmd_prune)
    prune.add_argument("--keep-last", type=_positive, metavar="N", help="keep the N newest")
    prune.add_argument("--keep-best", type=_positive, metavar="K",
                       help="keep the K best by the metric the run monitored")
    prune.add_argument("--keep-every-steps", type=_positive, metavar="S",
                       help="keep one checkpoint per S steps")
    prune.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    diff = command("diff", "Compare two checkpoints' state trees array by array.", _cmd_diff)
    diff.add_argument("a", metavar="A", type=_which, help="a step number, 'latest' or 'best'")
    diff.add_argument("b", metavar="B", type=_which, help="a step number, 'latest' or 'best'")
    diff.add_argument("--all", action="store_true", help="also list the unchanged keys")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``, allowing options between the steps of ``verify``.

    argparse gives a ``nargs="*"`` positional only the first run of values, so
    ``verify DIR 100 --progress 200`` would reject ``200``; those go to the steps here.

    Raises:
        _UsageError: bad arguments.
    """
    args, extras = parser.parse_known_args(argv)
    if extras and args.command == "verify" and not any(e.startswith("-") and e != "-" for e in extras):
        try:
            args.which = [*args.which, *map(_which, extras)]
        except argparse.ArgumentTypeError as exc:
            raise _UsageError(f"{parser.prog} verify", f"argument STEP: {exc}") from None
        return args
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


class _WarningPrinter:
    """Prints warnings as one line each (``ckptmgr: warning: ...``), each message once.

    A read-only manager re-lists the directory on every query, so the same problem
    (an unreadable sidecar, say) would otherwise be reported again and again.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(
        self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
        file: TextIO | None = None, line: str | None = None,
    ) -> None:
        """The ``warnings.showwarning`` hook."""
        text = _one_line(str(message)).removeprefix("ckptmgr: ")
        if text not in self._seen:
            self._seen.add(text)
            print(f"ckptmgr: warning: {text}", file=sys.stderr)


def _error(message: str) -> None:
    print(f"ckptmgr: error: {_one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ckptmgr`` command; return its exit status.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        ``EXIT_OK`` (0), ``EXIT_FAILURE`` (1) or ``EXIT_USAGE`` (2). Errors are
        printed as one line on stderr, never as a traceback.
    """
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except _UsageError as exc:
        print(f"{exc.prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.status
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    with warnings.catch_warnings():
        warnings.simplefilter("always", CheckpointWarning)  # deduplicated by the printer
        warnings.showwarning = _WarningPrinter()
        try:
            status = int(args.func(args))
            sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
            return status
        except CliError as exc:
            _error(str(exc))
            return exc.status
        except CheckpointNotFoundError as exc:
            _error(str(exc))
            return EXIT_USAGE
        except (CheckpointError, OSError) as exc:
            if isinstance(exc, BrokenPipeError):
                return _broken_pipe()
            _error(str(exc) or type(exc).__name__)
            return EXIT_FAILURE
        except KeyboardInterrupt:
            _error("interrupted")
            return 130
        except Exception as exc:  # a bug or a hostile file: still one line, no traceback
            _error(f"unexpected {type(exc).__name__}: {exc}")
            return EXIT_FAILURE


def _broken_pipe() -> int:
    """The reader of stdout went away (``ckptmgr ls DIR | head``): stop quietly."""
    # Python would complain again when it flushes stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_FAILURE

