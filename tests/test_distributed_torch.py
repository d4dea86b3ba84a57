"""Many processes, one checkpoint: real torchrun jobs of 2 CPU ranks (gloo on 127.0.0.1).

The worker is tests/_torch_job.py; tests/_dist.py launches it under a deadline and
kills whatever is left. What the ranks saw comes back as JSON reports; the checkpoint
directory is then also read from this process, without a coordinator.
"""

from __future__ import annotations

import os
import re
import signal
import threading
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
        assert report["async_ok"] and report["async_checkpoints"] == [1, 2, 3]
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


def test_sigterm_at_one_rank_makes_every_rank_save_the_same_step_and_stop(tmp_path: Path) -> None:
    result = run_torchrun(JOB, ["preempt", str(tmp_path / "ckpt")], timeout=90, workdir=tmp_path).check()
    rank0, rank1 = ranks(result)
    assert rank0["stopped_at"] == rank1["stopped_at"] == 7
    assert rank1["signal"] == "SIGTERM" and rank0["signal"] is None
    assert rank0["checkpoints"] == [5, 7]
    reader = ckptmgr.CheckpointManager(tmp_path / "ckpt", read_only=True)
    assert [reader.restore(7, rank=k)["state"]["rank"] for k in (0, 1)] == [0, 1]


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


def _kill_rank_once(directory: Path, after_step: int, stop: threading.Event) -> list[int]:
    """SIGKILL local rank 1 of the job training into ``directory`` once a checkpoint of
    ``after_step`` or later is committed there (the first attempt only)."""
    killed: list[int] = []
    needle = str(directory).encode()
    while not stop.is_set() and not killed:
        steps = [storage.parse_name(p.name) for p in directory.glob("ckpt-*.h5")] if directory.is_dir() else []
        if any(s is not None and s >= after_step for s in steps):
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                    environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if (needle in cmdline and b"torch_ddp.py" in cmdline and b"LOCAL_RANK=1" in environ
                        and b"TORCHELASTIC_RESTART_COUNT=0" in environ):
                    os.kill(int(entry), signal.SIGKILL)
                    killed.append(int(entry))
        stop.wait(0.01)
    return killed


def test_the_ddp_example_killed_by_sigkill_and_restarted_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    example = TESTS.parent / "examples" / "torch_ddp.py"
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    args = ["--steps", "150", "--save-every", "10", "--timeout", "20"]
    stop = threading.Event()
    killed: list[list[int]] = []
    killer = threading.Thread(target=lambda: killed.append(_kill_rank_once(tmp_path / "a", 60, stop)))
    killer.start()
    try:
        interrupted = run_torchrun(example, [str(tmp_path / "a"), *args], env=env,
                                   extra_torchrun_args=("--max-restarts=1",), timeout=240, workdir=tmp_path,
                                   results_arg=False)
    finally:
        stop.set()
        killer.join(10)
    assert killed and killed[0], "rank 1 was never killed"
    interrupted.check()
    uninterrupted = run_torchrun(example, [str(tmp_path / "b"), *args], env=env, timeout=240,
                                 workdir=tmp_path, results_arg=False).check()
    second = interrupted.output(0, attempt=1)
    resumed = re.search(r"resumed at step (\d+)", second)
    assert resumed is not None and int(resumed[1]) >= 60 and int(resumed[1]) % 10 == 0, interrupted.describe()
    done = re.findall(r"done: step 150, loss \S+, weights (\w+)", second + uninterrupted.output(0))
    assert len(done) == 2 and done[0] == done[1], interrupted.describe()
