"""ckptmgr: crash-proof, exact-resume checkpoint management for ML training.

>>> import ckptmgr, tempfile
>>> with ckptmgr.CheckpointManager(tempfile.mkdtemp(), keep=ckptmgr.KeepLast(2)) as mgr:
...     for step in (1, 2, 3):
...         _ = mgr.save(step, {"step": step})
...     [c.step for c in mgr.checkpoints], mgr.restore()["step"]
([2, 3], 3)
"""

from __future__ import annotations

from ._directory import is_checkpoint_directory
from ._follow import follow
from .coordinator import Coordinator
from .errors import (
    CheckpointError,
    CheckpointIOError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CoordinatorError,
    CorruptCheckpointError,
    DirectoryLockedError,
    MissingMetricWarning,
    ObjectStoreError,
    StepOrderError,
)
from .info import CheckpointDescription, CheckpointInfo, KeepReason, LeafInfo, ObjectURL, Which
from .manager import CheckpointManager
from .metrics import MetricTracker
from .payload import FilePayload
from .policies import (
    EverySeconds,
    EverySteps,
    KeepBest,
    KeepEvery,
    KeepLast,
    OnImprovement,
    RetentionContext,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointDescription",
    "CheckpointError",
    "CheckpointIOError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "Coordinator",
    "CoordinatorError",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "EverySeconds",
    "EverySteps",
    "FilePayload",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepReason",
    "LeafInfo",
    "MetricTracker",
    "MissingMetricWarning",
    "ObjectStoreError",
    "ObjectURL",
    "OnImprovement",
    "RetentionContext",
    "RetentionPolicy",
    "SaveContext",
    "SavePolicy",
    "StepOrderError",
    "Which",
    "__version__",
    "follow",
    "is_checkpoint_directory",
]
