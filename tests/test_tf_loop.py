"""ckptmgr.adapters.tf and the TensorFlow side of ckptmgr.adapters.loop: variables <->
trees, TF/Keras RNG state, and examples/tf_loop.py killed and resumed bit-identically."""

from __future__ import annotations

import doctest
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from _loop_harness import (  # noqa: E402 - after the importorskip
    Child,
    assert_same_training,
    final_tree,
    plan_seed,
    random_plan,
    run_interrupted,
)

import ckptmgr  # noqa: E402
from ckptmgr.adapters import tf as ckpt_tf  # noqa: E402
from ckptmgr.adapters.loop import capture_rng, restore_rng  # noqa: E402


def roundtrip(tree: Any, tmp_path: Path) -> Any:
    with ckptmgr.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(0, tree)
        return mgr.restore()


def make_model(seed: int) -> tuple[Any, Any]:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(1),
    ])
    optimizer = keras.optimizers.Adam(0.05)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def train(model: Any, optimizer: Any, steps: int) -> None:
    x = tf.constant(np.linspace(-1, 1, 32 * 4, dtype=np.float32).reshape(32, 4))
    y = tf.reduce_sum(x, axis=1, keepdims=True)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x, training=True) - y) ** 2)  # dropout draws from its seed generator
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))


def weights(model: Any) -> list[bytes]:
    return [v.numpy().tobytes() for v in model.variables]


def test_model_and_optimizer_resume_bit_identical(tmp_path: Path) -> None:
    model, optimizer = make_model(0)
    train(model, optimizer, 3)
    saved = roundtrip(ckpt_tf.to_tree({"model": model, "optimizer": optimizer, "epoch": 3}), tmp_path)
    train(model, optimizer, 3)

    model2, optimizer2 = make_model(1)  # other initial weights and dropout seeds
    ckpt_tf.load_tree({"model": model2, "optimizer": optimizer2}, saved)
    assert saved["epoch"] == 3
    train(model2, optimizer2, 3)
    assert weights(model2) == weights(model)
    assert [v.numpy().tobytes() for v in optimizer2.variables] == [v.numpy().tobytes() for v in optimizer.variables]


def test_tree_holds_seed_generator_state_and_optimizer_slots() -> None:
    model, optimizer = make_model(0)
    tree = ckpt_tf.to_tree({"model": model, "optimizer": optimizer})
    assert len(tree["model"]) == len(model.variables) == len(model.weights) + 1  # + dropout's seed state
    assert len(tree["optimizer"]) == 2 + 2 * len(model.trainable_variables)  # iteration, lr, m and v
    assert all(isinstance(a, np.ndarray) for a in tree["model"] + tree["optimizer"])


def test_variables_modules_and_bfloat16(tmp_path: Path) -> None:
    class Affine(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal((3, 2), seed=(1, 2)))
            self.b = tf.Variable(tf.zeros(2, tf.bfloat16) + 1.5)

    module, counter = Affine(), tf.Variable(7, dtype=tf.int64)
    saved = roundtrip(ckpt_tf.to_tree({"module": module, "counter": counter, "pair": (counter, [counter])}), tmp_path)
    assert saved["module"][0].dtype.name == "bfloat16"
    other, counter2 = Affine(), tf.Variable(0, dtype=tf.int64)
    other.w.assign(tf.zeros((3, 2)))
    ckpt_tf.load_tree({"module": other, "counter": counter2}, saved)
    assert [v.numpy().tobytes() for v in other.variables] == [v.numpy().tobytes() for v in module.variables]
    assert counter2.numpy() == 7


@pytest.mark.parametrize(
    ("target", "tree", "message"),
    [
        pytest.param("unbuilt", None, r"Expected \d+ variables .*build it first", id="unbuilt-optimizer"),
        pytest.param("shape", None, r"shape \(4, 8\), dtype float32 .* Received: shape \(8, 4\)", id="shape"),
        pytest.param("dtype", None, "dtype float32 .* Received: shape .*, dtype float64", id="dtype"),
        pytest.param("missing", None, "Expected a key 'optimizer'", id="missing-key"),
    ],
)
def test_load_tree_checks_everything_before_assigning(target: str, tree: Any, message: str) -> None:
    model, optimizer = make_model(0)
    saved = ckpt_tf.to_tree({"model": model, "optimizer": optimizer})
    model2, optimizer2 = make_model(1)
    before = weights(model2)
    objects: dict[str, Any] = {"model": model2, "optimizer": optimizer2}
    if target == "unbuilt":
        objects["optimizer"] = keras.optimizers.Adam(0.05)
    elif target == "shape":
        saved["model"][0] = saved["model"][0].T.copy()
    elif target == "dtype":
        saved["model"][0] = saved["model"][0].astype(np.float64)
    else:
        del saved["optimizer"]
    with pytest.raises(ValueError, match=message):
        ckpt_tf.load_tree(objects, saved)
    assert weights(model2) == before


def test_to_tree_and_load_tree_refuse_what_they_cannot_handle() -> None:
    with pytest.raises(TypeError, match=r"tree\['gen'\].*Generator"):
        ckpt_tf.to_tree({"gen": tf.random.Generator.from_seed(1)})
    with pytest.raises(TypeError, match=r"tree\['epoch'\].*cannot be loaded in place"):
        ckpt_tf.load_tree({"epoch": 3}, {"epoch": 3})


def test_tf_and_keras_generators_survive_a_checkpoint(tmp_path: Path) -> None:
    gen = tf.random.Generator.from_seed(3)
    seeds = keras.random.SeedGenerator(4)
    gen.normal([2])
    tf.random.set_global_generator(tf.random.Generator.from_seed(5))
    keras.random.normal((1,))  # creates Keras's global seed generator
    saved = roundtrip(capture_rng({"gen": gen, "seeds": seeds}), tmp_path)
    assert {"tensorflow", "keras"} <= set(saved)

    def draws() -> list[bytes]:
        return [
            gen.normal([3]).numpy().tobytes(),
            keras.random.normal((3,), seed=seeds).numpy().tobytes(),
            tf.random.get_global_generator().uniform([3]).numpy().tobytes(),
            keras.random.normal((3,)).numpy().tobytes(),
        ]

    expected = draws()
    gen2 = tf.random.Generator.from_seed(30)
    seeds2 = keras.random.SeedGenerator(40)
    restore_rng(saved, {"gen": gen2, "seeds": seeds2})
    gen, seeds = gen2, seeds2
    assert draws() == expected


def test_restore_rng_rejects_another_tf_algorithm(tmp_path: Path) -> None:
    saved = capture_rng({"g": tf.random.Generator.from_seed(1, alg="philox")}, frameworks=())
    with pytest.raises(ValueError, match="algorithm"):
        restore_rng(saved, {"g": tf.random.Generator.from_seed(1, alg="threefry")})


def test_docstring_examples() -> None:
    result = doctest.testmod(ckpt_tf, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 5


def test_tf_example_resumes_bit_identical_after_kills_and_sigterm(tmp_path: Path) -> None:
    seed = plan_seed()
    # Each child spends seconds importing TensorFlow: few steps, three interruptions.
    plan = random_plan(random.Random(seed), ["kill", "term", "kill"], 4, 20)
    argv = ["examples/tf_loop.py", "--steps", "80", "--save-every", "7"]
    reference = Child([*argv, str(tmp_path / "ref")], tmp_path / "ref.log", deadline=300)
    run = run_interrupted([*argv, str(tmp_path / "run")], tmp_path / "run.log", plan=plan, save_every=7, seed=seed)
    assert reference.wait() == 0, reference.describe()
    assert len(run.history) >= 2
    assert_same_training(final_tree(tmp_path / "run"), final_tree(tmp_path / "ref"))
