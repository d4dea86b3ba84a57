"""Kill -9 in the middle of an epoch, restart, and end exactly where an uninterrupted run ends.

A child process (tests/_keras_child.py) trains with BackupAndRestore, EarlyStopping
(restore_best_weights) and ModelCheckpoint (KeepLast(2)). It prints every batch and, at
the batch the test names, prints "ready" and waits; the test kills it with SIGKILL
there, starts it again, and compares the result with the same training run
uninterrupted in this process. Both scenarios run their children side by side.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import _keras_child as child  # noqa: E402

import ckptmgr  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

CHILD = Path(__file__).with_name("_keras_child.py")
TIMEOUT = 240  # seconds a child may take before the watchdog kills it

# name: (save_freq, the batch (epoch, batch) after which the child is killed, where it must resume)
SCENARIOS: dict[str, tuple[str | int, tuple[int, int], tuple[int, int]]] = {
    # Backed up after epoch 4 (0-based); killed in the middle of epoch 5: epoch 5 starts over.
    "epoch": ("epoch", (5, 2), (5, 0)),
    # 5 batches an epoch, a backup every 3: the last one before the kill is after batch 33
    # (epoch 6, batch 2), so the resumed run continues at epoch 6, batch 3.
    "every-3-batches": (3, (6, 3), (6, 3)),
}


def _start(directory: Path, save_freq: str | int, block_at: tuple[int, int] | None) -> subprocess.Popen[str]:
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(CHILD), str(directory), "--save-freq", str(save_freq)]
    if block_at is not None:
        command += ["--block-at", *map(str, block_at)]
    stderr = (directory / f"stderr-{'killed' if block_at else 'resumed'}.txt").open("w")
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    stderr.close()
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    return proc


def _read_until_ready(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if lines[-1] == "ready":
            return lines
    raise AssertionError(f"the child ended (status {proc.wait()}) before it was ready: {lines[-5:]}")


def _result(directory: Path) -> dict[str, Any]:
    with np.load(directory / "result.npz") as z:
        count = len([k for k in z.files if k.startswith("arr_")])
        return {
            "weights": [z[f"arr_{i}"] for i in range(count)],
            "iterations": int(z["iterations"]),
            "resumed_at": tuple(int(v) for v in z["resumed_at"]),
            "epochs_run": int(z["epochs_run"]),
            "stopped_epoch": int(z["stopped_epoch"]),
            "files": [str(f) for f in z["files"]],
            "weight_files": [str(f) for f in z["weight_files"]],
        }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("keras-resume")
    out: dict[str, dict[str, Any]] = {name: {"dir": root / name / "run"} for name in SCENARIOS}
    killed = {name: _start(out[name]["dir"], freq, block) for name, (freq, block, _) in SCENARIOS.items()}
    for name, proc in killed.items():
        out[name]["printed"] = _read_until_ready(proc)
        proc.send_signal(signal.SIGKILL)
        out[name]["killed_status"] = proc.wait()
        assert proc.stdout is not None and proc.stdin is not None
        proc.stdout.close()
        proc.stdin.close()
        backup = out[name]["dir"] / "backup"
        out[name]["after_kill"] = sorted(p.name for p in backup.iterdir() if not p.name.startswith(".ckptmgr"))
        with ckptmgr.CheckpointManager(backup, read_only=True) as reader:
            tree = reader.restore()
        out[name]["backup_position"] = (tree["epoch"], tree["batch"])
    resumed = {name: _start(out[name]["dir"], freq, None) for name, (freq, _, _) in SCENARIOS.items()}
    # The uninterrupted reference runs here while the children resume.
    for name, (freq, _, _) in SCENARIOS.items():
        out[name]["reference"] = child.train(root / name / "reference", freq)
    for name, proc in resumed.items():
        stdout, _ = proc.communicate()
        assert proc.returncode == 0, (out[name]["dir"] / "stderr-resumed.txt").read_text()[-3000:]
        out[name]["resumed_printed"] = stdout.split("\n")
        out[name]["result"] = _result(out[name]["dir"])
    return out


@pytest.mark.parametrize("name", SCENARIOS)
def test_child_was_killed_mid_epoch_with_one_intact_backup(runs: dict[str, dict[str, Any]], name: str) -> None:
    run = runs[name]
    _, block_at, resume_at = SCENARIOS[name]
    assert run["killed_status"] == -signal.SIGKILL
    assert run["printed"][-2:] == [f"batch {block_at[0]} {block_at[1]}", "ready"]
    assert block_at[1] < child.SAMPLES // child.BATCH - 1, "the kill must be in the middle of an epoch"
    assert len(run["after_kill"]) == 1 and run["after_kill"][0].startswith("ckpt-")
    assert run["backup_position"] == resume_at


@pytest.mark.parametrize("name", SCENARIOS)
def test_resumed_run_ends_like_the_uninterrupted_one(runs: dict[str, dict[str, Any]], name: str) -> None:
    run = runs[name]
    result, reference = run["result"], run["reference"]
    resume_at = SCENARIOS[name][2]
    assert result["resumed_at"] == resume_at
    # The first batch the resumed child reports as trained is the one after the backup;
    # the replayed ones before it are reported too (Keras shows them) but change nothing.
    assert f"batch {resume_at[0]} {child.SAMPLES // child.BATCH - 1}" in run["resumed_printed"]
    assert result["iterations"] == reference["iterations"] == 40
    # EarlyStopping resumed its patience and best weights: it stops at the same epoch
    # (before the last), and restores the same weights.
    assert result["stopped_epoch"] == reference["stopped_epoch"] == 7
    assert result["epochs_run"] == reference["epochs_run"] - resume_at[0]
    assert len(result["weights"]) == len(reference["weights"])
    for actual, expected in zip(result["weights"], reference["weights"], strict=True):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SCENARIOS)
def test_checkpoint_files_and_backup_after_resume(runs: dict[str, dict[str, Any]], name: str) -> None:
    run = runs[name]
    assert run["result"]["files"] == run["reference"]["files"] == ["model-07-0.351.keras", "model-08-0.229.keras"]
    # Every 4 batches (40 in all): batches 32, 36, 40 of the run are kept, named by epoch and batch.
    assert run["result"]["weight_files"] == run["reference"]["weight_files"] == [
        "w-07-02.weights.h5", "w-08-01.weights.h5", "w-08-05.weights.h5"]
    reference_dir = run["dir"].parent / "reference"
    for file in run["result"]["files"]:
        ours = keras.models.load_model(run["dir"] / "models" / file).get_weights()
        theirs = keras.models.load_model(reference_dir / "models" / file).get_weights()
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # Training ended normally: the backup is gone (delete_checkpoint=True).
    assert not (run["dir"] / "backup").exists()
