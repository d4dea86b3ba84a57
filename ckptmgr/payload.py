"""FilePayload: a framework-native file (e.g. a Keras ``.keras``) saved as a checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from . import storage


@dataclasses.dataclass(frozen=True)
class FilePayload:
    """A checkpoint whose content is a file written by a framework's own saver.

    Pass one to :meth:`CheckpointManager.save` instead of a state tree. The manager
    calls ``write(path)`` with a temporary path in the checkpoint directory (ending with
    ``-<name>``, so savers that check the suffix accept it), then commits the file as
    ``<directory>/<name>`` with the same guarantees as a native checkpoint: atomic and
    durable, a checksum verified on restore, retention, metric tracking. Its metadata
    lives in a hidden sidecar file next to it. ``restore()`` of a payload checkpoint
    returns the verified file's path, for the framework to load.

    Example:

    >>> import ckptmgr, tempfile
    >>> def write(path):
    ...     path.write_text("weights")
    >>> with ckptmgr.CheckpointManager(tempfile.mkdtemp()) as mgr:
    ...     info = mgr.save(3, ckptmgr.FilePayload("model-03.txt", write))
    ...     path = mgr.restore()
    >>> path.name, path.read_text()
    ('model-03.txt', 'weights')

    Args:
        name: the file name in the checkpoint directory (no ``/``, not hidden). Saving
            a payload with the name of an earlier checkpoint replaces that checkpoint.
        write: called once with a ``pathlib.Path``; must create a regular file there.

    Raises:
        ValueError: ``name`` is not a plain file name, or ``write`` is not callable.
    """

    name: str
    write: Callable[[Path], object]

    def __post_init__(self) -> None:
        storage.check_payload_name(self.name)
        if not callable(self.write):
            raise ValueError(f"Expected write to be callable. Received: write={self.write!r}")
