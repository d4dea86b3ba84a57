"""Names in a checkpoint directory, listing it, and reading small files safely."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import CheckpointIOError, describe_os_error

T = TypeVar("T")

LOCK_NAME = ".ckptmgr.lock"
INDEX_NAME = ".ckptmgr-index.json"
INDEX_VERSION = 2  # 2: keep reasons stored as [text, kind, detail]
_CKPT_RE = re.compile(r"ckpt-(\d{9,20})\.h5")
_TMP_RE = re.compile(r"\.ckpt-[0-9a-f]{16}\.tmp(-.+)?", re.DOTALL)
_COMMIT_RE = re.compile(r"\.ckpt-[0-9a-f]{16}\.commit")
_SIDECAR_RE = re.compile(r"\.ckptmgr-[0-9a-f]{16}\.json")
_PART_RE = re.compile(r"ckpt-(\d{9,20})\.rank-(\d{5,9})-of-(\d{5,9})\.([0-9a-f]{8})\.h5")
MAX_PAYLOAD_NAME = 200
_CHUNK = 8 * 1024 * 1024
_LIST_RETRIES = 10


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint of ``step``."""
    return f"ckpt-{step:09d}.h5"


def parse_name(name: str) -> int | None:
    """The step of a checkpoint file name, or None if the name is not one of ours."""
    match = _CKPT_RE.fullmatch(name)
    if match is None:
        return None
    step = int(match.group(1))
    # Only the canonical spelling: "ckpt-0000000001.h5" and "ckpt-000000001.h5" would
    # otherwise both claim step 1.
    return step if checkpoint_name(step) == name else None


def part_name(step: int, rank: int, world_size: int, token: str) -> str:
    """The file name of rank ``rank``'s part of a sharded checkpoint of ``step``.

    ``token`` (8 hex digits, drawn per save) makes the names of a step saved again
    differ from the first save's, so a commit record never names a file that a later
    save of the same step is replacing.
    """
    return f"{checkpoint_name(step)[:-3]}.rank-{rank:05d}-of-{world_size:05d}.{token}.h5"


def parse_part_name(name: str) -> tuple[int, int, int, str] | None:
    """``(step, rank, world_size, token)`` of a part file name, or None if not one."""
    match = _PART_RE.fullmatch(name)
    if match is None:
        return None
    step, rank, world = int(match.group(1)), int(match.group(2)), int(match.group(3))
    token = match.group(4)
    if rank >= world or part_name(step, rank, world, token) != name:
        return None
    return step, rank, world, token


def part_files(directory: Path) -> list[str]:
    """The names of the part files (of sharded checkpoints) in ``directory``.

    Raises:
        CheckpointIOError: the directory cannot be listed.
    """
    try:
        with os.scandir(directory) as it:
            return [e.name for e in it if parse_part_name(e.name) is not None and e.is_file(follow_symlinks=False)]
    except OSError as exc:
        raise io_error("Cannot list checkpoint directory", directory, exc) from exc


def sidecar_name(payload_name: str) -> str:
    """The metadata file name of a payload checkpoint named ``payload_name``."""
    digest = hashlib.sha256(payload_name.encode("utf-8", "surrogatepass")).hexdigest()
    return f".ckptmgr-{digest[:16]}.json"


def check_payload_name(name: object) -> str:
    """Validate the file name of a payload checkpoint.

    Raises:
        ValueError: not a plain, visible file name of at most 200 characters, or one
            that a native checkpoint uses.
    """
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= MAX_PAYLOAD_NAME
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or parse_name(name) is not None
        or _CKPT_RE.fullmatch(name) is not None
    ):
        raise ValueError(
            "Expected a payload name that is a plain file name (no '/', no NUL, not "
            f"starting with '.', at most {MAX_PAYLOAD_NAME} characters, not ckpt-<step>.h5). "
            f"Received: name={name!r}"
        )
    return name


def io_error(action: str, path: str | os.PathLike[str], exc: OSError) -> CheckpointIOError:
    """A CheckpointIOError whose message names what failed, the path, and the cause."""
    return CheckpointIOError(f"{action} {os.fspath(path)}: {describe_os_error(exc)}", path, exc)


@dataclass(frozen=True)
class Entry:
    """A file seen by :func:`scan`: a native checkpoint (``step`` from its name) or a
    payload's sidecar (``step`` None: it is in the sidecar)."""

    step: int | None
    name: str
    size: int
    mtime_ns: int


def scan(directory: Path) -> Iterator[Entry]:
    """The checkpoint files and payload sidecars of ``directory``.

    Only regular files with our name patterns; symbolic links and anything else are
    skipped: reading through them could read outside the directory.

    Raises:
        CheckpointIOError: the directory cannot be listed.
    """
    for _attempt in range(_LIST_RETRIES):
        try:
            with os.scandir(directory) as it:
                listed = list(it)
        except OSError as exc:
            raise io_error("Cannot list checkpoint directory", directory, exc) from exc
        found, vanished = [], False
        for entry in listed:
            step = parse_name(entry.name)
            if step is None and not _SIDECAR_RE.fullmatch(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                vanished = True
                continue
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append(Entry(step, entry.name, st.st_size, st.st_mtime_ns))
        # A listing is no snapshot: while a writer renames a new checkpoint in and
        # deletes an old one, it can hold the old one and miss the new. List again.
        if not vanished:
            break
    return iter(found)


def read_small(path: Path, limit: int = 1024 * 1024) -> bytes:
    """The content of a small regular file (not following a symlink), at most ``limit`` bytes.

    Raises:
        OSError: it cannot be read, or is not a regular file (a FIFO planted under the
            name would otherwise block the reader forever; a symbolic link would make
            it read outside the directory).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "Not a regular file", os.fspath(path))
        # Sized by the file, not the limit: read(limit) would allocate the whole limit.
        return fh.read(min(limit, st.st_size + 1))


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file and not a symbolic link.

    Raises:
        FileNotFoundError: it does not exist.
    """
    return stat.S_ISREG(os.lstat(path).st_mode)
