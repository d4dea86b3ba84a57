"""The manager's records, kept in sorted views, and retention evaluated per checkpoint.

A save changes one or two records. Re-running every policy over every checkpoint would
make each save cost O(n) in the checkpoints present (17 ms with 2,000 on this project's
machine); instead, :class:`Catalog` keeps the steps, the rankings by a metric and the
checkpoint times sorted, and :class:`IncrementalKeep` answers "why is step s kept?" for
one step in O(log n) and names the few steps whose answer a change can alter. The
results are the same as the policies' own ``keep()`` over all checkpoints (the property
tests in ``tests/test_retention.py`` hold the two side by side); policies it does not
know (user-defined ones) always go through ``keep()``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from .info import CheckpointInfo, KeepReason
from .metrics import Direction
from .policies import (
    KeepBest,
    KeepEvery,
    KeepLast,
    RetentionContext,
    RetentionPolicy,
    policy_leaves,
    rank_key,
)


@dataclass
class Record:
    """The manager's view of one checkpoint."""

    info: CheckpointInfo
    meta: dict[str, object]
    corrupt: str | None = None
    sidecar: str | None = None  # payload checkpoints: the metadata file's name
    recorded_reasons: tuple[KeepReason, ...] = ()  # what the writer's index said, for readers
    parts: tuple[str, ...] = ()  # a sharded checkpoint: every rank's part file, by rank

    @property
    def files(self) -> list[str]:
        # The payload before its sidecar: a deletion cut short leaves a sidecar
        # without payload, which the next writer removes, never an untracked payload.
        # The commit record before the parts: a cut leaves orphan parts, never a
        # listed checkpoint that lacks one.
        return [self.info.path.name] + ([self.sidecar] if self.sidecar else []) + list(self.parts)


def _time_key(info: CheckpointInfo) -> tuple[float, int]:
    return (info.time, info.step)


class Catalog:
    """Records by step, with sorted views maintained on every change.

    ``changes`` lists the records added or removed since the last :meth:`settle`, which
    is what :class:`IncrementalKeep` needs to know which labels may have moved.
    """

    def __init__(self) -> None:
        self.records: dict[int, Record] = {}
        self.steps: list[int] = []
        self.changes: list[Record] = []
        self._names: dict[str, int] = {}
        self._rankings: dict[tuple[str, Direction], list[tuple[float, int]]] = {}
        self._by_time: list[tuple[float, int]] | None = None

    def reset(self, records: dict[int, Record]) -> None:
        """Replace every record (a fresh listing of the directory)."""
        self.records = records
        self.steps = sorted(records)
        self._names = {r.info.path.name: s for s, r in records.items()}
        self._rankings.clear()
        self._by_time = None
        self.changes.clear()

    def info(self, step: int) -> CheckpointInfo:
        return self.records[step].info

    def step_of_file(self, name: str) -> int | None:
        """The step of the checkpoint whose file (or payload) is called ``name``."""
        return self._names.get(name)

    def add(self, record: Record) -> None:
        """Take a record whose step is not present yet."""
        info = record.info
        assert info.step not in self.records, info.step
        self.records[info.step] = record
        bisect.insort(self.steps, info.step)
        self._names[info.path.name] = info.step
        for (monitor, mode), ranking in self._rankings.items():
            key = rank_key(info, monitor, mode)
            if key is not None:
                bisect.insort(ranking, key)
        if self._by_time is not None:
            bisect.insort(self._by_time, _time_key(info))
        self.changes.append(record)

    def remove(self, step: int) -> Record | None:
        """Drop the record of ``step``; return it (None if there was none)."""
        record = self.records.pop(step, None)
        if record is None:
            return None
        info = record.info
        _discard(self.steps, step)
        if self._names.get(info.path.name) == step:
            del self._names[info.path.name]
        for (monitor, mode), ranking in self._rankings.items():
            key = rank_key(info, monitor, mode)
            if key is not None:
                _discard(ranking, key)
        if self._by_time is not None:
            _discard(self._by_time, _time_key(info))
        self.changes.append(record)
        return record

    def ranking(self, monitor: str, mode: Direction) -> list[tuple[float, int]]:
        """Rank keys of the checkpoints with a finite ``monitor``, best first."""
        ranking = self._rankings.get((monitor, mode))
        if ranking is None:
            ranking = sorted(
                key for r in self.records.values() if (key := rank_key(r.info, monitor, mode)) is not None
            )
            self._rankings[(monitor, mode)] = ranking
        return ranking

    def by_time(self) -> list[tuple[float, int]]:
        """(time, step) of every checkpoint, ascending."""
        if self._by_time is None:
            self._by_time = sorted(_time_key(r.info) for r in self.records.values())
        return self._by_time

    def settle(self) -> None:
        """Every label is current again: forget the changes."""
        self.changes.clear()


def _discard(items: list[Any], key: Any) -> None:
    i = bisect.bisect_left(items, key)
    if i < len(items) and items[i] == key:
        del items[i]


class IncrementalKeep:
    """A built-in retention policy answered one checkpoint at a time.

    ``reasons(step)`` equals ``policy.keep(all checkpoints)[step]`` (None when not
    kept); ``affected(catalog)`` names every step whose answer may differ from before
    the catalog's pending changes (besides the changed steps themselves).
    """

    def __init__(self, leaves: list[KeepLast | KeepBest | KeepEvery | None], monitor: str | None, mode: Direction):
        self._leaves = leaves
        self._context = RetentionContext(monitor=monitor, mode=mode)

    @classmethod
    def build(cls, policy: RetentionPolicy | None, monitor: str | None, mode: Direction) -> IncrementalKeep | None:
        """The evaluator of ``policy``, or None if it holds a policy not known here."""
        leaves: list[KeepLast | KeepBest | KeepEvery | None] = []
        for leaf in policy_leaves(policy):
            if leaf is not None and type(leaf) not in (KeepLast, KeepBest, KeepEvery):
                return None
            leaves.append(leaf)  # type: ignore[arg-type]
        return cls(leaves, monitor, mode)

    def reasons(self, catalog: Catalog, step: int) -> list[KeepReason] | None:
        kept: list[KeepReason] | None = None
        for leaf in self._leaves:
            reason = self._leaf_reason(catalog, leaf, step)
            if reason is not None:
                if kept is None:
                    kept = []
                if reason not in kept:
                    kept.append(reason)
        return kept

    def _leaf_reason(
        self, catalog: Catalog, leaf: KeepLast | KeepBest | KeepEvery | None, step: int
    ) -> KeepReason | None:
        if leaf is None:
            return KeepReason.keep_all()
        return leaf.reason(catalog, step, self._context)  # the policy's own rule

    def affected(self, catalog: Catalog) -> set[int]:
        changes = catalog.changes
        k = len(changes)
        out: set[int] = {r.info.step for r in changes}
        if not k:
            return out
        steps = catalog.steps
        size = len(steps)
        for leaf in self._leaves:
            if isinstance(leaf, KeepLast):
                # k changes move a checkpoint's count from the end by at most k: only
                # those within k of the window's edge can have crossed it.
                out.update(steps[max(0, size - leaf.n - k): max(0, min(size, size - leaf.n + k))])
            elif isinstance(leaf, KeepBest):
                best = leaf.metric(self._context)
                if best is not None:
                    out.update(s for _, s in catalog.ranking(*best)[: leaf.n + k])
            elif isinstance(leaf, KeepEvery):
                # Whether a checkpoint is the first of its interval depends on what lies
                # before it: a change can only alter the checkpoint right after it.
                if leaf.steps is not None:
                    for record in changes:
                        i = bisect.bisect_right(steps, record.info.step)
                        if i < size:
                            out.add(steps[i])
                else:
                    order = catalog.by_time()
                    for record in changes:
                        i = bisect.bisect_right(order, _time_key(record.info))
                        if i < size:
                            out.add(order[i][1])
        return out
