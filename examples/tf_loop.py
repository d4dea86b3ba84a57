"""A TensorFlow GradientTape loop that resumes exactly after kill -9, SIGTERM or Ctrl-C.

A small Keras MLP with dropout, trained by a hand-written ``tf.function`` step on
random mini-batches drawn from a ``tf.random.Generator``. Each checkpoint holds the
model's variables (dropout's seed generator included), the optimizer's, and every
generator's state, so a resumed run ends with the same weights, bit for bit, as a run
that was never interrupted.

    python examples/tf_loop.py runs/tf              # Ctrl-C it, run it again
    python examples/tf_loop.py runs/tf --steps 400

On SIGTERM or Ctrl-C it saves the current step and exits with status 75
(``ckptmgr.adapters.loop.PREEMPTED_EXIT_CODE``); a second one stops it at once.
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
import tensorflow as tf

import ckptmgr
from ckptmgr.adapters import tf as ckpt_tf
from ckptmgr.adapters.loop import TrainingLoop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="checkpoint directory (created if missing)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=10)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)  # initial weights and dropout seeds, the same in every process
    tf.config.experimental.enable_op_determinism()
    gen = np.random.default_rng(0)
    x = gen.normal(size=(512, 8)).astype("float32")
    y = np.sin(x @ gen.normal(size=(8, 1))).astype("float32")

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(1),
    ])
    optimizer = keras.optimizers.Adam(0.01)
    optimizer.build(model.trainable_variables)  # create its slots now, so a checkpoint can fill them
    batches = tf.random.Generator.from_seed(1)  # mini-batch sampling: its state is checkpointed
    trainables = {"model": model, "optimizer": optimizer}

    @tf.function
    def train_step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(xb, training=True) - yb) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    mgr = ckptmgr.CheckpointManager(
        args.directory, save_every=ckptmgr.EverySteps(args.save_every), keep=ckptmgr.KeepLast(2)
    )
    with mgr, TrainingLoop(mgr, generators={"batches": batches}) as loop:
        step, state = loop.resume()
        if state is not None:
            ckpt_tf.load_tree(trainables, state)
        print(f"starting at step {step}", flush=True)
        while step < args.steps:
            batch = batches.uniform([32], maxval=len(x), dtype=tf.int64)
            loss = train_step(tf.gather(x, batch), tf.gather(y, batch))
            step += 1
            print(f"step {step} loss {float(loss):.6f}", flush=True)
            # A function: the variables are read only on the steps that are saved.
            loop.step_done(step, lambda: ckpt_tf.to_tree(trainables))
        loop.save(step, ckpt_tf.to_tree(trainables), force=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
