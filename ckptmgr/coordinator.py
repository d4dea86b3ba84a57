"""The processes of one job, as the checkpoint manager needs to see them.

A multi-process job (``torchrun``, Keras ``MultiWorkerMirroredStrategy``, JAX multi-host)
saves one checkpoint per step: every process calls ``save(step, state)``, one decision
is taken (by rank 0) and one commit is written. The manager reaches the other processes
only through a :class:`Coordinator`, a small protocol that the adapters implement over
their framework (``ckptmgr.adapters.torch.TorchCoordinator``,
``ckptmgr.adapters.jax.JaxCoordinator``, ``ckptmgr.adapters.tf.MultiWorkerCoordinator``);
the core imports no framework.

Messages are small JSON values (dicts with str keys, lists, str, int, float, bool,
None): an implementation sends their JSON text, never a pickle, so a message cannot run
code in the process that receives it. Every collective has a timeout: a peer that died
or stalls makes the others raise :class:`ckptmgr.CoordinatorError` instead of hanging.
Every process calls the same collectives in the same order (the manager guarantees it as
long as every process calls the same manager methods in the same order).

:class:`ThreadCoordinator` runs the protocol between threads of one process: for
simulations of large worlds and for trying the multi-process API without launching a job.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol, runtime_checkable

from .errors import CoordinatorError

DEFAULT_TIMEOUT = 300.0


@runtime_checkable
class Coordinator(Protocol):
    """What a :class:`ckptmgr.CheckpointManager` needs from the processes of a job.

    ``rank`` is this process's index in ``range(world_size)``; rank 0 decides and
    commits. Each method is a collective: every rank calls it, in the same order, and
    it returns once every rank has called it, or raises :class:`ckptmgr.CoordinatorError`
    after ``timeout`` seconds (a peer died or stalled). Values are small JSON values.

    Example (two ranks as threads of one process; under ``torchrun`` use
    ``ckptmgr.adapters.torch.TorchCoordinator()`` in each process instead):

    >>> import threading
    >>> from ckptmgr.coordinator import ThreadCoordinator
    >>> group = ThreadCoordinator.group(2, timeout=10)
    >>> out = [None, None]
    >>> def work(c):
    ...     out[c.rank] = (c.broadcast({"step": 7} if c.rank == 0 else None), c.all_gather(c.rank * 10))
    >>> threads = [threading.Thread(target=work, args=(c,)) for c in group]
    >>> for t in threads: t.start()
    >>> for t in threads: t.join()
    >>> out
    [({'step': 7}, [0, 10]), ({'step': 7}, [0, 10])]
    """

    @property
    def rank(self) -> int:
        """This process's rank, in ``range(world_size)``."""
        ...

    @property
    def world_size(self) -> int:
        """The number of processes."""
        ...

    @property
    def timeout(self) -> float:
        """Seconds a collective waits for the other ranks before raising."""
        ...

    def barrier(self) -> None:
        """Return once every rank has called it."""
        ...

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value``, on every rank (the others pass anything, e.g. None)."""
        ...

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, indexed by rank, on every rank."""
        ...


class CoordinatorBase:
    """``rank``, ``world_size`` and ``timeout`` as read-only properties, for implementations
    of :class:`Coordinator` (each sets ``_rank``, ``_world_size`` and ``_timeout``).

    >>> class Alone(CoordinatorBase):
    ...     def __init__(self) -> None:
    ...         self._rank, self._world_size, self._timeout = 0, 1, 1.0
    >>> Alone().world_size
    1
    """

    _rank: int
    _world_size: int
    _timeout: float

    @property
    def rank(self) -> int:
        """This process's rank, in ``range(world_size)``; rank 0 decides and commits."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The number of processes (ranks) of the job."""
        return self._world_size

    @property
    def timeout(self) -> float:
        """Seconds a collective waits for the other ranks before raising."""
        return self._timeout


def encode_message(value: Any, where: str = "coordinator message") -> bytes:
    """The bytes an implementation sends for ``value`` (JSON, UTF-8).

    Raises:
        TypeError: ``value`` is not a JSON value (the message says which type).
    """
    try:
        return json.dumps(value, allow_nan=True, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Expected a {where} made of JSON values. Received: {exc}") from exc


def decode_message(blob: bytes | bytearray | memoryview) -> Any:
    """The value :func:`encode_message` encoded.

    Raises:
        CoordinatorError: the bytes are not a message (a peer on another protocol).
    """
    try:
        return json.loads(bytes(blob).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CoordinatorError(f"Received a malformed coordinator message ({exc})") from exc


class _Round:
    """One collective between the threads of a group."""

    def __init__(self, size: int) -> None:
        self.values: list[bytes | None] = [None] * size
        self.arrived = 0
        self.done = threading.Event()


class _Group:
    def __init__(self, size: int) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.rounds: dict[int, _Round] = {}
        self.broken: str | None = None


class ThreadCoordinator(CoordinatorBase):
    """The :class:`Coordinator` protocol between threads of one process.

    Create the ranks together with :meth:`group` and give one to each thread. Values
    travel as JSON, as between processes. A rank that stops calling makes the others
    raise :class:`ckptmgr.CoordinatorError` after ``timeout`` seconds, and the group
    stays broken (as a job whose peer died).

    Example: see :class:`Coordinator`.
    """

    def __init__(self, group: _Group, rank: int, timeout: float) -> None:
        self._group = group
        self._rank = rank
        self._world_size = group.size
        self._timeout = timeout
        self._round = 0

    @classmethod
    def group(cls, world_size: int, *, timeout: float = DEFAULT_TIMEOUT) -> list[ThreadCoordinator]:
        """``world_size`` coordinators, one per rank, that talk to each other.

        Raises:
            ValueError: ``world_size`` < 1 or ``timeout`` <= 0.
        """
        if type(world_size) is not int or world_size < 1:
            raise ValueError(f"Expected world_size to be an int >= 1. Received: world_size={world_size!r}")
        if not timeout > 0:
            raise ValueError(f"Expected timeout to be a number of seconds > 0. Received: timeout={timeout!r}")
        shared = _Group(world_size)
        return [cls(shared, rank, float(timeout)) for rank in range(world_size)]

    def _exchange(self, blob: bytes, what: str) -> list[bytes]:
        group = self._group
        number, self._round = self._round, self._round + 1
        with group.lock:
            if group.broken is not None:
                raise CoordinatorError(f"rank {self._rank}: {what} failed: {group.broken}")
            current = group.rounds.setdefault(number, _Round(group.size))
            current.values[self._rank] = blob
            current.arrived += 1
            if current.arrived == group.size:
                current.done.set()
        if not current.done.wait(self._timeout):
            with group.lock:
                if not current.done.is_set():
                    missing = [r for r, v in enumerate(current.values) if v is None]
                    group.broken = f"rank(s) {missing} did not join {what} #{number} within {self._timeout:g} s"
                    raise CoordinatorError(f"rank {self._rank}: {group.broken}")
        with group.lock:
            current.arrived += 1
            if current.arrived == 2 * group.size:
                del group.rounds[number]
        return [v for v in current.values if v is not None]

    def barrier(self) -> None:
        self._exchange(b"null", "barrier")

    def broadcast(self, value: Any, src: int = 0) -> Any:
        blob = encode_message(value if self._rank == src else None)
        return decode_message(self._exchange(blob, "broadcast")[src])

    def all_gather(self, value: Any) -> list[Any]:
        return [decode_message(v) for v in self._exchange(encode_message(value), "all_gather")]
