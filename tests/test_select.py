"""restore(select=...): only the selected subtrees, same nesting, and only they are read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _reliability import leaf_offset

import ckptmgr

STATE: dict[str, Any] = {
    "params": {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.zeros(3)},
               "scale": 2.0},
    "opt": {"m": [np.ones(3), np.full(3, 2.0)], "step": 7},
    "layers": [{"w": np.ones(1)}, {"w": np.full(1, 5.0)}],
    "pair": (1, "two"),
    "meta": None,
}


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    with ckptmgr.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, STATE)
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("select", "expected"),
    [
        ("params", {"params": STATE["params"]}),
        ("params/dense/kernel", {"params": {"dense": {"kernel": STATE["params"]["dense"]["kernel"]}}}),
        (["params/scale", "opt/step"], {"params": {"scale": 2.0}, "opt": {"step": 7}}),
        (["params", "params/dense"], {"params": STATE["params"]}),  # the wider selection wins
        (["params/dense", "params"], {"params": STATE["params"]}),
        ("opt/m/1", {"opt": {"m": [STATE["opt"]["m"][1]]}}),
        ("layers/1/w", {"layers": [{"w": STATE["layers"][1]["w"]}]}),
        ("pair", {"pair": (1, "two")}),
        ("meta", {"meta": None}),
        ("/params/scale/", {"params": {"scale": 2.0}}),
    ],
    ids=lambda v: repr(v) if isinstance(v, (str, list)) else None,
)
def test_select_returns_the_selected_subtrees_in_the_same_nesting(
    directory: Path, select: str | list[str], expected: Any, tree_equal: Any
) -> None:
    with ckptmgr.CheckpointManager(directory, read_only=True) as reader:
        tree_equal(reader.restore(select=select), expected)
        tree_equal(reader.restore(1, select=select), expected)


@pytest.mark.parametrize("select", ["nope", "params/nope", "params/scale/deeper", "opt/m/7", "layers/x"])
def test_an_unknown_path_is_a_key_error_naming_it(directory: Path, select: str) -> None:
    with ckptmgr.CheckpointManager(directory, read_only=True) as reader, pytest.raises(KeyError) as excinfo:
        reader.restore(select=select)
    last = select.split("/")[-1] if not select.endswith("deeper") else "deeper"
    assert last in str(excinfo.value) and str(directory) in str(excinfo.value)


@pytest.mark.parametrize("select", ["", "a//b", [], [1], b"params"])
def test_a_malformed_select_is_a_value_error(directory: Path, select: Any) -> None:
    with ckptmgr.CheckpointManager(directory, read_only=True) as reader, \
            pytest.raises(ValueError, match="Expected"):
        reader.restore(select=select)


def test_select_of_a_payload_is_refused(tmp_path: Path) -> None:
    with ckptmgr.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, ckptmgr.FilePayload("m.bin", lambda p: p.write_bytes(b"x")))
        with pytest.raises(ValueError, match="payload"):
            mgr.restore(select="params")


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io (Linux)")
def test_an_unselected_subtree_is_not_read(tmp_path: Path) -> None:
    big = np.random.default_rng(0).standard_normal(8 * 1024 * 1024 // 8)  # 8 MiB of optimizer state
    with ckptmgr.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"params": {"w": np.ones(16)}, "opt": {"m": big}})
    with ckptmgr.CheckpointManager(tmp_path / "run", read_only=True) as reader:
        reader.restore(1, select="params")  # warm the metadata paths once
        before = _bytes_read()
        params = reader.restore(1, select="params")
        selected = _bytes_read() - before
        before = _bytes_read()
        whole = reader.restore(1)
        everything = _bytes_read() - before
    np.testing.assert_array_equal(params["params"]["w"], np.ones(16))
    np.testing.assert_array_equal(whole["opt"]["m"], big)
    assert everything >= big.nbytes
    assert selected < big.nbytes // 16, f"read {selected} bytes for 128 selected bytes beside an 8 MiB subtree"


@pytest.mark.parametrize("layout", ["packed", "unpacked"])
def test_a_corrupt_unselected_leaf_does_not_fail_a_selected_read(
    tmp_path: Path, layout: str, request: pytest.FixtureRequest,
) -> None:
    if layout == "unpacked":
        request.getfixturevalue("unpacked")
    # Packed leaves are verified by 1 MiB block: "fill" puts "m" in another block than "w".
    fill = [np.zeros(25_000) for _ in range(6)]
    with ckptmgr.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"params": {"w": np.ones(16)}, "opt": {"fill": fill, "m": np.arange(64.0)}})
    path = tmp_path / "run" / "ckpt-000000001.h5"
    data = bytearray(path.read_bytes())
    data[leaf_offset(path, "/state/opt/m")] ^= 0xFF
    path.write_bytes(bytes(data))
    with ckptmgr.CheckpointManager(tmp_path / "run", read_only=True) as reader:
        np.testing.assert_array_equal(reader.restore(1, select="params")["params"]["w"], np.ones(16))
        with pytest.raises(ckptmgr.CorruptCheckpointError):
            reader.restore(1, select="opt")
        with pytest.raises(ckptmgr.CorruptCheckpointError):
            reader.restore(1)
