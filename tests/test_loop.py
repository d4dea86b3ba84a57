"""ckptmgr.adapters.loop: RNG capture/restore, TrainingLoop resume, pre-emption signals.

RNG capture/restore lives in ckptmgr.adapters.rng (shared with the Keras backup); these
tests import it through ckptmgr.adapters.loop, which re-exports it.

The crash tests run real child processes (tests/_loop_child.py and the NumPy example),
kill them with SIGKILL or signal them at random steps, and require the result to be
bit-identical to an uninterrupted run. CKPTMGR_TEST_SEED replays an interruption plan.
"""

from __future__ import annotations

import doctest
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _loop_harness import (
    PREEMPTED,
    Child,
    assert_identical,
    assert_same_training,
    child_env,
    final_tree,
    plan_seed,
    random_plan,
    run_interrupted,
)

import ckptmgr
from ckptmgr.adapters import loop as loop_module
from ckptmgr.adapters import rng as rng_module
from ckptmgr.adapters.loop import PREEMPTED_EXIT_CODE, TrainingLoop, capture_rng, restore_rng

# ----------------------------------------------------------------------------- RNG

GENERATORS: dict[str, Callable[[], Any]] = {
    "random.Random": lambda: random.Random(1),
    "Generator(PCG64)": lambda: np.random.default_rng(2),
    "Generator(MT19937)": lambda: np.random.Generator(np.random.MT19937(3)),
    "Generator(Philox)": lambda: np.random.Generator(np.random.Philox(4)),
    "Generator(SFC64)": lambda: np.random.Generator(np.random.SFC64(5)),
    "Generator(PCG64DXSM)": lambda: np.random.Generator(np.random.PCG64DXSM(6)),
    "BitGenerator(PCG64)": lambda: np.random.PCG64(7),
    "RandomState": lambda: np.random.RandomState(8),
}


def draw(gen: Any) -> list[float]:
    """A few draws that also exercise the cached Gaussian / half-used 32-bit word states."""
    if isinstance(gen, random.Random):
        return [gen.random(), gen.gauss(0, 1), float(gen.getrandbits(70))]
    if isinstance(gen, np.random.BitGenerator):
        return [float(x) for x in gen.random_raw(3)]
    if isinstance(gen, np.random.RandomState):
        return [*gen.standard_normal(3), *gen.randint(0, 2**31, 2)]
    return [*gen.standard_normal(3), *gen.integers(0, 2**31, 3, dtype=np.uint32), *gen.random(2)]


def roundtrip(tree: Any, tmp_path: Path) -> Any:
    """Through a real checkpoint file, as in a resumed process."""
    with ckptmgr.CheckpointManager(tmp_path / "rng") as mgr:
        mgr.save(0, tree)
        return mgr.restore()


@pytest.mark.parametrize("make", GENERATORS.values(), ids=GENERATORS.keys())
def test_generator_state_survives_a_checkpoint(make: Callable[[], Any], tmp_path: Path) -> None:
    gen = make()
    draw(gen)  # leave a half-used state behind
    draw(gen)
    saved = roundtrip(capture_rng({"g": gen}, frameworks=()), tmp_path)
    expected = draw(gen) + draw(gen)
    fresh = make()  # a new process builds its generators anew, then restores them
    restore_rng(saved, {"g": fresh})
    assert draw(fresh) + draw(fresh) == expected


def test_global_generators_survive_a_checkpoint(tmp_path: Path) -> None:
    random.seed(11)
    np.random.seed(12)
    random.gauss(0, 1)  # a cached second Gaussian is part of the state
    np.random.standard_normal()
    saved = roundtrip(capture_rng(frameworks=("python", "numpy")), tmp_path)
    expected = [random.random(), random.gauss(0, 1), *np.random.standard_normal(3), np.random.rand()]
    random.seed(0)
    np.random.seed(0)
    restore_rng(saved)
    assert [random.random(), random.gauss(0, 1), *np.random.standard_normal(3), np.random.rand()] == expected


def test_loop_reexports_the_rng_module() -> None:
    for name in ("FRAMEWORKS", "Framework", "capture_rng", "restore_rng"):
        assert name in loop_module.__all__ and getattr(loop_module, name) is getattr(rng_module, name)
    assert rng_module.FRAMEWORKS == ("python", "numpy", "tensorflow", "keras", "torch")


def test_capture_rng_tree_layout() -> None:
    gen = np.random.default_rng(0)
    tree = capture_rng([gen, random.Random(1)], frameworks=("numpy",))
    assert list(tree) == ["numpy", "generators"]
    assert list(tree["generators"]) == ["0", "1"]
    assert tree["generators"]["0"]["kind"] == "numpy.Generator"
    assert tree["generators"]["1"]["kind"] == "python"
    assert tree["generators"]["1"]["state"]["internal"].dtype == np.uint32  # one array, not 625 ints


def test_auto_captures_python_and_numpy_and_imported_frameworks_only() -> None:
    tree = capture_rng()
    assert {"python", "numpy", "generators"} <= set(tree)
    for framework in ("tensorflow", "torch"):
        assert (framework in tree) == (sys.modules.get(framework) is not None)


def test_adapters_import_and_work_without_tensorflow_or_torch(tmp_path: Path) -> None:
    # A None entry in sys.modules makes "import torch" fail, as if it were not installed.
    code = """
import sys
for name in ("tensorflow", "torch", "keras", "ml_dtypes"):
    sys.modules[name] = None
import ckptmgr.adapters.loop as loop, ckptmgr.adapters.rng, ckptmgr.adapters.tf, ckptmgr.adapters.torch
print(sorted(loop.capture_rng()))
try:
    loop.capture_rng(frameworks=("torch",))
except ImportError:
    print("ImportError")
"""
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["['generators', 'numpy', 'python']", "ImportError"], out.stderr


@pytest.mark.parametrize(
    ("saved_with", "restored_with", "message"),
    [
        pytest.param({"a": random.Random(0)}, {"b": random.Random(0)}, "generators captured with this state: ['a']", id="names"),
        pytest.param({"a": random.Random(0)}, {"a": np.random.default_rng(0)}, "to be a python", id="kind"),
        pytest.param(
            {"a": np.random.default_rng(0)}, {"a": np.random.Generator(np.random.MT19937(0))},
            "PCG64 bit generator", id="bit-generator",
        ),
    ],
)
def test_restore_rng_rejects_other_generators_and_changes_nothing(
    saved_with: dict[str, Any], restored_with: dict[str, Any], message: str
) -> None:
    random.seed(5)
    saved = capture_rng(saved_with, frameworks=("python",))
    random.seed(6)
    expected = random.getstate()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        restore_rng(saved, restored_with)
    assert random.getstate() == expected


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: capture_rng(frameworks="everything"), "Expected frameworks", id="frameworks-str"),
        pytest.param(lambda: capture_rng(frameworks=("jax",)), "Expected frameworks", id="frameworks-name"),
        pytest.param(lambda: capture_rng({"sys": random.SystemRandom()}), r"generators\['sys'\]", id="system-random"),
        pytest.param(lambda: capture_rng({"x": object()}), "Expected a random.Random", id="object"),
        pytest.param(lambda: capture_rng("abc"), "Expected generators", id="str"),  # type: ignore[arg-type]
        pytest.param(lambda: restore_rng({"jax": 1}), "Expected a tree returned by capture_rng", id="tree-keys"),
        pytest.param(lambda: restore_rng([1]), "Expected a tree returned by capture_rng", id="tree-type"),  # type: ignore[arg-type]
    ],
)
def test_rng_functions_reject_bad_arguments(call: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# -------------------------------------------------------------------- TrainingLoop


@pytest.fixture(autouse=True)
def usual_signal_handlers() -> Iterator[None]:
    """SIGTERM and SIGINT as in a terminal, whatever the runner inherited (a background
    job has SIGINT ignored, and TrainingLoop leaves ignored signals alone)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@pytest.fixture
def mgr(tmp_path: Path) -> Iterator[ckptmgr.CheckpointManager]:
    with ckptmgr.CheckpointManager(tmp_path / "ckpt", save_every=ckptmgr.EverySteps(10)) as manager:
        yield manager


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"manager": "runs/x"}, "Expected manager to be a ckptmgr.CheckpointManager", id="manager"),
        pytest.param({"exit_code": 256}, r"exit_code to be an int in \[0, 255\]", id="exit-code-range"),
        pytest.param({"exit_code": True}, "exit_code", id="exit-code-bool"),
        pytest.param({"signals": [signal.SIGKILL]}, "signals that can be caught. Received: SIGKILL", id="sigkill"),
        pytest.param({"signals": ["SIGTERM"]}, "signal numbers", id="signal-name"),
        pytest.param({"generators": {"x": 3}}, r"generators\['x'\]=3", id="generator"),
        pytest.param({"frameworks": ("tensorflow", "jax")}, "Expected frameworks", id="frameworks"),
    ],
)
def test_training_loop_validates_arguments(mgr: ckptmgr.CheckpointManager, kwargs: dict[str, Any], message: str) -> None:
    kwargs = {"manager": mgr, **kwargs}
    with pytest.raises(ValueError, match=message):
        TrainingLoop(**kwargs)


def test_resume_fresh_then_from_checkpoint_restores_rng(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    gen = np.random.default_rng(0)
    with ckptmgr.CheckpointManager(directory, save_every=ckptmgr.EverySteps(3)) as mgr:
        loop = TrainingLoop(mgr, generators={"data": gen})
        assert loop.resume() == (0, None)
        step, state = loop.resume(lambda: {"w": np.zeros(2)})
        assert step == 0
        while step < 7:
            state["w"] += gen.normal(size=2)
            step += 1
            loop.step_done(step, state)
        expected_next = gen.normal(size=2)
    assert [c.step for c in ckptmgr.CheckpointManager(directory, read_only=True).checkpoints] == [3, 6]

    gen2 = np.random.default_rng(99)
    with ckptmgr.CheckpointManager(directory) as mgr:
        step, state = TrainingLoop(mgr, generators={"data": gen2}).resume()
    assert step == 6
    state["w"] += gen2.normal(size=2)  # step 7 again, from the checkpoint of step 6
    np.testing.assert_array_equal(gen2.normal(size=2), expected_next)


def test_numpy_integer_steps_are_saved_as_ints_and_resumed(tmp_path: Path) -> None:
    with ckptmgr.CheckpointManager(tmp_path, save_every=ckptmgr.EverySteps(2)) as mgr:
        loop = TrainingLoop(mgr)
        for step in np.arange(1, 5):  # np.int64 steps
            loop.step_done(step, {"w": float(step)})
    with ckptmgr.CheckpointManager(tmp_path) as mgr:
        step, state = TrainingLoop(mgr).resume()
        assert type(step) is int and (step, state) == (4, {"w": 4.0})
        assert type(mgr.restore()["step"]) is int
        # A checkpoint that stored the NumPy integer as given (before save() took its int) resumes too.
        mgr.save(6, {"step": np.int64(6), "state": {"w": 6.0}, "rng": mgr.restore()["rng"]})
        step, _ = TrainingLoop(mgr).resume()
        assert type(step) is int and step == 6


def test_resume_rejects_a_checkpoint_not_written_by_training_loop(mgr: ckptmgr.CheckpointManager) -> None:
    mgr.save(5, {"w": np.zeros(2)}, force=True)
    with pytest.raises(ValueError, match=r"Expected a checkpoint saved by TrainingLoop.*Received: \['w'\]"):
        TrainingLoop(mgr).resume()


def test_checkpoint_layout_and_lazy_state(mgr: ckptmgr.CheckpointManager) -> None:
    loop = TrainingLoop(mgr, frameworks=("numpy",))
    calls = []

    def state() -> dict[str, int]:
        calls.append(1)
        return {"x": 1}

    for step in range(1, 21):
        loop.step_done(step, state)
    assert len(calls) == 2  # built on steps 10 and 20 only
    tree = mgr.restore()
    assert sorted(tree) == ["rng", "state", "step"]
    assert tree["step"] == 20 and tree["state"] == {"x": 1} and sorted(tree["rng"]) == ["generators", "numpy"]
    assert loop.save(21, state, force=True) is not None and mgr.latest is not None and mgr.latest.step == 21


def test_handlers_installed_inside_and_restored_after(mgr: ckptmgr.CheckpointManager) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with TrainingLoop(mgr, signals=(signal.SIGTERM, signal.SIGUSR1)):
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGUSR1) != before[signal.SIGUSR1]
        assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]  # not asked for
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_the_current_step_and_exits(mgr: ckptmgr.CheckpointManager, signum: signal.Signals) -> None:
    before = signal.getsignal(signum)
    gen = np.random.default_rng(0)
    state = {"w": np.zeros(3)}
    with pytest.raises(SystemExit) as exited, TrainingLoop(mgr, generators=[gen]) as loop:
        for step in range(1, 100):
            state["w"] += gen.normal(size=3)
            if step == 13:
                signal.raise_signal(signum)  # what a scheduler, or Ctrl-C, does mid-step
                assert loop.preempted and loop.received_signal == signum
            loop.step_done(step, state)
    assert exited.value.code == PREEMPTED_EXIT_CODE == PREEMPTED
    assert signal.getsignal(signum) == before
    assert [c.step for c in mgr.checkpoints] == [10, 13]  # 13: forced, off the every-10 policy
    with pytest.raises(ckptmgr.CheckpointError, match="closed"):
        mgr.save(14, state)
    with ckptmgr.CheckpointManager(mgr.directory) as reopened:
        gen2 = np.random.default_rng(1)
        step, restored = TrainingLoop(reopened, generators=[gen2]).resume()
    assert step == 13
    np.testing.assert_array_equal(restored["w"], state["w"])
    np.testing.assert_array_equal(gen2.normal(size=3), gen.normal(size=3))


def test_exit_code_none_returns_and_the_loop_stops_itself(mgr: ckptmgr.CheckpointManager) -> None:
    with TrainingLoop(mgr, exit_code=None) as loop:
        step = 0
        while step < 100 and not loop.preempted:
            step += 1
            if step == 4:
                signal.raise_signal(signal.SIGTERM)
            info = loop.step_done(step, {"step": step})
    assert step == 4 and info is not None and info.step == 4
    assert mgr.latest is not None and mgr.latest.step == 4  # committed, and the manager is still open
    mgr.save(5, {"step": 5}, force=True)


def test_ignored_signals_stay_ignored(mgr: ckptmgr.CheckpointManager) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    with TrainingLoop(mgr, signals=(signal.SIGTERM, signal.SIGUSR1)) as loop:
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        signal.raise_signal(signal.SIGUSR1)
        assert not loop.preempted
        loop.step_done(1, {"x": 1})
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


def test_signal_after_the_last_step_goes_to_the_previous_handler(mgr: ckptmgr.CheckpointManager) -> None:
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with TrainingLoop(mgr) as loop:
            loop.step_done(1, {"x": 1})
            signal.raise_signal(signal.SIGTERM)  # during, say, the final evaluation
            assert received == []
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_with_an_exception_in_flight_is_not_redelivered(mgr: ckptmgr.CheckpointManager) -> None:
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with pytest.raises(KeyError), TrainingLoop(mgr):
            signal.raise_signal(signal.SIGTERM)
            raise KeyError("boom")
        assert received == []
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_entering_outside_the_main_thread_explains_itself(mgr: ckptmgr.CheckpointManager) -> None:
    errors: list[BaseException] = []
    without_signals: list[int] = []

    def worker() -> None:
        try:
            with TrainingLoop(mgr):
                pass
        except RuntimeError as exc:
            errors.append(exc)
        with TrainingLoop(mgr, signals=()) as loop:  # no pre-emption handling: fine anywhere
            loop.step_done(10, {"x": 1})
            without_signals.append(1)

    thread = threading.Thread(target=worker, name="trainer")
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert "main thread" in str(errors[0]) and "'trainer'" in str(errors[0]) and "signals=()" in str(errors[0])
    assert without_signals == [1]


def test_nested_with_is_refused(mgr: ckptmgr.CheckpointManager) -> None:
    loop = TrainingLoop(mgr)
    with loop, pytest.raises(RuntimeError, match="entered once"), loop:
        pass


@pytest.mark.parametrize("module", [loop_module, rng_module], ids=["loop", "rng"])
def test_docstring_examples(module: Any) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 5


# ------------------------------------------------------------- child processes


def test_every_generator_kind_resumes_bit_identical_after_kills_and_signals(tmp_path: Path) -> None:
    seed = plan_seed()
    plan = random_plan(random.Random(seed), ["kill", "term", "kill", "int", "kill"], 3, 30)
    argv = ["tests/_loop_child.py", "--steps", "200", "--save-every", "7"]
    reference = Child([*argv, str(tmp_path / "ref")], tmp_path / "ref.log")
    run_interrupted([*argv, str(tmp_path / "run")], tmp_path / "run.log", plan=plan, save_every=7, seed=seed)
    assert reference.wait() == 0, reference.describe()
    assert_identical(final_tree(tmp_path / "run"), final_tree(tmp_path / "ref"))


def test_numpy_example_resumes_bit_identical_after_kills_and_sigterm(tmp_path: Path) -> None:
    seed = plan_seed()
    plan = random_plan(random.Random(seed), ["kill", "kill", "term", "kill"], 5, 60)
    argv = ["examples/numpy_loop.py", "--steps", "300", "--save-every", "9"]
    reference = Child([*argv, str(tmp_path / "ref")], tmp_path / "ref.log")
    run = run_interrupted([*argv, str(tmp_path / "run")], tmp_path / "run.log", plan=plan, save_every=9, seed=seed)
    assert reference.wait() == 0, reference.describe()
    assert len(run.history) >= 2
    assert_same_training(final_tree(tmp_path / "run"), final_tree(tmp_path / "ref"))


def test_second_signal_during_the_preemption_save_exits_at_once_and_leaves_the_directory_consistent(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "run"
    argv = ["tests/_loop_child.py", "--steps", "60", "--save-every", "5"]
    child = Child([*argv, "--block-in-preemption-save", str(directory)], tmp_path / "run.log", stdin=True, deadline=30)
    assert child.start_step() == 0
    assert child.read_until(r"step 12$") is not None
    child.proc.send_signal(signal.SIGTERM)
    assert child.read_until("blocked in a save after a signal") is not None, child.describe()
    child.proc.send_signal(signal.SIGTERM)  # the save is half-written now
    assert child.wait() == -signal.SIGTERM, child.describe()

    leftovers = [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the second signal should have landed in the middle of a save"
    with ckptmgr.CheckpointManager(directory, read_only=True) as reader:
        steps = [reader.verify(c.step).step for c in reader.checkpoints]
    last = child.last_step
    # The save of `last` (forced, or due anyway) was cut short; the one before it is the latest.
    assert last is not None and steps and steps[-1] == (last - 1) // 5 * 5

    finish = Child([*argv, str(directory)], tmp_path / "run.log")
    assert finish.start_step() == steps[-1]
    assert finish.wait() == 0, finish.describe()
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]  # cleaned up on the next open
    reference = Child([*argv, str(tmp_path / "ref")], tmp_path / "ref.log")
    assert reference.wait() == 0, reference.describe()
    assert_identical(final_tree(directory), final_tree(tmp_path / "ref"))


@pytest.mark.slow
def test_many_random_interruptions(tmp_path: Path) -> None:
    seed = plan_seed()
    rng = random.Random(seed)
    plan = random_plan(rng, [rng.choice(["kill", "kill", "term", "int"]) for _ in range(25)], 1, 25)
    argv = ["tests/_loop_child.py", "--steps", "1000", "--save-every", "3"]
    reference = Child([*argv, str(tmp_path / "ref")], tmp_path / "ref.log")
    run_interrupted([*argv, str(tmp_path / "run")], tmp_path / "run.log", plan=plan, save_every=3, seed=seed)
    assert reference.wait() == 0, reference.describe()
    assert_identical(final_tree(tmp_path / "run"), final_tree(tmp_path / "ref"))
