"""ckptmgr Keras demo: kill -9 in the middle of model.fit(), restart, end exactly as if never stopped.

The script trains a small Keras model on synthetic data (no downloads) in a child
process, with ckptmgr's drop-in callbacks::

    BackupAndRestore(backup_dir, save_freq=5)             # every 5 batches, exact-batch resume
    EarlyStopping(patience=2, restore_best_weights=True)  # its state survives the kill
    ModelCheckpoint("model-{epoch:02d}-{val_accuracy:.3f}.keras",
                    monitor="val_accuracy", keep=KeepLast(2) | KeepBest(1))

It kills the child with SIGKILL in the middle of an epoch (when the child reports the
batch chosen below), starts it again, lets it finish, and meanwhile runs the same
training uninterrupted in another directory. Then it prints the checkpoint files kept
and why, where the restarted run resumed, and compares the final weights and
``optimizer.iterations`` of the two runs.

    python examples/keras_demo.py               # the whole demo (about a minute)
    python examples/keras_demo.py --train DIR   # one training process (what the demo runs)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import ckptmgr

EPOCHS = 20
BATCH = 64
SAMPLES = 1024  # 16 batches an epoch
BACKUP_EVERY = 5  # batches
KILL_AT = (8, 9)  # 0-based (epoch, batch): kill when the child reports it, mid-epoch 9
KEEP = ckptmgr.KeepLast(2) | ckptmgr.KeepBest(1)
MONITOR = "val_accuracy"


# ----------------------------------------------------------------------- training


def train(directory: Path) -> None:
    """One training process: resumes from ``directory``/backup if a backup is there."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from ckptmgr.adapters.keras import BackupAndRestore, EarlyStopping, ModelCheckpoint

    rng = np.random.default_rng(0)
    # Two interleaved spirals in the first two features, six noise features.
    t = rng.uniform(0.5, 2.0 * np.pi, size=SAMPLES + 256)
    label = rng.integers(0, 2, size=t.shape)
    angle = t + np.pi * label
    x = np.concatenate([np.stack([t * np.cos(angle), t * np.sin(angle)], 1) / 6,
                        rng.normal(size=(len(t), 6))], 1).astype("float32")
    x[:, :2] += rng.normal(scale=0.1, size=(len(t), 2)).astype("float32")
    y = label.astype("float32")[:, None]

    keras.utils.set_random_seed(0)
    model = keras.Sequential([  # not built before fit(): BackupAndRestore does not need it
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy", metrics=["accuracy"])

    class Report(keras.callbacks.Callback):  # type: ignore[misc]
        """What the parent reads: one line per batch and per epoch."""

        def on_train_begin(self, logs: Any = None) -> None:
            print(json.dumps({"resumed_at": backup.resumed_at}), flush=True)

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = epoch

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            print(json.dumps({"batch": [self.epoch, batch]}), flush=True)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            print(json.dumps({"epoch": epoch, "logs": {k: round(float(v), 4) for k, v in (logs or {}).items()}}),
                  flush=True)

    backup = BackupAndRestore(directory / "backup", save_freq=BACKUP_EVERY)
    early = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    checkpoint = ModelCheckpoint(str(directory / "models" / "model-{epoch:02d}-{val_accuracy:.3f}.keras"),
                                 monitor=MONITOR, keep=KEEP)
    history = model.fit(
        x[:SAMPLES], y[:SAMPLES], validation_data=(x[SAMPLES:], y[SAMPLES:]), batch_size=BATCH,
        epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[backup, early, checkpoint, Report()],
    )
    np.savez(directory / "result.npz", *model.get_weights(), iterations=int(model.optimizer.iterations.numpy()),
             stopped_epoch=early.stopped_epoch, best_epoch=early.best_epoch, epochs_run=len(history.history["loss"]))
    print(json.dumps({"done": True}), flush=True)


# --------------------------------------------------------------------------- demo


def _start(directory: Path) -> subprocess.Popen[str]:
    directory.mkdir(parents=True, exist_ok=True)
    stderr = (directory / "stderr.txt").open("a")
    try:
        return subprocess.Popen([sys.executable, __file__, "--train", str(directory)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    finally:
        stderr.close()


def _events(proc: subprocess.Popen[str]) -> Any:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            yield json.loads(line)


def _epoch_line(event: dict[str, Any]) -> str:
    logs = event["logs"]
    return (f"    epoch {event['epoch'] + 1:2d}/{EPOCHS}: loss {logs['loss']:.4f}  val_loss {logs['val_loss']:.4f}  "
            f"val_accuracy {logs['val_accuracy']:.3f}")


def _load(directory: Path) -> dict[str, Any]:
    with np.load(directory / "result.npz") as z:
        weights = [z[k] for k in sorted((k for k in z.files if k.startswith("arr_")), key=lambda k: int(k[4:]))]
        return {"weights": weights, "iterations": int(z["iterations"]), "stopped_epoch": int(z["stopped_epoch"]),
                "best_epoch": int(z["best_epoch"]), "epochs_run": int(z["epochs_run"])}


def demo(root: Path) -> int:
    steps = SAMPLES // BATCH
    print("ckptmgr Keras demo: kill -9 in the middle of model.fit(), restart, compare with an uninterrupted run\n")
    print(f"  data     {SAMPLES} training + 256 validation samples (two spirals + noise), {steps} batches of "
          f"{BATCH} an epoch, up to {EPOCHS} epochs, shuffle=False")
    print("  model    Dense(64)-Dropout(0.1)-Dense(64)-Dense(1), Adam, seeded (keras.utils.set_random_seed(0))")
    print(f"  callbacks from ckptmgr.adapters.keras:\n"
          f"           BackupAndRestore(save_freq={BACKUP_EVERY})\n"
          f"           EarlyStopping(monitor='val_loss', patience=2, restore_best_weights=True)\n"
          f"           ModelCheckpoint('model-{{epoch:02d}}-{{val_accuracy:.3f}}.keras', monitor='{MONITOR}',\n"
          f"                           keep=KeepLast(2) | KeepBest(1))\n")
    start = time.monotonic()
    run, reference = root / "run", root / "reference"
    ref_proc = _start(reference)  # the uninterrupted run, side by side
    proc = _start(run)
    print(f"[1] training in a child process (pid {proc.pid}); the uninterrupted reference runs in {reference}")
    killed_after: tuple[int, int] | None = None
    for event in _events(proc):
        if "epoch" in event:
            print(_epoch_line(event))
        elif "batch" in event and tuple(event["batch"]) >= KILL_AT:
            proc.send_signal(signal.SIGKILL)
            killed_after = (event["batch"][0], event["batch"][1])
            break
    status = proc.wait()
    if killed_after is None:
        print("    the child ended before it could be killed; see", run / "stderr.txt")
        return 1
    print(f"\n[2] the child reported epoch {killed_after[0] + 1}, batch {killed_after[1] + 1}/{steps}: "
          f"sent SIGKILL (exit status {status})")
    with ckptmgr.CheckpointManager(run / "backup", read_only=True) as reader:
        latest = reader.latest
        tree = reader.restore()
    assert latest is not None
    print(f"    backup on disk: {latest.path.name}, taken in epoch {tree['epoch'] + 1} after batch "
          f"{tree['batch']}/{steps} (a backup every {BACKUP_EVERY} batches)")

    proc = _start(run)
    print(f"\n[3] restarted the same command (pid {proc.pid})")
    for event in _events(proc):
        if "resumed_at" in event and event["resumed_at"] is not None:
            epoch, done = event["resumed_at"]
            if done:
                print(f"    BackupAndRestore resumed in epoch {epoch + 1} at batch {done + 1}/{steps}: batches "
                      f"1-{done} of that epoch\n    are read again but not trained on again (Keras' own "
                      "BackupAndRestore restarts the epoch at batch 1)")
            else:
                print(f"    BackupAndRestore resumed at the start of epoch {epoch + 1}")
        elif "epoch" in event:
            print(_epoch_line(event))
    if proc.wait() != 0 or ref_proc.wait() != 0:
        print("    a training process failed; see stderr.txt in", root)
        return 1
    assert ref_proc.stdout is not None
    ref_proc.stdout.close()

    print(f"\n[4] checkpoint files kept in {run / 'models'} (KeepLast(2) | KeepBest(1); the latest and the best "
          "are never deleted)")
    with ckptmgr.CheckpointManager(run / "models", read_only=True, keep=KEEP, monitor=MONITOR, mode="max") as reader:
        infos = reader.checkpoints
    print(f"    {'file':<26}{'step':>6}  {MONITOR:>12}  kept because")
    for info in infos:
        print(f"    {info.path.name:<26}{info.step:>6}  {info.metrics.get(MONITOR, float('nan')):>12.3f}  "
              f"{', '.join(info.keep_reasons)}")
    ref_files = sorted(p.name for p in (reference / "models").glob("*.keras"))
    print(f"    uninterrupted run kept: {', '.join(ref_files)}")

    ours, theirs = _load(run), _load(reference)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours["weights"], theirs["weights"], strict=True))
    same_files = [i.path.name for i in infos] == ref_files
    stopped = (f"stopped early after epoch {theirs['stopped_epoch'] + 1}" if theirs["stopped_epoch"]
               else "ran all epochs")
    stopped += f", weights of epoch {theirs['best_epoch'] + 1} restored"
    ok = diff <= 1e-6 and ours["iterations"] == theirs["iterations"] and same_files and (
        ours["stopped_epoch"], ours["best_epoch"]) == (theirs["stopped_epoch"], theirs["best_epoch"])
    print("\n[5] killed-and-resumed run vs uninterrupted run")
    print(f"    final weights           max |difference| = {diff:.3g}")
    print(f"    optimizer.iterations    {ours['iterations']} vs {theirs['iterations']}")
    print(f"    EarlyStopping           epoch {ours['stopped_epoch'] + 1} vs {theirs['stopped_epoch'] + 1} "
          f"(both {stopped})")
    print(f"    checkpoint files        {'the same' if same_files else 'DIFFERENT'}")
    print(f"    no backup left behind   {not (run / 'backup').exists()} (deleted when training ended)")
    print(f"\n{'OK: identical' if ok else 'MISMATCH'} ({time.monotonic() - start:.0f} s; files in {root})")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, metavar="DIR", help="run one training process in DIR")
    parser.add_argument("--workdir", type=Path, help="where the demo writes its runs (default: a temporary directory)")
    args = parser.parse_args()
    if args.train is not None:
        train(args.train)
        return 0
    root = args.workdir or Path(tempfile.mkdtemp(prefix="ckptmgr-keras-demo-"))
    return demo(root)


if __name__ == "__main__":
    sys.exit(main())
