"""A worker of test_keras_multiworker.py: a Keras model under MultiWorkerMirroredStrategy.

    TF_CONFIG=... python tests/_keras_mwms_job.py RESULTS MODE CKPT_DIR [KILL_AT]

Keras 3's ``fit()`` does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585,
"Attempt to convert a value (PerReplica...)", checked with TF 2.21): the training here is
a custom loop (``strategy.run`` with a GradientTape), the way TF's own multi-worker
tutorials train without ``fit``. Modes:

- ``loop``: 12 steps, a replicated checkpoint (weights, optimizer, step) every 2 steps
  through a CheckpointManager with a MultiWorkerCoordinator; with KILL_AT, worker 1
  SIGKILLs itself at that step on the first attempt (a marker file next to RESULTS). It
  resumes from the latest checkpoint when there is one.
- ``callbacks``: ckptmgr's BackupAndRestore driven through the hooks ``fit()`` would
  call, on a model built under the strategy: it finds the strategy by itself.

Each worker reports as ``worker<index>`` (``_dist.report``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from _dist import report

import ckptmgr
from ckptmgr.adapters import keras as ckpt_keras
from ckptmgr.adapters import tf as ckpt_tf


def digest(variables: list[Any]) -> str:
    h = hashlib.sha256()
    for v in variables:
        h.update(np.asarray(v.numpy()).tobytes())
    return h.hexdigest()


def main() -> None:
    results, mode, ckpt_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out_dir = Path(results).parent
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    tf.keras.utils.set_random_seed(1)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(16, activation="tanh"),
                                     tf.keras.layers.Dense(1)])
        optimizer = tf.keras.optimizers.Adam(0.01)
        optimizer.build(model.trainable_variables)
    out: dict[str, Any] = {"task": task}
    if mode == "loop":
        # Short: after worker 1 is killed, the chief waits this long in the next save.
        coordinator = ckpt_tf.MultiWorkerCoordinator(strategy, timeout=8)

        @tf.function  # type: ignore[misc]
        def train_step(x: Any, y: Any) -> Any:
            def replica(x: Any, y: Any) -> Any:
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean((model(x) - y) ** 2)
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
                return loss

            return strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(replica, args=(x, y)), axis=None)

        marker = out_dir / "killed-once"
        with ckptmgr.CheckpointManager(ckpt_dir, coordinator=coordinator, save_every=ckptmgr.EverySteps(2),
                                       keep=ckptmgr.KeepLast(2)) as mgr:
            tree = mgr.restore_or_initialize(lambda: None)
            step = 0
            if tree is not None:
                ckpt_tf.load_tree({"model": model, "optimizer": optimizer}, tree["train"])
                step = tree["step"]
            out["resumed_from"] = step
            while step < 12:
                step += 1
                rng = np.random.default_rng(step * 10 + task)  # each worker its own batch
                x = rng.normal(size=(16, 8)).astype(np.float32)
                train_step(x, np.sin(x.sum(axis=1, keepdims=True)))
                if task == 1 and step == kill_at and not marker.exists():
                    marker.write_text("x")
                    os.kill(os.getpid(), signal.SIGKILL)
                if mgr.should_save(step):
                    mgr.save(step, {"step": step, "train": ckpt_tf.to_tree({"model": model, "optimizer": optimizer})})
            out["checkpoints"] = [i.step for i in mgr.checkpoints]
        out["final"] = digest(model.weights + optimizer.variables)
    elif mode == "callbacks":
        backup = ckpt_keras.BackupAndRestore(str(ckpt_dir), save_freq=2, delete_checkpoint=False)
        model.compile(optimizer=optimizer, loss="mse")
        backup.set_model(model)
        backup.set_params({"epochs": 2, "steps": 4, "verbose": 0})
        backup.on_train_begin()
        out["resumed_at"] = backup.resumed_at
        manager = backup.manager
        assert manager is not None
        coordinator = manager.coordinator
        out["coordinated"] = None if coordinator is None else [coordinator.rank, coordinator.world_size]
        if backup.resumed_at is None:
            for epoch in range(2):
                backup.on_epoch_begin(epoch)
                for batch in range(4):
                    for v in model.trainable_variables:
                        v.assign_add(tf.ones_like(v) * 0.01)
                    backup.on_train_batch_end(batch, {"loss": 1.0})
                backup.on_epoch_end(epoch, {"loss": 1.0})
        out["backups"] = [i.step for i in manager.checkpoints]
        backup.on_train_end()
        out["weights"] = digest(model.weights)
        # ModelCheckpoint: the chief writes each best model's file; every worker agrees.
        best = ckpt_keras.ModelCheckpoint(str(ckpt_dir.parent / "models" / "m-{epoch:02d}.weights.h5"),
                                          monitor="loss", save_best_only=True, save_weights_only=True)
        best.set_model(model)
        best.set_params({"epochs": 4, "steps": 1, "verbose": 0})
        best.on_train_begin()
        for epoch, loss in enumerate([0.5, 0.7, 0.3, 0.4]):
            best.on_epoch_begin(epoch)
            best.on_epoch_end(epoch, {"loss": loss})
        out["models"] = [Path(i.path).name for i in best.checkpoints]
        out["best_coordinated"] = best.manager is not None and best.manager.coordinator is not None
        best.on_train_end()
    report(results, f"worker{task}", out)


if __name__ == "__main__":
    main()
