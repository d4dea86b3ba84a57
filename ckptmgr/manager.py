"""CheckpointManager: decide -> snapshot -> write -> commit -> retain."""

from __future__ import annotations

import os
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import numpy as np

from . import codec
from ._directory import READ_RETRIES, CheckpointDirectory, Loaded
from ._retention import Catalog, IncrementalKeep
from ._retention import Record as _Record
from ._writer import SaveWriter
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    MissingMetricWarning,
    StepOrderError,
)
from .info import CheckpointDescription, CheckpointInfo, KeepReason, Which
from .metrics import Direction, MetricTracker, Mode
from .payload import FilePayload
from .policies import (
    AllOf,
    KeepBest,
    OnImprovement,
    RetentionContext,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
    policy_leaves,
)

T = TypeVar("T")

_MAX_STEP = 2**63 - 1




class CheckpointManager:
    """Saves, keeps and restores the checkpoints of one training run in one directory.

    Each checkpoint is one HDF5 file holding a *state tree* (dicts with str keys, lists,
    tuples, NumPy arrays and scalars, Python scalars, str, bytes, None) and its own
    metadata. A save is written under a temporary name, fsynced and renamed, so a crash
    at any instant leaves either the complete checkpoint or none; retention runs only
    after the new checkpoint is committed and never deletes the latest or the best.

    Example:

    >>> import ckptmgr, numpy as np, tempfile
    >>> directory = tempfile.mkdtemp()
    >>> with ckptmgr.CheckpointManager(
    ...     directory,
    ...     save_every=ckptmgr.EverySteps(100),
    ...     keep=ckptmgr.KeepLast(2) | ckptmgr.KeepBest(1),
    ...     monitor="val_loss",
    ... ) as mgr:
    ...     state = mgr.restore_or_initialize(lambda: {"w": np.zeros(3), "step": 0})
    ...     for step in range(state["step"] + 1, 501):
    ...         state["w"] += 0.1
    ...         state["step"] = step
    ...         _ = mgr.save(step, state, metrics={"val_loss": abs(step - 200) / 100})
    ...     print([(c.step, c.keep_reasons) for c in mgr.checkpoints])
    [(200, ('best val_loss #1',)), (400, ('last 2',)), (500, ('latest', 'last 2'))]
    >>> ckptmgr.CheckpointManager(directory, read_only=True).restore("best")["step"]
    200

    Args:
        directory: where the checkpoints live; created if missing.
        save_every: when ``save()`` writes (``EverySteps``, ``EverySeconds``,
            ``OnImprovement`` and their ``|``/``&`` compositions). None: every call.
        keep: which checkpoints to keep (``KeepLast``, ``KeepBest``, ``KeepEvery``,
            composed with ``|``). None: keep all.
        monitor: the metric that defines "best", e.g. ``"val_loss"``.
        mode: ``"min"``, ``"max"``, or ``"auto"`` to infer it from ``monitor``'s name
            (see :func:`ckptmgr.metrics.infer_mode`).
        min_delta: the smallest change of ``monitor`` that counts as an improvement.
        baseline: a value of ``monitor`` to beat before anything counts as best.
        best_only: save only when ``monitor`` improves (sugar for
            ``save_every & OnImprovement()``).
        async_save: ``save()`` returns after an in-memory copy of the state; a
            background thread writes and commits it. The next ``save()`` (and
            ``wait()``, ``close()``, interpreter exit) waits for the write in flight,
            and raises its error if it failed.
        read_only: open for reading without taking the writer lock; ``save`` raises.
            Without ``monitor``, a reader uses the metric the checkpoints recorded.
        clock: the time source (POSIX seconds), for tests.

    Raises:
        ValueError: bad arguments ("Expected ... Received: ...").
        DirectoryLockedError: another live process writes to ``directory``.
        CheckpointIOError: the directory cannot be created, listed or locked.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: SavePolicy | None = None,
        keep: RetentionPolicy | None = None,
        monitor: str | None = None,
        mode: Mode = "auto",
        min_delta: float = 0.0,
        baseline: float | None = None,
        best_only: bool = False,
        async_save: bool = False,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise ValueError(f"Expected directory to be a non-empty str or path. Received: directory={directory!r}")
        if save_every is not None and not isinstance(save_every, SavePolicy):
            raise ValueError(
                "Expected save_every to be a save policy such as ckptmgr.EverySteps(1000), or None. "
                f"Received: save_every={save_every!r}"
            )
        if keep is not None and not isinstance(keep, RetentionPolicy):
            raise ValueError(
                "Expected keep to be a retention policy such as ckptmgr.KeepLast(3), or None. "
                f"Received: keep={keep!r}"
            )
        for name, flag in (("best_only", best_only), ("async_save", async_save), ("read_only", read_only)):
            if not isinstance(flag, bool):
                raise ValueError(f"Expected {name} to be a bool. Received: {name}={flag!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"Expected monitor to be a non-empty str or None. Received: monitor={monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"Expected mode to be 'auto', 'min' or 'max'. Received: mode={mode!r}")
        self._tracker = (
            MetricTracker(monitor, mode=mode, min_delta=min_delta, baseline=baseline)
            if monitor is not None else None
        )
        if monitor is None:
            if best_only:
                raise ValueError("Expected a monitor= metric with best_only=True. Received: monitor=None")
            needs_monitor = [p for p in (*policy_leaves(save_every), *policy_leaves(keep))
                             if isinstance(p, OnImprovement) or (isinstance(p, KeepBest) and p.monitor is None)]
            if needs_monitor:
                raise ValueError(
                    f"Expected a monitor= metric for {needs_monitor[0]!r}. Received: monitor=None"
                )
        if best_only:
            save_every = OnImprovement() if save_every is None else AllOf((save_every, OnImprovement()))
        self._save_every = save_every
        self._keep = keep
        self._best_only = best_only
        self._read_only = read_only
        self._clock = clock
        self._directory = Path(os.path.abspath(os.fspath(directory)))
        self._mutex = threading.RLock()
        self._catalog = Catalog()
        # The labels (keep_reasons) are those of the manager's own policy for every
        # checkpoint but the catalog's pending changes: the next save may then relabel
        # only the checkpoints those changes can affect (see _retention.py).
        self._labels_current = False
        self._labelled: set[int] = set()  # latest, best and just saved, as last labelled
        self._unretained: set[int] = set()  # kept only because deleting failed or was deferred
        self._closed = False
        self._last_save_time = clock()
        self._restored: CheckpointInfo | None = None
        self._skipped_corrupt: set[int] = set()  # steps restore() fell back past

        self._dir = CheckpointDirectory(self._directory, read_only=read_only, owner=_opened_at())
        try:
            self._refresh()
        except BaseException:
            self._dir.release()
            raise
        self._writer = SaveWriter(self, self._directory, background=async_save)
        recorded = self._newest_tracker_state()
        if read_only:
            self._adopt_tracker(recorded)
        self._restore_tracker(recorded)
        with self._mutex:
            self._apply_retention(delete=False)

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

    # ------------------------------------------------------------------ properties

    @property
    def _records(self) -> dict[int, _Record]:
        return self._catalog.records

    @property
    def directory(self) -> Path:
        """The checkpoint directory (absolute)."""
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

    # ------------------------------------------------------------------------ saving

    def should_save(self, step: int, metrics: Mapping[str, float] | None = None) -> bool:
        """Whether ``save(step, ..., metrics=metrics)`` would write a checkpoint.

        Changes nothing: use it to skip building an expensive state on steps that would
        not be saved.
        """
        step = _check_step(step)
        metrics = _check_metrics(metrics)
        value = metrics.get(self._tracker.monitor) if self._tracker else None
        if self._best_only and value is None:
            return False
        if self._save_every is None:
            return True
        improved = self._tracker.would_improve(value) if self._tracker else False
        return self._save_every.should_save(self._save_context(step, improved))

    def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> CheckpointInfo | None:
        """Save ``state`` as the checkpoint of ``step`` if the save policy says so.

        The monitored metric (if any) is recorded first, whether or not this step is
        saved, so patience counts every call that reports it. Saving a step that
        already exists replaces that checkpoint.

        Args:
            step: the training step (int >= 0).
            state: the state tree, or a :class:`FilePayload` (a framework's own file).
            metrics: numbers to store with the checkpoint, e.g. ``{"val_loss": 0.3}``.
            force: save whatever the policy says (pre-emption, end of training).

        Returns:
            The new checkpoint's info; None when the policy skipped this step. With
            ``async_save`` the info describes the checkpoint being written (``wait()``
            for it to be committed).

        Raises:
            TypeError: ``state`` holds an unsupported type (the message names its path).
            ValueError: bad ``step`` or ``metrics``; a state nested deeper than
                ``codec.MAX_DEPTH`` or whose description exceeds ``codec.MAX_MANIFEST_BYTES``.
            CheckpointIOError: the write failed (disk full, permission, I/O error); no
                earlier checkpoint is touched and the manager stays usable. With
                ``async_save``, a failure of the previous background write.
            CheckpointError: the manager is read-only or closed.
        """
        self._check_writable()
        step = _check_step(step)
        metrics = _check_metrics(metrics)
        if not isinstance(force, bool):
            raise ValueError(f"Expected force to be a bool. Received: force={force!r}")
        self._check_step_order(step)
        self._writer.poll()  # a failed background write surfaces here, without blocking
        value = None
        improved = False
        best_before = (self._tracker.best, self._tracker.best_step) if self._tracker else (None, None)
        if self._tracker is not None:
            value = metrics.get(self._tracker.monitor)
            if value is None:
                warnings.warn(
                    f"ckptmgr: save(step={step}) got no {self._tracker.monitor!r} metric "
                    f"(got {sorted(metrics)}); "
                    + ("skipping: best_only needs it" if self._best_only and not force
                       else "the checkpoint is never ranked best"),
                    MissingMetricWarning,
                    stacklevel=2,
                )
            improved = self._tracker.update(step, value)
        if not force:
            if self._best_only and value is None:
                return None
            if self._save_every is not None and not self._save_every.should_save(
                self._save_context(step, improved)
            ):
                return None
        now = self._clock()
        meta = {
            "step": step,
            "time": now,
            "metrics": metrics,
            "tracker": self._tracker.state_dict() if self._tracker else None,
        }
        self._last_save_time = now
        if isinstance(state, FilePayload):
            self._writer.wait()
            tmp = self._dir.write_payload(state.name, state.write)
            commit: Callable[[], CheckpointInfo] = lambda: self._commit_payload(state.name, tmp, meta)  # noqa: E731
            path = self._directory / state.name
        else:
            tree = self._writer.prepare(state)
            commit = lambda: self._commit_tree(step, tree, meta)  # noqa: E731
            path = self._dir.tree_path(step)
        info = self._writer.run(step, commit, lambda: self._forget_best(step, best_before))
        return info if info is not None else CheckpointInfo(step, path, metrics, now, 0)

    def _check_step_order(self, step: int) -> None:
        """Steps only move forward: a save below the latest would be hidden by it.

        A new run started in an old directory, or a run continued from an earlier step,
        would otherwise save checkpoints that retention deletes at once (the old, higher
        steps rank as the latest) and that restore() never returns. Checkpoints this
        manager skipped as corrupt when it restored do not count: resuming below them
        is the fallback working as intended.
        """
        with self._mutex:
            steps = self._catalog.steps
            pending = self._writer.pending_step
            if (not steps or steps[-1] <= step) and (pending is None or pending <= step):
                return
            newer = [s for s in steps if s > step and s not in self._skipped_corrupt
                     and self._records[s].corrupt is None]
            if pending is not None and pending > step:
                newer.append(pending)
            earlier = [s for s in steps if s <= step]
        if not newer:
            return
        latest = max(newer)
        back = f"rollback({earlier[-1]})" if earlier else "rollback(step)"
        raise StepOrderError(
            f"Cannot save step {step} in {self._directory}: it already holds checkpoints up to step "
            f"{latest}, and steps only move forward (a lower step would be hidden by the later ones "
            f"and deleted by retention). To resume that run, call restore() and continue after step "
            f"{latest}; to continue from an earlier step, call {back} first, which moves the later "
            "checkpoints aside (nothing is deleted); for a new run, use a new directory",
            step=step, latest=latest,
        )

    def _forget_best(self, step: int, best_before: tuple[float | None, int | None]) -> None:
        # A step whose save failed must not stay the best: then best_only would never
        # save the model that was best (its retry would not improve on itself).
        if self._tracker is not None and self._tracker.best_step == step:
            self._tracker.best, self._tracker.best_step = best_before

    def _save_context(self, step: int, improved: bool) -> SaveContext:
        with self._mutex:
            pending = self._writer.pending_step
            steps = [*self._catalog.steps[-1:], *([] if pending is None else [pending])]
            last_step = max(steps) if steps else None
        return SaveContext(step=step, now=self._clock(), last_step=last_step,
                           last_time=self._last_save_time, improved=improved)

    def _commit_tree(self, step: int, state: Any, meta: dict[str, Any]) -> CheckpointInfo:
        return self._committed(self._dir.commit_tree(step, state, meta))

    def _commit_payload(self, name: str, tmp: Path, meta: dict[str, Any]) -> CheckpointInfo:
        return self._committed(self._dir.commit_payload(name, tmp, meta))

    def _committed(self, record: _Record) -> CheckpointInfo:
        """Take a just-committed checkpoint into the records, then run retention."""
        step = record.info.step
        with self._mutex:
            same_file = self._catalog.step_of_file(record.info.path.name)
            replaced = [old for s in {step, same_file} if s is not None
                        and (old := self._catalog.remove(s)) is not None]
            self._catalog.add(record)
            # The same step saved under another name: the new checkpoint replaces it.
            stale = [f for old in replaced if old.info.path != record.info.path for f in old.files]
            self._dir.delete(stale)
            self._apply_retention(just_saved=step)
            self._dir.saved(self._records)
            return self._records[step].info

    def wait(self) -> None:
        """Block until the background write (``async_save``) is committed.

        Raises:
            CheckpointError: the background write failed.
        """
        self._writer.wait()

    def close(self) -> None:
        """Wait for pending writes, update the index, release the writer lock. Idempotent.

        Raises:
            CheckpointError: a pending background write failed (the lock is released
                anyway).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.wait()
        finally:
            self._writer.shutdown()
            if not self._read_only:
                with self._mutex:
                    self._dir.write_index(self._records)
            self._dir.release()

    def delete_all(self) -> None:
        """Delete every checkpoint (the latest and the best too) and the index, then close.

        For runs that want nothing left behind once they finish. Checkpoints go oldest
        first, so a process killed part-way leaves the newest ones. Files that are not
        ckptmgr's stay, and so does the directory.

        Example:

        >>> import ckptmgr, os, tempfile
        >>> mgr = ckptmgr.CheckpointManager(tempfile.mkdtemp())
        >>> _ = mgr.save(1, {"w": 1.0})
        >>> mgr.delete_all()
        >>> os.listdir(mgr.directory)
        []

        Raises:
            CheckpointIOError: a file could not be deleted (the manager stays open).
            CheckpointError: the manager is read-only or closed; a pending background
                write failed.
        """
        self._check_writable()
        self._writer.wait()
        with self._mutex:
            for step in sorted(self._records):
                self._dir.delete_checkpoint(self._records[step])
                self._catalog.remove(step)
        self._closed = True
        self._writer.shutdown()
        self._dir.remove_index_and_lock()
        self._dir.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as close_exc:
            warnings.warn(f"ckptmgr: while closing after an error: {close_exc}", CheckpointWarning, stacklevel=2)

    def _check_writable(self) -> None:
        if self._read_only:
            raise CheckpointError(f"CheckpointManager({str(self._directory)!r}) is read-only")
        if self._closed:
            raise CheckpointError(f"CheckpointManager({str(self._directory)!r}) is closed")

    # ---------------------------------------------------------------------- rollback

    def rollback(self, step: int) -> CheckpointInfo:
        """Make ``step`` the latest checkpoint, moving every later one aside.

        For continuing a run from an earlier checkpoint (after a loss spike, say): the
        later checkpoints are moved, not deleted, into a new folder
        ``rolled-back/after-step-<step>-<UTC time>/`` of the directory, which is itself a
        checkpoint directory (open it with ``read_only=True`` to restore from it;
        ``ckptmgr ls --all`` lists it). They no longer count for ``checkpoints``,
        ``latest``, ``best``, ``restore()`` or retention, across restarts; the best and
        patience are those recorded with ``step``. The move is crash-safe: the decision
        is committed first (a durable record of what moves where), and a crash midway is
        finished by the next writer that opens the directory.

        Example:

        >>> import ckptmgr, tempfile
        >>> with ckptmgr.CheckpointManager(tempfile.mkdtemp()) as mgr:
        ...     for step in (100, 200, 300):
        ...         _ = mgr.save(step, {"step": step})
        ...     _ = mgr.rollback(100)
        ...     _ = mgr.save(150, {"step": 150})
        ...     [c.step for c in mgr.checkpoints], len(mgr.rolled_back)
        ([100, 150], 1)

        Returns:
            The info of ``step``, now the latest.

        Raises:
            CheckpointNotFoundError: ``step`` is not a committed checkpoint here.
            CheckpointIOError: a move failed; what was not moved yet stays where it
                was, and the next writer to open finishes the rollback.
            CheckpointError: the manager is read-only or closed.
        """
        self._check_writable()
        step = _check_step(step)
        self._writer.wait()
        with self._mutex:
            if step not in self._records:
                raise CheckpointNotFoundError(
                    f"No checkpoint of step {step} in {self._directory} to roll back to "
                    f"(steps: {_steps_text(self._catalog.steps)})"
                )
            later = [self._records[s] for s in self._catalog.steps if s > step]
            if later:
                self._dir.set_aside(step, later, self._clock())
                self._refresh()
                self._skipped_corrupt.clear()
                if self._tracker is not None:
                    recorded = self._newest_tracker_state()
                    if recorded is None:
                        tracker = self._tracker
                        self._tracker = MetricTracker(tracker.monitor, mode=tracker.mode,
                                                      min_delta=tracker.min_delta, baseline=tracker.baseline)
                    self._restore_tracker(recorded)
                self._apply_retention(delete=False)
            return self._records[step].info

    @property
    def rolled_back(self) -> list[Path]:
        """The folders ``rollback()`` moved checkpoints into, oldest first.

        Each is a checkpoint directory of its own: ``CheckpointManager(folder,
        read_only=True)`` lists and restores what it holds.
        """
        return self._dir.rolled_back()

    # --------------------------------------------------------------------- retention

    def prune(self, keep: RetentionPolicy | None = None, *, dry_run: bool = False) -> list[CheckpointInfo]:
        """Apply a retention policy now, without saving.

        The latest checkpoint and the best one are protected, as after every save.

        Example:

        >>> import ckptmgr, tempfile
        >>> with ckptmgr.CheckpointManager(tempfile.mkdtemp()) as mgr:
        ...     for step in range(5):
        ...         _ = mgr.save(step, {"step": step})
        ...     [c.step for c in mgr.prune(ckptmgr.KeepLast(2))], [c.step for c in mgr.checkpoints]
        ([0, 1, 2], [3, 4])

        Args:
            keep: the policy (default: the manager's own ``keep=``).
            dry_run: only say what would be deleted (allowed on a read-only manager).

        Returns:
            The checkpoints deleted (or, with ``dry_run``, that would be), ascending step;
            one that could not be deleted is left out, with a :class:`CheckpointWarning`.

        Raises:
            ValueError: no policy given and the manager has none.
            CheckpointError: the manager is read-only (without ``dry_run``) or closed.
        """
        if not dry_run:
            self._check_writable()
        policy = self._keep if keep is None else keep
        if not isinstance(policy, RetentionPolicy):
            raise ValueError(
                "Expected keep to be a retention policy such as ckptmgr.KeepLast(3). "
                f"Received: keep={keep!r} (and the manager has no keep= of its own)"
            )
        self._writer.wait()
        if self._read_only:
            self._refresh()
        with self._mutex:
            removed = self._apply_retention(delete=not dry_run, policy=policy)
            if dry_run:
                self._apply_retention(delete=False)  # back to the manager's own labels
            else:
                self._dir.write_index(self._records)
        return removed

    def _apply_retention(
        self, *, delete: bool = True, policy: RetentionPolicy | Literal["own"] | None = "own",
        just_saved: int | None = None,
    ) -> list[CheckpointInfo]:
        """Delete what no policy keeps, except the latest and the best; set keep_reasons.

        With ``delete=False`` (a directory just opened, or a reader) only the reasons are
        computed; what would go is marked "unretained". Returns what was (or would be)
        deleted.
        """
        if not self._records:
            self._catalog.settle()
            return []
        own = policy == "own"
        keep = self._keep if policy == "own" else policy
        if keep is None and self._read_only and any(r.recorded_reasons for r in self._records.values()):
            # A reader does not know the writer's policies: show what the writer said
            # (and what it could not know: damage found since).
            for record in self._records.values():
                recorded = tuple(r for r in record.recorded_reasons if r.kind != "corrupt")
                if record.corrupt:
                    recorded += (KeepReason.corrupt(record.corrupt),)
                record.info = record.info.with_reasons(recorded)
            return []
        tracker = self._tracker
        monitor = tracker.monitor if tracker else None
        mode: Direction = tracker.mode if tracker else "min"
        steps = self._catalog.steps
        latest = steps[-1]
        best = self._best_locked()
        best_step = best.step if best is not None else None
        incremental = (
            IncrementalKeep.build(keep, monitor, mode)
            if own and delete and self._labels_current and not self._read_only else None
        )
        policy_reasons: Callable[[int], list[KeepReason] | None]
        if incremental is not None:
            # Only what the changes since the last labelling can have moved.
            todo = sorted(
                {*incremental.affected(self._catalog), *self._labelled, *self._unretained,
                 latest, *([] if best_step is None else [best_step]), *([] if just_saved is None else [just_saved])}
                & self._records.keys()
            )
            catalog = self._catalog
            policy_reasons = lambda step: incremental.reasons(catalog, step)  # noqa: E731
        else:
            todo = list(steps)
            if keep is None:
                policy_reasons = lambda step: [KeepReason.keep_all()]  # noqa: E731
            else:
                context = RetentionContext(now=self._clock(), monitor=monitor, mode=mode)
                chosen = keep.keep([self._records[s].info for s in steps], context)
                policy_reasons = lambda step: [KeepReason.of(r) for r in chosen[step]] if step in chosen else None  # noqa: E731
        kept: dict[int, list[KeepReason]] = {}
        doomed: list[CheckpointInfo] = []
        for step in todo:
            reasons = policy_reasons(step)
            # The two protections of invariant 5, whatever the policies say.
            if step == latest:
                reasons = [KeepReason.latest(), *(reasons or [])]
            if step == just_saved and reasons is None:
                # A step below the newest (a run resumed from an older checkpoint) that no
                # policy keeps: deleting what save() just promised would be absurd.
                reasons = [KeepReason.just_saved()]
            if step == best_step and tracker is not None:
                reasons = reasons or []
                if not any(r.kind in ("best", "ranked") and r.detail == tracker.monitor for r in reasons):
                    reasons.insert(0, KeepReason.best(tracker.monitor))
            record = self._records[step]
            if reasons is None:
                doomed.append(record.info)
                continue
            if record.corrupt:
                reasons.append(KeepReason.corrupt(record.corrupt))
            kept[step] = reasons
        removed: list[CheckpointInfo] = []
        if not delete:
            for info in doomed:
                kept[info.step] = [KeepReason.unretained()]
            removed, doomed = doomed, []
        failures = self._dir.delete([f for info in doomed for f in self._records[info.step].files])
        for info in doomed:
            # Judged by the checkpoint's own file: a payload's sidecar left behind is an
            # orphan that the next writer's open removes.
            failed = failures.get(info.path.name)
            if failed is not None:
                kept[info.step] = [KeepReason.not_deleted(failed)]
            else:
                # Deleting a checkpoint no policy keeps moves no other checkpoint's
                # label: it is in no window, ranking top or interval start.
                self._catalog.remove(info.step)
                removed.append(info)
        for step, reasons in kept.items():
            kept_record = self._records.get(step)
            if kept_record is not None and kept_record.info.keep_reasons != tuple(reasons):
                kept_record.info = kept_record.info.with_reasons(tuple(reasons))
        if own:
            self._catalog.settle()
            self._labels_current = True
            self._labelled = {latest, *([] if best_step is None else [best_step]),
                              *([] if just_saved is None else [just_saved])}
            # Checkpoints still there that no policy keeps: the next save retries them.
            pending = {s for s, r in kept.items() if r and r[0].kind in ("unretained", "not deleted")}
            if incremental is None:
                self._unretained = pending
            else:
                self._unretained.difference_update(todo)
                self._unretained.update(pending)
        else:
            self._labels_current = False
        return removed

    # ----------------------------------------------------------------------- records

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

    # --------------------------------------------------------------------- restoring

    def restore(
        self, which: Which = "latest", *, verify: bool = True, select: str | Sequence[str] | None = None
    ) -> Any:
        """Load a checkpoint's state tree (or, for a payload checkpoint, its file's path).

        ``"latest"`` falls back to the newest checkpoint that verifies, warning
        (:class:`CheckpointWarning`) about each one it skips; ``"best"`` and a step
        number load exactly that checkpoint.

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
                parts; nothing else is read from the file, and what is read is verified.

        Returns:
            The state tree, equal to the one saved (types, dtypes, shapes, values); for
            a :class:`FilePayload` checkpoint, the ``pathlib.Path`` of its file.

        Raises:
            CheckpointNotFoundError: no checkpoint at all, no best, or no such step.
            CorruptCheckpointError: the named checkpoint (or every checkpoint, for
                ``"latest"``) fails verification.
            CheckpointIOError: a file could not be read.
            KeyError: a selected key path is not in the checkpoint (the message names it).
            ValueError: ``select`` is malformed, or given for a payload checkpoint.
        """
        return self._restore(which, verify, _parse_select(select))[0]

    def restore_or_initialize(self, init: Callable[[], T]) -> T | Any:
        """The latest good checkpoint's state, or ``init()`` if there is no checkpoint.

        Raises:
            CorruptCheckpointError: checkpoints exist but none verifies (initialising
                would silently throw the run away).
            CheckpointIOError: a file could not be read.
        """
        try:
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
                        f"(steps: {_steps_text(sorted(self._records))})"
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

    def _restore(self, which: Which, verify: bool, select: codec.Selection | None = None) -> tuple[Any, CheckpointInfo]:
        if which != "latest":
            for attempt in range(READ_RETRIES):
                record = self._resolve(which)
                try:
                    value = self._exactly(record, self._dir.load(record, verify=verify, select=select))
                except CheckpointNotFoundError:
                    # A reader racing the writer: "best" may have moved on; list again.
                    if not (self._read_only and which == "best") or attempt == READ_RETRIES - 1:
                        raise
                    continue
                self._after_restore(record)
                return value, record.info
        failures: list[str] = []
        raced = False
        for _attempt in range(READ_RETRIES):
            self._refresh_if_reader()
            with self._mutex:
                candidates = [self._records[s] for s in sorted(self._records, reverse=True)]
            if not candidates and raced:
                # A directory listing is no snapshot: while the writer renames a new
                # checkpoint in and deletes an old one, a listing can miss both.
                continue
            raced = False
            for record in candidates:
                try:
                    loaded = self._dir.load(record, verify=verify, select=select)
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

    def _after_restore(self, record: _Record) -> None:
        self._restored = record.info
        # Resuming from a checkpoint resumes its metric history too.
        if not self._read_only and record.meta.get("tracker") is not None:
            self._restore_tracker(record.meta["tracker"])


# ------------------------------------------------------------------------- helpers


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= _MAX_STEP:
        raise ValueError(f"Expected step to be an int in [0, 2**63 - 1]. Received: step={step!r}")
    return int(step)


def _parse_select(select: str | Sequence[str] | None) -> codec.Selection | None:
    if select is None:
        return None
    paths = [select] if isinstance(select, str) else select
    if isinstance(paths, (bytes, Mapping)) or not all(isinstance(p, str) for p in paths) or not paths:
        raise ValueError(
            "Expected select to be a key path such as 'params' or 'params/dense/kernel', or a "
            f"non-empty list of them. Received: select={select!r}"
        )
    split = [p.strip("/").split("/") for p in paths]
    if any(not all(split_path) for split_path in split):
        raise ValueError(f"Expected key paths without empty segments. Received: select={select!r}")
    return codec.selection(split)


def _opened_at() -> str:
    """Where the caller opened this manager: the first frame outside ckptmgr."""
    package = os.path.dirname(os.path.abspath(__file__))
    ours = (package + os.sep, os.path.join(os.path.dirname(package), "adapters") + os.sep)
    for frame in reversed(traceback.extract_stack()):
        if not os.path.abspath(frame.filename).startswith(ours):
            return f"a CheckpointManager opened at {frame.filename}:{frame.lineno}"
    return "a CheckpointManager"


def _check_metrics(metrics: Mapping[str, object] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ValueError(f"Expected metrics to be a mapping of str to number. Received: metrics={metrics!r}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ValueError(f"Expected metric names to be str. Received: metrics key {key!r}")
        if isinstance(value, (str, bytes, bytearray)):
            # float("0.5") would succeed: a metric logged as text is a bug, say so.
            raise ValueError(
                f"Expected metric values to be numbers. Received: metrics[{key!r}]={value!r} (a {type(value).__name__})"
            )
        try:
            number = float(value)  # type: ignore[arg-type]  # NumPy scalars, 0-d arrays, framework scalars
        except (TypeError, ValueError):
            raise ValueError(
                f"Expected metric values to be numbers. Received: metrics[{key!r}]={value!r}"
            ) from None
        out[key] = number
    return out


def _steps_text(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:4])) + ", ..., " + ", ".join(map(str, steps[-3:]))

