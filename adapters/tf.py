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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["load_tree", "to_tree"]


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
