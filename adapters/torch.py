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
"""

from __future__ import annotations

import collections
import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["from_numpy", "from_tree", "load_tree", "to_numpy", "to_tree"]

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
