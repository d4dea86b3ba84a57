"""A Keras model trained by two workers under MultiWorkerMirroredStrategy (TF_CONFIG on
127.0.0.1 ports), checkpointed through ckptmgr, killed with SIGKILL and resumed.

Keras 3's ``fit()`` itself fails under MultiWorkerMirroredStrategy in this TensorFlow
(keras-team/keras#20585), so the training is a custom loop (tests/_keras_mwms_job.py),
and the callbacks are driven through the hooks ``fit()`` calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tensorflow")

from _dist import TESTS, free_ports, run_workers

import ckptmgr

JOB = TESTS / "_keras_mwms_job.py"


def two_workers(tmp_path: Path, *args: str) -> Any:
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    envs = [{"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
             "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"} for i in range(2)]
    return run_workers(JOB, list(args), envs, timeout=150, workdir=tmp_path)


def reports(result: Any) -> list[dict[str, Any]]:
    return [result.results[f"worker{i}"] for i in range(2)]


def test_a_killed_worker_job_resumes_and_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    killed = two_workers(tmp_path, "loop", str(tmp_path / "a"), "7")
    assert killed.returncode != 0 and not killed.results, killed.describe()
    assert [c.step for c in ckptmgr.CheckpointManager(tmp_path / "a", read_only=True).checkpoints] == [4, 6]
    resumed = two_workers(tmp_path, "loop", str(tmp_path / "a")).check()
    reference = two_workers(tmp_path, "loop", str(tmp_path / "b")).check()
    for report in reports(resumed):
        assert report["resumed_from"] == 6 and report["checkpoints"] == [10, 12]
    for report in reports(reference):
        assert report["resumed_from"] == 0
    assert len({r["final"] for r in reports(resumed) + reports(reference)}) == 1


def test_backup_and_restore_finds_the_strategy_and_the_chief_writes(tmp_path: Path) -> None:
    first = two_workers(tmp_path, "callbacks", str(tmp_path / "backup")).check()
    for rank, report in enumerate(reports(first)):
        assert report["coordinated"] == [rank, 2]
        assert report["resumed_at"] is None and report["backups"] == [8]
    again = two_workers(tmp_path, "callbacks", str(tmp_path / "backup")).check()
    for report in reports(again):
        assert report["resumed_at"] == [1, 4]
    # Both workers restored the weights the chief saved.
    assert len({r["weights"] for r in reports(first) + reports(again)}) == 1
    # ModelCheckpoint: the files of the improving epochs, written once (by the chief).
    for report in reports(first):
        assert report["best_coordinated"] is True
        assert report["models"] == ["m-01.weights.h5", "m-03.weights.h5"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")) == [
        "m-01.weights.h5", "m-03.weights.h5"]
