"""Steps only move forward in a directory; rollback(step) continues from an earlier one.

A new run started in an old directory (or a run continued from an earlier step without
saying so) used to save checkpoints that the old, higher steps hid: retention deleted
them at the next save and restore() returned the old run's latest, silently.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _reliability import leaf_offset

import ckptmgr
from ckptmgr.cli import main as cli_main

MONITOR = "val_loss"
LOSSES = {100: 0.9, 200: 0.7, 300: 0.5, 400: 0.3, 500: 0.2}


def _state(step: int) -> dict[str, Any]:
    return {"w": np.full((2, 3), step, dtype=np.float32), "step": step}


def _run(directory: Path, steps: list[int] | None = None, **kwargs: Any) -> None:
    with ckptmgr.CheckpointManager(directory, monitor=MONITOR, **kwargs) as mgr:
        for step in steps or sorted(LOSSES):
            mgr.save(step, _state(step), metrics={MONITOR: LOSSES[step]})


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` (the index cache aside) with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in (".ckptmgr-index.json", ".ckptmgr.lock")
    }


# ------------------------------------------------------------------ steps move forward


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("force", [False, True], ids=["policy", "force"])
def test_a_new_run_in_an_old_directory_is_refused_and_nothing_changes(
    tmp_path: Path, async_save: bool, force: bool
) -> None:
    _run(tmp_path / "run")
    before = _snapshot(tmp_path / "run")
    with ckptmgr.CheckpointManager(tmp_path / "run", monitor=MONITOR, keep=ckptmgr.KeepLast(2),
                                   async_save=async_save) as mgr:
        best_before = (mgr.tracker.best, mgr.tracker.best_step) if mgr.tracker else None
        with pytest.raises(ckptmgr.StepOrderError) as excinfo:
            mgr.save(0, _state(0), metrics={MONITOR: 0.01}, force=force)
        assert _snapshot(tmp_path / "run") == before, "a refused save changed the directory"
        message = str(excinfo.value)
        for part in (str(tmp_path / "run"), "step 0", "step 500", "restore()", "rollback("):
            assert part in message, f"{part!r} not in {message!r}"
        assert excinfo.value.step == 0 and excinfo.value.latest == 500
        assert isinstance(excinfo.value, ckptmgr.CheckpointError)
        # The refused metric did not count: the best and patience are the old run's.
        assert mgr.tracker is not None and (mgr.tracker.best, mgr.tracker.best_step) == best_before
        assert [c.step for c in mgr.checkpoints] == sorted(LOSSES)
        # The manager stays usable: the old run resumes after its latest.
        assert mgr.restore()["step"] == 500
        info = mgr.save(600, _state(600), metrics={MONITOR: 0.25})
        mgr.wait()
        assert info is not None and info.step == 600
        assert [c.step for c in mgr.checkpoints] == [500, 600]


def test_a_payload_below_the_latest_is_refused_before_its_writer_runs(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    calls: list[Path] = []
    with ckptmgr.CheckpointManager(tmp_path / "run") as mgr, pytest.raises(ckptmgr.StepOrderError):
        mgr.save(10, ckptmgr.FilePayload("model.bin", lambda path: calls.append(path)))
    assert calls == []
    assert not (tmp_path / "run" / "model.bin").exists()


def test_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    with ckptmgr.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(5, _state(5))
        mgr.save(5, {"replaced": True})
        assert mgr.restore() == {"replaced": True}


def test_resuming_below_a_corrupt_newest_is_allowed(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    newest = tmp_path / "run" / "ckpt-000000500.h5"
    data = bytearray(newest.read_bytes())  # flip a byte of an array's data: its checksum fails
    data[leaf_offset(newest, "/state/w")] ^= 0xFF
    newest.write_bytes(bytes(data))
    with ckptmgr.CheckpointManager(tmp_path / "run", monitor=MONITOR) as mgr:
        with pytest.warns(ckptmgr.CheckpointWarning, match="ckpt-000000500"):
            state = mgr.restore()
        assert state["step"] == 400
        # The fallback is the intended way on: the next step after 400 may be saved.
        info = mgr.save(450, _state(450), metrics={MONITOR: 0.1})
        assert info is not None and info.step == 450
        # But not below the checkpoint it resumed from.
        with pytest.raises(ckptmgr.StepOrderError, match="step 450"):
            mgr.save(420, _state(420))


# ---------------------------------------------------------------------------- rollback


def test_rollback_sets_later_checkpoints_aside_and_the_run_continues(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    _run(directory)
    originals = {step: (directory / f"ckpt-{step:09d}.h5").read_bytes() for step in (400, 500)}
    keep = ckptmgr.KeepLast(2) | ckptmgr.KeepBest(1)
    with ckptmgr.CheckpointManager(directory, monitor=MONITOR, keep=keep) as mgr:
        assert mgr.best is not None and mgr.best.step == 500
        info = mgr.rollback(300)
        assert info.step == 300
        assert [c.step for c in mgr.checkpoints] == [100, 200, 300]
        assert mgr.latest is not None and mgr.latest.step == 300
        # The best is recomputed over what remains, from the history recorded with 300.
        assert mgr.best is not None and mgr.best.step == 300
        assert mgr.tracker is not None and mgr.tracker.best == LOSSES[300]
        assert mgr.restore()["step"] == 300
        # Continue from 300: a worse metric than the abandoned 400/500 is still an improvement
        # over 300's history ... and retention never touches what was set aside.
        for step, loss in ((310, 0.45), (320, 0.6), (330, 0.65)):
            mgr.save(step, _state(step), metrics={MONITOR: loss})
        assert [c.step for c in mgr.checkpoints] == [310, 320, 330]
        assert mgr.best is not None and mgr.best.step == 310
        [folder] = mgr.rolled_back
    assert folder.parent == directory / "rolled-back"
    assert folder.name.startswith("after-step-000000300-")
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-000000400.h5", "ckpt-000000500.h5"]
    for step, data in originals.items():
        assert (folder / f"ckpt-{step:09d}.h5").read_bytes() == data
    # Across restarts: still set aside, and readable as a checkpoint directory of its own.
    with ckptmgr.CheckpointManager(directory, read_only=True) as reader:
        assert [c.step for c in reader.checkpoints] == [310, 320, 330]
        assert reader.restore("best")["step"] == 310
    with ckptmgr.CheckpointManager(folder, read_only=True) as aside:
        assert [c.step for c in aside.checkpoints] == [400, 500]
        np.testing.assert_array_equal(aside.restore(500)["w"], _state(500)["w"])


def test_rollback_moves_payloads_with_their_metadata(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    with ckptmgr.CheckpointManager(directory) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, ckptmgr.FilePayload(f"model-{step}.bin", lambda p, s=step: p.write_bytes(bytes([s]) * 10)))
        mgr.rollback(1)
        assert [c.step for c in mgr.checkpoints] == [1]
        [folder] = mgr.rolled_back
    with ckptmgr.CheckpointManager(folder, read_only=True) as aside:
        assert [c.step for c in aside.checkpoints] == [2, 3]
        assert Path(aside.restore(3)).read_bytes() == bytes([3]) * 10


def test_rollback_to_an_unknown_step_changes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    _run(directory)
    before = _snapshot(directory)
    with ckptmgr.CheckpointManager(directory) as mgr:
        with pytest.raises(ckptmgr.CheckpointNotFoundError, match=r"step 250 .*100, 200, 300, 400, 500|step 250"):
            mgr.rollback(250)
        assert mgr.rolled_back == []
    assert _snapshot(directory) == before


def test_rollback_to_the_latest_moves_nothing(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    with ckptmgr.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.rollback(500).step == 500
        assert mgr.rolled_back == []


def test_a_reader_cannot_roll_back(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    with ckptmgr.CheckpointManager(tmp_path / "run", read_only=True) as reader, \
            pytest.raises(ckptmgr.CheckpointError, match="read-only"):
        reader.rollback(100)


def test_two_rollbacks_get_two_folders_oldest_first(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    with ckptmgr.CheckpointManager(tmp_path / "run", monitor=MONITOR, clock=iter(range(10**6, 10**7, 5)).__next__) as mgr:
        mgr.rollback(400)
        mgr.rollback(200)
        first, second = mgr.rolled_back
    with ckptmgr.CheckpointManager(first, read_only=True) as a, ckptmgr.CheckpointManager(second, read_only=True) as b:
        assert [c.step for c in a.checkpoints] == [500]
        assert [c.step for c in b.checkpoints] == [300, 400]


_KILLED_MID_ROLLBACK = textwrap.dedent(
    """
    import os, signal, sys
    import ckptmgr
    real_rename = os.rename
    moved = []
    def rename(src, dst, *a, **k):
        real_rename(src, dst, *a, **k)
        moved.append(dst)
        if "rolled-back" in str(dst):
            os.kill(os.getpid(), signal.SIGKILL)   # power gone after the first move
    os.rename = rename
    mgr = ckptmgr.CheckpointManager(sys.argv[1])
    mgr.rollback(200)
    """
)


def test_a_rollback_killed_midway_is_finished_by_the_next_writer(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    _run(directory)
    child = subprocess.run([sys.executable, "-c", _KILLED_MID_ROLLBACK, str(directory)],
                           capture_output=True, timeout=60, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    moved = list((directory / "rolled-back").rglob("ckpt-*.h5"))
    assert len(moved) == 1, "the child should have died after exactly one move"
    # A reader before any writer reopens: the decision is committed, so 300-500 are gone.
    with ckptmgr.CheckpointManager(directory, read_only=True) as reader:
        assert [c.step for c in reader.checkpoints] == [100, 200]
        assert reader.restore()["step"] == 200
    # The next writer finishes the moves.
    with ckptmgr.CheckpointManager(directory) as mgr:
        assert [c.step for c in mgr.checkpoints] == [100, 200]
        [folder] = mgr.rolled_back
    assert sorted(p.name for p in folder.iterdir()) == [f"ckpt-{s:09d}.h5" for s in (300, 400, 500)]
    assert not (directory / ".ckptmgr-rollback.json").exists()


def test_cli_ls_all_lists_what_was_set_aside(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "run"
    _run(directory)
    with ckptmgr.CheckpointManager(directory) as mgr:
        mgr.rollback(300)
    assert cli_main(["ls", str(directory)]) == 0
    plain = capsys.readouterr().out
    assert "rolled back" not in plain and "\n400 " not in plain
    assert cli_main(["ls", "--all", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "rolled back" in out and "after-step-000000300-" in out
    assert cli_main(["ls", "--all", "--json", str(directory)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in listing["checkpoints"]] == [100, 200, 300]
    assert [[c["step"] for c in r["checkpoints"]] for r in listing["rolled_back"]] == [[400, 500]]


def test_a_forged_rollback_record_moves_nothing_outside(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    _run(directory)
    outside = tmp_path / "victim.txt"
    outside.write_text("keep me")
    (directory / ".ckptmgr-rollback.json").write_text(
        json.dumps({"version": 1, "folder": "../../elsewhere", "files": ["../victim.txt", "ckpt-000000500.h5"]})
    )
    with ckptmgr.CheckpointManager(directory) as mgr:
        assert [c.step for c in mgr.checkpoints] == sorted(LOSSES)
    assert outside.read_text() == "keep me"
    assert not (tmp_path / "elsewhere").exists()
    assert not os.path.exists(directory / ".ckptmgr-rollback.json")
