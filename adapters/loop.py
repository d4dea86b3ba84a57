"""Exact, pre-emptible resume for hand-written training loops.

Three pieces, usable together (:class:`TrainingLoop`) or alone:

- :func:`capture_rng` / :func:`restore_rng`: the state of every random number generator
  a loop draws from, as a ckptmgr state tree, in one call. Global generators are
  captured for Python's ``random``, NumPy's legacy ``np.random``, and, when already
  imported, TensorFlow (``tf.random.get_global_generator()``, once it exists), Keras (the global
  ``SeedGenerator`` behind ``keras.random.*(seed=None)``) and PyTorch (CPU, and CUDA
  once initialised). Generator objects you pass by name are captured too:
  ``random.Random``, ``np.random.Generator``/``BitGenerator``/``RandomState``,
  ``tf.random.Generator``, ``keras.random.SeedGenerator`` and ``torch.Generator``.
- Pre-emption: inside ``with TrainingLoop(...)``, SIGTERM and SIGINT no longer kill the
  process. The current step finishes, :meth:`TrainingLoop.step_done` saves it with
  ``force=True``, waits for the write and exits with :data:`PREEMPTED_EXIT_CODE`.
  A second signal ends the process at once (the checkpoint being written is then
  simply not committed; the previous ones are intact).
- :meth:`TrainingLoop.resume`: the step to continue from and the state, with the RNG
  state of that step restored.

Not captured: TensorFlow's legacy op-level seeds (``tf.random.set_seed`` with
``tf.random.uniform`` and friends) have no readable state; draw from a
``tf.random.Generator`` or use stateless ops instead. A JAX PRNG key is an array:
keep it in the state tree, like NumPy and JAX pytrees (``jax.device_get(tree)``).

Bit-identical resume also needs deterministic kernels
(``tf.config.experimental.enable_op_determinism()``,
``torch.use_deterministic_algorithms(True)``) and data read in the same order.
"""

from __future__ import annotations

import importlib
import logging
import random
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any, Literal

import numpy as np

import ckptmgr

__all__ = ["FRAMEWORKS", "PREEMPTED_EXIT_CODE", "Framework", "TrainingLoop", "capture_rng", "restore_rng"]

#: Exit status after a pre-emption save: 75 is ``EX_TEMPFAIL`` of ``sysexits.h``
#: ("temporary failure, try again"). It tells a supervisor that the run stopped
#: cleanly with its checkpoint committed and should be restarted, as opposed to
#: 0 (finished) or 128 + N (killed by signal N before it could save).
PREEMPTED_EXIT_CODE = 75

Framework = Literal["python", "numpy", "tensorflow", "keras", "torch"]
FRAMEWORKS: tuple[Framework, ...] = ("python", "numpy", "tensorflow", "keras", "torch")

_log = logging.getLogger(__name__)

_KERAS_GLOBAL_SEED_GENERATOR = "global_seed_generator"


# ------------------------------------------------------------------------ RNG state


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
    >>> from ckptmgr.adapters.loop import capture_rng, restore_rng
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
    named = _named_generators(generators)
    tree: dict[str, Any] = {}
    for name in _resolve_frameworks(frameworks):
        tree[name] = _CAPTURE[name]()
    tree["generators"] = {key: _capture_generator(key, gen) for key, gen in named.items()}
    return tree


def restore_rng(tree: Mapping[str, Any], generators: Mapping[str, Any] | Sequence[Any] | None = None) -> None:
    """Put back the generator states that :func:`capture_rng` captured.

    Every global generator in ``tree`` is restored (importing its framework if
    needed); ``generators`` must name the same generators as at capture time.

    Example:

    >>> import random
    >>> from ckptmgr.adapters.loop import capture_rng, restore_rng
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
    named = _named_generators(generators)
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


def _resolve_frameworks(frameworks: Collection[Framework] | Literal["auto"]) -> list[Framework]:
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


def _named_generators(generators: Mapping[str, Any] | Sequence[Any] | None) -> dict[str, Any]:
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


# ---------------------------------------------------------------------- the loop


class TrainingLoop:
    """Exact resume and pre-emption saves for a hand-written training loop.

    ``resume()`` returns the step to continue from and the state, with the random
    number generators put back as they were at that step. ``step_done(step, state)``,
    called after every step, saves whenever the manager's ``save_every`` policy says
    so, each checkpoint holding ``{"step": step, "state": state, "rng": ...}``.

    Inside ``with TrainingLoop(...)``, SIGTERM and SIGINT (``signals=``) only set a
    flag: the current step finishes, and the next ``step_done`` saves it with
    ``force=True``, waits until it is committed, closes the manager and raises
    ``SystemExit(exit_code)`` (:data:`PREEMPTED_EXIT_CODE` unless told otherwise; with
    ``exit_code=None`` it returns instead and :attr:`preempted` tells the loop to
    stop). A second signal ends the process at once, by the operating system's default
    action, even in the middle of that save. Leaving the block restores the previous
    handlers; a signal that arrived after the last ``step_done`` is then delivered to
    them; the handlers of signals the loop acted on are not called. Signals ignored
    (``SIG_IGN``) when the block is entered stay ignored. The handlers can only be
    installed in the main thread, where Python runs them.

    Example (the signal is what a scheduler would send):

    >>> import ckptmgr, numpy as np, signal, tempfile
    >>> from ckptmgr.adapters.loop import TrainingLoop
    >>> data_rng = np.random.default_rng(0)
    >>> mgr = ckptmgr.CheckpointManager(tempfile.mkdtemp(), save_every=ckptmgr.EverySteps(100))
    >>> with mgr, TrainingLoop(mgr, generators={"data": data_rng}, exit_code=None) as loop:
    ...     step, state = loop.resume(lambda: {"w": np.zeros(3)})
    ...     while step < 1000 and not loop.preempted:
    ...         state["w"] += data_rng.normal(size=3)
    ...         step += 1
    ...         if step == 250:
    ...             signal.raise_signal(signal.SIGTERM)
    ...         _ = loop.step_done(step, state)
    >>> step, [c.step for c in mgr.checkpoints]
    (250, [100, 200, 250])

    A new process continues from there, drawing the same random numbers:

    >>> with ckptmgr.CheckpointManager(mgr.directory) as mgr2:
    ...     step, state = TrainingLoop(mgr2, generators={"data": data_rng}).resume()
    >>> step
    250

    Args:
        manager: the checkpoint manager; its ``save_every`` decides which steps are
            saved (None: every step).
        generators: generator objects the loop draws from, by name (see
            :func:`capture_rng`); restored in place by ``resume()``.
        frameworks: whose global generators to capture (see :func:`capture_rng`).
        signals: the signals that mean "save and stop"; ``()`` installs no handler.
        exit_code: the exit status after a pre-emption save, or None to return from
            ``step_done`` and let the loop stop by itself.

    Raises:
        ValueError: bad arguments ("Expected ... Received: ...").
    """

    def __init__(
        self,
        manager: ckptmgr.CheckpointManager,
        *,
        generators: Mapping[str, Any] | Sequence[Any] | None = None,
        frameworks: Collection[Framework] | Literal["auto"] = "auto",
        signals: Collection[int] = (signal.SIGTERM, signal.SIGINT),
        exit_code: int | None = PREEMPTED_EXIT_CODE,
    ) -> None:
        if not isinstance(manager, ckptmgr.CheckpointManager):
            raise ValueError(f"Expected manager to be a ckptmgr.CheckpointManager. Received: manager={_short(manager)}")
        self._generators = _named_generators(generators)
        _resolve_frameworks(frameworks)
        self._frameworks = frameworks
        self._signals = tuple(dict.fromkeys(_check_signal(s) for s in signals))
        if exit_code is not None and (
            isinstance(exit_code, bool) or not isinstance(exit_code, int) or not 0 <= exit_code <= 255
        ):
            raise ValueError(f"Expected exit_code to be an int in [0, 255] or None. Received: exit_code={exit_code!r}")
        self._manager = manager
        self._exit_code = exit_code
        self._previous: dict[signal.Signals, Any] = {}
        self._installed = False
        self._received: signal.Signals | None = None
        self._acted = False

    @property
    def manager(self) -> ckptmgr.CheckpointManager:
        """The checkpoint manager."""
        return self._manager

    @property
    def preempted(self) -> bool:
        """Whether one of ``signals`` arrived: the loop should save and stop."""
        return self._received is not None

    @property
    def received_signal(self) -> signal.Signals | None:
        """The first of ``signals`` that arrived, or None."""
        return self._received

    def __repr__(self) -> str:
        return f"TrainingLoop({str(self._manager.directory)!r}, preempted={self.preempted})"

    # ------------------------------------------------------------------- resuming

    def resume(self, init: Callable[[], Any] | None = None) -> tuple[int, Any]:
        """The step to continue from and the state: from the latest good checkpoint, or new.

        With a checkpoint of step ``s``, returns ``(s, its state)`` and restores the
        random number generators to what they were when it was saved. Without one,
        returns ``(0, init())`` (``(0, None)`` without ``init``) and touches no
        generator. Steps count the steps done: continue with step ``s + 1``.

        Raises:
            ValueError: the checkpoint was not written by a TrainingLoop, or its
                generators do not match ``generators``.
            CorruptCheckpointError: checkpoints exist but none verifies.
            CheckpointIOError: a file could not be read.
        """
        missing = object()
        tree = self._manager.restore_or_initialize(lambda: missing)
        if tree is missing:
            return 0, (init() if init is not None else None)
        if not (isinstance(tree, dict) and set(tree) == {"step", "state", "rng"} and type(tree["step"]) is int):
            raise ValueError(
                "Expected a checkpoint saved by TrainingLoop, a dict with keys 'step', 'state' and 'rng'. "
                f"Received: {_short(sorted(tree) if isinstance(tree, dict) else tree)} in {self._manager.directory}"
            )
        restore_rng(tree["rng"], self._generators)
        return tree["step"], tree["state"]

    # --------------------------------------------------------------------- saving

    def save(
        self,
        step: int,
        state: Any | Callable[[], Any],
        *,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> ckptmgr.CheckpointInfo | None:
        """Save ``state`` and the RNG state as the checkpoint of ``step``, if the policy says so.

        Args:
            step: the number of steps done.
            state: the state tree, or a function returning it, called only when a
                checkpoint is written (to skip building it on other steps).
            metrics: passed to :meth:`ckptmgr.CheckpointManager.save`.
            force: save whatever the policy says (end of training).

        Returns:
            The new checkpoint's info, or None when the policy skipped the step.

        Raises:
            Whatever :meth:`ckptmgr.CheckpointManager.save` raises.
        """
        # Without metrics there is nothing to record on a skipped step, so skip the
        # RNG capture (and building the state) when the policy would skip it anyway.
        if not force and not metrics and not self._manager.should_save(step):
            return None
        tree = state() if callable(state) else state
        checkpoint = {"step": step, "state": tree, "rng": capture_rng(self._generators, frameworks=self._frameworks)}
        return self._manager.save(step, checkpoint, metrics=metrics, force=force)

    def step_done(
        self,
        step: int,
        state: Any | Callable[[], Any],
        *,
        metrics: Mapping[str, float] | None = None,
    ) -> ckptmgr.CheckpointInfo | None:
        """End of a step: save if the policy says so; after a signal, save and stop.

        After one of ``signals``: saves ``step`` with ``force=True``, waits for the
        write, logs it, and, unless ``exit_code`` is None, closes the manager and
        raises ``SystemExit(exit_code)``.

        Args:
            step: the number of steps done (1 after the first step).
            state: the state tree, or a function returning it (see :meth:`save`).
            metrics: passed to :meth:`ckptmgr.CheckpointManager.save`.

        Returns:
            The new checkpoint's info, or None when the policy skipped the step.

        Raises:
            SystemExit: after a pre-emption save (``exit_code``).
            Whatever :meth:`ckptmgr.CheckpointManager.save` raises.
        """
        received = self._received
        if received is None:
            return self.save(step, state, metrics=metrics)
        self._acted = True
        info = self.save(step, state, metrics=metrics, force=True)
        self._manager.wait()
        _log.warning(
            "ckptmgr: %s received; saved step %d in %s%s",
            received.name, step, self._manager.directory,
            "" if self._exit_code is None else f"; exiting with status {self._exit_code}",
        )
        if self._exit_code is not None:
            self._manager.close()
            raise SystemExit(self._exit_code)
        return info

    # -------------------------------------------------------------------- signals

    def __enter__(self) -> TrainingLoop:
        if self._installed:
            raise RuntimeError("Expected a TrainingLoop to be entered once at a time. Received: a nested `with`")
        if self._signals:
            thread = threading.current_thread()
            if thread is not threading.main_thread():
                raise RuntimeError(
                    "Expected `with TrainingLoop(...)` in the main thread: Python runs signal handlers "
                    f"only there, so pre-emption cannot be caught from another. Received: thread {thread.name!r}. "
                    "Run the training loop in the main thread, or pass signals=() to go without "
                    "pre-emption handling."
                )
        self._received = None
        self._acted = False
        self._previous = {}
        try:
            for signum in self._signals:
                if signal.getsignal(signum) == signal.SIG_IGN:
                    # Ignored on purpose (SIGINT of a job a shell script starts in the
                    # background, SIGHUP under nohup): it stays ignored.
                    continue
                self._previous[signum] = signal.signal(signum, self._on_signal)
        except (ValueError, OSError) as exc:
            self._restore_handlers()
            raise RuntimeError(f"Cannot install the pre-emption signal handlers: {exc}") from exc
        self._installed = True
        return self

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            # None: the handler was not installed from Python; the default is the best guess.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._installed = False
        self._restore_handlers()
        if self._received is not None and not self._acted and exc_type is None:
            # Arrived after the last step_done: nothing was saved for it, so the
            # signal goes to whoever handled it before, as if we had never been here.
            signal.raise_signal(self._received)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._received is None:
            self._received = signal.Signals(signum)
            # The next signal must end the process even while the main thread is inside
            # C code (an HDF5 write), where Python-level handlers cannot run.
            for other in self._previous:
                signal.signal(other, signal.SIG_DFL)


def _check_signal(signum: object) -> signal.Signals:
    try:
        if isinstance(signum, bool) or not isinstance(signum, int):
            raise ValueError
        sig = signal.Signals(signum)
    except ValueError:
        raise ValueError(
            f"Expected signals to hold signal numbers such as signal.SIGTERM. Received: {signum!r}"
        ) from None
    if sig in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None)):
        raise ValueError(f"Expected signals that can be caught. Received: {sig.name}")
    return sig
