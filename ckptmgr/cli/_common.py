"""What the ``ckptmgr`` commands share: errors, exit codes, formatting, opening a directory.

Everything here uses ckptmgr's public API only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ckptmgr import CheckpointInfo, CheckpointManager, MetricTracker, Which, is_checkpoint_directory

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

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
        CliError: no such directory, not a directory, not a ckptmgr directory, or a
            URL of a kind ckptmgr does not take.
        CheckpointError: the directory cannot be listed.
    """
    if "://" in directory:
        # Object storage (s3://bucket/prefix): credentials and endpoint from the standard
        # AWS environment variables. Nothing of ckptmgr's there: CheckpointNotFoundError.
        try:
            return CheckpointManager(directory, read_only=True)
        except ValueError as exc:  # a URL it cannot take (gs://, s3:// with no bucket, ...)
            raise CliError(str(exc), EXIT_USAGE) from exc
    path = Path(directory)
    if not path.exists():
        raise CliError(f"no such directory: {directory}", EXIT_USAGE)
    if not path.is_dir():
        raise CliError(f"not a directory: {directory}", EXIT_USAGE)
    mgr = CheckpointManager(path, read_only=True)
    if not mgr.checkpoints and not is_checkpoint_directory(path):
        raise CliError(
            f"{directory} is not a ckptmgr checkpoint directory (no checkpoints, and no sign that "
            "a CheckpointManager has written to it)",
            EXIT_USAGE,
        )
    return mgr


def _disk_size(info: CheckpointInfo) -> int | None:
    """A checkpoint's bytes on disk: its file, and the parts of a sharded one."""
    sizes = [_file_size(p) for p in (info.path, *info.parts)]
    return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)


def _file_size(path: Path | str) -> int | None:
    """A local file's size; None when unknown (gone, or an object store's URL)."""
    if isinstance(path, str) and "://" in path:
        return None
    try:
        return os.lstat(path).st_size
    except OSError:
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
        "kind": "native" if info.kind == "tree" else "payload",
        "time": info.time,
        "time_local": _iso_time(info.time),
        "file_bytes": _disk_size(info),
        "parts": [str(p) for p in info.parts],
        "nbytes": info.nbytes,
        "metrics": dict(info.metrics),
        "keep_reasons": list(info.keep_reasons),
        "latest": info.step == latest,
        "best": info.step == best,
        "corrupt": info.corrupt,
    }


def _latest_and_best(mgr: CheckpointManager) -> tuple[int | None, int | None]:
    """The steps of the directory's latest and best checkpoints (None where there is none)."""
    latest, best = mgr.latest, mgr.best
    return (latest.step if latest else None), (best.step if best else None)


def _marks(info: CheckpointInfo, latest: int | None, best: int | None) -> str:
    marks = [m for m, on in (("latest", info.step == latest), ("best", info.step == best)) if on]
    if info.corrupt is not None:
        marks.append("CORRUPT")
    return ",".join(marks)


def _tracker_json(tracker: MetricTracker | None) -> dict[str, Any] | None:
    return None if tracker is None else {"monitor": tracker.monitor, "mode": tracker.mode}


def _shape_text(shape: object) -> str:
    if isinstance(shape, (list, tuple)):
        return "[" + ", ".join(map(str, shape)) + "]"
    return str(shape)
