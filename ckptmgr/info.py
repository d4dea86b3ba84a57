"""CheckpointInfo: what the manager knows about one committed checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint.

    Example:

    >>> import ckptmgr, tempfile
    >>> with ckptmgr.CheckpointManager(tempfile.mkdtemp()) as mgr:
    ...     info = mgr.save(10, {"w": [1.0, 2.0]}, metrics={"loss": 0.5})
    ...     info = mgr.latest
    >>> info.step, info.metrics["loss"], info.keep_reasons
    (10, 0.5, ('latest', 'keep all'))

    Attributes:
        step: the training step it was saved at.
        path: the checkpoint file.
        metrics: the metrics passed to ``save``.
        time: when it was saved, POSIX seconds.
        nbytes: bytes of array data in the state (the file is slightly larger).
        keep_reasons: why retention keeps it, e.g. ``("latest", "best val_loss #1")``.
    """

    step: int
    path: Path
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict, hash=False)
    time: float = 0.0
    nbytes: int = 0
    keep_reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A private copy: changing the caller's dict must not change the record.
        object.__setattr__(self, "metrics", dict(self.metrics))
        object.__setattr__(self, "path", Path(self.path))

    def with_reasons(self, reasons: tuple[str, ...]) -> CheckpointInfo:
        return dataclasses.replace(self, keep_reasons=reasons)
