"""PyTorch state (modules, optimizers, LR schedulers, GradScalers) as ckptmgr state trees.

``to_tree`` turns ``state_dict()`` output into a tree ckptmgr can save: tensors become
NumPy arrays (bfloat16 and float8 through ml_dtypes), dicts with int keys (an
optimizer's ``state``) and a module's version ``_metadata`` are encoded so that
``from_tree`` gives back what ``load_state_dict`` expects. Nothing here calls
``torch.load`` or unpickles anything: checkpoints stay data, never code.

Example:

>>> import torch, ckptmgr, tempfile
>>> from ckptmgr.adapters import torch as ckpt_torch
>>> model = torch.nn.Linear(3, 2)
>>> opt = torch.optim.Adam(model.parameters(), lr=0.01)
>>> model(torch.ones(4, 3)).sum().backward(); opt.step()
>>> with ckptmgr.CheckpointManager(tempfile.mkdtemp()) as mgr:
...     _ = mgr.save(1, ckpt_torch.to_tree({"model": model, "opt": opt}))
...     tree = mgr.restore()
>>> model2 = torch.nn.Linear(3, 2)
>>> opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
>>> ckpt_torch.load_tree({"model": model2, "opt": opt2}, tree)
>>> torch.equal(model2.weight, model.weight), opt2.param_groups[0]["lr"]
(True, 0.01)

On the way back every NumPy array becomes a tensor (on ``device``, CPU by default:
``load_state_dict`` moves the values where the parameters live).

:class:`TorchCoordinator` lets the ranks of a ``torchrun`` job share one checkpoint
manager (``CheckpointManager(directory, coordinator=TorchCoordinator())``).
"""

from __future__ import annotations

import collections
import datetime
import importlib
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from ckptmgr.coordinator import CoordinatorBase, decode_message, encode_message
from ckptmgr.errors import CoordinatorError

__all__ = ["TorchCoordinator", "from_numpy", "from_tree", "load_tree", "to_numpy", "to_tree"]

_T = TypeVar("_T")

# Reserved keys in encoded dicts. A dict whose keys are not all str (an optimizer's
# per-parameter ``state``) becomes {_ITEMS: [(key, value), ...]}; a state_dict's
# ``_metadata`` attribute (module versions, read by load_state_dict) rides along
# under _METADATA.
_ITEMS = "__ckptmgr_items__"
_METADATA = "__ckptmgr_metadata__"
_RESERVED_PREFIX = "__ckptmgr_"

# Torch dtypes NumPy lacks, stored as the ml_dtypes type of the same name, through an
# integer view of the same width.
_ML_DTYPES = {
    "bfloat16": "int16",
    "float8_e4m3fn": "uint8",
    "float8_e4m3fnuz": "uint8",
    "float8_e5m2": "uint8",
    "float8_e5m2fnuz": "uint8",
    "float8_e8m0fnu": "uint8",
}


def _torch() -> Any:
    return importlib.import_module("torch")


def _ml_dtypes(needed_for: str) -> Any:
    try:
        return importlib.import_module("ml_dtypes")
    except ImportError:
        raise TypeError(f"Converting {needed_for} tensors needs the ml_dtypes package (pip install ml_dtypes)") from None


def to_numpy(tensor: Any) -> np.ndarray[Any, Any]:
    """A NumPy copy of a dense tensor (any device), bit for bit.

    >>> import torch
    >>> from ckptmgr.adapters.torch import to_numpy
    >>> array = to_numpy(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    >>> array.dtype.name, array.astype("float32").tolist()
    ('bfloat16', [1.5, -2.0])

    Raises:
        TypeError: a sparse, quantized or complex32 tensor, or bfloat16/float8
            without ml_dtypes installed.
    """
    torch = _torch()
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"Expected a torch.Tensor. Received: {type(tensor).__qualname__}")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise TypeError(
            f"Expected a dense tensor. Received: layout={tensor.layout}, dtype={tensor.dtype} "
            "(convert it, e.g. with .to_dense() or .dequantize())"
        )
    name = str(tensor.dtype).removeprefix("torch.")
    on_cpu = tensor.device.type == "cpu"
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg()
    if name in _ML_DTYPES:
        ml_dtypes = _ml_dtypes(name)
        if not hasattr(ml_dtypes, name):
            raise TypeError(f"Expected a tensor dtype this ml_dtypes knows. Received: {tensor.dtype}")
        array = tensor.view(getattr(torch, _ML_DTYPES[name])).numpy().view(getattr(ml_dtypes, name))
    else:
        try:
            array = tensor.numpy()
        except TypeError as exc:
            raise TypeError(f"Expected a tensor with a NumPy dtype. Received: {tensor.dtype} ({exc})") from None
    # A CPU tensor's .numpy() shares its memory; the tree must not change with the model.
    return array.copy() if on_cpu else np.ascontiguousarray(array)


def from_numpy(array: np.ndarray[Any, Any], *, device: Any = None) -> Any:
    """A tensor holding a copy of ``array`` (ml_dtypes bfloat16/float8 included).

    >>> import numpy as np
    >>> from ckptmgr.adapters.torch import from_numpy
    >>> from_numpy(np.arange(3, dtype=np.int16))
    tensor([0, 1, 2], dtype=torch.int16)

    Raises:
        TypeError: a dtype torch has no equivalent for.
    """
    torch = _torch()
    array = np.asarray(array)
    name = array.dtype.name
    if name in _ML_DTYPES and array.dtype.type.__module__.startswith("ml_dtypes"):
        if not hasattr(torch, name):
            raise TypeError(f"Expected a dtype this torch supports. Received: {array.dtype}")
        raw = np.array(array.view(np.dtype(_ML_DTYPES[name])), order="C", copy=True)
        tensor = torch.from_numpy(raw).view(getattr(torch, name))
    else:
        try:
            tensor = torch.from_numpy(np.array(array, order="C", copy=True))
        except TypeError as exc:
            raise TypeError(f"Expected an array of a dtype torch supports. Received: {array.dtype} ({exc})") from None
    return tensor if device is None else tensor.to(device)


def to_tree(obj: Any) -> Any:
    """A ckptmgr state tree of ``obj``: a state dict, or anything with ``state_dict()``.

    Containers are walked: ``{"model": model, "opt": opt, "epoch": 3}`` becomes
    ``{"model": <model tree>, "opt": <optimizer tree>, "epoch": 3}``. Tensors become
    NumPy arrays (copies); dicts with non-str keys, ``OrderedDict``s and their
    ``_metadata`` are encoded for :func:`from_tree`.

    >>> import torch
    >>> from ckptmgr.adapters.torch import to_tree
    >>> to_tree({"step": torch.tensor(3), "state": {0: 1.5}})
    {'step': array(3), 'state': {'__ckptmgr_items__': [(0, 1.5)]}}

    Raises:
        TypeError: a value with no tree form (the message names its path), e.g. a
            ``torch.device`` or a sparse tensor.
        ValueError: a str dict key starting with ``"__ckptmgr_"`` (reserved).
    """
    return _encode(obj, ())


def from_tree(tree: Any, *, device: Any = None) -> Any:
    """The inverse of :func:`to_tree`: arrays become tensors (on ``device``), dicts come back.

    >>> import torch
    >>> from ckptmgr.adapters.torch import from_tree, to_tree
    >>> state = from_tree(to_tree(torch.nn.Linear(2, 1).state_dict()))
    >>> sorted(state), type(state["weight"]).__name__
    (['bias', 'weight'], 'Tensor')
    """
    return _decode(tree, device)


def load_tree(obj: Any, tree: Any) -> None:
    """Load ``tree`` (from :func:`to_tree`) into ``obj`` in place.

    ``obj`` mirrors what was given to ``to_tree``: objects with ``load_state_dict``
    get ``load_state_dict(from_tree(...))`` (strict, for modules), tensors are copied
    into, dicts, lists and tuples are walked (keys of ``obj`` missing from ``tree`` are
    an error; extra keys in ``tree``, such as an ``"epoch"`` counter, are left for the
    caller).

    Raises:
        ValueError: ``tree`` lacks a key or item that ``obj`` has, or a tensor's shape
            differs.
        TypeError: a value of ``obj`` that cannot be loaded into (e.g. an int).
        RuntimeError: ``load_state_dict`` rejects the state (missing or unexpected
            keys, shape mismatch).
    """
    _load(obj, tree, ())


def _path(where: tuple[Any, ...]) -> str:
    return "tree" + "".join(f"[{key!r}]" for key in where)


def _encode(value: Any, where: tuple[Any, ...]) -> Any:
    torch = _torch()
    if value is None or type(value) in (bool, int, float, complex, str, bytes):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        return value
    if isinstance(value, torch.Tensor):
        try:
            return to_numpy(value)
        except TypeError as exc:
            raise TypeError(f"At {_path(where)}: {exc}") from None
    if isinstance(value, Mapping):
        return _encode_dict(value, where)
    if isinstance(value, (list, tuple)):
        items = [_encode(item, (*where, i)) for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if callable(getattr(value, "state_dict", None)):
        return _encode(value.state_dict(), where)
    if isinstance(value, (bool, int, float, str)):  # subclasses, e.g. an IntEnum
        return _plain_scalar(value)
    raise TypeError(
        f"Expected tensors, containers, numbers, str, bytes, None or objects with state_dict() "
        f"at {_path(where)}. Received: {type(value).__module__}.{type(value).__qualname__}"
    )


def _plain_scalar(value: Any) -> Any:
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    raise AssertionError(value)  # unreachable: callers check isinstance first


def _encode_dict(value: Mapping[Any, Any], where: tuple[Any, ...]) -> dict[str, Any]:
    plain = all(type(key) is str for key in value)
    for key in value:
        if type(key) is str and key.startswith(_RESERVED_PREFIX):
            raise ValueError(f"Expected dict keys not starting with {_RESERVED_PREFIX!r}. Received: {_path((*where, key))}")
    out: dict[str, Any]
    if plain:
        out = {key: _encode(item, (*where, key)) for key, item in value.items()}
    else:
        out = {_ITEMS: [(_encode_key(key, where), _encode(item, (*where, key))) for key, item in value.items()]}
    metadata = getattr(value, "_metadata", None)
    if isinstance(metadata, Mapping):
        out[_METADATA] = _encode(metadata, (*where, "_metadata"))
    return out


def _encode_key(key: Any, where: tuple[Any, ...]) -> Any:
    if key is None or type(key) in (bool, int, float, str, bytes):
        return key
    if type(key) is tuple:
        return tuple(_encode_key(k, where) for k in key)
    raise TypeError(f"Expected dict keys of type int, float, str, bytes, bool, None or tuple at {_path(where)}. Received: {key!r}")


def _decode(value: Any, device: Any) -> Any:
    if isinstance(value, np.ndarray):
        return from_numpy(value, device=device)
    if isinstance(value, dict):
        metadata = value.get(_METADATA)
        if _ITEMS in value:
            out: dict[Any, Any] = {key: _decode(item, device) for key, item in value[_ITEMS]}
        else:
            out = {key: _decode(item, device) for key, item in value.items() if key != _METADATA}
        if metadata is None:
            return out
        ordered: Any = collections.OrderedDict(out)
        ordered._metadata = collections.OrderedDict(_decode(metadata, device))
        return ordered
    if isinstance(value, list):
        return [_decode(item, device) for item in value]
    if isinstance(value, tuple):
        return tuple(_decode(item, device) for item in value)
    return value


def _load(obj: Any, tree: Any, where: tuple[Any, ...]) -> None:
    torch = _torch()
    if isinstance(obj, torch.Tensor):
        if not isinstance(tree, np.ndarray) or tuple(tree.shape) != tuple(obj.shape):
            raise ValueError(
                f"Expected an array of shape {tuple(obj.shape)} at {_path(where)}. "
                f"Received: {type(tree).__name__} of shape {getattr(tree, 'shape', None)}"
            )
        with torch.no_grad():
            obj.copy_(from_numpy(tree))
        return
    if callable(getattr(obj, "load_state_dict", None)) and not isinstance(obj, Mapping):
        obj.load_state_dict(_decode(tree, None))
        return
    if isinstance(obj, Mapping):
        if not isinstance(tree, dict):
            raise ValueError(f"Expected a dict at {_path(where)}. Received: {type(tree).__name__}")
        missing = [key for key in obj if key not in tree]
        if missing:
            raise ValueError(f"Expected keys {sorted(map(str, obj))} at {_path(where)}. Received: no {missing[0]!r}")
        for key, item in obj.items():
            _load(item, tree[key], (*where, key))
        return
    if isinstance(obj, (list, tuple)):
        if not isinstance(tree, (list, tuple)) or len(tree) != len(obj):
            raise ValueError(
                f"Expected a sequence of {len(obj)} items at {_path(where)}. Received: {type(tree).__name__} "
                f"of {len(tree) if isinstance(tree, (list, tuple)) else '?'}"
            )
        for i, (item, sub) in enumerate(zip(obj, tree, strict=True)):
            _load(item, sub, (*where, i))
        return
    raise TypeError(
        f"Expected a tensor, a container, or an object with load_state_dict() at {_path(where)}. "
        f"Received: {type(obj).__module__}.{type(obj).__qualname__} (it cannot be loaded in place)"
    )


# ------------------------------------------------------------------------- coordinator


class TorchCoordinator(CoordinatorBase):
    """The :class:`ckptmgr.coordinator.Coordinator` protocol over ``torch.distributed``.

    Lets the processes of a ``torchrun`` job share one
    :class:`ckptmgr.CheckpointManager` (``coordinator=TorchCoordinator()``). Messages
    are small JSON values, sent as their JSON text in ``uint8`` CPU tensors (never
    pickled: ``broadcast_object_list`` and ``all_gather_object`` are not used), over a
    gloo process group of the coordinator's own, made with ``torch.distributed.new_group``
    at construction. So it works in NCCL jobs too (its messages stay on the CPU), its
    ``timeout`` applies whatever the default group's is, and its collectives never mix
    with the training's.

    The constructor is itself a collective: every rank of the job calls it at the same
    point of its program, with the same ``group`` (``new_group`` requires every process
    of the job, even those outside ``group``; a rank outside ``group`` passes what
    ``new_group`` returned there, and gets :class:`ValueError` after its part). Then
    every rank of the group calls ``barrier``, ``broadcast`` and ``all_gather`` in the
    same order; at most one of them runs at a time in a process (calls from several
    threads are serialised).

    A collective that fails (a peer exited, or stalled past ``timeout``) raises
    :class:`ckptmgr.CoordinatorError` naming the operation, the rank, the world size and
    the timeout, chained from torch's error; the coordinator is then broken, and every
    later call raises :class:`ckptmgr.CoordinatorError` at once. A rank that raises
    before its collective (a ``value`` that is not JSON) leaves the others waiting
    until their timeout.

    Example, in a script started with ``torchrun --nproc_per_node=2 train.py``::

        import socket
        import torch.distributed as dist
        import ckptmgr
        from ckptmgr.adapters.torch import TorchCoordinator

        dist.init_process_group("nccl")  # or "gloo": the coordinator talks over gloo anyway
        coordinator = TorchCoordinator(timeout=120)  # every rank, at the same point
        plan = coordinator.broadcast({"resume": 1200} if coordinator.rank == 0 else None)
        hosts = coordinator.all_gather(socket.gethostname())  # indexed by rank
        coordinator.barrier()
        with ckptmgr.CheckpointManager("/shared/ckpt", coordinator=coordinator) as manager:
            ...  # every rank calls save() and restore() at the same points
        dist.destroy_process_group()  # all groups, the coordinator's included

    Call ``torch.distributed.destroy_process_group()`` before the script ends: a process
    that exits with gloo groups alive may abort in their destructors ("terminate called
    without an active exception", pytorch/pytorch#190489).

    Args:
        group: the ranks to coordinate, as a ``torch.distributed`` process group (its
            ranks, in its order: ``rank`` here is the rank in ``group``). None: every
            rank of the job.
        timeout: seconds (or a ``datetime.timedelta``) a collective waits for the other
            ranks before raising; also bounds the wait in the constructor.

    Raises:
        ValueError: ``torch.distributed`` is not initialized (call
            ``torch.distributed.init_process_group`` first), ``timeout`` is not a number
            of seconds > 0, ``group`` is not a process group, or this rank is outside
            ``group``.
        CoordinatorError: creating the coordinator's group failed (a peer did not
            construct its coordinator within ``timeout``).
    """

    def __init__(self, group: Any = None, *, timeout: float | datetime.timedelta = 300.0) -> None:
        seconds = _timeout_seconds(timeout)
        dist = _distributed()
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "Expected torch.distributed to be initialized: call torch.distributed.init_process_group() "
                "first (e.g. in a script started by torchrun). Received: no default process group"
            )
        job_rank, job_size = int(dist.get_rank()), int(dist.get_world_size())
        outside = group is dist.GroupMember.NON_GROUP_MEMBER
        ranks: list[int] | None
        if group is None:
            ranks = None
        elif outside:
            # new_group must still be entered here, so that every rank of the job
            # numbers its groups alike. A non-member's call does the same whatever the
            # members are (new_group takes [] for the default group: pass the others).
            ranks = [r for r in range(job_size) if r != job_rank]
        elif isinstance(group, dist.ProcessGroup):
            ranks = [int(r) for r in dist.get_process_group_ranks(group)]
        else:
            raise ValueError(
                "Expected group to be a torch.distributed process group or None. "
                f"Received: {type(group).__module__}.{type(group).__qualname__}"
            )
        options: dict[str, Any] = {}
        if ranks and ranks != sorted(ranks):
            options["sort_ranks"] = False  # keep the group's rank order, so rank means the same
        try:
            own = dist.new_group(
                ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=seconds), **options
            )
        except Exception as exc:
            raise CoordinatorError(
                f"TorchCoordinator: creating its gloo group failed on rank {job_rank} of the job's "
                f"{job_size} (timeout {seconds:g} s): {_describe(exc)}. Every rank must construct its "
                "coordinator at the same point"
            ) from exc
        if outside or own is dist.GroupMember.NON_GROUP_MEMBER or own is None:
            raise ValueError(
                f"Expected this process to be a member of group. Received: rank {job_rank} of the job, "
                "outside the group (torch.distributed.new_group returned GroupMember.NON_GROUP_MEMBER here)"
            )
        self._torch = _torch()
        self._dist = dist
        self._group = own
        self._ranks = [int(r) for r in dist.get_process_group_ranks(own)]
        self._rank = int(dist.get_rank(own))
        self._world_size = int(dist.get_world_size(own))
        self._timeout = seconds
        self._lock = threading.Lock()
        self._broken: str | None = None

    @property
    def process_group(self) -> Any:
        """The coordinator's own gloo process group (for inspection; send nothing on it)."""
        return self._group

    def __repr__(self) -> str:
        state = ", broken" if self._broken is not None else ""
        return f"TorchCoordinator(rank={self._rank}, world_size={self._world_size}, timeout={self._timeout:g}{state})"

    def barrier(self) -> None:
        """Return once every rank has called it.

        Raises:
            CoordinatorError: a peer exited or stalled past ``timeout``, or the
                coordinator is broken by an earlier failure.
        """
        self._collective("barrier", lambda: self._dist.barrier(group=self._group))

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value``, on every rank (the others pass anything, e.g. None).

        Every rank gets the value as JSON gives it back (tuples become lists, dict keys
        str), rank ``src`` included.

        Raises:
            TypeError: on rank ``src``, ``value`` is not a JSON value (raised before
                anything is sent; the other ranks then wait until their timeout).
            ValueError: ``src`` is not a rank in ``range(world_size)``.
            CoordinatorError: a peer exited or stalled past ``timeout``, a malformed
                message, or the coordinator is broken by an earlier failure.
        """
        if type(src) is not int or not 0 <= src < self._world_size:
            raise ValueError(f"Expected src to be a rank in range({self._world_size}). Received: src={src!r}")
        blob = encode_message(value) if src == self._rank else b""
        torch, dist, group, source = self._torch, self._dist, self._group, self._ranks[src]

        def exchange() -> Any:
            length = torch.tensor([len(blob)], dtype=torch.int64)
            dist.broadcast(length, src=source, group=group)
            if src == self._rank:
                data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            else:
                data = torch.empty(int(length.item()), dtype=torch.uint8)
            dist.broadcast(data, src=source, group=group)
            return decode_message(data.numpy().tobytes())

        return self._collective("broadcast", exchange)

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, indexed by rank, on every rank (as JSON gives them back).

        Raises:
            TypeError: ``value`` is not a JSON value (raised before anything is sent;
                the other ranks then wait until their timeout).
            CoordinatorError: a peer exited or stalled past ``timeout``, a malformed
                message, or the coordinator is broken by an earlier failure.
        """
        blob = encode_message(value)
        torch, dist, group, size = self._torch, self._dist, self._group, self._world_size

        def exchange() -> list[Any]:
            # Tensors of one all_gather have one shape: gather the lengths, then the
            # messages padded to the longest.
            lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
            dist.all_gather(lengths, torch.tensor([len(blob)], dtype=torch.int64), group=group)
            sizes = [int(length.item()) for length in lengths]
            longest = max(sizes)
            padded = torch.frombuffer(bytearray(blob) + bytes(longest - len(blob)), dtype=torch.uint8)
            gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(size)]
            dist.all_gather(gathered, padded, group=group)
            return [decode_message(data[:n].numpy().tobytes()) for data, n in zip(gathered, sizes, strict=True)]

        return self._collective("all_gather", exchange)

    def _collective(self, what: str, exchange: Callable[[], _T]) -> _T:
        where = f"rank {self._rank} of {self._world_size} (timeout {self._timeout:g} s)"
        with self._lock:
            if self._broken is not None:
                raise CoordinatorError(
                    f"TorchCoordinator {what} on {where}: the coordinator is broken by an earlier failure "
                    f"({self._broken}); a job whose peer failed cannot continue"
                )
            try:
                return exchange()
            except Exception as exc:
                self._broken = f"{what}: {_describe(exc)}"
                raise CoordinatorError(
                    f"TorchCoordinator {what} failed on {where}: {_describe(exc)}. A peer process exited, "
                    "stalled past the timeout or sent something else; this coordinator is now broken"
                ) from exc
            except BaseException as exc:  # e.g. KeyboardInterrupt mid-collective: out of step
                self._broken = f"{what}: interrupted by {type(exc).__name__}"
                raise


def _distributed() -> Any:
    return importlib.import_module("torch.distributed")


def _timeout_seconds(timeout: Any) -> float:
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f"Expected timeout to be a finite number of seconds > 0 or a datetime.timedelta. Received: timeout={timeout!r}"
        )
    return seconds


def _describe(exc: BaseException) -> str:
    """``exc`` in one line, without the C++ source location gloo puts in front."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    text = text.split(". This is typically caused by", 1)[0]  # gloo's boilerplate advice
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
