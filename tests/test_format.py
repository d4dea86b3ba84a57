"""Format 2 on disk: packed small leaves, big leaves as datasets, format 1 still read,
hostile packs refused, and the memory-mapped restore (what it verifies and what not)."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from _format1_tree import format1_tree
from _reliability import leaf_offset
from _trees import assert_tree_equal

import ckptmgr
from ckptmgr import CorruptCheckpointError, codec
from ckptmgr.codec import _format

FIXTURE = Path(__file__).parent / "fixtures" / "format1.h5"
# Format 2 as first written (ckptmgr at 5d878bc): packed leaves placed one by one in
# tree order, each dataset's HDF5 header just before its bytes; written by
# ``codec.write_file(path, format2_tree(), {"step": 7, "time": 1764650000.0, "metrics": {"loss": 0.25}})``.
FIXTURE_2 = Path(__file__).parent / "fixtures" / "format2.h5"


def format2_tree() -> dict[str, Any]:
    return {**format1_tree(), "wide": np.arange(65536, dtype=np.float32).reshape(256, 256)}


def _manifest(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return dict(json.loads(f[codec.MANIFEST][()].tobytes()))


def _resign(path: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest and its CRC, as someone who knows the format would."""
    blob = json.dumps(manifest).encode()
    with h5py.File(path, "r+") as f:
        del f[codec.MANIFEST]
        f.create_dataset(codec.MANIFEST, data=np.frombuffer(blob, np.uint8))
        f.attrs["ckptmgr_manifest_crc32"] = np.uint32(codec.checksum(blob))


def _node(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    return dict(next(node for k, node in manifest["tree"]["items"] if k == key))


def _set_node(manifest: dict[str, Any], key: str, node: dict[str, Any]) -> None:
    manifest["tree"]["items"] = [[k, node if k == key else n] for k, n in manifest["tree"]["items"]]


# ------------------------------------------------------------------------ format 1


def test_a_format_1_file_still_restores_exactly(tmp_path: Path) -> None:
    """tests/fixtures/format1.h5 was written by format 1 (ckptmgr at ef46f85, one dataset
    per leaf, every kind of leaf); it restores bit for bit, verifies and is described."""
    assert h5py.File(FIXTURE, "r").attrs["ckptmgr_format"] == 1
    tree, manifest = codec.read_file(FIXTURE)
    assert manifest["format"] == 1 and manifest["step"] == 7
    assert_tree_equal(tree, format1_tree())
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURE, run / "ckpt-000000007.h5")
    with ckptmgr.CheckpointManager(run, read_only=True) as reader:
        assert_tree_equal(reader.restore(7), format1_tree())
        assert reader.verify(7).step == 7
        assert_tree_equal(reader.restore(7, select="params/layer3"), {"params": {"layer3": format1_tree()["params"]["layer3"]}})
        mapped = reader.restore(7, mmap=True)
        assert_tree_equal(mapped, format1_tree())
        assert {leaf.key_path for leaf in reader.describe(7).leaves} >= {("big",), ("bf16",)}
    # A writer continues the run in format 2; both files restore.
    with ckptmgr.CheckpointManager(run) as mgr:
        mgr.save(8, format1_tree())
        assert h5py.File(run / "ckpt-000000008.h5", "r").attrs["ckptmgr_format"] == 2
        assert_tree_equal(mgr.restore(8), format1_tree())
        assert_tree_equal(mgr.restore(7), format1_tree())


def test_a_format_2_file_of_the_first_writer_still_restores_exactly(tmp_path: Path) -> None:
    """Files written by format 2's first writer (5d878bc) restore, select, map and verify
    with today's reader; a writer continuing the run writes files that restore alike."""
    assert h5py.File(FIXTURE_2, "r").attrs["ckptmgr_format"] == 2
    tree, manifest = codec.read_file(FIXTURE_2)
    assert manifest["format"] == 2 and manifest["step"] == 7
    assert_tree_equal(tree, format2_tree())
    assert_tree_equal(codec.read_file(FIXTURE_2, mmap=True)[0], format2_tree())
    codec.verify_file(FIXTURE_2)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURE_2, run / "ckpt-000000007.h5")
    with ckptmgr.CheckpointManager(run) as mgr:
        assert_tree_equal(mgr.restore(7, select="params/layer3"),
                          {"params": {"layer3": format2_tree()["params"]["layer3"]}})
        mgr.save(8, format2_tree())
        assert_tree_equal(mgr.restore(8), format2_tree())
        assert_tree_equal(mgr.restore(7), format2_tree())


def test_an_unknown_format_version_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    codec.write_file(path, {"w": np.ones(3)}, {"step": 1})
    with h5py.File(path, "r+") as f:
        f.attrs["ckptmgr_format"] = 3
    with pytest.raises(CorruptCheckpointError, match="unsupported format version 3"):
        codec.read_file(path)


# -------------------------------------------------------------------------- layout


def test_small_leaves_are_packed_and_big_ones_are_page_aligned_datasets(tmp_path: Path) -> None:
    threshold = _format.PACK_THRESHOLD
    tree = {
        "just_below": np.ones(threshold - 1, np.uint8),
        "at_threshold": np.ones(threshold, np.uint8),
        "big": np.arange(threshold // 4 * 3, dtype=np.float32),
        "tiny": [np.float16(1.5), True, 3, "text", b"\x00", None, 2**70],
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "x.h5"
    codec.write_file(path, tree, {"step": 1})
    with h5py.File(path, "r") as f:
        assert sorted(f["state"]) == ["at_threshold", "big"]
        for name in ("at_threshold", "big"):
            assert f[f"state/{name}"].id.get_offset() % _format.FILE_ALIGN == 0
        # The datasets' headers lie together before their bytes (one read finds them).
        headers = [h5py.h5o.get_info(f[f"state/{name}"].id).addr for name in ("at_threshold", "big")]
        assert max(headers) < min(f[f"state/{name}"].id.get_offset() for name in ("at_threshold", "big"))
        names = sorted(row.decode() for row in f["ckptmgr_packed_index"]["name"])
        assert "/state/just_below" in names and "/state/mask" in names
    manifest = _manifest(path)
    packed = [node for _keys, _h5path, node in codec.iter_leaves(manifest["tree"]) if "at" in node]
    assert packed and all(node["at"] % min(np.dtype(node["dtype"]).itemsize if node["dtype"][0] in "<>|=" else 2,
                                           _format.PACK_ALIGN) == 0 for node in packed)
    assert_tree_equal(codec.read_file(path)[0], tree)
    assert_tree_equal(codec.read_file(path, verify=False)[0], tree)
    codec.verify_file(path)


def test_the_packed_index_table_is_for_people_only(tmp_path: Path) -> None:
    """Damage to the index table does not change what is restored: the manifest rules."""
    path = tmp_path / "x.h5"
    tree = {"a": np.arange(5.0), "b": np.arange(7, dtype=np.int32)}
    codec.write_file(path, tree, {"step": 1})
    with h5py.File(path, "r+") as f:
        table = f["ckptmgr_packed_index"][()]
        table["offset"] = table["offset"][::-1]
        f["ckptmgr_packed_index"][...] = table
    assert_tree_equal(codec.read_file(path)[0], tree)


# ------------------------------------------------------------------ hostile packs


def _pack_craft(edit: Callable[[dict[str, Any], Path], None]) -> Callable[[Path], None]:
    def craft(path: Path) -> None:
        manifest = _manifest(path)
        edit(manifest, path)
        _resign(path, manifest)
    return craft


def _at(value: Any) -> Callable[[dict[str, Any], Path], None]:
    def edit(manifest: dict[str, Any], path: Path) -> None:
        node = _node(manifest, "w")
        node["at"] = value
        _set_node(manifest, "w", node)
    return edit


def _moved_to_another_key(manifest: dict[str, Any], path: Path) -> None:
    """Swap two leaves of the same dtype and shape between keys (their bytes, re-signed)."""
    w, v = _node(manifest, "w"), _node(manifest, "v")
    _set_node(manifest, "w", {**w, "at": v["at"]})


def _read_as_another_dtype(manifest: dict[str, Any], path: Path) -> None:
    node = _node(manifest, "w")
    _set_node(manifest, "w", {**node, "dtype": "<i8"})  # same item size as <f8


def _aliased_many_times(manifest: dict[str, Any], path: Path) -> None:
    """200 keys at the place of one 64 KiB leaf: more bytes than the file has."""
    node = _node(manifest, "big")
    manifest["tree"]["items"] += [[f"k{i}", node] for i in range(200)]


def _pack_replaced(dataset: Callable[[h5py.File], None]) -> Callable[[Path], None]:
    def craft(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            del f[_format.PACK]
            dataset(f)
    return craft


def _external_pack(f: h5py.File) -> None:
    f.create_dataset(_format.PACK, shape=(1 << 20,), dtype=np.uint8, external=[("/etc/passwd", 0, 1 << 20)])


@pytest.mark.parametrize(("craft", "match"), [
    pytest.param(_pack_craft(_at(-64)), "outside the packed leaves", id="negative-offset"),
    pytest.param(_pack_craft(_at(1 << 40)), "outside the packed leaves", id="offset-past-the-pack"),
    pytest.param(_pack_craft(_at("0")), "outside the packed leaves", id="offset-not-an-int"),
    pytest.param(_pack_craft(_at(True)), "outside the packed leaves", id="offset-a-bool"),
    pytest.param(_pack_craft(_moved_to_another_key), "checksum mismatch in /state/", id="leaf-moved-to-another-key"),
    pytest.param(_pack_craft(_read_as_another_dtype), "checksum mismatch in /state/", id="leaf-read-as-another-dtype"),
    pytest.param(_pack_craft(_aliased_many_times), "claims more bytes|checksum mismatch in /state/",
                 id="one-leaf-under-200-keys"),
    pytest.param(_pack_replaced(lambda f: None), "missing 'ckptmgr_packed'", id="pack-missing"),
    pytest.param(_pack_replaced(lambda f: f.create_dataset(_format.PACK, data=np.zeros(1 << 14, np.float32))),
                 "malformed packed leaves", id="pack-of-floats"),
    pytest.param(_pack_replaced(lambda f: f.create_dataset(_format.PACK, data=np.zeros((64, 1 << 10), np.uint8))),
                 "malformed packed leaves", id="pack-of-two-dimensions"),
    pytest.param(_pack_replaced(_external_pack), "external or virtual storage", id="pack-stored-externally"),
    pytest.param(_pack_replaced(lambda f: f.create_dataset(_format.PACK, data=np.zeros(1 << 16, np.uint8),
                                                            chunks=(1024,), compression="gzip")),
                 "unexpected layout", id="pack-chunked-and-compressed"),
])
@pytest.mark.parametrize("how", ["read", "select", "mmap", "verify"])
def test_a_hostile_pack_is_refused(tmp_path: Path, craft: Callable[[Path], None], match: str, how: str) -> None:
    path = tmp_path / "x.h5"
    tree = {"w": np.arange(100.0), "v": np.arange(100.0) + 1, "big": np.zeros(8192)}
    codec.write_file(path, tree, {"step": 1})
    craft(path)
    if how == "mmap" and match.startswith("checksum"):
        pytest.skip("a mapped restore checks no array checksum (documented): verify() does")
    read: Callable[[], Any] = {
        "read": lambda: codec.read_file(path),
        "select": lambda: codec.read_file(path, select=codec.selection([["w"], *[[f"k{i}"] for i in range(200)]])
                                          if "k0" in dict(_manifest(path)["tree"]["items"]) else
                                          codec.selection([["w"]])),
        "mmap": lambda: codec.read_file(path, mmap=True),
        "verify": lambda: codec.verify_file(path),
    }[how]
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match=match):
            read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * os.path.getsize(path) + (4 << 20), f"allocated {peak} bytes for a {os.path.getsize(path)}-byte file"


# ----------------------------------------------------------------------------- mmap


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_mmap_restore_maps_without_reading_and_survives_retention(tmp_path: Path) -> None:
    state = {f"layer{i}": {"w": np.full((256, 256), i, np.float32), "b": np.full(256, -i, np.float32)}
             for i in range(96)}  # 24 MiB of big leaves, and small ones packed
    with ckptmgr.CheckpointManager(tmp_path / "run", keep=ckptmgr.KeepLast(1)) as mgr:
        mgr.save(1, state)
        before = _rss()
        mapped = mgr.restore(1, mmap=True)
        after_restore = _rss()
        assert_tree_equal(mapped, state)  # touches every byte
        after_touch = _rss()
        w = mapped["layer5"]["w"]
        assert not w.flags.writeable and not mapped["layer5"]["b"].flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            w[0, 0] = 1
        mgr.save(2, state)  # retention deletes step 1's file: mapped arrays stay valid
        assert not (tmp_path / "run" / "ckpt-000000001.h5").exists()
        np.testing.assert_array_equal(mapped["layer95"]["w"], state["layer95"]["w"])
    assert after_restore - before < 4 << 20, f"restore(mmap=True) grew RSS by {after_restore - before} bytes"
    assert after_touch - before > 16 << 20, "touching the arrays should have faulted their pages in"


@pytest.mark.parametrize("layout", ["packed", "unpacked"])
def test_mmap_restore_checks_the_metadata_and_verify_checks_the_arrays(
    tmp_path: Path, layout: str, request: pytest.FixtureRequest,
) -> None:
    """The integrity story of mmap=True: a damaged manifest is refused (and "latest" falls
    back); damaged array bytes are returned as they are, and verify() finds them."""
    if layout == "unpacked":
        request.getfixturevalue("unpacked")
    run = tmp_path / "run"
    with ckptmgr.CheckpointManager(run) as mgr:
        mgr.save(1, {"w": np.arange(100.0)})
        mgr.save(2, {"w": np.arange(100.0) * 2})
    path = run / "ckpt-000000002.h5"
    data = bytearray(path.read_bytes())
    data[leaf_offset(path, "/state/w") + 8 * 10 + 7] ^= 0x40
    path.write_bytes(bytes(data))
    with ckptmgr.CheckpointManager(run, read_only=True) as reader:
        mapped = reader.restore(2, mmap=True)
        assert mapped["w"][10] != 20.0
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch in /state/w"):
            reader.verify(2)
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            reader.restore(2)
    manifest = _manifest(path)
    with h5py.File(path, "r+") as f:  # the manifest's CRC no longer matches
        f.attrs["ckptmgr_manifest_crc32"] = np.uint32(codec.checksum(json.dumps(manifest).encode()) ^ 1)
    with ckptmgr.CheckpointManager(run, read_only=True) as reader, pytest.warns(ckptmgr.CheckpointWarning):
        assert reader.restore(mmap=True)["w"][10] == 10.0


def test_mmap_returns_aligned_read_only_arrays_also_from_a_small_pack(tmp_path: Path) -> None:
    """HDF5 aligns only datasets of 64 KiB or more: a small pack's leaves, mapped where
    they lie, could be misaligned for their dtype; they are read instead."""
    tree = {"a": np.arange(3.0), "b": np.arange(5, dtype=np.complex128), "c": [np.float64(2)],
            "flags": np.array([True, False]), "big": np.arange(2**16, dtype=np.float64)}
    path = tmp_path / "x.h5"
    codec.write_file(path, tree, {"step": 1})
    with h5py.File(path, "r") as f:
        assert f["ckptmgr_packed"].id.get_offset() % 16, "a pack HDF5 did not align: the case under test"
    for select in (None, codec.selection([["a"], ["b"], ["big"]])):
        mapped, _ = codec.read_file(path, mmap=True, select=select)
        arrays = [mapped["a"], mapped["b"], mapped["big"]] + ([] if select else [mapped["flags"]])
        assert all(a.flags.aligned and not a.flags.writeable for a in arrays)
        assert_tree_equal(mapped, tree if select is None else {k: tree[k] for k in ("a", "b", "big")})


def test_mmap_with_select_and_every_kind_of_leaf(tmp_path: Path) -> None:
    tree = format1_tree()
    path = tmp_path / "x.h5"
    codec.write_file(path, tree, {"step": 1})
    mapped, _ = codec.read_file(path, mmap=True)
    assert_tree_equal(mapped, tree)
    part, _ = codec.read_file(path, mmap=True, select=codec.selection([["params", "layer2"], ["mask"]]))
    assert_tree_equal(part, {"params": {"layer2": tree["params"]["layer2"]}, "mask": tree["mask"]})
