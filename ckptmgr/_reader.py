"""The read side of a checkpoint directory: listing, best, restore with fallback.

:class:`CheckpointManager` (manager.py) is this plus the write side; a manager opened
with ``read_only=True`` uses only this. Everything here works without the lock: a
reader lists the directory again before each answer, and a listing that raced the
writer (a file renamed in, another deleted) is taken again.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import codec
from ._args import parse_select, steps_text
from ._directory import READ_RETRIES, CheckpointDirectory, Loaded
from ._object_directory import ObjectCheckpointDirectory
from ._retention import Catalog
from ._retention import Record as _Record
from .coordinator import Coordinator
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CoordinatorError,
    CorruptCheckpointError,
)
from .info import CheckpointDescription, CheckpointInfo, Which
from .metrics import MetricTracker

T = TypeVar("T")


class CheckpointReader:
    """Reading a checkpoint directory (the base of :class:`ckptmgr.CheckpointManager`).

    Not constructed on its own: open ``CheckpointManager(directory, read_only=True)``.
    """

    _directory: Path | str
    _dir: CheckpointDirectory | ObjectCheckpointDirectory
    _catalog: Catalog
    _mutex: threading.RLock
    _tracker: MetricTracker | None
    _read_only: bool
    _restored: CheckpointInfo | None
    _skipped_corrupt: set[int]
    _labels_current: bool
    _coordinator: Coordinator | None = None

    def _apply_retention(self, *, delete: bool = True) -> list[CheckpointInfo]:
        raise NotImplementedError

    def _pending_step(self) -> int | None:
        """The step of a save still being written (a writer's business)."""
        return None

    def _settle_pending(self) -> None:
        """Collective: conclude a save in flight before reading (a writer's business)."""


    def _adopt_tracker(self, recorded: Any) -> None:
        """A reader without ``monitor`` adopts the metric the run recorded, so that
        ``best`` and ``restore("best")`` work (also when the run started after it opened)."""
        if self._tracker is None and isinstance(recorded, dict):
            try:
                self._tracker = MetricTracker(
                    recorded["monitor"], mode=recorded["mode"],
                    min_delta=recorded.get("min_delta") or 0.0, baseline=recorded.get("baseline"),
                )
            except (KeyError, TypeError, ValueError):
                self._tracker = None

    @property
    def _records(self) -> dict[int, _Record]:
        return self._catalog.records

    @property
    def directory(self) -> Path | str:
        """The checkpoint directory (absolute); for object storage, its URL (a ``str``)."""
        return self._directory

    @property
    def tracker(self) -> MetricTracker | None:
        """The monitored metric's tracker (best value, its step, patience), or None."""
        return self._tracker

    @property
    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, ascending step (corrupt ones included, with reason "corrupt")."""
        self._refresh_if_reader()
        with self._mutex:
            return [self._records[s].info for s in self._catalog.steps]

    @property
    def restored(self) -> CheckpointInfo | None:
        """The checkpoint the last ``restore``/``restore_or_initialize`` loaded, or None.

        After a fallback past a corrupt checkpoint this says which one was used; after
        ``restore_or_initialize`` started fresh it is None.
        """
        return self._restored

    @property
    def latest(self) -> CheckpointInfo | None:
        """The checkpoint with the highest step, or None."""
        self._refresh_if_reader()
        with self._mutex:
            return self._records[self._catalog.steps[-1]].info if self._records else None

    @property
    def best(self) -> CheckpointInfo | None:
        """The best committed checkpoint by ``monitor``, or None.

        That is the step where the tracker last saw an improvement (``min_delta`` and
        ``baseline`` applied) when it was saved; otherwise the checkpoint with the best
        value (ties: the earliest) if that beats ``baseline``.
        """
        self._refresh_if_reader()
        with self._mutex:
            return self._best_locked()

    def _best_locked(self) -> CheckpointInfo | None:
        tracker = self._tracker
        if tracker is None:
            return None
        # The tracker's best (min_delta and baseline applied), when that step was saved.
        record = self._records.get(tracker.best_step) if tracker.best_step is not None else None
        if record is not None and (record.corrupt or record.info.metrics.get(tracker.monitor) == tracker.best):
            # A damaged best stays the best: restore("best") then says so rather than
            # quietly returning the runner-up.
            return record.info
        # Otherwise (metrics reported between saves, or a directory from elsewhere) the
        # best value among the checkpoints, if it beats the baseline.
        ranking = self._catalog.ranking(tracker.monitor, tracker.mode)
        if ranking:
            first = self._records[ranking[0][1]].info
            if tracker.is_better(first.metrics[tracker.monitor], None):
                return first
        return None

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self._directory)!r}, checkpoints={len(self._records)})"

    def _refresh_if_reader(self) -> None:
        if self._read_only:
            self._refresh()
            # The writer's best moves on as it saves: follow its newest recorded state
            # (silently: a mismatched metric was warned about at open).
            recorded = self._newest_tracker_state()
            self._adopt_tracker(recorded)
            if self._tracker is not None and recorded is not None:
                self._tracker.load_state_dict(recorded)
            with self._mutex:
                self._apply_retention(delete=False)

    def _refresh(self) -> None:
        """(Re)build the records from the directory."""
        records = self._dir.read_records()
        with self._mutex:
            self._catalog.reset(records)
            self._labels_current = False

    def _newest_tracker_state(self) -> Any:
        with self._mutex:
            for step in sorted(self._records, reverse=True):
                record = self._records[step]
                if not record.corrupt and record.meta.get("tracker") is not None:
                    return record.meta["tracker"]
        return None

    def _restore_tracker(self, state: Any) -> None:
        if self._tracker is not None and state is not None and not self._tracker.load_state_dict(state):
            warnings.warn(
                f"ckptmgr: the checkpoints in {self._directory} tracked "
                f"{state.get('monitor') if isinstance(state, dict) else state!r}/"
                f"{state.get('mode') if isinstance(state, dict) else ''}, not "
                f"{self._tracker.monitor}/{self._tracker.mode}; starting a new best",
                CheckpointWarning,
                stacklevel=3,
            )

    def restore(
        self, which: Which = "latest", *, verify: bool = True, select: str | Sequence[str] | None = None,
        mmap: bool = False, rank: int | None = None,
    ) -> Any:
        """Load a checkpoint's state tree (or, for a payload checkpoint, its file's path).

        ``"latest"`` falls back to the newest checkpoint that verifies, warning
        (:class:`CheckpointWarning`) about each one it skips; ``"best"`` and a step
        number load exactly that checkpoint. On a writer, restoring the newest good
        checkpoint (a resume) also takes its metric history (best, its step,
        patience); restoring any older one (to evaluate it, say) leaves the run's
        history as it is: to continue from an earlier step, use ``rollback(step)``.

        Example (a server needs the parameters, not the optimizer state):

        >>> import ckptmgr, numpy as np, tempfile
        >>> with ckptmgr.CheckpointManager(tempfile.mkdtemp()) as mgr:
        ...     _ = mgr.save(1, {"params": {"w": np.ones(2), "b": 0.5}, "opt": {"m": np.zeros(2)}})
        ...     mgr.restore(select="params/b"), mgr.restore(select=["params/w", "opt"])
        ({'params': {'b': 0.5}}, {'params': {'w': array([1., 1.])}, 'opt': {'m': array([0., 0.])}})

        Args:
            which: ``"latest"``, ``"best"`` or a step.
            verify: check every checksum (recommended; the cost is small).
            select: read only these subtrees: a key path with ``/`` between keys
                (``"params"``, ``"params/dense/kernel"``; list items by index), or a
                list of them. The result keeps the same nesting with only the selected
                parts; nothing else is read from the file, and what is read is verified
                (arrays under 256 KiB are stored packed together and verified by the
                1 MiB block of the file that holds them).
            mmap: return arrays as read-only views of the checkpoint file mapped in
                memory: restore returns at once, and each array is read from disk
                when first touched (the OS can drop those pages again under memory
                pressure). The metadata and the layout are verified, the arrays'
                checksums are not (that would read every byte): run :meth:`verify`
                to check them. Retention deleting the file does not affect arrays
                already returned. Payload checkpoints and scalars are read as usual.
            rank: read rank ``rank``'s part of a checkpoint saved by several processes
                with ``sharded=True`` (e.g. to combine the parts on another number of
                ranks); a checkpoint in one file is returned whole. Not a collective:
                ``which`` is resolved here, without fallback.

        With a coordinator (and no ``rank``) it is a collective: every rank restores the
        same step, its own part of it (``sharded=True`` checkpoints) or the one copy;
        ``"latest"`` falls back, on every rank together, past a step any rank cannot
        read or verify.

        Returns:
            The state tree, equal to the one saved (types, dtypes, shapes, values); for
            a :class:`FilePayload` checkpoint, the ``pathlib.Path`` of its file.

        Raises:
            CheckpointNotFoundError: no checkpoint at all, no best, or no such step.
            CorruptCheckpointError: the named checkpoint (or every checkpoint, for
                ``"latest"``) fails verification.
            CheckpointIOError: a file could not be read.
            KeyError: a selected key path is not in the checkpoint (the message names it).
            ValueError: ``select`` is malformed, or given for a payload checkpoint; a
                sharded checkpoint without a coordinator or ``rank``, or ``rank`` out
                of its range.
            CheckpointError: a sharded checkpoint saved by another number of ranks
                than this job's (the message names both).
            CoordinatorError: another rank died or stalled, or failed to read the step
                asked for.
        """
        parsed = parse_select(select)
        if which not in ("latest", "best") and not (isinstance(which, (int, np.integer)) and not isinstance(which, bool)):
            raise ValueError(f"Expected which to be 'latest', 'best' or a step. Received: which={which!r}")
        if rank is not None:
            if type(rank) is not int or rank < 0:
                raise ValueError(f"Expected rank to be an int >= 0. Received: rank={rank!r}")
            record = self._resolve(which)
            value = self._exactly(record, self._dir.load(record, verify=verify, select=parsed, mmap=mmap, rank=rank))
            return value
        if self._coordinator is not None:
            return self._restore_coordinated(which, verify, parsed, mmap)[0]
        return self._restore(which, verify, parsed, mmap=mmap)[0]

    def restore_or_initialize(self, init: Callable[[], T]) -> T | Any:
        """The latest good checkpoint's state, or ``init()`` if there is no checkpoint.

        Raises:
            CorruptCheckpointError: checkpoints exist but none verifies (initialising
                would silently throw the run away).
            CheckpointIOError: a file could not be read.
        """
        try:
            if self._coordinator is not None:
                return self._restore_coordinated("latest", True, None, False)[0]
            return self._restore("latest", True)[0]
        except CheckpointNotFoundError:
            if self.checkpoints:
                raise
            return init()

    def verify(self, which: Which = "latest") -> CheckpointInfo:
        """Check every checksum of one checkpoint (no fallback); return its info.

        Raises:
            CheckpointNotFoundError, CorruptCheckpointError, CheckpointIOError.
        """
        record = self._resolve(which)
        self._exactly(record, self._dir.load(record, verify=True, tree=False))
        return record.info

    def describe(self, which: Which = "latest") -> CheckpointDescription:
        """A checkpoint's metadata and the layout of its state tree, reading no arrays.

        The metadata is checksum-verified; the arrays are not read (``verify`` checks
        them). See :class:`CheckpointDescription` for an example.

        Raises:
            CheckpointNotFoundError: no such checkpoint (or it was deleted meanwhile).
            CorruptCheckpointError: its metadata is damaged.
            CheckpointIOError: it could not be read.
        """
        return self._dir.describe(self._resolve(which))

    def _resolve(self, which: Which) -> _Record:
        self._refresh_if_reader()
        with self._mutex:
            if which == "best":
                best = self._best_locked()
                if best is None:
                    raise CheckpointNotFoundError(
                        f"No best checkpoint in {self._directory}"
                        + ("" if self._tracker else " (the manager has no monitor=)")
                    )
                return self._records[best.step]
            if which == "latest":
                if not self._records:
                    raise CheckpointNotFoundError(f"No checkpoint in {self._directory}")
                return self._records[max(self._records)]
            if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
                record = self._records.get(int(which))
                if record is None:
                    raise CheckpointNotFoundError(
                        f"No checkpoint of step {int(which)} in {self._directory} "
                        f"(steps: {steps_text(sorted(self._records))})"
                    )
                return record
        raise ValueError(f"Expected which to be 'latest', 'best' or a step. Received: which={which!r}")

    @staticmethod
    def _exactly(record: _Record, loaded: Loaded) -> Any:
        """The value of ``record`` itself: a payload replaced by a commit in progress is
        that commit's step now, so the step asked for is not found."""
        if loaded.record is not record:
            raise CheckpointNotFoundError(
                f"{record.info.path} no longer holds step {record.info.step}: it is step "
                f"{loaded.record.info.step}, being committed"
            )
        return loaded.value

    def _restore(
        self, which: Which, verify: bool, select: codec.Selection | None = None, *, mmap: bool = False,
    ) -> tuple[Any, CheckpointInfo]:
        if which != "latest":
            for attempt in range(READ_RETRIES):
                try:
                    record = self._resolve(which)
                    value = self._exactly(record, self._dir.load(record, verify=verify, select=select, mmap=mmap))
                except CheckpointNotFoundError:
                    # A reader racing the writer: "best" may have moved on (deleted after
                    # the listing, or missing from a listing taken while the writer renamed
                    # a new one in and deleted an old one); list again.
                    if not (self._read_only and which == "best" and self._tracker is not None) \
                            or attempt == READ_RETRIES - 1:
                        raise
                    continue
                self._after_restore(record)
                return value, record.info
        failures: list[str] = []
        raced = False
        for _attempt in range(READ_RETRIES):
            listed_before = bool(self._records)
            self._refresh_if_reader()
            with self._mutex:
                candidates = [self._records[s] for s in sorted(self._records, reverse=True)]
            if not candidates and (raced or (self._read_only and listed_before)):
                # A directory listing is no snapshot: while the writer renames a new
                # checkpoint in and deletes an old one, a listing can miss both. A
                # reader that saw checkpoints before lists again rather than report none.
                raced = True
                continue
            raced = False
            for record in candidates:
                try:
                    loaded = self._dir.load(record, verify=verify, select=select, mmap=mmap)
                except CheckpointNotFoundError:
                    # Deleted under us (a reader racing the writer's retention, or a
                    # user's rm): list again, a newer checkpoint replaced it.
                    raced = True
                    if not self._read_only:
                        with self._mutex:
                            self._catalog.remove(record.info.step)
                    break
                except CorruptCheckpointError as exc:
                    failures.append(str(exc))
                    self._skipped_corrupt.add(record.info.step)
                    warnings.warn(
                        f"ckptmgr: skipping corrupt checkpoint {exc}; falling back to an older one",
                        CheckpointWarning,
                        stacklevel=3,
                    )
                    continue
                # A payload replaced by a commit in progress is served as that commit's step.
                self._after_restore(loaded.record)
                return loaded.value, loaded.record.info
            if not raced:
                break
        if failures:
            raise CorruptCheckpointError(
                f"No checkpoint in {self._directory} verifies ({len(failures)} corrupt): "
                + "; ".join(failures)
            )
        raise CheckpointNotFoundError(f"No checkpoint in {self._directory}")

    def _restore_coordinated(
        self, which: Which, verify: bool, select: codec.Selection | None, mmap: bool,
    ) -> tuple[Any, CheckpointInfo]:
        """restore() of a job of several processes: the same step on every rank.

        Rank 0 names the candidates (newest first for "latest"); for each, every rank
        reads and verifies what it needs (its part, or the one copy) and an all-gather
        tells all whether everyone succeeded: the first step that every rank could
        read is the one restored, everywhere.
        """
        c = self._coordinator
        assert c is not None
        self._settle_pending()
        if c.rank == 0:
            try:
                steps = (sorted(self._records, reverse=True) if which == "latest"
                         else [self._resolve(which).info.step])
                plan: Any = {"steps": steps}
            except CheckpointNotFoundError as exc:
                plan = {"missing": str(exc)}
            plan = c.broadcast(plan)
        else:
            plan = c.broadcast(None)
            self._refresh()
        if "missing" in plan:
            raise CheckpointNotFoundError(plan["missing"])
        failures: list[str] = []
        for step in plan["steps"]:
            record = self._records.get(step)
            value: Any = None
            own: BaseException | None = None
            report: dict[str, Any]
            try:
                if record is None:
                    raise CheckpointNotFoundError(
                        f"Rank {c.rank} sees no checkpoint of step {step} in {self._directory}: is the "
                        "directory on a file system every rank sees?"
                    )
                if record.parts and len(record.parts) != c.world_size:
                    raise CheckpointError(
                        f"{record.info.path} was saved by {len(record.parts)} ranks, each its own part "
                        f"(sharded=True); this job has {c.world_size}. Restore it on {len(record.parts)} "
                        "ranks, or read each part with restore(step, rank=k) and combine them yourself"
                    )
                value = self._dir.load(record, verify=verify, select=select, mmap=mmap,
                                       rank=c.rank if record.parts else None).value
                report = {"ok": True}
            except CorruptCheckpointError as exc:
                own, report = exc, {"corrupt": f"rank {c.rank}: {exc}"}
            except (CheckpointError, KeyError, ValueError) as exc:
                own, report = exc, {"error": f"rank {c.rank}: {type(exc).__name__}: {exc}"}
            reports = c.all_gather(report)
            errors = [r["error"] for r in reports if "error" in r]
            corrupt = [r["corrupt"] for r in reports if "corrupt" in r]
            if not errors and not corrupt:
                assert record is not None
                self._after_restore(record)
                return value, record.info
            if errors or which != "latest":
                if own is not None:
                    raise own
                raise CoordinatorError(f"rank {c.rank}: restoring step {step} failed on another rank: "
                                       + "; ".join(errors + corrupt))
            failures.extend(corrupt)
            self._skipped_corrupt.add(step)
            warnings.warn(
                f"ckptmgr: skipping corrupt checkpoint of step {step} ({'; '.join(corrupt)}); "
                "falling back to an older one on every rank",
                CheckpointWarning,
                stacklevel=4,
            )
        if failures:
            raise CorruptCheckpointError(
                f"No checkpoint in {self._directory} verifies on every rank ({len(failures)} failures): "
                + "; ".join(failures)
            )
        raise CheckpointNotFoundError(f"No checkpoint in {self._directory}")

    def _after_restore(self, record: _Record) -> None:
        self._restored = record.info
        # Resuming from the newest good checkpoint resumes its metric history too (after a
        # fall back past corrupt ones, theirs is lost with them). Any other restore (an
        # older step, "best", to evaluate it) leaves the run's history alone: the next
        # save continues after the newest step, and rewinding the best would let
        # retention delete the real one. rollback(step) is how a run continues from
        # an earlier step, its history with it.
        if not self._read_only and record.meta.get("tracker") is not None and self._is_newest_good(record.info.step):
            self._restore_tracker(record.meta["tracker"])

    def _is_newest_good(self, step: int) -> bool:
        with self._mutex:
            pending = self._pending_step()
            if pending is not None and pending > step:
                return False
            return not any(s > step and self._is_good(s) for s in self._catalog.steps)

    def _is_good(self, step: int) -> bool:
        """A listed checkpoint neither known corrupt nor skipped by restore() as corrupt."""
        return step not in self._skipped_corrupt and self._records[step].corrupt is None
