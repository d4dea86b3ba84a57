"""Random number generator state, for every framework, as a ckptmgr state tree.

:func:`capture_rng` returns the state of every random number generator a training run
draws from, in one call, as a tree of NumPy arrays and scalars that any
:class:`ckptmgr.CheckpointManager` saves; :func:`restore_rng` puts it back. Used by
:class:`ckptmgr.adapters.loop.TrainingLoop` (each checkpoint holds it) and by
:class:`ckptmgr.adapters.keras.BackupAndRestore` (each backup holds it).

Global generators are captured for Python's ``random``, NumPy's legacy ``np.random``,
and, when already imported, TensorFlow (``tf.random.get_global_generator()``, once it
exists), Keras (the global ``SeedGenerator`` behind ``keras.random.*(seed=None)``,
whatever Keras' backend: TensorFlow, JAX or PyTorch) and PyTorch (CPU, and CUDA once
initialised). Generator objects passed by name are captured too: ``random.Random``,
``np.random.Generator``/``BitGenerator``/``RandomState``, ``tf.random.Generator``,
``keras.random.SeedGenerator`` and ``torch.Generator``.

Not captured: TensorFlow's legacy op-level seeds (``tf.random.set_seed`` with
``tf.random.uniform`` and friends) have no readable state; draw from a
``tf.random.Generator`` or use stateless ops instead. JAX has no global generator: a
JAX PRNG key is an array, so keep it in the state tree, like NumPy and JAX pytrees
(``jax.device_get(tree)``); Keras on JAX draws from Keras' global ``SeedGenerator``,
which is captured.
"""

from __future__ import annotations

import importlib
import random
import sys
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

import numpy as np

import ckptmgr

__all__ = ["FRAMEWORKS", "Framework", "capture_rng", "named_generators", "resolve_frameworks", "restore_rng"]

#: The global generators :func:`capture_rng` knows, by name, in capture order.
Framework = Literal["python", "numpy", "tensorflow", "keras", "torch"]
FRAMEWORKS: tuple[Framework, ...] = ("python", "numpy", "tensorflow", "keras", "torch")

_KERAS_GLOBAL_SEED_GENERATOR = "global_seed_generator"



def capture_rng(
    generators: Mapping[str, Any] | Sequence[Any] | None = None,
    *,
    frameworks: Collection[Framework] | Literal["auto"] = "auto",
) -> dict[str, Any]:
    """The state of the global random number generators and of ``generators``, as a tree.

    The tree holds only NumPy arrays, ints, floats, str and None, so it can be saved
    by any :class:`ckptmgr.CheckpointManager`; :func:`restore_rng` puts it back.

    Example:

    >>> import random, numpy as np
    >>> from ckptmgr.adapters.rng import capture_rng, restore_rng
    >>> data_rng = np.random.default_rng(0)
    >>> saved = capture_rng({"data": data_rng}, frameworks=("python", "numpy"))
    >>> first = (random.random(), np.random.rand(), data_rng.random())
    >>> restore_rng(saved, {"data": data_rng})
    >>> (random.random(), np.random.rand(), data_rng.random()) == first
    True

    Args:
        generators: generator objects to capture, by name (a sequence is named by
            position): ``random.Random``, ``np.random.Generator``, ``BitGenerator``,
            ``RandomState``, ``tf.random.Generator``, ``keras.random.SeedGenerator``,
            ``torch.Generator``.
        frameworks: the global generators to capture. ``"auto"``: Python's and
            NumPy's, plus TensorFlow's, Keras's and PyTorch's for those already
            imported (capturing never imports a framework). A collection of names
            from ``FRAMEWORKS`` imports the ones it names.

    Returns:
        ``{"python": ..., "numpy": ..., [framework: ...,] "generators": {name: ...}}``.

    Raises:
        ValueError: an unknown framework name, or a generator of an unsupported type.
        ImportError: ``frameworks`` names a framework that is not installed.
    """
    named = named_generators(generators)
    tree: dict[str, Any] = {}
    for name in resolve_frameworks(frameworks):
        tree[name] = _CAPTURE[name]()
    tree["generators"] = {key: _capture_generator(key, gen) for key, gen in named.items()}
    return tree


def restore_rng(tree: Mapping[str, Any], generators: Mapping[str, Any] | Sequence[Any] | None = None) -> None:
    """Put back the generator states that :func:`capture_rng` captured.

    Every global generator in ``tree`` is restored (importing its framework if
    needed); ``generators`` must name the same generators as at capture time.

    Example:

    >>> import random
    >>> from ckptmgr.adapters.rng import capture_rng, restore_rng
    >>> rng = random.Random(7)
    >>> saved = capture_rng([rng], frameworks=())
    >>> draws = [rng.random() for _ in range(3)]
    >>> restore_rng(saved, [rng])
    >>> [rng.random() for _ in range(3)] == draws
    True

    Args:
        tree: what :func:`capture_rng` returned (possibly after a save and restore).
        generators: the generator objects to restore in place, named as at capture.

    Raises:
        ValueError: ``tree`` is not an RNG tree, or its generators do not match
            ``generators`` (names, types or algorithms).
        ImportError: ``tree`` holds the state of a framework that is not installed.
    """
    if not isinstance(tree, Mapping) or not isinstance(tree.get("generators", {}), Mapping):
        raise ValueError(f"Expected a tree returned by capture_rng. Received: tree={_short(tree)}")
    unknown = [key for key in tree if key not in FRAMEWORKS and key != "generators"]
    if unknown:
        raise ValueError(
            f"Expected a tree returned by capture_rng (keys from {[*FRAMEWORKS, 'generators']}). "
            f"Received: keys {unknown}"
        )
    named = named_generators(generators)
    saved = dict(tree.get("generators", {}))
    if sorted(saved) != sorted(named):
        raise ValueError(
            f"Expected the generators captured with this state: {sorted(saved)}. "
            f"Received: generators named {sorted(named)}"
        )
    # Check every generator before changing any, so a mismatch changes nothing.
    for key, gen in named.items():
        _check_generator_state(key, gen, saved[key])
    for name in FRAMEWORKS:
        if name in tree:
            _RESTORE[name](tree[name])
    for key, gen in named.items():
        _restore_generator(gen, saved[key])


def resolve_frameworks(frameworks: Collection[Framework] | Literal["auto"]) -> list[Framework]:
    """The global generators ``frameworks`` names (see :func:`capture_rng`), in capture order.

    Raises:
        ValueError: not "auto" nor a collection of names from :data:`FRAMEWORKS`.
    """
    if isinstance(frameworks, str):
        if frameworks != "auto":
            raise ValueError(
                f"Expected frameworks to be 'auto' or a collection of names from {list(FRAMEWORKS)}. "
                f"Received: frameworks={frameworks!r}"
            )
        # Only frameworks already imported (a None entry in sys.modules blocks an import).
        return [name for name in FRAMEWORKS if name in ("python", "numpy") or sys.modules.get(name) is not None]
    chosen = list(frameworks)
    bad = [name for name in chosen if name not in FRAMEWORKS]
    if bad:
        raise ValueError(
            f"Expected frameworks to be 'auto' or a collection of names from {list(FRAMEWORKS)}. "
            f"Received: frameworks={frameworks!r}"
        )
    return [name for name in FRAMEWORKS if name in chosen]


def named_generators(generators: Mapping[str, Any] | Sequence[Any] | None) -> dict[str, Any]:
    """``generators`` by name (a sequence is named by position), each checked to be of a known kind.

    Raises:
        ValueError: not a mapping, a sequence or None; a name that is not a str; a
            generator of an unsupported type.
    """
    if generators is None:
        return {}
    if isinstance(generators, Mapping):
        named = dict(generators)
        bad_keys = [key for key in named if not isinstance(key, str)]
        if bad_keys:
            raise ValueError(f"Expected generator names to be str. Received: {bad_keys[0]!r}")
    elif isinstance(generators, Sequence) and not isinstance(generators, (str, bytes)):
        named = {str(i): gen for i, gen in enumerate(generators)}
    else:
        raise ValueError(
            "Expected generators to be a mapping of names to generators, a sequence of "
            f"generators, or None. Received: generators={_short(generators)}"
        )
    for key, gen in named.items():
        _generator_kind(key, gen)
    return named


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Global generators. Each capture returns a tree; each restore takes it back.


def _capture_python() -> dict[str, Any]:
    return _python_state(random.getstate())


def _python_state(state: tuple[Any, ...]) -> dict[str, Any]:
    version, internal, gauss_next = state
    # 625 words as one array: one dataset in the checkpoint, not 625.
    return {"version": version, "internal": np.array(internal, dtype=np.uint32), "gauss_next": gauss_next}


def _python_tuple(tree: Mapping[str, Any]) -> tuple[Any, ...]:
    return (int(tree["version"]), tuple(int(x) for x in np.asarray(tree["internal"])), tree["gauss_next"])


def _restore_python(tree: Mapping[str, Any]) -> None:
    random.setstate(_python_tuple(tree))


def _capture_numpy() -> dict[str, Any]:
    state = np.random.get_state(legacy=False)
    assert isinstance(state, dict)
    return state


def _restore_numpy(tree: Mapping[str, Any]) -> None:
    np.random.set_state(dict(tree))


def _tf_global_generator(tf: Any) -> Any:
    """TensorFlow's global generator if it exists, or None; never creates one.

    ``tf.random.get_global_generator()`` would create it from a non-deterministic seed,
    and refuses to under ``enable_op_determinism()``, hence the module attribute.
    """
    try:
        return importlib.import_module("tensorflow.python.ops.stateful_random_ops").global_generator
    except (ImportError, AttributeError):  # another TF layout: the public way
        try:
            return tf.random.get_global_generator()
        except RuntimeError:
            return None


def _capture_tensorflow() -> dict[str, Any]:
    gen = _tf_global_generator(importlib.import_module("tensorflow"))
    return {"global_generator": None if gen is None else _tf_generator_state(gen)}


def _restore_tensorflow(tree: Mapping[str, Any]) -> None:
    saved = tree["global_generator"]
    if saved is None:
        return  # the saved run had not used it yet
    tf = importlib.import_module("tensorflow")
    gen = _tf_global_generator(tf)
    if gen is None:
        tf.random.set_global_generator(tf.random.Generator.from_state(saved["state"], saved["algorithm"]))
        return
    _check_tf_generator("tensorflow global generator", gen, saved)
    gen.state.assign(saved["state"])


def _tf_generator_state(gen: Any) -> dict[str, Any]:
    return {"algorithm": int(gen.algorithm), "state": np.array(gen.state.numpy())}


def _check_tf_generator(where: str, gen: Any, saved: Mapping[str, Any]) -> None:
    if int(gen.algorithm) != saved["algorithm"] or tuple(gen.state.shape) != np.shape(saved["state"]):
        raise ValueError(
            f"Expected {where} to use RNG algorithm {saved['algorithm']} with a state of shape "
            f"{np.shape(saved['state'])}, as saved. Received: algorithm {int(gen.algorithm)}, "
            f"shape {tuple(gen.state.shape)}"
        )


def _keras_global_state() -> Any:
    """Keras's module holding its global state, or None if this Keras lacks one."""
    try:
        return importlib.import_module("keras.src.backend.common.global_state")
    except ImportError:  # Keras 2, or a layout this adapter does not know
        return None


def _capture_keras() -> dict[str, Any]:
    # Keras 3 keeps the generator behind keras.random.*(seed=None) in a private global;
    # it is created on first use, so "none yet" is a state too.
    module = _keras_global_state()
    gen = module.get_global_attribute(_KERAS_GLOBAL_SEED_GENERATOR) if module is not None else None
    return {"global_seed_generator": None if gen is None else np.array(gen.state.numpy())}


def _restore_keras(tree: Mapping[str, Any]) -> None:
    module = _keras_global_state()
    if module is None:
        return
    saved = tree["global_seed_generator"]
    if saved is None:
        # Recreated on next use from Python's (restored) random module, as in the saved run.
        module.set_global_attribute(_KERAS_GLOBAL_SEED_GENERATOR, None)
        return
    seed_generator = importlib.import_module("keras.src.random.seed_generator")
    seed_generator.global_seed_generator().state.assign(saved)


def _capture_torch() -> dict[str, Any]:
    torch = importlib.import_module("torch")
    tree: dict[str, Any] = {"cpu": torch.get_rng_state().numpy().copy()}
    # Only when CUDA is already in use: capturing must not initialise a device.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tree["cuda"] = [state.numpy().copy() for state in torch.cuda.get_rng_state_all()]
    return tree


def _restore_torch(tree: Mapping[str, Any]) -> None:
    torch = importlib.import_module("torch")
    torch.set_rng_state(torch.from_numpy(np.array(tree["cpu"], dtype=np.uint8)))
    cuda = tree.get("cuda")
    if cuda is None:
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count != len(cuda):
        warnings.warn(
            f"ckptmgr: the checkpoint holds the RNG state of {len(cuda)} CUDA devices, this process "
            f"sees {count}; restoring {min(count, len(cuda))}, so the resumed run will draw different "
            "CUDA random numbers",
            ckptmgr.CheckpointWarning,
            stacklevel=3,
        )
    for device, state in enumerate(cuda[:count]):
        torch.cuda.set_rng_state(torch.from_numpy(np.array(state, dtype=np.uint8)), device)


_CAPTURE: dict[str, Callable[[], Any]] = {
    "python": _capture_python,
    "numpy": _capture_numpy,
    "tensorflow": _capture_tensorflow,
    "keras": _capture_keras,
    "torch": _capture_torch,
}
_RESTORE: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "python": _restore_python,
    "numpy": _restore_numpy,
    "tensorflow": _restore_tensorflow,
    "keras": _restore_keras,
    "torch": _restore_torch,
}


# Generator objects. A framework's types are looked up only if it is already imported:
# an object of that framework cannot exist otherwise.


def _module_attr(module: str, *names: str) -> Any:
    obj = sys.modules.get(module)
    for name in names:
        obj = getattr(obj, name, None)
    return obj


def _generator_kind(key: str, gen: Any) -> str:
    if isinstance(gen, random.Random) and not isinstance(gen, random.SystemRandom):
        return "python"
    if isinstance(gen, np.random.Generator):
        return "numpy.Generator"
    if isinstance(gen, np.random.BitGenerator):
        return "numpy.BitGenerator"
    if isinstance(gen, np.random.RandomState):
        return "numpy.RandomState"
    tf_generator = _module_attr("tensorflow", "random", "Generator")
    if isinstance(tf_generator, type) and isinstance(gen, tf_generator):
        return "tensorflow.Generator"
    seed_generator = _module_attr("keras", "random", "SeedGenerator")
    if isinstance(seed_generator, type) and isinstance(gen, seed_generator):
        return "keras.SeedGenerator"
    torch_generator = _module_attr("torch", "Generator")
    if isinstance(torch_generator, type) and isinstance(gen, torch_generator):
        return "torch.Generator"
    raise ValueError(
        "Expected a random.Random, np.random.Generator, BitGenerator or RandomState, "
        "tf.random.Generator, keras.random.SeedGenerator or torch.Generator. "
        f"Received: generators[{key!r}]={_short(gen)}"
    )


def _capture_generator(key: str, gen: Any) -> dict[str, Any]:
    kind = _generator_kind(key, gen)
    state: Any
    if kind == "python":
        state = _python_state(gen.getstate())
    elif kind == "numpy.Generator":
        state = gen.bit_generator.state
    elif kind == "numpy.BitGenerator":
        state = gen.state
    elif kind == "numpy.RandomState":
        state = gen.get_state(legacy=False)
    elif kind == "tensorflow.Generator":
        state = _tf_generator_state(gen)
    elif kind == "keras.SeedGenerator":
        state = np.array(gen.state.numpy())
    else:  # torch.Generator
        state = {"device": str(gen.device), "state": gen.get_state().numpy().copy()}
    return {"kind": kind, "state": state}


def _check_generator_state(key: str, gen: Any, saved: Any) -> None:
    kind = _generator_kind(key, gen)
    if not isinstance(saved, Mapping) or saved.get("kind") != kind:
        raise ValueError(
            f"Expected generators[{key!r}] to be a {saved.get('kind') if isinstance(saved, Mapping) else '?'}, "
            f"as saved. Received: {kind} {_short(gen)}"
        )
    state = saved["state"]
    if kind in ("numpy.Generator", "numpy.BitGenerator"):
        bit_generator = gen.bit_generator if kind == "numpy.Generator" else gen
        if state.get("bit_generator") != type(bit_generator).__name__:
            raise ValueError(
                f"Expected generators[{key!r}] to use a {state.get('bit_generator')} bit generator, "
                f"as saved. Received: {type(bit_generator).__name__}"
            )
    elif kind == "tensorflow.Generator":
        _check_tf_generator(f"generators[{key!r}]", gen, state)
    elif kind == "torch.Generator" and str(gen.device) != state["device"]:
        raise ValueError(
            f"Expected generators[{key!r}] to be a generator of device {state['device']}, as saved. "
            f"Received: device {gen.device}"
        )


def _restore_generator(gen: Any, saved: Mapping[str, Any]) -> None:
    kind, state = saved["kind"], saved["state"]
    if kind == "python":
        gen.setstate(_python_tuple(state))
    elif kind == "numpy.Generator":
        gen.bit_generator.state = dict(state)
    elif kind == "numpy.BitGenerator":
        gen.state = dict(state)
    elif kind == "numpy.RandomState":
        gen.set_state(dict(state))
    elif kind in ("tensorflow.Generator",):
        gen.state.assign(state["state"])
    elif kind == "keras.SeedGenerator":
        gen.state.assign(state)
    else:  # torch.Generator
        torch = importlib.import_module("torch")
        gen.set_state(torch.from_numpy(np.array(state["state"], dtype=np.uint8)))


