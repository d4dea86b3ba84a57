"""Exact, pre-emptible resume for hand-written training loops.

Three pieces, usable together (:class:`TrainingLoop`) or alone:

- :func:`capture_rng` / :func:`restore_rng` (from :mod:`ckptmgr.adapters.rng`, and
  importable from here): the state of every random number generator a loop draws
  from, as a ckptmgr state tree, in one call: Python's ``random``, NumPy's legacy
  ``np.random``, and, when already imported, TensorFlow, Keras and PyTorch, plus the
  generator objects you pass by name.
- Pre-emption: inside ``with TrainingLoop(...)``, SIGTERM and SIGINT no longer kill the
  process. The current step finishes, :meth:`TrainingLoop.step_done` saves it with
  ``force=True``, waits for the write and exits with :data:`PREEMPTED_EXIT_CODE`.
  A second signal ends the process at once (the checkpoint being written is then
  simply not committed; the previous ones are intact).
- :meth:`TrainingLoop.resume`: the step to continue from and the state, with the RNG
  state of that step restored.

What is not captured (TensorFlow's legacy op-level seeds; JAX keys, which belong in
the state tree) is listed in :mod:`ckptmgr.adapters.rng`.

Bit-identical resume also needs deterministic kernels
(``tf.config.experimental.enable_op_determinism()``,
``torch.use_deterministic_algorithms(True)``) and data read in the same order.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any, Literal

import numpy as np

import ckptmgr

from .rng import FRAMEWORKS, Framework, _short, capture_rng, named_generators, resolve_frameworks, restore_rng

__all__ = ["FRAMEWORKS", "PREEMPTED_EXIT_CODE", "Framework", "TrainingLoop", "capture_rng", "restore_rng"]

#: Exit status after a pre-emption save: 75 is ``EX_TEMPFAIL`` of ``sysexits.h``
#: ("temporary failure, try again"). It tells a supervisor that the run stopped
#: cleanly with its checkpoint committed and should be restarted, as opposed to
#: 0 (finished) or 128 + N (killed by signal N before it could save).
PREEMPTED_EXIT_CODE = 75

_log = logging.getLogger(__name__)


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
        self._generators = named_generators(generators)
        resolve_frameworks(frameworks)
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
        self._peers: list[int] = []  # other ranks that received one of the signals

    @property
    def manager(self) -> ckptmgr.CheckpointManager:
        """The checkpoint manager."""
        return self._manager

    @property
    def preempted(self) -> bool:
        """Whether one of ``signals`` arrived (in a job of several processes: at any
        rank, as the last ``step_done`` found): the loop should save and stop."""
        return self._received is not None or bool(self._peers)

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
        if not (isinstance(tree, dict) and set(tree) == {"step", "state", "rng"}):
            raise ValueError(
                "Expected a checkpoint saved by TrainingLoop, a dict with keys 'step', 'state' and 'rng'. "
                f"Received: {_short(sorted(tree) if isinstance(tree, dict) else tree)} in {self._manager.directory}"
            )
        step = tree["step"]
        # (A NumPy integer: a step saved as given, before save() took its int.)
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
            raise ValueError(
                "Expected a checkpoint saved by TrainingLoop, its 'step' an int. "
                f"Received: step={_short(step)} in {self._manager.directory}"
            )
        restore_rng(tree["rng"], self._generators)
        return int(step), tree["state"]

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
        # A NumPy integer (np.arange's) is stored as the int it is; anything else the manager checks.
        step = int(step) if isinstance(step, np.integer) else step  # type: ignore[unreachable]
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

        With a manager that has a coordinator (a job of several processes) it is a
        collective, every rank calls it for every step: a signal at any rank makes
        every rank save the same step and stop (one small all-gather per call).

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
        coordinator = self._manager.coordinator
        if coordinator is not None:
            heard = coordinator.all_gather(None if received is None else received.name)
            self._peers = [rank for rank, name in enumerate(heard) if name is not None and rank != coordinator.rank]
        if received is None and not self._peers:
            return self.save(step, state, metrics=metrics)
        self._acted = received is not None
        info = self.save(step, state, metrics=metrics, force=True)
        self._manager.wait()
        _log.warning(
            "ckptmgr: %s received; saved step %d in %s%s",
            received.name if received is not None else f"a signal at rank(s) {self._peers}",
            step, self._manager.directory,
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
