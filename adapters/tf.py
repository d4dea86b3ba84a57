"""TensorFlow and Keras variables as ckptmgr state trees, for custom ``GradientTape`` loops.

``to_tree`` reads the variables of Keras models and layers, Keras optimizers,
``tf.Module``s, ``tf.Variable``s and ``keras.Variable``s (and dicts, lists and tuples
of them) into NumPy arrays; ``load_tree`` assigns them back, in place. A model or
module becomes the list of its ``.variables`` in their (deterministic) order, which
for Keras 3 includes the state of its seed generators (``Dropout``), so a resumed run
draws the same dropout masks. Built-in Keras ``fit()`` callbacks live in
``ckptmgr.adapters.keras``.

Example:

>>> import ckptmgr, keras, numpy as np, tempfile
>>> from ckptmgr.adapters import tf as ckpt_tf
>>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
>>> opt = keras.optimizers.Adam(0.01)
>>> opt.build(model.trainable_variables)
>>> with ckptmgr.CheckpointManager(tempfile.mkdtemp()) as mgr:
...     _ = mgr.save(1, ckpt_tf.to_tree({"model": model, "opt": opt}))
...     tree = mgr.restore()
>>> model2 = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
>>> opt2 = keras.optimizers.Adam(0.01)
>>> opt2.build(model2.trainable_variables)   # an optimizer creates its slots lazily
>>> ckpt_tf.load_tree({"model": model2, "opt": opt2}, tree)
>>> np.array_equal(model2.layers[0].kernel.numpy(), model.layers[0].kernel.numpy())
True

Works in eager mode (outside ``tf.function``), which is where a loop saves.

:class:`MultiWorkerCoordinator` is the :class:`ckptmgr.coordinator.Coordinator` of a
``tf.distribute.MultiWorkerMirroredStrategy`` job: the workers of one job reach each
other through it when they save together.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from ckptmgr.coordinator import DEFAULT_TIMEOUT, CoordinatorBase, decode_message, encode_message
from ckptmgr.errors import CoordinatorError

__all__ = ["MultiWorkerCoordinator", "load_tree", "to_tree"]


def _is_variable(obj: Any) -> bool:
    # tf.Variable and keras.Variable; a tf.Tensor has numpy() but cannot be assigned.
    return callable(getattr(obj, "assign", None)) and callable(getattr(obj, "numpy", None)) and hasattr(obj, "shape")


def _holds_variables(obj: Any) -> bool:
    # Keras layers, models and optimizers, tf.Module: all list their state in .variables.
    return not isinstance(obj, (Mapping, list, tuple)) and isinstance(getattr(obj, "variables", None), (list, tuple))


def _path(where: tuple[Any, ...]) -> str:
    return "tree" + "".join(f"[{key!r}]" for key in where)


def _read(variable: Any) -> np.ndarray[Any, Any]:
    # .numpy() of a variable is a snapshot: later assignments do not change it.
    return np.asarray(variable.numpy())


def to_tree(obj: Any) -> Any:
    """A ckptmgr state tree of the variables in ``obj``.

    A variable becomes a NumPy array; anything with ``.variables`` (Keras model,
    layer or optimizer, ``tf.Module``) a list of arrays; dicts (str keys), lists and
    tuples are walked; NumPy arrays, numbers, str, bytes and None are kept as they are
    (an ``"epoch"`` counter next to the model, say).

    >>> import tensorflow as tf
    >>> from ckptmgr.adapters.tf import to_tree
    >>> to_tree({"w": tf.Variable([1.0, 2.0]), "epoch": 3})
    {'w': array([1., 2.], dtype=float32), 'epoch': 3}

    Raises:
        TypeError: a value with no tree form (the message names its path), e.g. a
            ``tf.random.Generator`` (capture those with
            :func:`ckptmgr.adapters.rng.capture_rng`).
    """
    return _encode(obj, ())


def _encode(obj: Any, where: tuple[Any, ...]) -> Any:
    if obj is None or type(obj) in (bool, int, float, complex, str, bytes) or isinstance(obj, (np.ndarray, np.generic)):
        return obj
    if _is_variable(obj):
        return _read(obj)
    if _holds_variables(obj):
        return [_read(v) for v in obj.variables]
    if isinstance(obj, Mapping):
        bad = [key for key in obj if type(key) is not str]
        if bad:
            raise TypeError(f"Expected str dict keys at {_path(where)}. Received: {bad[0]!r}")
        return {key: _encode(value, (*where, key)) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_encode(value, (*where, i)) for i, value in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(
        "Expected variables, Keras models, layers or optimizers, tf.Modules, containers of them, "
        f"or plain values at {_path(where)}. Received: {type(obj).__module__}.{type(obj).__qualname__}"
    )


def load_tree(obj: Any, tree: Any) -> None:
    """Assign ``tree`` (from :func:`to_tree`) to the variables of ``obj``, in place.

    ``obj`` mirrors what was given to ``to_tree``. Everything is checked (count,
    shapes, dtypes) before anything is assigned, so a mismatch changes nothing. Build
    what creates its variables lazily first: call a Keras model on data (or
    ``model.build``), and ``optimizer.build(model.trainable_variables)``. Keys of
    ``tree`` that ``obj`` lacks (an ``"epoch"`` counter) are left for the caller.

    >>> import numpy as np, tensorflow as tf
    >>> from ckptmgr.adapters.tf import load_tree
    >>> w = tf.Variable([0.0, 0.0])
    >>> load_tree({"w": w}, {"w": np.array([1.0, 2.0], dtype=np.float32), "epoch": 3})
    >>> w.numpy()
    array([1., 2.], dtype=float32)

    Raises:
        ValueError: the tree does not match: a missing key, another number of
            variables (an unbuilt model or optimizer), another shape or dtype.
        TypeError: a value of ``obj`` that holds no variables (e.g. an int).
    """
    pairs: list[tuple[Any, np.ndarray[Any, Any]]] = []
    _match(obj, tree, (), pairs)
    for variable, value in pairs:
        variable.assign(value)


def _match(obj: Any, tree: Any, where: tuple[Any, ...], pairs: list[tuple[Any, np.ndarray[Any, Any]]]) -> None:
    if _is_variable(obj):
        pairs.append((obj, _checked(obj, tree, where)))
        return
    if _holds_variables(obj):
        variables = list(obj.variables)
        if not isinstance(tree, list) or len(tree) != len(variables):
            count = len(tree) if isinstance(tree, list) else type(tree).__name__
            raise ValueError(
                f"Expected {count} variables at {_path(where)}, as saved. Received: "
                f"{type(obj).__qualname__} with {len(variables)} (build it first: call a model on data, "
                "optimizer.build(model.trainable_variables))"
            )
        for i, (variable, value) in enumerate(zip(variables, tree, strict=True)):
            pairs.append((variable, _checked(variable, value, (*where, i))))
        return
    if isinstance(obj, Mapping):
        if not isinstance(tree, Mapping):
            raise ValueError(f"Expected a dict at {_path(where)}. Received: {type(tree).__name__}")
        for key, value in obj.items():
            if key not in tree:
                raise ValueError(f"Expected a key {key!r} at {_path(where)}. Received: keys {sorted(tree)}")
            _match(value, tree[key], (*where, key), pairs)
        return
    if isinstance(obj, (list, tuple)):
        if not isinstance(tree, (list, tuple)) or len(tree) != len(obj):
            raise ValueError(
                f"Expected a sequence of {len(obj)} items at {_path(where)}. Received: {type(tree).__name__}"
                + (f" of {len(tree)}" if isinstance(tree, (list, tuple)) else "")
            )
        for i, (item, value) in enumerate(zip(obj, tree, strict=True)):
            _match(item, value, (*where, i), pairs)
        return
    raise TypeError(
        f"Expected variables, Keras models, layers or optimizers, tf.Modules or containers of them at "
        f"{_path(where)}. Received: {type(obj).__module__}.{type(obj).__qualname__} (it cannot be loaded in place)"
    )


def _checked(variable: Any, value: Any, where: tuple[Any, ...]) -> np.ndarray[Any, Any]:
    current = _read(variable)
    if not isinstance(value, (np.ndarray, np.generic)) or value.shape != current.shape or value.dtype != current.dtype:
        received = (
            f"shape {value.shape}, dtype {value.dtype}" if isinstance(value, (np.ndarray, np.generic))
            else type(value).__name__
        )
        raise ValueError(
            f"Expected an array of shape {current.shape}, dtype {current.dtype} at {_path(where)} "
            f"for variable {getattr(variable, 'path', None) or getattr(variable, 'name', '?')}. Received: {received}"
        )
    return np.asarray(value)


# --------------------------------------------------------------- multi-worker coordinator

# What each rank contributes to the header round of a collective: which collective, its
# argument (broadcast's src), the byte length of its message (_NOT_JSON where its value
# was not a JSON value) and the collective's number. Every rank fills its own row of a
# zero matrix and the rows are summed across workers, which is an all-gather.
_BARRIER, _BROADCAST, _ALL_GATHER = 1, 2, 3
_OP_NAMES = {_BARRIER: "barrier", _BROADCAST: "broadcast", _ALL_GATHER: "all_gather"}
_HEADER_FIELDS = 4
_NOT_JSON = -1


def _tensorflow() -> Any:
    import tensorflow as tf

    return tf


def _tf_config_tasks() -> int:
    """The number of chief and worker tasks that ``TF_CONFIG`` names (0 without one)."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "") or "{}").get("cluster", {})
        return sum(len(cluster.get(job, ())) for job in ("chief", "worker"))
    except (ValueError, AttributeError, TypeError):
        return 0  # TensorFlow reports a malformed TF_CONFIG itself


def _words(blob: bytes) -> np.ndarray[Any, Any]:
    """``blob`` as int32 words (TF's collectives reduce no uint8), zero-padded."""
    return np.frombuffer(blob + b"\0" * (-len(blob) % 4), dtype="<i4").astype(np.int32)


def _unwords(words: np.ndarray[Any, Any], nbytes: int) -> bytes:
    return words.astype("<i4").tobytes()[:nbytes]


def _describe_tf_error(exc: BaseException) -> str:
    """A one-line cause for a failed TF collective (TF's messages run over many lines)."""
    text = str(getattr(exc, "message", None) or exc).strip()
    line = text.splitlines()[0] if text else ""
    line = re.sub(r"^\{\{[^}]*\}\}\s*", "", line)  # the op's internal function name
    line = re.sub(r"\s*\[Op:\w+\].*$", "", line)  # the op's type and (empty) name
    line = re.sub(r"(Collective ops is aborted by: )+", r"\1", line)
    cause = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    if type(exc).__name__ == "DeadlineExceededError":
        return f"not every worker reached it in time (a peer stalled or died; {cause})"
    if type(exc).__name__ == "UnavailableError":
        return f"a peer is unreachable (it died?; {cause})"
    return cause


class MultiWorkerCoordinator(CoordinatorBase):
    """The :class:`ckptmgr.coordinator.Coordinator` protocol between the workers of a
    ``tf.distribute.MultiWorkerMirroredStrategy`` job.

    Create one in every worker, from the job's strategy (by default the strategy in
    scope, ``tf.distribute.get_strategy()``). ``rank`` is the worker's index in the
    cluster: with a ``"chief"`` task the chief is rank 0 and worker ``i`` is rank
    ``i + 1``; without one, worker ``i`` is rank ``i`` (worker 0 is then the chief).
    ``world_size`` is the number of chief and worker tasks. Under a strategy that runs
    one process (the default strategy, ``OneDeviceStrategy``, ``MirroredStrategy``, a
    ``MultiWorkerMirroredStrategy`` without a cluster) it is a world of one, whose
    collectives return at once.

    Messages travel as JSON text (:func:`ckptmgr.coordinator.encode_message`), never as
    pickles, through the strategy's own collectives on each worker's CPU:
    ``strategy.extended.reduce_to(SUM, ...)`` with
    ``tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)``. A
    collective is a header round (which collective, message lengths), then, except for
    ``barrier``, a round that carries the messages; every rank checks that the others
    called the same collective. Call the coordinator eagerly (outside ``tf.function``),
    in cross-replica context (outside ``strategy.run``).

    Each round waits at most ``timeout`` seconds. A peer that stalls, or a non-chief
    peer that died, makes the others raise :class:`ckptmgr.CoordinatorError` after
    ``timeout``; when the chief (TensorFlow's collective leader) dies, the others raise
    within about a second. A rank that reaches the collective after the others gave up
    raises at once. Such a failure is final, for TensorFlow as for the coordinator: TF
    aborts the process's collective executor (every later collective of the strategy,
    the training's included, fails, until the process restarts), and every later call
    of the coordinator raises :class:`ckptmgr.CoordinatorError` at once. Ranks that
    call different collectives all raise at once too (the header round shows it); that
    breaks the coordinator, not TensorFlow. (TF starts a thread per collective that
    waits ``timeout``; a few per checkpoint are nothing.)

    A world of one needs no cluster:

    >>> from ckptmgr.adapters.tf import MultiWorkerCoordinator
    >>> coordinator = MultiWorkerCoordinator(timeout=10)
    >>> coordinator.rank, coordinator.world_size, coordinator.all_gather({"step": 3})
    (0, 1, [{'step': 3}])

    In each worker of a job (``TF_CONFIG`` names the cluster and the task)::

        import tensorflow as tf, ckptmgr
        from ckptmgr.adapters import tf as ckpt_tf

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        with strategy.scope():
            model = build_model()
            coordinator = ckpt_tf.MultiWorkerCoordinator(timeout=120)
        config = coordinator.broadcast({"run": "a1"} if coordinator.rank == 0 else None)
        hosts = coordinator.all_gather(socket.gethostname())  # indexed by rank
        coordinator.barrier()
        with ckptmgr.CheckpointManager("/shared/ckpt", coordinator=coordinator) as mgr:
            mgr.save(step, ckpt_tf.to_tree({"model": model, "step": step}))

    Args:
        strategy: the job's ``tf.distribute.Strategy``; None: the one in scope.
        timeout: seconds each collective round waits for the other workers.

    Raises:
        ValueError: ``timeout`` is not a number of seconds > 0; the strategy is a
            ``ParameterServerStrategy``; the task is not a chief or a worker (an
            evaluator takes no part in saving); or ``TF_CONFIG`` names a cluster of
            several workers while the strategy runs one process (create the
            coordinator inside ``strategy.scope()`` or pass ``strategy``).
        TypeError: ``strategy`` is not a ``tf.distribute.Strategy``.
    """

    def __init__(self, strategy: Any = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"Expected timeout to be a number of seconds > 0. Received: timeout={timeout!r}")
        tf = _tensorflow()
        if strategy is None:
            strategy = tf.distribute.get_strategy()
        elif not isinstance(strategy, (tf.distribute.Strategy, tf.compat.v1.distribute.Strategy)):
            raise TypeError(
                "Expected strategy to be a tf.distribute.Strategy or None. "
                f"Received: {type(strategy).__module__}.{type(strategy).__qualname__}"
            )
        self._tf: Any = tf
        self._strategy: Any = strategy
        self._rank, self._world_size = self._locate(tf, strategy)
        self._timeout = float(timeout)
        self._options: Any = tf.distribute.experimental.CommunicationOptions(timeout_seconds=self._timeout)
        self._lock = threading.Lock()
        self._round = 0
        self._broken: str | None = None  # why the coordinator failed, once it has
        self._failure: BaseException | None = None

    @staticmethod
    def _locate(tf: Any, strategy: Any) -> tuple[int, int]:
        """(rank, world_size) of this process under ``strategy``."""
        kind = type(strategy).__qualname__
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            resolver = strategy.cluster_resolver
            spec = resolver.cluster_spec()
            chiefs = spec.num_tasks("chief") if "chief" in spec.jobs else 0
            world_size = chiefs + (spec.num_tasks("worker") if "worker" in spec.jobs else 0)
            if world_size <= 1 and resolver.task_type in (None, "chief", "worker"):
                return 0, 1
            if resolver.task_type == "chief":
                return 0, world_size
            if resolver.task_type == "worker":
                return chiefs + int(resolver.task_id), world_size
            raise ValueError(
                "Expected a chief or worker task of a MultiWorkerMirroredStrategy job. Received: "
                f"task_type={resolver.task_type!r} (an evaluator or parameter server takes no part in saving)"
            )
        if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
            raise ValueError(
                "Expected a strategy whose workers all run the training program (MultiWorkerMirroredStrategy) "
                f"or a single-process one. Received: {kind}"
            )
        tasks = _tf_config_tasks()
        if tasks > 1:
            raise ValueError(
                f"Expected a MultiWorkerMirroredStrategy for the cluster of {tasks} workers that TF_CONFIG "
                f"names. Received: {kind}, which runs one process (create the coordinator inside "
                "strategy.scope(), or pass strategy=)"
            )
        return 0, 1

    def barrier(self) -> None:
        """Return once every worker has called it.

        Raises:
            ckptmgr.CoordinatorError: a worker did not call it within ``timeout``
                seconds, called another collective, or the coordinator failed earlier.
        """
        self._collective(_BARRIER, 0, None)

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Worker ``src``'s ``value`` (a JSON value), on every worker.

        The others pass anything (e.g. None). Every worker gets the value as decoded
        from its JSON text, ``src`` included (a tuple comes back as a list).

        Raises:
            TypeError: on ``src``, ``value`` is not a JSON value (the others raise
                :class:`ckptmgr.CoordinatorError`; the coordinator stays usable).
            ValueError: ``src`` is not a rank.
            ckptmgr.CoordinatorError: a worker did not call it within ``timeout``
                seconds, called another collective, or the coordinator failed earlier.
        """
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < self._world_size:
            raise ValueError(f"Expected src to be a rank in range({self._world_size}). Received: src={src!r}")
        blob = self._encode(value, "message for broadcast") if self._rank == src else None
        return decode_message(self._collective(_BROADCAST, src, blob)[src])

    def all_gather(self, value: Any) -> list[Any]:
        """Every worker's ``value`` (a JSON value), indexed by rank, on every worker.

        Raises:
            TypeError: ``value`` is not a JSON value (the others raise
                :class:`ckptmgr.CoordinatorError`; the coordinator stays usable).
            ckptmgr.CoordinatorError: a worker did not call it within ``timeout``
                seconds, called another collective, or the coordinator failed earlier.
        """
        blobs = self._collective(_ALL_GATHER, 0, self._encode(value, "message for all_gather"))
        return [decode_message(blobs[rank]) for rank in range(self._world_size)]

    @staticmethod
    def _encode(value: Any, where: str) -> bytes | TypeError:
        # A value that is not JSON is still announced (as _NOT_JSON), so that every
        # rank raises instead of waiting for this one until the timeout.
        try:
            return encode_message(value, where)
        except TypeError as exc:
            return exc

    def _collective(self, op: int, arg: int, blob: bytes | TypeError | None) -> dict[int, bytes]:
        """Run one collective; return the messages sent, by rank (``blob`` None: this
        rank sends none: a barrier, or a broadcast from another rank)."""
        what = _OP_NAMES[op]
        with self._lock:
            number = self._round
            if self._broken is not None:
                raise CoordinatorError(
                    f"{what} #{number} refused {self._on()}: the coordinator failed earlier ({self._broken})"
                ) from self._failure
            if not self._tf.executing_eagerly():
                raise RuntimeError(f"Expected MultiWorkerCoordinator's {what} to be called eagerly, outside tf.function")
            self._round += 1
            if self._world_size == 1:
                if isinstance(blob, TypeError):
                    raise blob
                return {} if blob is None else {0: blob}

            nbytes = 0 if blob is None else _NOT_JSON if isinstance(blob, TypeError) else len(blob)
            header = np.zeros((self._world_size, _HEADER_FIELDS), dtype=np.int32)
            header[self._rank] = (op, arg, nbytes, number % 2**31)
            headers = self._reduce(header, what, number)
            self._check_in_step(headers, op, arg, number, what)
            lengths = headers[:, 2]
            if (lengths == _NOT_JSON).any():
                if isinstance(blob, TypeError):
                    raise blob
                ranks = np.flatnonzero(lengths == _NOT_JSON).tolist()
                raise CoordinatorError(
                    f"{what} #{number} failed {self._on()}: rank(s) {ranks} passed a value that is not a JSON value"
                )
            if op == _BARRIER:
                return {}

            senders = list(range(self._world_size)) if op == _ALL_GATHER else [arg]
            width = -(-int(lengths[senders].max()) // 4)
            payload = np.zeros((len(senders), width), dtype=np.int32)
            if isinstance(blob, bytes):
                words = _words(blob)
                payload[senders.index(self._rank), : len(words)] = words
            payload = self._reduce(payload, what, number)
            return {rank: _unwords(row, int(lengths[rank])) for rank, row in zip(senders, payload, strict=True)}

    def _on(self) -> str:
        return f"on rank {self._rank} (world_size={self._world_size}, timeout={self._timeout:g} s)"

    def _reduce(self, matrix: np.ndarray[Any, Any], what: str, number: int) -> np.ndarray[Any, Any]:
        """The sum of every worker's ``matrix`` (of the same shape on every worker)."""
        tf = self._tf
        try:
            value = tf.constant(matrix, dtype=tf.int32)
            total = self._strategy.extended.reduce_to(
                tf.distribute.ReduceOp.SUM, value, destinations=value, options=self._options
            )
            result: np.ndarray[Any, Any] = np.asarray(total.numpy()).reshape(matrix.shape)
            return result
        except Exception as exc:
            cause = _describe_tf_error(exc)
            self._broken = f"{what} #{number} failed: {cause}"
            self._failure = exc
            raise CoordinatorError(f"{what} #{number} failed {self._on()}: {cause}") from exc

    def _check_in_step(self, headers: np.ndarray[Any, Any], op: int, arg: int, number: int, what: str) -> None:
        """Every rank called the same collective: same kind, argument and number."""
        expected = (op, arg, number % 2**31)
        calls = [(int(h[0]), int(h[1]), int(h[3])) for h in headers]
        if all(call == expected for call in calls):
            return
        called = ", ".join(
            f"rank {rank}: {_OP_NAMES.get(o, f'op {o}')}"
            + (f"(src={a})" if o == _BROADCAST else "")
            + f" #{n}"
            for rank, (o, a, n) in enumerate(calls)
        )
        cause = f"the workers called different collectives ({called})"
        self._broken = f"{what} #{number} failed: {cause}"
        raise CoordinatorError(f"{what} #{number} failed {self._on()}: {cause}")

    def __repr__(self) -> str:
        state = "broken" if self._broken is not None else f"round {self._round}"
        return (
            f"MultiWorkerCoordinator(rank={self._rank}, world_size={self._world_size}, "
            f"timeout={self._timeout:g}, {state})"
        )
