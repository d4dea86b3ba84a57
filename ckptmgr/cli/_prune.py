"""``ckptmgr prune DIR --keep-last N ...``: delete what the retention policies drop."""

from __future__ import annotations

import argparse
import functools
import operator
import warnings
from pathlib import Path

from ckptmgr import (
    CheckpointManager,
    CheckpointWarning,
    DirectoryLockedError,
    KeepBest,
    KeepEvery,
    KeepLast,
    MetricTracker,
    RetentionPolicy,
)

from ._common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    _disk_size,
    _human_bytes,
    _open_reader,
    _print_json,
    _table,
    _tracker_json,
)

# ----------------------------------------------------------------------------- prune


def _open_pruner(
    directory: Path | str, policy: RetentionPolicy, tracker: MetricTracker | None, *, read_only: bool
) -> CheckpointManager:
    """A manager of ``directory`` with ``policy`` as its retention and the run's metric.

    Without ``read_only`` it takes the writer lock.

    Raises:
        CliError: a live process (a training job) holds the writer lock.
        CheckpointError: the directory cannot be locked or read.
    """
    try:
        return CheckpointManager(
            directory,
            keep=policy,
            monitor=tracker.monitor if tracker else None,
            mode=tracker.mode if tracker else "auto",
            min_delta=tracker.min_delta if tracker else 0.0,
            baseline=tracker.baseline if tracker else None,
            read_only=read_only,
        )
    except DirectoryLockedError as exc:
        raise CliError(
            f"cannot prune {directory}: another process (a training job?) holds its writer lock "
            f"{exc.lock_path or directory}; try again when it has finished, or use --dry-run"
        ) from exc


def _cmd_prune(args: argparse.Namespace) -> int:
    """``ckptmgr prune DIR --keep-last N ...``: delete what the retention policies drop."""
    policies: list[KeepLast | KeepBest | KeepEvery] = []
    if args.keep_last is not None:
        policies.append(KeepLast(args.keep_last))
    if args.keep_best is not None:
        policies.append(KeepBest(args.keep_best))
    if args.keep_every_steps is not None:
        policies.append(KeepEvery(steps=args.keep_every_steps))
    if not policies:
        raise CliError(
            "ckptmgr prune: give at least one of --keep-last, --keep-best, --keep-every-steps "
            "(see 'ckptmgr prune --help')",
            EXIT_USAGE,
        )
    policy: RetentionPolicy = functools.reduce(operator.or_, policies)  # KeepLast(3) | KeepBest(1) ...
    reader = _open_reader(args.directory)
    tracker = reader.tracker
    if args.keep_best is not None and tracker is None:
        raise CliError(
            f"--keep-best needs the metric the run monitored, and the checkpoints in {reader.directory} "
            "recorded none",
            EXIT_USAGE,
        )
    # A dry run needs no lock: it works while a training job is running.
    mgr = _open_pruner(reader.directory, policy, tracker, read_only=args.dry_run)
    try:
        before = {c.step: c for c in mgr.checkpoints}
        sizes = {step: _disk_size(c) for step, c in before.items()}
        with warnings.catch_warnings():
            # A file that cannot be deleted is reported below, from its keep reason.
            warnings.simplefilter("ignore", CheckpointWarning)
            removed = mgr.prune(dry_run=args.dry_run)
        removed_steps = {c.step for c in removed}
        after = [] if args.dry_run else mgr.checkpoints
        if args.dry_run:
            after = [c for c in mgr.checkpoints if c.step not in removed_steps]
    finally:
        mgr.close()
    errors = {c.step: r.detail for c in after for r in c.keep_reasons if r.kind == "not deleted"}
    kept = [c for c in after if c.step not in errors]
    failed = [before[step] for step in errors]
    if args.json:
        _print_json({
            "directory": str(reader.directory),
            "dry_run": args.dry_run,
            "policy": repr(policy),
            "tracker": _tracker_json(tracker),
            "kept": [{"step": c.step, "path": str(c.path), "keep_reasons": list(c.keep_reasons)} for c in kept],
            "removed": [{"step": c.step, "path": str(c.path), "file_bytes": sizes.get(c.step)} for c in removed],
            "failed": [{"step": c.step, "path": str(c.path), "error": errors[c.step]} for c in failed],
        })
    else:
        verb = "would remove" if args.dry_run else "removed"
        rows = [["keep", str(c.step), ", ".join(c.keep_reasons)] for c in kept]
        rows += [["FAILED", str(c.step), errors[c.step]] for c in failed]
        rows += [[verb, str(c.step), _human_bytes(sizes.get(c.step))] for c in removed]
        rows.sort(key=lambda row: int(row[1]))
        for line in _table(["ACTION", "STEP", "DETAIL"], rows, right={1}):
            print(line)
        freed = sum(sizes.get(c.step) or 0 for c in removed)
        print(f"{'dry run: ' if args.dry_run else ''}{verb} {len(removed)} checkpoint{'s' * (len(removed) != 1)} "
              f"({_human_bytes(freed)}), kept {len(kept)}"
              + (f", {len(failed)} could not be removed" if failed else ""))
    return EXIT_FAILURE if errors else EXIT_OK
