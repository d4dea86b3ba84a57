"""CheckpointManager: decide -> snapshot -> write -> commit -> retain (the read side is in _reader.py)."""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from ._args import check_coordination, check_metrics, check_options, check_step, opened_at, steps_text
from ._directory import CheckpointDirectory
from ._object_directory import ObjectCheckpointDirectory, is_url
from ._reader import CheckpointReader
from ._retention import Catalog, IncrementalKeep
from ._retention import Record as _Record
from ._writer import SaveWriter
from .coordinator import Coordinator
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CoordinatorError,
    MissingMetricWarning,
    StepOrderError,
)
from .info import CheckpointInfo, KeepReason, ObjectURL
from .metrics import Direction, MetricTracker, Mode
from .payload import FilePayload
from .policies import (
    AllOf,
    OnImprovement,
    RetentionContext,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
)


class CheckpointManager(CheckpointReader):
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

    On object storage (``CheckpointManager("s3://bucket/prefix", storage_options=...)``)
    the same holds: a checkpoint is uploaded under a unique name, then committed by a
    marker written last with a create-only conditional write; one writer per location
    holds a lease (a SIGKILLed writer's is taken over 30 to 32 s after its last renewal).
    Saving a :class:`FilePayload` and :meth:`rollback` are local-only so far.

    Args:
        directory: where the checkpoints live; created if missing. A local path, or an
            ``s3://bucket/prefix`` URL (needs ``pip install ckptmgr[s3]``); other URL
            schemes raise ValueError.
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
            ``wait()``, ``close()``) waits for the write in flight, and raises its
            error if it failed; interpreter exit waits for it too, and prints its
            error on stderr. The copy's memory is kept until
            ``close()`` and reused by the next save (arrays of the same shape and
            dtype), which then copies at memcpy speed instead of allocating anew.
        read_only: open for reading without taking the writer lock; ``save`` raises.
            Without ``monitor``, a reader uses the metric the checkpoints recorded.
        clock: the time source (POSIX seconds), for tests.
        storage_options: for an ``s3://`` URL only: passed to ``s3fs.S3FileSystem``
            (``endpoint_url``, ``key``, ``secret``, ``client_kwargs``, ...). Without it
            the standard AWS environment variables (``AWS_ACCESS_KEY_ID``,
            ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...) are used.
        coordinator: for a job of several processes (``torchrun``, JAX multi-process,
            ...): a :class:`ckptmgr.Coordinator` such as
            ``ckptmgr.adapters.torch.TorchCoordinator()``. Every rank opens the manager
            on the same directory (one every rank sees: a shared file system, or one
            machine) and calls ``save``, ``should_save`` and ``restore`` at the same
            points; rank 0 decides (the save policy, metrics, best, retention) and
            commits, and each call returns the same answer on every rank. ``save``
            returns only once the step is committed, on every rank. A rank that died or
            stalls makes the others raise :class:`CoordinatorError` within the
            coordinator's timeout (which must exceed the time a save takes). The metrics
            that count are rank 0's. ``prune``, ``rollback`` and ``delete_all`` run on
            rank 0 alone; the other ranks' ``checkpoints``, ``latest`` and ``best`` list
            the directory (rank 0 deletes what retention removed after the others have
            their answer, so a listing right after a save may still show it, labelled
            "unretained"). With ``async_save``, each rank writes its share in the
            background and rank 0 commits the step at the next collective call (``save``,
            ``wait``, ``restore``, ``close``), which raises if any rank's share failed.
            See "Many processes" in the README.
        sharded: with a coordinator: True when each rank's state is its own part (a
            shard): every rank writes its part, and restores its own; a checkpoint so
            saved restores only on as many ranks (``restore(step, rank=k)`` reads any
            rank's part, e.g. to reshard). False (DDP-style, the same state on every
            rank): rank 0 writes the one copy and every rank restores it, on any number
            of ranks.

    Raises:
        ValueError: bad arguments ("Expected ... Received: ..."), a URL other than
            ``s3://``, ``storage_options`` with a local path.
        DirectoryLockedError: another live process writes to ``directory`` (on object
            storage: holds its lease; the message names it).
        CheckpointIOError: the directory cannot be created, listed or locked.
        ObjectStoreError: (a CheckpointIOError) the bucket does not exist, the
            credentials are refused, the server cannot be reached.
        CheckpointNotFoundError: ``read_only`` and there is no such directory (on
            object storage: nothing of ckptmgr's under the prefix).
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
        storage_options: Mapping[str, Any] | None = None,
        coordinator: Coordinator | None = None,
        sharded: bool = False,
    ) -> None:
        check_options(directory, save_every, keep, monitor, mode, best_only=best_only,
                      async_save=async_save, read_only=read_only, storage_options=storage_options)
        check_coordination(directory, coordinator, sharded=sharded, read_only=read_only)
        self._coordinator = coordinator
        self._sharded = sharded
        self._pending: _Pending | None = None  # a coordinated async save not concluded yet
        self._own_error: BaseException | None = None  # this rank's failure in that save
        follower = coordinator is not None and coordinator.rank != 0
        self._tracker = (
            MetricTracker(monitor, mode=mode, min_delta=min_delta, baseline=baseline)
            if monitor is not None else None
        )
        if best_only:
            save_every = OnImprovement() if save_every is None else AllOf((save_every, OnImprovement()))
        self._save_every = save_every
        self._keep = keep
        self._best_only = best_only
        # A follower (rank > 0 of a job) lists and reads like a reader; it saves
        # through rank 0, which holds the lock and commits.
        self._read_only = read_only or follower
        self._writable = not read_only
        self._clock = clock
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
        # Saves not known to have committed: (best before, last save time before, own time).
        self._unsaved: dict[int, tuple[tuple[float | None, int | None], float, float]] = {}

        self._dir: CheckpointDirectory | ObjectCheckpointDirectory
        if coordinator is None:
            self._open(directory, storage_options, async_save)
        elif follower:
            # Rank 0 creates the directory and cleans up after a killed job first.
            opened = coordinator.broadcast(None)
            if opened is not None:
                raise CoordinatorError(f"rank {coordinator.rank}: rank 0 could not open {directory}: {opened}")
            self._open(directory, storage_options, async_save)
        else:
            try:
                self._open(directory, storage_options, async_save)
            except BaseException as exc:
                coordinator.broadcast(f"{type(exc).__name__}: {exc}")
                raise
            try:
                coordinator.broadcast(None)
            except BaseException:
                self._dir.release()
                raise

    def _open(self, directory: str | os.PathLike[str], storage_options: Mapping[str, Any] | None,
              async_save: bool) -> None:
        read_only = self._read_only
        if is_url(directory):
            self._dir = ObjectCheckpointDirectory(str(directory), storage_options, read_only=read_only,
                                                  owner=opened_at())
            self._directory: Path | str = self._dir.url
        else:
            self._directory = Path(os.path.abspath(os.fspath(directory)))
            self._dir = CheckpointDirectory(self._directory, read_only=read_only, owner=opened_at())
        try:
            self._refresh()
        except BaseException:
            self._dir.release()
            raise
        self._writer = SaveWriter(self, self._directory, background=async_save)
        recorded = self._newest_tracker_state()
        if not self._writable:
            self._adopt_tracker(recorded)
        self._restore_tracker(recorded)
        with self._mutex:
            self._apply_retention(delete=False)

    # ------------------------------------------------------------------------ saving

    def should_save(self, step: int, metrics: Mapping[str, float] | None = None) -> bool:
        """Whether ``save(step, ..., metrics=metrics)`` would write a checkpoint.

        Changes nothing: use it to skip building an expensive state on steps that would
        not be saved. With a coordinator it is a collective (every rank calls it): rank
        0's answer, on every rank.
        """
        step = check_step(step)
        metrics = check_metrics(metrics)
        if self._coordinator is not None:
            answer = self._should_save(step, metrics) if self._coordinator.rank == 0 else None
            return bool(self._coordinator.broadcast(answer))
        return self._should_save(step, metrics)

    def _should_save(self, step: int, metrics: dict[str, float]) -> bool:
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
            ObjectStoreError: (a CheckpointIOError) on object storage, a request failed
                (server down, connection dropped, ...); nothing partial is visible.
            DirectoryLockedError: on object storage, this writer lost its lease.
            CheckpointError: the manager is read-only or closed; a FilePayload on
                object storage or with a coordinator (not supported there yet).
            CoordinatorError: with a coordinator: another rank died, stalled past the
                timeout, called save() with another step, or failed to write its part
                (this rank then raises that error itself); nothing was committed.
            StepOrderError: ``step`` is below the latest checkpoint (every rank raises it).
        """
        self._check_writable()
        if isinstance(state, FilePayload) and isinstance(self._dir, ObjectCheckpointDirectory):
            raise CheckpointError(f"Saving a FilePayload is not supported on object storage yet ({self._directory})")
        step = check_step(step)
        metrics = check_metrics(metrics)
        if not isinstance(force, bool):
            raise ValueError(f"Expected force to be a bool. Received: force={force!r}")
        if self._coordinator is not None:
            return self._save_coordinated(step, state, metrics, force)
        self._check_step_order(step)
        self._writer.poll()  # a failed background write surfaces here, without blocking
        if self._writer.pending_step == step:
            self._writer.wait()  # the same step again (a forced save at the end): that write first
        pending = self._writer.pending_step
        self._unsaved = {s: entry for s, entry in self._unsaved.items() if s == pending}
        time_before = self._last_save_time
        wanted, meta, best_before = self._decide(step, metrics, force=force, stacklevel=3)
        if not (wanted or force):
            return None
        now = meta["time"]
        self._last_save_time = now
        self._unsaved[step] = (best_before, time_before, now)
        path: Path | ObjectURL
        try:
            if isinstance(state, FilePayload):
                self._writer.wait()
                tmp = self._dir.write_payload(state.name, state.write)
                commit: Callable[[], CheckpointInfo] = lambda: self._commit_payload(state.name, tmp, meta)  # noqa: E731
                path = Path(self._directory) / state.name
            else:
                tree = self._writer.prepare(state)
                commit = lambda: self._commit_tree(step, tree, meta)  # noqa: E731
                path = self._dir.tree_path(step)
            info = self._writer.run(step, commit, lambda: self._unsave(step))
        except BaseException:
            # A bad tree, the payload's writer failing, or the previous background
            # write's error surfacing here: nothing of this step was saved.
            self._unsave(step)
            raise
        return info if info is not None else CheckpointInfo(step, path, metrics, now, 0)

    def _unsave(self, step: int) -> None:
        """Undo what deciding to save ``step`` changed, its save having failed: the step
        must not stay the best (best_only would then never save the model that was
        best: its retry would not improve on itself), nor its time the last save's (an
        EverySeconds schedule would wait a whole interval more). In either order with
        the save before it, whose failure may surface during this one."""
        entry = self._unsaved.pop(step, None)
        if entry is None:
            return
        best_before, time_before, at = entry
        self._forget_best(step, best_before)
        if self._last_save_time == at:
            self._last_save_time = time_before
        for later, (best, last, own) in self._unsaved.items():  # a later save decided after this one
            self._unsaved[later] = (best_before if best[1] == step else best, time_before if last == at else last, own)

    def _decide(
        self, step: int, metrics: dict[str, float], *, force: bool, stacklevel: int,
    ) -> tuple[bool, dict[str, Any], tuple[float | None, int | None]]:
        """Record the monitored metric; whether the save policy wants ``step`` saved.

        Returns that, the checkpoint's metadata should it be saved, and the best before
        this call (to forget a best whose save then failed).
        """
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
                    stacklevel=stacklevel + 1,
                )
            improved = self._tracker.update(step, value)
        if self._best_only and value is None:
            wanted = False
        else:
            wanted = self._save_every is None or self._save_every.should_save(self._save_context(step, improved))
        meta = {
            "step": step,
            "time": self._clock(),
            "metrics": metrics,
            "tracker": self._tracker.state_dict() if self._tracker else None,
        }
        return wanted, meta, best_before

    def _save_coordinated(
        self, step: int, state: Any, metrics: dict[str, float], force: bool,
    ) -> CheckpointInfo | None:
        """save() in a job of several processes: one decision, one commit, every rank.

        One all-gather carries every rank's step and ``force`` and rank 0's decision (so
        a pre-empted rank's forced save makes every rank save that step); then each rank
        writes its part (sharded) or rank 0 the one copy; a second all-gather brings
        every part's report to rank 0, which writes the commit record last; its outcome
        is broadcast, and every rank returns the same info or raises.
        """
        if isinstance(state, FilePayload) and self._sharded:
            raise CheckpointError(
                f"Saving a FilePayload with sharded=True is not supported ({self._directory}): a "
                "framework's own file is saved by rank 0 alone (sharded=False)")
        c = self._coordinator
        assert c is not None
        leader = c.rank == 0
        mine: dict[str, Any] = {"step": step, "force": force}
        best_before: tuple[float | None, int | None] = (None, None)
        if leader:
            try:
                self._check_step_order(step)
            except StepOrderError as exc:
                mine["refused"] = [str(exc), exc.step, exc.latest]
            else:
                wanted, meta, best_before = self._decide(step, metrics, force=force, stacklevel=4)
                mine.update(save=wanted, meta=meta, token=secrets.token_hex(4))
        previous, self._pending = self._pending, None
        if previous is not None:
            mine["previous"] = self._own_report()
        gathered = c.all_gather(mine)
        if previous is not None:  # the async save before this one: committed now, or its error raised
            self._conclude(previous, [g["previous"] for g in gathered])
        steps = [g.get("step") for g in gathered]
        if len(set(steps)) != 1:
            raise CoordinatorError(
                f"rank {c.rank}: the ranks called save() with different steps ({steps}, by rank): "
                "every rank must save the same step"
            )
        lead = gathered[0]
        if "refused" in lead:
            text, asked, latest = lead["refused"]
            raise StepOrderError(text, step=asked, latest=latest)
        meta = lead["meta"]
        if not leader and self._tracker is not None and meta.get("tracker") is not None:
            self._tracker.load_state_dict(meta["tracker"])
        forced = [rank for rank, g in enumerate(gathered) if g.get("force")]
        if not (lead["save"] or forced):
            return None
        if leader:
            self._last_save_time = meta["time"]
        pending = _Pending(step, lead["token"], meta, best_before)
        if not self._writer.background:
            report = self._write_mine(pending, state)
            return self._conclude(pending, c.all_gather(report) if self._sharded else [report])
        # Async: this rank's share runs on the background thread, from a copy of the state;
        # the commit is concluded by the next collective call (save, wait, restore, close).
        snapshot = self._writer.prepare(state) if self._sharded or leader else None
        self._writer.run(step, lambda: self._write_mine(pending, snapshot), lambda: None)
        self._pending = pending
        return CheckpointInfo(step, self._dir.tree_path(step), meta["metrics"], meta["time"], 0)

    def _write_mine(self, pending: _Pending, state: Any) -> dict[str, Any]:
        """This rank's share of a save, and its report: its part (sharded), or rank 0's
        whole checkpoint, committed (replicated; the other ranks have nothing to do)."""
        c = self._coordinator
        assert c is not None
        step, meta = pending.step, pending.meta
        try:
            if self._sharded:
                directory = self._dir
                assert isinstance(directory, CheckpointDirectory)
                return directory.write_part(step, c.rank, c.world_size, pending.token, state,
                                            {"step": step, "time": meta["time"]})
            if c.rank != 0:
                return {"ok": True}
            if isinstance(state, FilePayload):
                info = self._commit_payload(state.name, self._dir.write_payload(state.name, state.write), meta)
            else:
                info = self._commit_tree(step, state, meta)
            return {"info": _info_message(info)}
        except (CheckpointError, TypeError, ValueError) as exc:
            self._own_error = exc
            return {"error": f"rank {c.rank}: {type(exc).__name__}: {exc}"}

    def _own_report(self) -> dict[str, Any]:
        """Wait for this rank's background share of the pending save; its report."""
        c = self._coordinator
        assert c is not None
        try:
            self._writer.wait()
        except CheckpointError as exc:
            self._own_error = exc
            return {"error": f"rank {c.rank}: {type(exc).__name__}: {exc}"}
        report = self._writer.take_result()
        return report if isinstance(report, dict) else {"error": f"rank {c.rank}: its write never ran"}

    def _conclude(self, pending: _Pending, reports: list[dict[str, Any]]) -> CheckpointInfo:
        """Rank 0 commits (or, if any rank failed, discards) a save every rank wrote its
        share of, and tells the others; every rank returns its info or raises.

        ``reports``: every rank's report, by rank (a replicated save: at least rank 0's).
        """
        c = self._coordinator
        assert c is not None
        leader = c.rank == 0
        step = pending.step
        own_error, self._own_error = self._own_error, None
        outcome: dict[str, Any] | None = None
        if leader:
            failed = [r["error"] for r in reports if "error" in r]
            if failed:
                outcome = {"error": "; ".join(failed)}
            elif self._sharded:
                directory = self._dir
                assert isinstance(directory, CheckpointDirectory)
                try:
                    record = directory.commit_parts(step, pending.token, reports, pending.meta)
                    # Retention's deletions (n parts per step) wait until the other ranks
                    # have their answer: they need not wait for them.
                    outcome = {"info": _info_message(self._committed(record, delete=False))}
                except CheckpointError as exc:
                    own_error, outcome = exc, {"error": f"rank 0: {type(exc).__name__}: {exc}"}
            else:
                outcome = reports[0]
            if "error" in outcome and self._sharded:
                assert isinstance(self._dir, CheckpointDirectory)
                self._dir.discard_parts([r["name"] for r in reports if "name" in r])
        outcome = c.broadcast(outcome)
        assert isinstance(outcome, dict)
        if "error" in outcome:
            if leader:
                self._forget_best(step, pending.best_before)
            if own_error is not None:
                raise own_error
            raise CoordinatorError(f"rank {c.rank}: the save of step {step} failed, nothing was committed: "
                                   f"{outcome['error']}")
        if leader:
            if self._sharded:
                with self._mutex:
                    self._apply_retention()
            return self._records[step].info
        return _info_from_message(outcome["info"], ObjectURL if isinstance(self._dir, ObjectCheckpointDirectory)
                                  else Path)

    def _settle_pending(self) -> None:
        """Collective: conclude an async save in flight (every rank calls it alike)."""
        pending, self._pending = self._pending, None
        if pending is not None and self._coordinator is not None:
            self._conclude(pending, self._coordinator.all_gather(self._own_report()))

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
            newer = [s for s in steps if s > step and self._is_good(s)]
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

    def _pending_step(self) -> int | None:
        return self._writer.pending_step

    def _forget_best(self, step: int, best_before: tuple[float | None, int | None]) -> None:
        # A step whose save failed must not stay the best: then best_only would never
        # save the model that was best (its retry would not improve on itself).
        if self._tracker is not None and self._tracker.best_step == step:
            self._tracker.best, self._tracker.best_step = best_before

    def _save_context(self, step: int, improved: bool) -> SaveContext:
        with self._mutex:
            pending = self._writer.pending_step
            # The newest good checkpoint (not one restore() fell back past, nor one known
            # corrupt): a resumed run saves that step again.
            good = next((s for s in reversed(self._catalog.steps) if self._is_good(s)), None)
            steps = [s for s in (good, pending) if s is not None]
            last_step = max(steps) if steps else None
        return SaveContext(step=step, now=self._clock(), last_step=last_step,
                           last_time=self._last_save_time, improved=improved)

    def _commit_tree(self, step: int, state: Any, meta: dict[str, Any]) -> CheckpointInfo:
        return self._committed(self._dir.commit_tree(step, state, meta))

    def _commit_payload(self, name: str, tmp: Path, meta: dict[str, Any]) -> CheckpointInfo:
        return self._committed(self._dir.commit_payload(name, tmp, meta))

    def _committed(self, record: _Record, *, delete: bool = True) -> CheckpointInfo:
        """Take a just-committed checkpoint into the records, then run retention
        (``delete=False``: label only; what goes is deleted by the next retention)."""
        step = record.info.step
        with self._mutex:
            same_file = self._catalog.step_of_file(record.info.path.name)
            replaced = [old for s in {step, same_file} if s is not None
                        and (old := self._catalog.remove(s)) is not None]
            self._catalog.add(record)
            self._skipped_corrupt.discard(step)  # saved again: this one is good
            # The same step saved under another name: the new checkpoint replaces it.
            kept = set(record.files)
            stale = [f for old in replaced for f in old.files if f not in kept]
            self._dir.delete(stale)
            self._apply_retention(just_saved=step, delete=delete)
            self._dir.saved(self._records)
            return self._records[step].info

    def wait(self) -> None:
        """Block until the background write (``async_save``) is committed.

        With a coordinator it is a collective (every rank calls it): rank 0 commits the
        step every rank has written its share of, and every rank returns once it is.

        Raises:
            CheckpointError: the background write failed (with a coordinator, at any rank:
                :class:`CoordinatorError` at the others).
        """
        if self._coordinator is not None:
            self._settle_pending()
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
            self.wait()
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
            DirectoryLockedError: on object storage, this writer lost its lease (another
                holds it): nothing is deleted.
        """
        self._check_writable()
        self._check_leader("delete_all()")
        self._writer.wait()
        with self._mutex:
            for step in sorted(self._records):
                self._dir.delete_checkpoint(self._records[step])
                self._catalog.remove(step)
        self._closed = True
        self._writer.shutdown()
        try:
            self._dir.remove_index_and_lock()
        finally:
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

    @property
    def coordinator(self) -> Coordinator | None:
        """The coordinator of a job of several processes (None: one process)."""
        return self._coordinator

    def _check_leader(self, what: str) -> None:
        if self._coordinator is not None and self._coordinator.rank != 0:
            raise CheckpointError(
                f"{what} runs on rank 0 alone (this is rank {self._coordinator.rank} of "
                f"{self._coordinator.world_size}): call it there; the other ranks see the result "
                f"in {self._directory}"
            )

    def _check_writable(self) -> None:
        if not self._writable:
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
            CheckpointError: the manager is read-only or closed; the checkpoints are on
                object storage (not supported there yet).
        """
        self._check_writable()
        self._check_leader("rollback()")
        if isinstance(self._dir, ObjectCheckpointDirectory):
            raise CheckpointError(f"rollback() is not supported on object storage yet ({self._directory})")
        step = check_step(step)
        self._writer.wait()
        with self._mutex:
            if step not in self._records:
                raise CheckpointNotFoundError(
                    f"No checkpoint of step {step} in {self._directory} to roll back to "
                    f"(steps: {steps_text(self._catalog.steps)})"
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
            DirectoryLockedError: on object storage, this writer lost its lease: nothing
                is deleted.
        """
        if not dry_run:
            self._check_writable()
            self._check_leader("prune()")
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



@dataclasses.dataclass(frozen=True)
class _Pending:
    """A coordinated save whose shares are being written: what its commit needs."""

    step: int
    token: str
    meta: dict[str, Any]
    best_before: tuple[float | None, int | None]


def _info_message(info: CheckpointInfo) -> dict[str, Any]:
    """What rank 0 tells the other ranks of a checkpoint it committed (JSON)."""
    return {"step": info.step, "metrics": dict(info.metrics), "time": info.time, "nbytes": info.nbytes,
            "kind": info.kind, "reasons": [[str(r), r.kind, r.detail] for r in info.keep_reasons],
            "path": str(info.path), "metadata": None if info.metadata_path is None else str(info.metadata_path),
            "parts": [str(p) for p in info.parts]}


def _info_from_message(message: dict[str, Any], location: type[Path] | type[ObjectURL]) -> CheckpointInfo:
    """The info rank 0 sent (its paths are the ones every rank sees: a shared directory)."""
    reasons = tuple(KeepReason(text, kind, detail) for text, kind, detail in message["reasons"])
    return CheckpointInfo(message["step"], location(message["path"]), message["metrics"], message["time"],
                          message["nbytes"], keep_reasons=reasons, kind=message["kind"],
                          metadata_path=None if message["metadata"] is None else location(message["metadata"]),
                          parts=tuple(Path(name) for name in message["parts"]))
