"""What a newcomer's first mistakes are told: each message names the cause and the way out."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

import ckptmgr


def test_a_second_writer_in_the_same_process_is_told_where_the_first_was_opened(tmp_path: Path) -> None:
    first = ckptmgr.CheckpointManager(tmp_path / "run")  # this line is named in the error
    line = test_a_second_writer_in_the_same_process_is_told_where_the_first_was_opened.__code__.co_firstlineno + 1
    try:
        with pytest.raises(ckptmgr.DirectoryLockedError) as excinfo:
            ckptmgr.CheckpointManager(tmp_path / "run")
        message = str(excinfo.value)
        assert "already open for writing in this process" in message
        assert f"{__file__}:{line}" in message
        assert "another process" not in message
        # A reader is fine meanwhile.
        with ckptmgr.CheckpointManager(tmp_path / "run", read_only=True):
            pass
    finally:
        first.close()
    # Once closed, a new writer opens.
    ckptmgr.CheckpointManager(tmp_path / "run").close()


def test_a_writer_dropped_without_close_does_not_block_the_next_one(tmp_path: Path) -> None:
    ckptmgr.CheckpointManager(tmp_path / "run")  # never closed: released when collected
    gc.collect()
    with ckptmgr.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"x": 1})


@pytest.mark.parametrize("value", ["0.5", b"0.5", np.str_("0.5")], ids=["str", "bytes", "numpy-str"])
def test_a_metric_given_as_text_is_refused_not_converted(tmp_path: Path, value: object) -> None:
    with ckptmgr.CheckpointManager(tmp_path / "run", monitor="val_loss") as mgr:
        with pytest.raises(ValueError, match=r"metrics\['val_loss'\]"):
            mgr.save(1, {"x": 1}, metrics={"val_loss": value})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match=r"metrics\['val_loss'\]"):
            mgr.should_save(1, metrics={"val_loss": value})  # type: ignore[dict-item]
        assert mgr.checkpoints == []
        # Numbers of any numeric kind still work.
        assert mgr.save(1, {"x": 1}, metrics={"val_loss": np.float32(0.5)}) is not None


def test_a_torch_tensor_in_the_state_names_its_path_and_the_adapter(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    state = {"model": {"layer": {"weight": torch.zeros(2)}}}
    with ckptmgr.CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(TypeError) as excinfo:
            mgr.save(1, state)
        assert mgr.checkpoints == []
    message = str(excinfo.value)
    assert "model" in message and "layer" in message and "weight" in message
    assert "ckptmgr.adapters.torch.to_tree" in message
