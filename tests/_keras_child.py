"""A deterministic Keras training run with ckptmgr's callbacks, for the kill-and-resume tests.

Imported by the tests (``train()`` runs in-process for the uninterrupted reference) and
run as a child process: ``python tests/_keras_child.py DIR --save-freq epoch|N
[--block-at EPOCH BATCH]``. The child prints ``batch E B`` after every training batch;
with ``--block-at`` it prints ``ready`` after that batch and waits on stdin, so the
test can kill it with SIGKILL at exactly that point. When training ends it writes
``DIR/result.npz`` (final weights, optimizer iterations, where it resumed, epochs run,
EarlyStopping's stopped epoch).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import ckptmgr
from ckptmgr.adapters.keras import BackupAndRestore, EarlyStopping, ModelCheckpoint

EPOCHS = 10
BATCH = 16
SAMPLES = 80  # 5 batches per epoch


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES + 16, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0]], dtype="float32") + 0.1).astype("float32")
    return x[:SAMPLES], y[:SAMPLES], x[SAMPLES:], y[SAMPLES:]


def make_model(*, compiled: bool = True) -> keras.Model:
    """Unbuilt on purpose (no Input): BackupAndRestore must cope with that."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dropout(0.25),  # its SeedGenerator state is part of the backup
        keras.layers.Dense(1),
    ])
    if compiled:
        model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", metrics=["mae"], jit_compile=False)
    return model


class Reporter(keras.callbacks.Callback):  # type: ignore[misc]
    """Prints each batch; blocks after ``block_at`` until killed."""

    def __init__(self, block_at: tuple[int, int] | None) -> None:
        super().__init__()
        self.block_at = block_at
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        print(f"batch {self.epoch} {batch}", flush=True)
        if self.block_at == (self.epoch, batch):
            print("ready", flush=True)
            sys.stdin.readline()  # the test kills us here
            raise SystemExit("not killed")


def callbacks(directory: Path, save_freq: str | int) -> list[Any]:
    """BackupAndRestore, EarlyStopping and two ModelCheckpoints (by epoch; every 4 batches)."""
    backup = BackupAndRestore(directory / "backup", save_freq=save_freq)
    early = EarlyStopping(monitor="val_loss", min_delta=1.0, patience=3, restore_best_weights=True)
    checkpoint = ModelCheckpoint(
        str(directory / "models" / "model-{epoch:02d}-{val_loss:.3f}.keras"), keep=ckptmgr.KeepLast(2),
    )
    # Its batch count must survive the kill too: the resumed run saves at the same batches.
    by_batch = ModelCheckpoint(
        str(directory / "weights" / "w-{epoch:02d}-{batch:02d}.weights.h5"), save_weights_only=True,
        save_freq=4, monitor="loss", keep=ckptmgr.KeepLast(3),
    )
    return [backup, early, checkpoint, by_batch]


def train(directory: Path, save_freq: str | int, block_at: tuple[int, int] | None = None) -> dict[str, Any]:
    x, y, vx, vy = data()
    model = make_model()
    backup, early, checkpoint, by_batch = callbacks(directory, save_freq)
    # Callbacks before and after BackupAndRestore: the backup must hold their state
    # after the epoch/batch it records, whatever their order.
    history = model.fit(
        x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, validation_data=(vx, vy),
        callbacks=[checkpoint, backup, early, by_batch, Reporter(block_at)],
    )
    return {
        "weights": model.get_weights(),
        "iterations": int(model.optimizer.iterations.numpy()),
        "resumed_at": backup.resumed_at,
        "epochs_run": len(history.history["loss"]),
        "stopped_epoch": early.stopped_epoch,
        "files": sorted(p.name for p in (directory / "models").glob("*.keras")),
        "weight_files": sorted(p.name for p in (directory / "weights").glob("*.weights.h5")),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--save-freq", default="epoch")
    parser.add_argument("--block-at", type=int, nargs=2)
    args = parser.parse_args()
    save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
    result = train(args.directory, save_freq, tuple(args.block_at) if args.block_at else None)
    resumed = result["resumed_at"]
    np.savez(
        args.directory / "result.npz",
        *result["weights"],
        iterations=result["iterations"],
        resumed_at=np.array(resumed if resumed is not None else (-1, -1)),
        epochs_run=result["epochs_run"],
        stopped_epoch=result["stopped_epoch"],
        files=np.array(result["files"]),
        weight_files=np.array(result["weight_files"]),
    )
    print("done", flush=True)


if __name__ == "__main__":
    main()
