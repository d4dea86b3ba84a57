"""CheckpointInfo and KeepReason: what the manager knows about one committed checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

# Which checkpoint a call means: a step, the newest ("latest") or the best by the monitor.
Which = int | Literal["latest", "best"]

ReasonKind = Literal[
    "latest",       # the newest checkpoint (never deleted)
    "best",         # the monitored metric's best (never deleted); detail: the metric
    "last",         # KeepLast; detail: n
    "ranked",       # KeepBest; detail: the metric
    "every",        # KeepEvery; detail: the interval as text
    "keep all",     # no retention policy
    "custom",       # a user-defined policy's reason
    "just saved",   # a save below the newest that no policy keeps (kept anyway)
    "unretained",   # no policy keeps it; deleted at the next save
    "not deleted",  # retention could not delete it; detail: the error
    "corrupt",      # it does not verify; detail: why
]
REASON_KINDS: frozenset[str] = frozenset(ReasonKind.__args__)  # type: ignore[attr-defined]


class KeepReason(str):
    """Why retention keeps a checkpoint: the text people read, with a ``kind`` and ``detail``.

    It is a ``str`` (``"latest"``, ``"best val_loss #1"``, ``"every 10000 steps"``), so
    it prints, compares and serialises as one; code that needs to know what it means
    reads ``kind`` and ``detail`` instead of parsing the text.

    >>> from ckptmgr.info import KeepReason
    >>> reason = KeepReason.ranked("val_loss", 1)
    >>> reason, reason.kind, reason.detail, reason == "best val_loss #1"
    ('best val_loss #1', 'ranked', 'val_loss', True)
    """

    kind: ReasonKind
    detail: str

    def __new__(cls, text: str, kind: ReasonKind = "custom", detail: str = "") -> KeepReason:
        if kind not in REASON_KINDS:
            raise ValueError(f"Expected a reason kind among {sorted(REASON_KINDS)}. Received: kind={kind!r}")
        self = super().__new__(cls, text)
        self.__dict__.update(kind=kind, detail=detail)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"KeepReason is immutable (cannot set {name!r})")

    def __repr__(self) -> str:
        return str.__repr__(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (KeepReason, (str(self), self.kind, self.detail))

    @classmethod
    def of(cls, reason: str) -> KeepReason:
        """``reason`` itself if it is a KeepReason, else a user policy's reason."""
        return reason if isinstance(reason, KeepReason) else cls(str(reason), "custom")

    # The texts below are the only place each reason's wording is defined.

    @classmethod
    def latest(cls) -> KeepReason:
        return cls("latest", "latest")

    @classmethod
    def best(cls, monitor: str) -> KeepReason:
        return cls(f"best {monitor}", "best", monitor)

    @classmethod
    def last(cls, n: int) -> KeepReason:
        return cls(f"last {n}", "last", str(n))

    @classmethod
    def ranked(cls, monitor: str, rank: int) -> KeepReason:
        return cls(f"best {monitor} #{rank}", "ranked", monitor)

    @classmethod
    def every(cls, interval: str) -> KeepReason:
        return cls(f"every {interval}", "every", interval)

    @classmethod
    def keep_all(cls) -> KeepReason:
        return cls("keep all", "keep all")

    @classmethod
    def just_saved(cls) -> KeepReason:
        return cls("just saved", "just saved")

    @classmethod
    def unretained(cls) -> KeepReason:
        return cls("unretained: deleted at the next save", "unretained")

    @classmethod
    def not_deleted(cls, error: object) -> KeepReason:
        return cls(f"not deleted: {error}", "not deleted", str(error))

    @classmethod
    def corrupt(cls, why: str) -> KeepReason:
        return cls(f"corrupt: {why}", "corrupt", why)


class ObjectURL(str):
    """The URL of an object in an object store (``s3://bucket/prefix/data/ckpt-....h5``).

    A ``str`` (it prints and serialises as the URL), with ``name``, the part after the
    last ``/``, like :attr:`pathlib.PurePath.name`. A URL cannot be a :class:`~pathlib.Path`:
    ``Path("s3://b/k")`` collapses the ``//``.

    >>> from ckptmgr.info import ObjectURL
    >>> url = ObjectURL("s3://bucket/run/data/ckpt-000000010-0123456789abcdef.h5")
    >>> url.name, url == "s3://bucket/run/data/ckpt-000000010-0123456789abcdef.h5"
    ('ckpt-000000010-0123456789abcdef.h5', True)
    """

    __slots__ = ()

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint.

    Example:

    >>> import ckptmgr, tempfile
    >>> with ckptmgr.CheckpointManager(tempfile.mkdtemp()) as mgr:
    ...     info = mgr.save(10, {"w": [1.0, 2.0]}, metrics={"loss": 0.5})
    ...     info = mgr.latest
    >>> info.step, info.metrics["loss"], info.keep_reasons, info.kind
    (10, 0.5, ('latest', 'keep all'), 'tree')

    Attributes:
        step: the training step it was saved at.
        path: the checkpoint file (for a payload, the framework's own file): a
            :class:`~pathlib.Path`, or for a checkpoint on object storage (``s3://``) its
            data object's URL, an :class:`ObjectURL` (a ``str`` with ``.name``).
        metrics: the metrics passed to ``save``.
        time: when it was saved, POSIX seconds.
        nbytes: bytes of array data in the state (the file is slightly larger).
        keep_reasons: why retention keeps it, e.g. ``("latest", "best val_loss #1")``:
            :class:`KeepReason` strings, each with a ``kind`` and ``detail``.
        kind: ``"tree"`` (a state tree in ckptmgr's HDF5 format) or ``"payload"`` (a
            framework's own file saved with :class:`ckptmgr.FilePayload`).
        metadata_path: where its metadata lives: the file itself for a tree, the
            payload's metadata file for a payload; on object storage the URL of the
            step's commit marker (an :class:`ObjectURL`).
        corrupt: why it does not verify, when its metadata already showed that (None
            otherwise; data checksums are checked by ``restore`` and ``verify``).
        parts: for a checkpoint saved by several processes with ``sharded=True``, each
            rank's part file, by rank (``path`` is then the commit record, written last,
            that names them); ``()`` for a checkpoint in one file.
    """

    step: int
    path: Path | ObjectURL
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict, hash=False)
    time: float = 0.0
    nbytes: int = 0
    keep_reasons: tuple[KeepReason, ...] = ()
    kind: Literal["tree", "payload"] = "tree"
    metadata_path: Path | ObjectURL | None = None
    corrupt: str | None = None
    parts: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        # A private copy: changing the caller's dict must not change the record.
        object.__setattr__(self, "metrics", dict(self.metrics))
        path: object = self.path
        if not isinstance(path, (Path, ObjectURL)):  # a str from the caller
            object.__setattr__(self, "path", Path(self.path))
        if self.keep_reasons:
            object.__setattr__(self, "keep_reasons", tuple(KeepReason.of(r) for r in self.keep_reasons))
        metadata: object = self.metadata_path
        if metadata is None:
            object.__setattr__(self, "metadata_path", self.path)
        elif not isinstance(metadata, (Path, ObjectURL)):
            object.__setattr__(self, "metadata_path", Path(self.metadata_path))  # type: ignore[arg-type]

    def with_reasons(self, reasons: tuple[KeepReason, ...]) -> CheckpointInfo:
        """The same checkpoint with other keep reasons (on every save: kept cheap, no re-checks)."""
        new = object.__new__(CheckpointInfo)
        new.__dict__.update(self.__dict__, keep_reasons=tuple(KeepReason.of(r) for r in reasons))
        return new


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """One stored leaf of a state tree, as its checkpoint describes it (nothing read).

    Attributes:
        key_path: the keys and indices from the root, e.g. ``("params", "dense", 0)``.
        kind: ``"ndarray"``, ``"npscalar"``, ``"int"``, ``"float"``, ``"bool"``,
            ``"complex"``, ``"str"`` or ``"bytes"``.
        dtype: the stored dtype's name, e.g. ``"float32"``, ``"bfloat16"``.
        shape: the stored shape (``()`` for scalars).
        nbytes: bytes of data.
    """

    key_path: tuple[str | int, ...]
    kind: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclasses.dataclass(frozen=True)
class CheckpointDescription:
    """A checkpoint's metadata and the layout of its state tree, without its arrays.

    Example:

    >>> import ckptmgr, numpy as np, tempfile
    >>> with ckptmgr.CheckpointManager(tempfile.mkdtemp()) as mgr:
    ...     _ = mgr.save(3, {"w": np.zeros((2, 3), np.float32), "step": 3})
    ...     d = mgr.describe()
    >>> d.metadata["step"], [(leaf.key_path, leaf.dtype, leaf.shape) for leaf in d.leaves]
    (3, [(('w',), 'float32', (2, 3)), (('step',), 'int64', ())])

    Attributes:
        info: the checkpoint.
        metadata: its checksum-verified metadata (``step``, ``time``, ``metrics``,
            ``tracker``, ``format``, ``checksum``, ...; for a payload also ``name``,
            ``size`` and ``crc32`` of its file).
        leaves: the stored leaves in tree order; None for a payload.
    """

    info: CheckpointInfo
    metadata: Mapping[str, Any]
    leaves: tuple[LeafInfo, ...] | None
