"""JAX multi-process jobs for ckptmgr: a coordinator over ``jax.distributed``, and trees.

:class:`JaxCoordinator` implements :class:`ckptmgr.coordinator.Coordinator` with the
key-value store and barriers of JAX's distributed runtime (the coordination service that
``jax.distributed.initialize`` starts, the one Orbax synchronises hosts with): no device
collective, no compiled program, so it works the same on CPU, GPU and TPU hosts.
Messages travel as JSON text (:func:`ckptmgr.coordinator.encode_message`), never as
pickles.

:func:`to_tree` turns a pytree of ``jax.Array`` leaves into a ckptmgr state tree (NumPy
copies); :func:`from_tree` turns the arrays of a restored tree back into ``jax.Array``.

Example, in each process of a two-process job::

    import jax, ckptmgr
    from ckptmgr.adapters import jax as ckpt_jax

    jax.distributed.initialize(coordinator_address="10.0.0.1:1234", num_processes=2,
                               process_id=PROCESS_ID)
    coordinator = ckpt_jax.JaxCoordinator(timeout=300)
    with ckptmgr.CheckpointManager("/shared/ckpt", coordinator=coordinator) as mgr:
        mgr.save(step, ckpt_jax.to_tree({"params": params, "step": step}))

JAX is imported when a function or class here is first used, never by ``import ckptmgr``.
"""

from __future__ import annotations

import importlib
import itertools
import math
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from ckptmgr.coordinator import DEFAULT_TIMEOUT, CoordinatorBase, decode_message, encode_message
from ckptmgr.errors import CoordinatorError

__all__ = ["JaxCoordinator", "from_tree", "to_tree"]

# The distributed runtime client methods the coordinator calls (jax's private
# jax._src.distributed.global_state.client, a jaxlib DistributedRuntimeClient; checked
# with jax 0.10.2).
_CLIENT_METHODS = (
    "key_value_set_bytes",
    "key_value_dir_get_bytes",
    "blocking_key_value_get_bytes",
    "key_value_delete",
    "wait_at_barrier",
)

# Every coordinator's keys and barriers live under _KEY_ROOT/<instance>/<round>. The
# instance number is this process's count of coordinators created so far: the processes
# agree on it as long as they create their coordinators in the same order (as they call
# every collective in the same order).
_KEY_ROOT = "ckptmgr/coordinator"
_instances = itertools.count()
_instances_lock = threading.Lock()


def _jax() -> Any:
    return importlib.import_module("jax")


def _describe(exc: BaseException) -> str:
    """A one-line cause for a failed collective (JAX's messages run over many lines)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if line.startswith("DEADLINE_EXCEEDED"):
        return f"not every process reached it in time (a peer died, stalled or called another collective; {line})"
    return line


class JaxCoordinator(CoordinatorBase):
    """The :class:`ckptmgr.coordinator.Coordinator` protocol between the processes of a JAX job.

    Create one in every process, after ``jax.distributed.initialize(...)`` and in the
    same order as any other ``JaxCoordinator`` (each instance has its own key space in
    the distributed runtime, numbered by creation order). ``rank`` is the process's id
    in the distributed runtime and ``world_size`` the number of processes, the values
    of ``jax.process_index()`` and ``jax.process_count()``; they are read from the
    runtime, because ``jax.process_index()`` first initialises the backends, which
    waits for every process with no timeout of ours.

    Each collective is one barrier of the coordination service, after which every rank
    reads the values the others stored under keys unique to the collective, so a
    repeated call never reads an earlier call's value. A collective that does not
    complete within ``timeout`` seconds (a peer died, stalled, or called another
    collective) raises :class:`ckptmgr.CoordinatorError` on every rank that reaches it,
    the late ones included; the coordinator then stays broken and every later call
    raises at once.

    Keys are deleted one round later (when every rank has read them), so at most two
    rounds' values are stored at a time. Barrier ids are unique per collective too; how
    long the coordination service remembers a passed barrier is up to JAX. A barrier
    that times out fails within about a second after ``timeout`` (the service checks
    its deadlines periodically).

    JAX's own failure handling comes first where it is faster: when the process that
    hosts the coordination service (process 0) dies, or when a process misses its
    heartbeats for ``heartbeat_timeout_seconds`` (an argument of
    ``jax.distributed.initialize``, 100 s by default), JAX terminates the other
    processes (SIGABRT) without raising. A peer that exits cleanly (``sys.exit``)
    waits in JAX's shutdown barrier and is seen as stalled.

    Example, in each process of the job::

        import jax
        from ckptmgr.adapters.jax import JaxCoordinator

        jax.distributed.initialize(coordinator_address="10.0.0.1:1234", num_processes=2,
                                   process_id=PROCESS_ID)
        coordinator = JaxCoordinator(timeout=120)
        config = coordinator.broadcast({"run": "a1"} if coordinator.rank == 0 else None)
        hosts = coordinator.all_gather(socket.gethostname())  # indexed by rank
        coordinator.barrier()

    Args:
        timeout: seconds each collective waits for the other processes.

    Raises:
        ValueError: ``timeout`` is not a number of seconds > 0.
        RuntimeError: ``jax.distributed.initialize`` has not been called, or this
            version of JAX lacks the distributed runtime client the coordinator uses.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"Expected timeout to be a number of seconds > 0. Received: timeout={timeout!r}")
        jax = _jax()
        # Private API, the one Orbax uses: jax.distributed offers no public key-value store.
        from jax._src import distributed

        state = distributed.global_state
        client = state.client
        if client is None:
            raise RuntimeError(
                "Expected jax.distributed.initialize(...) to have been called in this process before "
                "JaxCoordinator(). Received: no JAX distributed runtime client"
            )
        missing = [name for name in _CLIENT_METHODS if not callable(getattr(client, name, None))]
        if missing:
            raise RuntimeError(
                f"Expected a JAX distributed runtime client with {', '.join(_CLIENT_METHODS)} "
                f"(JaxCoordinator was checked with jax 0.10.2). Received: jax {jax.__version__}, lacking "
                f"{', '.join(missing)}"
            )
        self._client: Any = client
        self._rank = int(state.process_id)
        self._world_size = int(state.num_processes)
        self._timeout = float(timeout)
        self._timeout_ms = max(1, math.ceil(self._timeout * 1000))
        with _instances_lock:
            instance = next(_instances)
        self._prefix = f"{_KEY_ROOT}/{instance}"
        self._round = 0
        self._stored_round: int | None = None  # the previous round, if it stored values
        self._broken: str | None = None  # why the coordinator failed, once it has
        self._failure: BaseException | None = None

    def barrier(self) -> None:
        """Return once every process has called it.

        Raises:
            ckptmgr.CoordinatorError: a process did not call it within ``timeout``
                seconds, or the coordinator failed earlier.
        """
        self._collective("barrier", None, read=None)

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Process ``src``'s ``value`` (a JSON value), on every process.

        The others pass anything (e.g. None). Every process gets the value as decoded
        from its JSON text, ``src`` included (a tuple comes back as a list).

        Raises:
            TypeError: on ``src``, ``value`` is not a JSON value (nothing is sent).
            ValueError: ``src`` is not a rank.
            ckptmgr.CoordinatorError: a process did not call it within ``timeout``
                seconds, or the coordinator failed earlier.
        """
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < self._world_size:
            raise ValueError(f"Expected src to be a rank in range({self._world_size}). Received: src={src!r}")
        blob = encode_message(value, "broadcast value") if self._rank == src else None
        return self._collective(f"broadcast_from_{src}", blob, read=src)[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (a JSON value), indexed by rank, on every process.

        Raises:
            TypeError: ``value`` is not a JSON value (nothing is sent).
            ckptmgr.CoordinatorError: a process did not call it within ``timeout``
                seconds, or the coordinator failed earlier.
        """
        return self._collective("all_gather", encode_message(value, "all_gather value"), read="all")

    def _collective(self, what: str, blob: bytes | None, *, read: int | str | None) -> list[Any]:
        """One round: store ``blob`` (if any), meet the others at the round's barrier,
        then read rank ``read``'s value, every rank's (``"all"``), or nothing."""
        number = self._round
        if self._broken is not None:
            raise CoordinatorError(
                f"{what} #{number} refused on rank {self._rank} (world_size={self._world_size}, "
                f"timeout={self._timeout:g} s): the coordinator failed earlier ({self._broken})"
            ) from self._failure
        self._round += 1
        base = f"{self._prefix}/{number}"
        try:
            if blob is not None:
                self._client.key_value_set_bytes(f"{base}/{self._rank}", blob)
            # The collective's name is part of the barrier's id: processes that call
            # different collectives time out instead of reading each other's values.
            self._client.wait_at_barrier(f"{base}/{what}", self._timeout_ms)
            if read is None:
                values = []
            elif read == "all":
                stored = dict(self._client.key_value_dir_get_bytes(f"{base}/"))
                missing = [r for r in range(self._world_size) if f"{base}/{r}" not in stored]
                if missing:
                    raise CoordinatorError(f"rank(s) {missing} stored no value")
                values = [decode_message(stored[f"{base}/{r}"]) for r in range(self._world_size)]
            else:
                values = [decode_message(blob if blob is not None else self._read(f"{base}/{read}"))]
            # Everyone is past the barrier, so done with the previous round: its values go.
            previous, self._stored_round = self._stored_round, (None if read is None else number)
            if self._rank == 0 and previous is not None:
                self._client.key_value_delete(f"{self._prefix}/{previous}")
        except Exception as exc:
            cause = _describe(exc)
            self._broken = f"{what} #{number} failed: {cause}"
            self._failure = exc
            raise CoordinatorError(
                f"{what} #{number} failed on rank {self._rank} (world_size={self._world_size}, "
                f"timeout={self._timeout:g} s): {cause}"
            ) from exc
        return values

    def _read(self, key: str) -> bytes:
        # Past the barrier the value is stored: this returns at once (the timeout is a bound).
        value: bytes = self._client.blocking_key_value_get_bytes(key, self._timeout_ms)
        return value

    def __repr__(self) -> str:
        state = "broken" if self._broken is not None else f"round {self._round}"
        return f"JaxCoordinator(rank={self._rank}, world_size={self._world_size}, timeout={self._timeout:g}, {state})"


def _path(where: tuple[Any, ...]) -> str:
    return "tree" + "".join(f"[{key!r}]" for key in where)


def to_tree(pytree: Any) -> Any:
    """A ckptmgr state tree of ``pytree``: ``jax.Array`` leaves become NumPy copies.

    Dicts, lists and tuples are walked (a NamedTuple, such as an optax state, becomes
    a plain tuple; :func:`from_tree` documents how to get the structure back); NumPy
    arrays, scalars, str and None are kept. A typed PRNG key array
    (``jax.random.key``) becomes ``{"ckptmgr.jax.prng_key": IMPL, "key_data": ARRAY}``
    (its implementation's name and ``jax.random.key_data``), which :func:`from_tree`
    turns back into the same keys. Only fully addressable arrays can be
    converted: an array sharded across processes has no whole value in any one of
    them, so each process saves its own shards (``shard.data`` of
    ``array.addressable_shards``) in a ``sharded=True`` checkpoint.

    Example::

        tree = to_tree({"params": {"w": jnp.ones((2, 3))}, "step": 3})
        # {'params': {'w': array([[1., 1., 1.], [1., 1., 1.]], dtype=float32)}, 'step': 3}

    Raises:
        ValueError: an array that is not fully addressable (the message names its path).
    """
    return _encode(pytree, (), _jax())


# A typed PRNG key array, saved: its implementation's name and its key data.
_KEY_MARK, _KEY_DATA = "ckptmgr.jax.prng_key", "key_data"


def from_tree(tree: Any, *, device: Any = None) -> Any:
    """The arrays of a restored state tree as ``jax.Array`` (on ``device``, by default
    JAX's default device); dicts, lists and tuples are walked, other values kept, and
    the PRNG keys :func:`to_tree` saved are typed key arrays again.

    Dtypes follow JAX's rules: without ``jax_enable_x64``, int64 and float64 arrays
    become int32 and float32 (as ``jax.device_put`` does).

    To get a pytree of another structure back (an optax NamedTuple state, a flax
    struct), unflatten the leaves into a template of it::

        restored = from_tree(mgr.restore())
        opt_state = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(opt_state_template),
            jax.tree_util.tree_leaves(restored["opt_state"]))
    """
    return _decode(tree, _jax(), device)


def _encode(value: Any, where: tuple[Any, ...], jax: Any) -> Any:
    if isinstance(value, jax.Array):
        if not value.is_fully_addressable:
            raise ValueError(
                f"Expected fully addressable arrays at {_path(where)}. Received: an array of shape "
                f"{value.shape} sharded across processes ({value.sharding}); save each process's shards "
                "(shard.data for shard in array.addressable_shards) with CheckpointManager(..., "
                "coordinator=JaxCoordinator(), sharded=True)"
            )
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            # NumPy has no key dtype: the key data, and the implementation to wrap it with.
            return {_KEY_MARK: str(jax.random.key_impl(value)),
                    _KEY_DATA: np.array(jax.random.key_data(value), copy=True)}
        # A copy: the tree must not follow a buffer that JAX may donate or delete later.
        return np.array(value, copy=True)
    if isinstance(value, Mapping):
        return {key: _encode(item, (*where, key), jax) for key, item in value.items()}
    if isinstance(value, list):
        return [_encode(item, (*where, i), jax) for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_encode(item, (*where, i), jax) for i, item in enumerate(value))
    return value


def _decode(value: Any, jax: Any, device: Any) -> Any:
    if isinstance(value, np.ndarray):
        return jax.device_put(value, device)
    if isinstance(value, dict):
        if set(value) == {_KEY_MARK, _KEY_DATA} and isinstance(value[_KEY_DATA], np.ndarray):
            return jax.device_put(jax.random.wrap_key_data(value[_KEY_DATA], impl=value[_KEY_MARK]), device)
        return {key: _decode(item, jax, device) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item, jax, device) for item in value]
    if isinstance(value, tuple):
        return tuple(_decode(item, jax, device) for item in value)
    return value
