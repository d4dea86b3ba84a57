"""Save policies (when to save) and retention policies (what to keep).

Both kinds are small immutable objects with one method and no I/O: the current time is
passed in, so every policy is a pure function of its inputs and is tested as a table.

Save policies answer ``should_save(context) -> bool`` and compose with ``|`` (any)
and ``&`` (all)::

    EverySteps(1000) | EverySeconds(1800)      # whichever comes first
    EverySteps(1000) & OnImprovement()         # on 1000-step boundaries, if better

Retention policies answer ``keep(checkpoints, context) -> {step: [reasons]}`` and
compose with ``|``: a checkpoint is kept if any policy keeps it. The manager adds two
protections of its own, whatever the policies say: the latest checkpoint and the
current best are never deleted.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from .info import CheckpointInfo, KeepReason
from .metrics import Direction, Mode, is_finite_number, resolve_mode

__all__ = [
    "AllOf",
    "AnyOf",
    "AnyRetention",
    "EverySeconds",
    "EverySteps",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "OnImprovement",
    "RetentionContext",
    "RetentionPolicy",
    "SaveContext",
    "SavePolicy",
]


# ----------------------------------------------------------------------- save policies


@dataclasses.dataclass(frozen=True)
class SaveContext:
    """What a save policy sees.

    Attributes:
        step: the step being considered.
        now: the current time, POSIX seconds.
        last_step: the step of the last checkpoint, or None if there is none.
        last_time: when the clock for time-based saving started: the last save of this
            session, or the session's start.
        improved: whether the monitored metric improved at this step.
    """

    step: int
    now: float
    last_step: int | None = None
    last_time: float | None = None
    improved: bool = False


@runtime_checkable
class SavePolicy(Protocol):
    """Decides whether a step is saved. Implementations are pure."""

    def should_save(self, context: SaveContext) -> bool: ...


class _SaveOps:
    def __or__(self, other: SavePolicy) -> AnyOf:
        _check_save_policy(other, "|")
        return AnyOf((*_flatten(self, AnyOf), *_flatten(other, AnyOf)))

    def __and__(self, other: SavePolicy) -> AllOf:
        _check_save_policy(other, "&")
        return AllOf((*_flatten(self, AllOf), *_flatten(other, AllOf)))


def _check_save_policy(other: object, op: str) -> None:
    if not isinstance(other, SavePolicy):
        raise TypeError(f"Expected a save policy on both sides of {op!r}. Received: {other!r}")


def _flatten(policy: Any, kind: type) -> tuple[Any, ...]:
    return tuple(getattr(policy, "policies", ())) if isinstance(policy, kind) else (policy,)


def policy_leaves(policy: object) -> Iterator[object]:
    """The policies a composition (``a | b``, ``a & b``) is made of, depth first; any
    other policy (a subclass of a composition included) is its own leaf."""
    if type(policy) in (AnyOf, AllOf, AnyRetention):
        for p in policy.policies:  # type: ignore[attr-defined]
            yield from policy_leaves(p)
    else:
        yield policy


def _positive_int(name: str, value: object) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"Expected {name} to be an int >= 1. Received: {name}={value!r}")
    return value


def _positive_seconds(name: str, value: object) -> float:
    if not is_finite_number(value) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"Expected {name} to be a finite number > 0. Received: {name}={value!r}")
    return float(value)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class EverySteps(_SaveOps):
    """Save when the step reaches a multiple of ``n``, or has passed one since the last save.

    Counting from the last checkpoint's step (not from the process start) keeps the
    schedule the same across restarts, and a step that skips over a multiple (saving is
    considered every 7 steps, say) still saves right after it.

    >>> p = EverySteps(100)
    >>> [p.should_save(SaveContext(s, 0.0, last_step=last)) for s, last in [(100, 0), (150, 100), (207, 150)]]
    [True, False, True]

    Args:
        n: the interval, in steps (>= 1).
    """

    n: int

    def __post_init__(self) -> None:
        _positive_int("n", self.n)

    def should_save(self, context: SaveContext) -> bool:
        if context.last_step is None:
            return context.step % self.n == 0 or context.step >= self.n
        return context.step // self.n > context.last_step // self.n


@dataclasses.dataclass(frozen=True)
class EverySeconds(_SaveOps):
    """Save when ``seconds`` have passed since the last save of this session (or its start).

    >>> p = EverySeconds(60)
    >>> p.should_save(SaveContext(5, now=130.0, last_time=100.0)), p.should_save(SaveContext(6, now=160.0, last_time=100.0))
    (False, True)

    Args:
        seconds: the interval (> 0).
    """

    seconds: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "seconds", _positive_seconds("seconds", self.seconds))

    def should_save(self, context: SaveContext) -> bool:
        if context.last_time is None:
            return True
        return context.now - context.last_time >= self.seconds


@dataclasses.dataclass(frozen=True)
class OnImprovement(_SaveOps):
    """Save when the monitored metric improves on the best seen so far.

    The manager decides what "improves" means from its ``monitor``, ``mode``,
    ``min_delta`` and ``baseline``. Combine with ``&`` to save only on a schedule *and*
    when better, or with ``|`` to save on a schedule *or* when better.

    >>> OnImprovement().should_save(SaveContext(3, 0.0, improved=True))
    True
    """

    def should_save(self, context: SaveContext) -> bool:
        return context.improved


@dataclasses.dataclass(frozen=True)
class AnyOf(_SaveOps):
    """Save if any of ``policies`` says so (what ``a | b`` builds).

    >>> p = EverySteps(1000) | OnImprovement()
    >>> p.should_save(SaveContext(10, 0.0, last_step=0, improved=True))
    True
    """

    policies: tuple[SavePolicy, ...]

    def should_save(self, context: SaveContext) -> bool:
        return any(p.should_save(context) for p in self.policies)


@dataclasses.dataclass(frozen=True)
class AllOf(_SaveOps):
    """Save if all of ``policies`` say so (what ``a & b`` builds).

    >>> p = EverySteps(1000) & OnImprovement()
    >>> p.should_save(SaveContext(1000, 0.0, last_step=0, improved=False))
    False
    """

    policies: tuple[SavePolicy, ...]

    def should_save(self, context: SaveContext) -> bool:
        return all(p.should_save(context) for p in self.policies)


# ------------------------------------------------------------------ retention policies


@dataclasses.dataclass(frozen=True)
class RetentionContext:
    """What a retention policy sees besides the checkpoints.

    Attributes:
        now: the current time, POSIX seconds.
        monitor: the manager's monitored metric, or None.
        mode: the manager's resolved direction, "min" or "max".
    """

    now: float = 0.0
    monitor: str | None = None
    mode: Direction = "min"


@runtime_checkable
class RetentionPolicy(Protocol):
    """Chooses which checkpoints to keep. Implementations are pure.

    ``keep`` receives the checkpoints in ascending step order and returns the steps to
    keep, each with the reasons it is kept; steps not returned may be deleted.
    """

    def keep(
        self, checkpoints: Sequence[CheckpointInfo], context: RetentionContext
    ) -> Mapping[int, list[str]]: ...


class _KeepOps:
    def __or__(self, other: RetentionPolicy) -> AnyRetention:
        if not isinstance(other, RetentionPolicy):
            raise TypeError(f"Expected a retention policy on both sides of '|'. Received: {other!r}")
        return AnyRetention((*_flatten(self, AnyRetention), *_flatten(other, AnyRetention)))


def rank_key(info: CheckpointInfo, monitor: str, mode: Direction) -> tuple[float, int] | None:
    """Where a checkpoint sorts by ``monitor``, best first (ties: the earlier step); None
    when it reports no finite value."""
    value = info.metrics.get(monitor)
    if value is None or not is_finite_number(value):
        return None
    return (value if mode == "min" else -value, info.step)


class CheckpointView(Protocol):
    """Sorted views of a set of checkpoints, what the built-in retention rules look at.

    The manager keeps one up to date as checkpoints come and go (so that a save only
    relabels what can have changed); :meth:`keep` of a built-in policy builds one from
    the list it is given. Either way the same rule (``reason``) decides.
    """

    steps: list[int]  # ascending

    def info(self, step: int) -> CheckpointInfo: ...

    def ranking(self, monitor: str, mode: Direction) -> list[tuple[float, int]]:
        """``rank_key`` of every checkpoint with a finite ``monitor``, best first."""
        ...

    def by_time(self) -> list[tuple[float, int]]:
        """``(time, step)`` of every checkpoint, ascending."""
        ...


class ListView:
    """A :class:`CheckpointView` of a list of checkpoints (sorted once, on demand)."""

    def __init__(self, checkpoints: Sequence[CheckpointInfo]) -> None:
        self._infos = {c.step: c for c in checkpoints}
        self.steps = sorted(self._infos)
        self._rankings: dict[tuple[str, Direction], list[tuple[float, int]]] = {}
        self._by_time: list[tuple[float, int]] | None = None

    def info(self, step: int) -> CheckpointInfo:
        return self._infos[step]

    def ranking(self, monitor: str, mode: Direction) -> list[tuple[float, int]]:
        if (monitor, mode) not in self._rankings:
            self._rankings[(monitor, mode)] = sorted(
                key for c in self._infos.values() if (key := rank_key(c, monitor, mode)) is not None
            )
        return self._rankings[(monitor, mode)]

    def by_time(self) -> list[tuple[float, int]]:
        if self._by_time is None:
            self._by_time = sorted((c.time, c.step) for c in self._infos.values())
        return self._by_time


class _RuleKeep(_KeepOps):
    """A retention policy decided one checkpoint at a time by :meth:`reason`."""

    def reason(self, view: CheckpointView, step: int, context: RetentionContext) -> KeepReason | None:
        raise NotImplementedError

    def keep(
        self, checkpoints: Sequence[CheckpointInfo], context: RetentionContext
    ) -> Mapping[int, list[str]]:
        view = ListView(checkpoints)
        return {s: [reason] for s in view.steps if (reason := self.reason(view, s, context)) is not None}


@dataclasses.dataclass(frozen=True)
class KeepLast(_RuleKeep):
    """Keep the ``n`` newest checkpoints.

    >>> infos = [CheckpointInfo(s, f"ckpt-{s}") for s in (1, 2, 3, 4)]
    >>> sorted(KeepLast(2).keep(infos, RetentionContext()))
    [3, 4]

    Args:
        n: how many (>= 1).
    """

    n: int

    def __post_init__(self) -> None:
        _positive_int("n", self.n)

    def reason(self, view: CheckpointView, step: int, context: RetentionContext) -> KeepReason | None:
        steps = view.steps
        return KeepReason.last(self.n) if len(steps) - bisect.bisect_left(steps, step) <= self.n else None


@dataclasses.dataclass(frozen=True)
class KeepBest(_RuleKeep):
    """Keep the ``n`` best checkpoints by a metric.

    By default the metric and direction are the manager's ``monitor`` and ``mode``;
    give ``monitor=`` (and ``mode=``) to rank by another one. Checkpoints without a
    finite value of the metric are never ranked.

    >>> infos = [CheckpointInfo(s, f"ckpt-{s}", {"val_loss": v}) for s, v in [(1, .5), (2, .3), (3, .4)]]
    >>> dict(KeepBest(2).keep(infos, RetentionContext(monitor="val_loss", mode="min")))
    {2: ['best val_loss #1'], 3: ['best val_loss #2']}

    Args:
        n: how many (>= 1).
        monitor: the metric to rank by (default: the manager's).
        mode: "min", "max" or "auto" for ``monitor``.

    Raises:
        ValueError: bad arguments; or ``mode="auto"`` with a name whose direction
            cannot be inferred.
    """

    n: int
    monitor: str | None = None
    mode: Mode = "auto"

    def __post_init__(self) -> None:
        _positive_int("n", self.n)
        if self.monitor is not None:
            if not isinstance(self.monitor, str) or not self.monitor:
                raise ValueError(f"Expected monitor to be a non-empty str or None. Received: monitor={self.monitor!r}")
            resolve_mode(self.monitor, self.mode)
        elif self.mode not in ("auto", "min", "max"):
            raise ValueError(f"Expected mode to be 'auto', 'min' or 'max'. Received: mode={self.mode!r}")

    def metric(self, context: RetentionContext) -> tuple[str, Direction] | None:
        """The metric and direction ranked by: its own ``monitor``, else the manager's."""
        if self.monitor is not None:
            return self.monitor, resolve_mode(self.monitor, self.mode)
        if context.monitor is None:
            return None
        return context.monitor, context.mode if self.mode == "auto" else self.mode

    def reason(self, view: CheckpointView, step: int, context: RetentionContext) -> KeepReason | None:
        metric = self.metric(context)
        if metric is None:
            return None
        monitor, mode = metric
        key = rank_key(view.info(step), monitor, mode)
        if key is None:
            return None
        rank = bisect.bisect_left(view.ranking(monitor, mode), key)
        return KeepReason.ranked(monitor, rank + 1) if rank < self.n else None


@dataclasses.dataclass(frozen=True)
class KeepEvery(_RuleKeep):
    """Keep one checkpoint per interval of steps, or of time, for the long view.

    For each interval ``[k*n, (k+1)*n)`` the first checkpoint in it is kept; when steps
    are multiples of ``n`` that is exactly the checkpoint at each multiple. Later
    checkpoints never change which one an interval keeps.

    >>> infos = [CheckpointInfo(s, f"ckpt-{s}") for s in (0, 500, 1000, 1500, 2100)]
    >>> sorted(KeepEvery(steps=1000).keep(infos, RetentionContext()))
    [0, 1000, 2100]

    Args:
        steps: the interval in steps; or
        seconds: the interval in seconds of checkpoint time (give exactly one).
    """

    steps: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.seconds is None):
            raise ValueError(
                "Expected exactly one of steps= or seconds=. "
                f"Received: steps={self.steps!r}, seconds={self.seconds!r}"
            )
        if self.steps is not None:
            _positive_int("steps", self.steps)
        else:
            object.__setattr__(self, "seconds", _positive_seconds("seconds", self.seconds))

    def reason(self, view: CheckpointView, step: int, context: RetentionContext) -> KeepReason | None:
        if self.steps is not None:
            steps = view.steps
            i = bisect.bisect_left(steps, step)
            first = i == 0 or steps[i - 1] // self.steps != step // self.steps
            return KeepReason.every(f"{self.steps} steps") if first else None
        interval = float(self.seconds)  # type: ignore[arg-type]
        order = view.by_time()
        key = (view.info(step).time, step)
        i = bisect.bisect_left(order, key)
        first = i == 0 or math.floor(order[i - 1][0] / interval) != math.floor(key[0] / interval)
        return KeepReason.every(seconds_text(interval)) if first else None


def seconds_text(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


@dataclasses.dataclass(frozen=True)
class AnyRetention(_KeepOps):
    """Keep a checkpoint if any of ``policies`` keeps it (what ``a | b`` builds).

    >>> infos = [CheckpointInfo(s, f"ckpt-{s}") for s in range(0, 50, 10)]
    >>> dict((KeepLast(1) | KeepEvery(steps=20)).keep(infos, RetentionContext()))
    {40: ['last 1', 'every 20 steps'], 0: ['every 20 steps'], 20: ['every 20 steps']}
    """

    policies: tuple[RetentionPolicy, ...]

    def keep(
        self, checkpoints: Sequence[CheckpointInfo], context: RetentionContext
    ) -> Mapping[int, list[str]]:
        kept: dict[int, list[str]] = {}
        for policy in self.policies:
            for step, reasons in policy.keep(checkpoints, context).items():
                kept.setdefault(step, []).extend(r for r in reasons if r not in kept.get(step, []))
        return kept
