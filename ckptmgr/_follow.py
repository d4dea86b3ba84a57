"""follow(): the serving side's view of a training run, one new checkpoint at a time.

Example (a finished run, so ``timeout=0`` returns after listing it once):

>>> import ckptmgr, tempfile
>>> directory = tempfile.mkdtemp()
>>> with ckptmgr.CheckpointManager(directory, monitor="val_loss") as mgr:
...     for step, val_loss in ((1, 0.9), (2, 0.4), (3, 0.6)):
...         _ = mgr.save(step, {"step": step}, metrics={"val_loss": val_loss})
>>> [info.step for info in ckptmgr.follow(directory, timeout=0)]
[2]
>>> [info.step for info in ckptmgr.follow(directory, "latest", timeout=0)]
[3]
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator
from pathlib import Path
from time import monotonic, sleep
from typing import Literal

from .errors import CheckpointIOError, CheckpointNotFoundError
from .info import CheckpointInfo
from .manager import CheckpointManager

__all__ = ["follow"]

Followed = Literal["best", "latest"]


def follow(
    directory: str | os.PathLike[str],
    which: Followed = "best",
    interval: float = 1.0,
    timeout: float | None = None,
) -> Generator[CheckpointInfo, None, None]:
    """Yield the best (or latest) checkpoint of ``directory``, then each new one as it lands.

    For a process that serves or evaluates the checkpoints another process trains:

        for info in ckptmgr.follow("runs/exp1"):
            with ckptmgr.CheckpointManager("runs/exp1", read_only=True) as reader:
                model = build(reader.restore(info.step))

    It reads like ``CheckpointManager(directory, read_only=True)``: it takes no lock
    (the writer keeps running) and creates nothing. It lists only committed
    checkpoints, so it never yields a partial save, and checkpoints that retention
    deletes meanwhile simply stop being listed. A checkpoint is yielded when it differs
    from the last one yielded: another step, or the same step saved again (a different
    ``time``). Checkpoints that came and went between two polls are not seen: follow
    reports the current state, not every save.

    The first item is the current best/latest, if there is one. Until ``directory``
    exists, or while it holds no checkpoint, it waits. With ``which="best"`` it yields
    only once the run has a best: a run saved without ``monitor=`` has none, so
    following its best yields nothing (follow ``"latest"`` instead).

    Each poll opens (and closes) a fresh read-only manager, so that it picks up the
    best the run recorded in its newest checkpoint.

    Local directories only so far: an ``s3://`` URL raises ValueError (poll a
    ``CheckpointManager(url, read_only=True)`` instead).

    Args:
        directory: the checkpoint directory; it need not exist yet.
        which: ``"best"`` (by the metric the run monitors) or ``"latest"``.
        interval: seconds between polls, > 0.
        timeout: return after this many seconds of waiting without a new checkpoint
            (the time the caller spends between items does not count); 0 lists once.
            None: follow forever.

    Returns:
        A generator of :class:`ckptmgr.CheckpointInfo`. Arguments are checked when
        ``follow`` is called, the directory only when iterating.

    Raises:
        ValueError: bad arguments ("Expected ... Received: ...").
        CheckpointIOError: (while iterating) the directory exists but cannot be read.
    """
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise ValueError(f"Expected directory to be a non-empty str or path. Received: directory={directory!r}")
    if isinstance(directory, str) and "://" in directory:
        raise ValueError(
            "Expected a local checkpoint directory: follow() does not support object storage yet. "
            f"Received: directory={directory!r}"
        )
    if which not in ("best", "latest"):
        raise ValueError(f"Expected which to be 'best' or 'latest'. Received: which={which!r}")
    if not _is_number(interval) or not (0 < interval < math.inf):
        raise ValueError(f"Expected interval to be a finite number of seconds > 0. Received: interval={interval!r}")
    if timeout is not None and (not _is_number(timeout) or not timeout >= 0):
        raise ValueError(f"Expected timeout to be a number of seconds >= 0, or None. Received: timeout={timeout!r}")
    return _follow(Path(os.fspath(directory)), which, float(interval), None if timeout is None else float(timeout))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _follow(directory: Path, which: Followed, interval: float, timeout: float | None) -> Generator[CheckpointInfo, None, None]:
    last: tuple[int, float] | None = None
    deadline = None if timeout is None else monotonic() + timeout
    while True:
        info = _current(directory, which)
        if info is not None and (info.step, info.time) != last:
            last = (info.step, info.time)
            yield info
            if timeout is not None:
                deadline = monotonic() + timeout
            continue  # something may have landed while the caller was busy: look now
        if deadline is None:
            sleep(interval)
            continue
        remaining = deadline - monotonic()
        if remaining <= 0:
            return
        sleep(min(interval, remaining))


def _current(directory: Path, which: Followed) -> CheckpointInfo | None:
    """The best/latest committed checkpoint now, or None (none yet, or no directory yet)."""
    try:
        reader = CheckpointManager(directory, read_only=True)
    except CheckpointNotFoundError:
        return None  # not created yet (or deleted): wait for it
    except CheckpointIOError as exc:
        if isinstance(exc.__cause__, FileNotFoundError) and not directory.is_dir():
            return None  # deleted between the reader's check and its listing
        raise
    with reader:
        return reader.best if which == "best" else reader.latest
