"""Many processes, one checkpoint: real torchrun jobs of 2 CPU ranks (gloo on 127.0.0.1).

The worker is tests/_torch_job.py; tests/_dist.py launches it under a deadline and
kills whatever is left. What the ranks saw comes back as JSON reports; the checkpoint
directory is then also read from this process, without a coordinator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from _dist import TESTS, run_torchrun

import ckptmgr
from ckptmgr import storage

JOB = TESTS / "_torch_job.py"


def ranks(result: Any) -> list[dict[str, Any]]:
    return [result.results[f"rank{r}"] for r in range(2)]


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    ckpt = tmp_path_factory.mktemp("roundtrip")
    result = run_torchrun(JOB, ["roundtrip", str(ckpt)], timeout=120, workdir=ckpt.parent).check()
    return ckpt, ranks(result)


def test_sharded_and_replicated_saves_restore_bit_exact_on_every_rank(
    roundtrip: tuple[Path, list[dict[str, Any]]],
) -> None:
    ckpt, reports = roundtrip
    for report in reports:
        assert report["world"] == 2
        assert report["saved"] == [1, 2] and report["checkpoints"] == [1, 2]
        assert report["latest_ok"] and report["first_ok"] and report["replicated_ok"]
    # From one process, without a coordinator: the listing, and each rank's part.
    reader = ckptmgr.CheckpointManager(ckpt / "sharded", read_only=True)
    assert [c.step for c in reader.checkpoints] == [1, 2]
    assert reader.verify(2).step == 2
    assert [reader.restore(2, rank=k)["rank"] for k in (0, 1)] == [0, 1]
    assert len(storage.part_files(ckpt / "sharded")) == 4
    assert ckptmgr.CheckpointManager(ckpt / "replicated", read_only=True).restore()["note"] == "rank 0's"
    assert storage.part_files(ckpt / "replicated") == []


def test_ranks_at_different_speeds_under_every_seconds_agree_and_never_deadlock(
    roundtrip: tuple[Path, list[dict[str, Any]]],
) -> None:
    ckpt, reports = roundtrip
    saved = reports[0]["seconds_saved"]
    assert saved and reports[1]["seconds_saved"] == saved
    assert [c.step for c in ckptmgr.CheckpointManager(ckpt / "seconds", read_only=True).checkpoints] == saved


def test_a_corrupt_part_on_one_rank_makes_both_ranks_fall_back(
    roundtrip: tuple[Path, list[dict[str, Any]]], tmp_path: Path,
) -> None:
    import shutil

    ckpt, _ = roundtrip
    copy = tmp_path / "sharded"
    shutil.copytree(ckpt / "sharded", copy)
    part = next(n for n in storage.part_files(copy) if storage.parse_part_name(n)[:2] == (2, 1))
    from _reliability import leaf_offset

    offset = leaf_offset(copy / part, "/state/w")
    with open(copy / part, "r+b") as f:
        f.seek(offset + 1000)
        byte = f.read(1)
        f.seek(offset + 1000)
        f.write(bytes([byte[0] ^ 0x01]))
    result = run_torchrun(JOB, ["resume", str(copy)], env={"SHARD_MIB": "0.05"}, timeout=90, workdir=tmp_path).check()
    for report in ranks(result):
        assert report["step"] == 1 and report["ok"]
    assert "skipping corrupt checkpoint of step 2" in result.output(0) + result.output(1)


def test_a_rank_killed_mid_save_leaves_the_last_step_both_committed(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    killed = run_torchrun(JOB, ["save-big", str(ckpt)], env={"KILL_AT": "2"}, timeout=150, workdir=tmp_path)
    assert killed.returncode != 0, killed.describe()
    assert killed.results["rank1"]["saved"] == [1]  # it died saving step 2
    assert [c.step for c in ckptmgr.CheckpointManager(ckpt, read_only=True).checkpoints] == [1]
    resumed = run_torchrun(JOB, ["resume", str(ckpt)], timeout=150, workdir=tmp_path).check()
    for report in ranks(resumed):
        assert report["step"] == 1 and report["ok"] and report["checkpoints"] == [1]
    # Rank 0 removed what the killed save left when it opened.
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".ckpt-")) == []
    assert {storage.parse_part_name(n)[0] for n in storage.part_files(ckpt)} == {1}


def test_a_job_restarted_by_torchrun_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    restart = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "COORD_TIMEOUT": "20"}
    interrupted = run_torchrun(JOB, ["train", str(tmp_path / "a")], env={**restart, "DIE_AT": "13"},
                               extra_torchrun_args=("--max-restarts=1",), timeout=240, workdir=tmp_path).check()
    uninterrupted = run_torchrun(JOB, ["train", str(tmp_path / "b")], env=restart, timeout=240, workdir=tmp_path).check()
    for report in ranks(interrupted):
        assert report["attempt"] == 1 and report["resumed_from"] == 10  # the last save before step 13
    for report in ranks(uninterrupted):
        assert report["attempt"] == 0 and report["resumed_from"] == 0
    finals = {r["final"] for r in ranks(interrupted) + ranks(uninterrupted)}
    assert len(finals) == 1  # same weights and optimizer state, bit for bit
    assert ranks(interrupted)[0]["checkpoints"] == [25, 30]


@pytest.mark.parametrize("mode", ["exit-early", "stall"])
def test_a_rank_that_leaves_or_stalls_before_saving_makes_the_other_raise_in_time(tmp_path: Path, mode: str) -> None:
    timeout = 3.0
    result = run_torchrun(JOB, [mode, str(tmp_path / "ckpt")], env={"COORD_TIMEOUT": str(timeout)}, timeout=90, workdir=tmp_path)
    rank0 = result.results["rank0"]
    assert result.results["rank1"]["left"] is True
    assert rank0["raised"] == "CoordinatorError", rank0
    assert "TorchCoordinator all_gather failed on rank 0 of 2" in rank0["message"]
    if mode == "stall":
        assert timeout * 0.9 <= rank0["elapsed"] < timeout + 10
    else:
        assert rank0["elapsed"] < timeout + 10
    assert rank0["checkpoints"] == [1]  # nothing of step 2 became visible
