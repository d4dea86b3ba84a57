"""Setting checkpoints aside (rollback) crash-safely: a durable record first, then the moves."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from ._layout import _SIDECAR_RE, check_payload_name, io_error, parse_name, read_small
from ._local import ensure_directory, fsync_directory, remove_files, write_atomic

# ------------------------------------------------------------------------- rollback
#
# rollback(step) moves the checkpoints after ``step`` into a sub-folder of
# ROLLED_BACK_DIR, deleting nothing. Several renames cannot be one atomic step, so the
# decision is committed first, as a durable marker listing the files to move and where;
# readers ignore the files a marker lists, and the next writer to open finishes the moves
# of a rollback that a crash interrupted.

ROLLED_BACK_DIR = "rolled-back"
ROLLBACK_MARKER = ".ckptmgr-rollback.json"
_FOLDER_RE = re.compile(r"after-step-\d{9,20}-\d{8}T\d{6}Z(-\d{1,4})?")


def rollback_folder(directory: Path, step: int, now: float) -> str:
    """A new folder name under ROLLED_BACK_DIR for the checkpoints after ``step``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    base = f"after-step-{step:09d}-{stamp}"
    name, n = base, 1
    while os.path.lexists(directory / ROLLED_BACK_DIR / name):
        n += 1
        name = f"{base}-{n}"
    return f"{ROLLED_BACK_DIR}/{name}"


def write_rollback_marker(directory: Path, folder: str, names: list[str]) -> None:
    """Commit the decision to move ``names`` into ``folder``: written, fsynced, renamed, directory fsynced.

    Raises:
        CheckpointIOError: an OS error (no marker is left behind).
    """
    body = json.dumps({"version": 1, "folder": folder, "files": names}).encode("utf-8")

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as fh:
            fh.write(body)

    write_atomic(directory, ROLLBACK_MARKER, write)


def read_rollback_marker(directory: Path) -> tuple[str, list[str]] | None:
    """The folder and file names of an unfinished rollback, or None.

    A marker that does not parse, or names anything but plain file names and a folder
    of ours, is ignored (with nothing moved): it cannot send files outside the directory.
    """
    try:
        data = json.loads(read_small(directory / ROLLBACK_MARKER))
    except (OSError, ValueError):  # none (the usual case), or unreadable: nothing to do
        return None
    if not isinstance(data, dict):
        return None
    folder, names = data.get("folder"), data.get("files")
    if (
        not isinstance(folder, str)
        or not folder.startswith(ROLLED_BACK_DIR + "/")
        or _FOLDER_RE.fullmatch(folder[len(ROLLED_BACK_DIR) + 1 :]) is None
        or not isinstance(names, list)
        or not all(isinstance(n, str) and (parse_name(n) is not None or _SIDECAR_RE.fullmatch(n)
                                           or _is_payload_name(n)) for n in names)
    ):
        return None
    return folder, names


def _is_payload_name(name: str) -> bool:
    try:
        check_payload_name(name)
    except ValueError:
        return False
    return True


def finish_rollback(directory: Path) -> str | None:
    """Move the files an unfinished rollback lists, then remove its marker; return its folder.

    Each move is a rename within the file system; the folder (and rolled-back/) are made
    durable first, both directories are fsynced after the moves, and only then is the
    marker removed. Files already moved (or gone) are skipped, so a crash anywhere here
    is finished by the next call.

    Raises:
        CheckpointIOError: an OS error; the marker stays and the next writer retries.
    """
    pending = read_rollback_marker(directory)
    if pending is None:
        remove_files(directory, [ROLLBACK_MARKER])
        return None
    folder, names = pending
    target = directory / folder
    ensure_directory(target)
    try:
        for name in names:
            try:
                os.rename(directory / name, target / name)
            except FileNotFoundError:
                continue
        fsync_directory(target)
        fsync_directory(directory)
    except OSError as exc:
        raise io_error("Cannot move checkpoints aside into", target, exc) from exc
    failures = remove_files(directory, [ROLLBACK_MARKER])
    if failures:
        raise io_error("Cannot remove the rollback record", directory / ROLLBACK_MARKER, next(iter(failures.values())))
    return folder


def rolled_back_folders(directory: Path) -> list[Path]:
    """The folders rollbacks set aside in ``directory``, oldest first."""
    try:
        with os.scandir(directory / ROLLED_BACK_DIR) as it:
            names = [e.name for e in it if _FOLDER_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise io_error("Cannot list", directory / ROLLED_BACK_DIR, exc) from exc
    def when(name: str) -> tuple[str, int]:
        stamp, _, n = name.split("-", 3)[3].partition("-")
        return stamp, int(n or 1)

    return [directory / ROLLED_BACK_DIR / n for n in sorted(names, key=when)]
