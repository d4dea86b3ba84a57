"""Hostile input (invariant 8): loading can fail, but cannot run code, escape the
directory, or allocate without bound.

Hand-crafted HDF5 files (external, soft and virtual links, external storage, object
and variable-length types, absurd shapes, hard links that multiply one dataset, deep
nesting, hostile dtype strings) are refused with a CorruptCheckpointError, as files
and inside a checkpoint directory (where the manager falls back past them with a
warning). Hostile directory entries (names with "..", "/", NUL or huge lengths in
sidecars, commit records and the index; symbolic links and FIFOs planted at temporary
and final names, at the index, lock and commit records) are ignored or refused. An
inotify watch on a directory outside proves nothing there was opened, read or written;
tracemalloc (and a child process under an address-space limit) proves memory stays
bounded; pickles planted everywhere a checkpoint could hold one are never executed.

test_codec.py (another harness) has a soft and an external link and a huge manifest
shape; this file covers the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
import secrets
import signal
import tracemalloc
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from _reliability import MONITOR, OutsideWatch, codec_sidecar, processes, record, state_for, writes
from _trees import assert_tree_equal

import ckptmgr
from ckptmgr import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    FilePayload,
    codec,
    storage,
)
from ckptmgr.codec import _format

MEMORY_LIMIT = 48 * 1024 * 1024  # what reading any hostile file here may allocate (tracemalloc peak)


@pytest.fixture(scope="module", autouse=True)
def _each_leaf_its_own_dataset() -> Iterator[None]:
    """The crafting below targets one leaf's dataset: every leaf gets one (format 2 packs
    small leaves into one dataset; the pack's own hostile cases are in test_format.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_format, "PACK_THRESHOLD", 0)
        yield


class Outside:
    """A directory outside the checkpoint directory with files an attacker points at (a
    ckptmgr checkpoint, a plain HDF5 file, raw bytes, a sidecar), watched with inotify."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir()
        codec.write_file(directory / "secret.h5", {"w": np.full(4, 7.0), "v": np.ones(4), "s": "secret"},
                         {"step": 1})
        with h5py.File(directory / "plain.h5", "w") as f:
            f["x"] = np.full(4, 7.0)
        (directory / "secret.bin").write_bytes(np.full(4, 7.0).tobytes())
        _, blob = codec_sidecar("secret.bin", step=1, content=(directory / "secret.bin").read_bytes())
        (directory / "sidecar.json").write_bytes(blob)
        self.files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}
        self.watch = OutsideWatch(directory)

    def forget(self) -> None:
        """Drop the events so far (what the test itself did out there, such as planting
        a file, which joins the files that must stay as they are)."""
        self.files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in self.dir.iterdir()}
        self.watch.events()

    def check(self) -> None:
        """Nothing was opened, read, written, created or deleted out there."""
        events = self.watch.events()
        assert events == [], f"files outside the checkpoint directory were touched: {events}"
        now = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in self.dir.iterdir()}
        self.watch.events()  # our own reads, just now
        assert now == self.files


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Outside]:
    out = Outside(tmp_path / "outside")
    try:
        yield out
    finally:
        out.watch.close()


# ----------------------------------------------------------- hand-crafted HDF5


def _base(path: Path, step: int = 1) -> None:
    codec.write_file(path, {"w": np.zeros(4), "v": np.ones(4), "s": "text", "sub": {"a": np.arange(3)}},
                     {"step": step, "time": 1.0, "metrics": {}})


def _manifest(f: h5py.File) -> dict[str, Any]:
    return dict(json.loads(f[codec.MANIFEST][()].tobytes()))


def _resign(f: h5py.File, manifest: dict[str, Any]) -> None:
    """Replace the manifest and recompute its CRC, as an attacker who knows the format would."""
    blob = json.dumps(manifest).encode()
    del f[codec.MANIFEST]
    f.create_dataset(codec.MANIFEST, data=np.frombuffer(blob, np.uint8))
    f.attrs["ckptmgr_manifest_crc32"] = np.uint32(codec.checksum(blob))


def _leaf(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    return dict(next(node for k, node in manifest["tree"]["items"] if k == key))


def _set_leaf(manifest: dict[str, Any], key: str, node: dict[str, Any]) -> None:
    manifest["tree"]["items"] = [[k, node if k == key else v] for k, v in manifest["tree"]["items"]]


Craft = Callable[[Path, Path], None]


def _external_link(where: str) -> Craft:
    def craft(path: Path, out: Path) -> None:
        with h5py.File(path, "r+") as f:
            if where == codec.MANIFEST:
                _resign(f, _manifest(f))
                blob = f[codec.MANIFEST][()]
                del f[codec.MANIFEST]
                with h5py.File(out / "manifest.h5", "w") as g:
                    g["m"] = blob
                f[codec.MANIFEST] = h5py.ExternalLink(str(out / "manifest.h5"), "/m")
            elif where == "state":
                del f["state"]
                f["state"] = h5py.ExternalLink(str(out / "secret.h5"), "/state")
            elif where == "group":
                del f["state/sub"]
                f["state/sub"] = h5py.ExternalLink(str(out / "secret.h5"), "/state")
            else:
                del f["state/w"]
                f["state/w"] = h5py.ExternalLink(str(out / "plain.h5"), "/x")

    return craft


def _soft_link(where: str) -> Craft:
    def craft(path: Path, out: Path) -> None:
        with h5py.File(path, "r+") as f:
            if where == codec.MANIFEST:
                f.move(codec.MANIFEST, "other_manifest")
                f[codec.MANIFEST] = h5py.SoftLink("/other_manifest")
            elif where == "state":
                f.move("state", "other_state")
                f["state"] = h5py.SoftLink("/other_state")
            elif where == "dangling":
                del f["state/w"]
                f["state/w"] = h5py.SoftLink("/nowhere")
            else:
                del f["state/w"]
                f["state/w"] = h5py.SoftLink("/state/v")

    return craft


def _virtual(path: Path, out: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["state/w"]
        layout = h5py.VirtualLayout(shape=(4,), dtype="<f8")
        layout[:] = h5py.VirtualSource(str(out / "plain.h5"), "x", shape=(4,))
        f.create_virtual_dataset("state/w", layout)


def _external_storage(path: Path, out: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["state/w"]
        f.create_dataset("state/w", shape=(4,), dtype="<f8", external=[(str(out / "secret.bin"), 0, 32)])


def _stored_as(dtype: Any, data: Any, claim: str | None = None) -> Craft:
    """Leaf ``w`` stored with an HDF5 type the codec never writes; the manifest (re-signed)
    claims ``claim`` (default: what it said)."""

    def craft(path: Path, out: Path) -> None:
        with h5py.File(path, "r+") as f:
            del f["state/w"]
            if data is None:
                f.create_dataset("state/w", shape=(4,), dtype=dtype)
            else:
                f.create_dataset("state/w", data=data, dtype=dtype)
            manifest = _manifest(f)
            if claim is not None:
                node = _leaf(manifest, "w")
                node["dtype"] = claim
                _set_leaf(manifest, "w", node)
            _resign(f, manifest)

    return craft


def _claims(**changes: Any) -> Craft:
    """The manifest (re-signed) claims something else about leaf ``w``."""

    def craft(path: Path, out: Path) -> None:
        with h5py.File(path, "r+") as f:
            manifest = _manifest(f)
            node = _leaf(manifest, "w")
            node.update(changes)
            _set_leaf(manifest, "w", node)
            _resign(f, manifest)

    return craft


def _absurd_dataset(path: Path, out: Path) -> None:
    """A dataset that claims 2**60 bytes (never allocated in the file), and a manifest that agrees."""
    with h5py.File(path, "r+") as f:
        del f["state/w"]
        f.create_dataset("state/w", shape=(2**57,), dtype="<f8")
        manifest = _manifest(f)
        node = _leaf(manifest, "w")
        node["shape"] = [2**57]
        _set_leaf(manifest, "w", node)
        _resign(f, manifest)


def _huge_manifest_dataset(path: Path, out: Path) -> None:
    with h5py.File(path, "r+") as f:
        crc = f.attrs["ckptmgr_manifest_crc32"]
        del f[codec.MANIFEST]
        f.create_dataset(codec.MANIFEST, shape=(2**40,), dtype="u1")
        f.attrs["ckptmgr_manifest_crc32"] = crc


def _hard_links(path: Path, out: Path) -> None:
    """One 1 MiB dataset under 200 names: a 1 MB file that would make the reader allocate 200 MB."""
    with h5py.File(path, "r+") as f:
        f["state/big"] = np.zeros(2**17)
        manifest = _manifest(f)
        crc = _format._LEAF_CHECKSUMS[manifest["checksum"]](bytes(2**20), 0)  # each name verifies
        node = {"t": "ndarray", "dtype": "<f8", "shape": [2**17], "crc": crc}
        items = [[f"k{i}", node] for i in range(200)]
        for i in range(200):
            f[f"state/k{i}"] = f["state/big"]
        manifest["tree"]["items"] += items
        _resign(f, manifest)


def _deep_groups(depth: int) -> Craft:
    def craft(path: Path, out: Path) -> None:
        with h5py.File(path, "r+") as f:
            manifest = _manifest(f)
            node: dict[str, Any] = {"t": "ndarray", "dtype": "<f8", "shape": [1], "crc": zlib.crc32(bytes(8))}
            group = f.require_group("state/deep")
            for _ in range(depth):
                node = {"t": "dict", "items": [["d", node]]}
                group = group.require_group("d")
            group["d"] = np.zeros(1)
            manifest["tree"]["items"].append(["deep", {"t": "dict", "items": [["d", node]]}])
            _resign(f, manifest)

    return craft


def _deep_json(depth: int) -> Craft:
    def craft(path: Path, out: Path) -> None:
        with h5py.File(path, "r+") as f:
            manifest = _manifest(f)
            blob = json.dumps(manifest).encode()
            deep = b'{"t":"list","items":[' * depth + b"]}" * depth
            blob = blob.replace(b'"tree": {', b'"deep": ' + deep + b', "tree": {', 1)
            del f[codec.MANIFEST]
            f.create_dataset(codec.MANIFEST, data=np.frombuffer(blob, np.uint8))
            f.attrs["ckptmgr_manifest_crc32"] = np.uint32(codec.checksum(blob))

    return craft


def _many_items(path: Path, out: Path) -> None:
    """A manifest of 100,000 items, and a dict naming one dataset 1,000 times."""
    with h5py.File(path, "r+") as f:
        manifest = _manifest(f)
        manifest["tree"]["items"].append(["many", {"t": "list", "items": [{"t": "none"}] * 10**5}])
        node = _leaf(manifest, "v")
        manifest["tree"]["items"].append(["again", {"t": "dict", "items": [["v", node]] * 1000}])
        f["state/again/v"] = f["state/v"]
        _resign(f, manifest)


def _attribute(value: Any) -> Craft:
    def craft(path: Path, out: Path) -> None:
        with h5py.File(path, "r+") as f:
            f.attrs["ckptmgr_format"] = value

    return craft


def _object_reference_attribute(path: Path, out: Path) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs.create("ckptmgr_format", f["state/w"].ref, dtype=h5py.ref_dtype)


def _vlen_manifest(path: Path, out: Path) -> None:
    with h5py.File(path, "r+") as f:
        text = f[codec.MANIFEST][()].tobytes().decode()
        del f[codec.MANIFEST]
        f.create_dataset(codec.MANIFEST, data=text, dtype=h5py.string_dtype())


HOSTILE_FILES: list[Any] = [
    pytest.param(_external_link("leaf"), "ExternalLink", id="external-link-leaf"),
    pytest.param(_external_link("group"), "ExternalLink", id="external-link-group"),
    pytest.param(_external_link("state"), "ExternalLink", id="external-link-state"),
    pytest.param(_external_link(codec.MANIFEST), "ExternalLink", id="external-link-manifest"),
    pytest.param(_soft_link("leaf"), "SoftLink", id="soft-link-leaf"),
    pytest.param(_soft_link("dangling"), "SoftLink", id="soft-link-dangling"),
    pytest.param(_soft_link("state"), "SoftLink", id="soft-link-state"),
    pytest.param(_soft_link(codec.MANIFEST), "SoftLink", id="soft-link-manifest"),
    pytest.param(_virtual, "virtual", id="virtual-dataset"),
    pytest.param(_external_storage, "external", id="external-storage"),
    pytest.param(_stored_as(h5py.string_dtype(), ["a", "b", "c", "d"]), "", id="vlen-str"),
    pytest.param(_stored_as(h5py.vlen_dtype(np.int64), None), "", id="vlen-int"),
    pytest.param(_stored_as(h5py.ref_dtype, None), "", id="object-reference"),
    pytest.param(_stored_as(np.dtype([("a", "<f4"), ("b", "<i4")]), None), "", id="compound"),
    pytest.param(_stored_as(h5py.enum_dtype({"A": 0, "B": 1}, basetype="i1"), np.zeros(4, "i1")), "", id="enum"),
    pytest.param(_stored_as(np.dtype("V8"), np.zeros(4, "V8")), "", id="opaque"),
    pytest.param(_stored_as(np.dtype("S8"), np.zeros(4, "S8")), "", id="fixed-string"),
    pytest.param(_stored_as(np.dtype("V8"), np.zeros(4, "V8"), claim="|V8"), "dtype", id="claims-void"),
    pytest.param(_stored_as(np.dtype("S8"), np.zeros(4, "S8"), claim="|S8"), "dtype", id="claims-bytes"),
    pytest.param(_claims(dtype="|O"), "dtype", id="claims-object"),
    pytest.param(_claims(dtype="<M8[s]"), "dtype", id="claims-datetime"),
    pytest.param(_claims(dtype="__class__"), "dtype", id="claims-module-attribute"),
    pytest.param(_claims(dtype="x" * 10**6), "dtype", id="claims-huge-dtype-name"),
    pytest.param(_claims(shape=[2**31, 2**31]), "", id="claims-absurd-shape"),
    pytest.param(_claims(shape=[2**62]), "shape", id="claims-2**62-elements"),
    pytest.param(_claims(shape=[1] * 1000), "shape", id="claims-1000-dimensions"),
    pytest.param(_claims(shape=[-1]), "shape", id="claims-negative-shape"),
    pytest.param(_absurd_dataset, "", id="dataset-of-2**60-bytes"),
    pytest.param(_huge_manifest_dataset, "", id="manifest-of-2**40-bytes"),
    pytest.param(_hard_links, "claims", id="hard-links-multiplying-a-dataset"),
    pytest.param(_deep_groups(codec.MAX_DEPTH + 5), "malformed", id="groups-nested-too-deep"),
    pytest.param(_deep_json(100_000), "", id="manifest-json-nested-100000-deep"),
    pytest.param(_many_items, "duplicate", id="many-items-and-a-repeated-key"),
    pytest.param(_attribute(np.array([1, 1])), "format", id="format-attribute-array"),
    pytest.param(_attribute("1"), "format", id="format-attribute-str"),
    pytest.param(_object_reference_attribute, "format", id="format-attribute-reference"),
    pytest.param(_vlen_manifest, "manifest", id="manifest-vlen-str"),
]


def _bounded(call: Callable[[], Any]) -> int:
    """Run ``call``; return the peak bytes it allocated (tracemalloc sees NumPy's buffers)."""
    tracemalloc.start()
    try:
        call()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize(("craft", "match"), HOSTILE_FILES)
def test_hostile_file_is_refused(tmp_path: Path, outside: Outside, craft: Craft,
                                 match: str) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as mgr:
        mgr.save(0, state_for(0, 100))
    bad = run / storage.checkpoint_name(1)
    _base(bad)
    craft(bad, outside.dir)
    outside.forget()  # what crafting did outside does not count
    for read in (codec.read_file, codec.verify_file):
        def call(read: Callable[[Path], Any] = read) -> None:
            with pytest.raises(CorruptCheckpointError, match=match or None) as excinfo:
                read(bad)
            assert str(bad) in str(excinfo.value)

        peak = _bounded(call)
        assert peak < MEMORY_LIMIT, f"{read.__name__} allocated {peak} bytes on a hostile file"
    # In a directory: listed as corrupt, refused by restore(1), skipped with a warning by restore().
    for reader in (CheckpointManager(run, read_only=True), CheckpointManager(run)):
        with reader:
            with pytest.raises(CorruptCheckpointError):
                reader.restore(1)
            with pytest.warns(CheckpointWarning, match=str(bad)):
                assert_tree_equal(reader.restore(), state_for(0, 100))
    outside.check()
    record("hostile", "hostile HDF5 files", {"cases": 1, "refused by read_file, verify_file, a reader, a writer": 4})


def test_the_hostile_files_in_a_child_under_an_address_space_limit(tmp_path: Path) -> None:
    """All the crafted files read by a child process that may not map more than 1 GiB
    beyond what it started with: a reader that trusted a claimed size would die."""
    out = tmp_path / "outside"
    out.mkdir()
    codec.write_file(out / "secret.h5", {"w": np.full(4, 7.0)}, {"step": 1})
    with h5py.File(out / "plain.h5", "w") as f:
        f["x"] = np.full(4, 7.0)
    (out / "secret.bin").write_bytes(bytes(32))
    paths = []
    for n, param in enumerate(HOSTILE_FILES):
        path = tmp_path / f"{n}.h5"
        _base(path)
        param.values[0](path, out)
        paths.append(str(path))
    ctx = processes()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_read_all_limited, args=(child, paths), daemon=True)
    proc.start()
    child.close()
    outcome = parent.recv() if parent.poll(300) else None
    proc.join(60)
    assert outcome is not None, f"the child died (exit {proc.exitcode})"
    refused, others, grown = outcome
    assert others == [], others
    assert refused == len(paths)
    assert grown < 96 * 1024 * 1024, f"max RSS grew by {grown} bytes"
    record("hostile", "hostile HDF5 files under RLIMIT_AS in a child", {
        "cases": 1, "files refused": len(paths), "max RSS growth, KiB": grown // 1024})


def _read_all_limited(conn: Connection, paths: list[str]) -> None:
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused, others = 0, []
    for path in paths:
        try:
            codec.read_file(path)
        except CorruptCheckpointError:
            refused += 1
        except BaseException as exc:
            others.append(f"{path}: {type(exc).__name__}: {exc}"[:300])
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    conn.send((refused, others, grown))


def test_a_legitimate_200_level_tree_and_odd_keys_still_load(tmp_path: Path, outside: Outside) -> None:
    """The limits refuse hostile files, not unusual real ones."""
    deep: Any = np.arange(3)
    for _ in range(codec.MAX_DEPTH - 1):
        deep = [deep]
    tree = {"deep": deep, "../../etc/passwd": 1, "/abs": 2, "a\0b": 3, "..": 4, ".": 5, "k" * 100_000: b"x"}
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, tree)
        assert_tree_equal(mgr.restore(), tree)
    assert sorted(os.listdir(tmp_path / "run")) == [".ckptmgr-index.json", ".ckptmgr.lock", "ckpt-000000001.h5"]
    outside.check()
    record("hostile", "limits do not refuse real trees", {"cases": 1, "200-level tree and odd keys loaded": 1})


# ---------------------------------------------------- hostile directory entries


BAD_NAMES = ["../secret.bin", "../outside/secret.bin", "/etc/passwd", "a/b", "x\0y", "..", ".", "",
             "ckpt-000000001.h5", ".hidden", "z" * 10_000]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n[:20]) for n in BAD_NAMES])
def test_sidecar_naming_a_path_outside_is_refused(tmp_path: Path, outside: Outside,
                                                  name: str) -> None:
    """A well-formed, correctly checksummed sidecar whose payload name leaves the
    directory: never listed, verified, returned or deleted."""
    run = outside.dir.parent / "run"
    with CheckpointManager(run, keep=ckptmgr.KeepLast(1)) as mgr:
        mgr.save(1, {"a": 1})
    content = outside.files["secret.bin"][0]
    sidecar, blob = codec_sidecar(name, step=5, content=content)
    (run / sidecar).write_bytes(blob)
    for read_only in (True, False):
        with pytest.warns(CheckpointWarning, match="malformed metadata"), \
                CheckpointManager(run, read_only=read_only, keep=ckptmgr.KeepLast(1)) as mgr:
            assert [c.step for c in mgr.checkpoints] == [1]
            with pytest.raises(CheckpointNotFoundError):
                mgr.restore(5)
            assert mgr.restore() == {"a": 1}
            if not read_only:
                mgr.save(6, {"a": 6})  # retention runs
    outside.check()
    record("hostile", "hostile payload names in sidecars", {"cases": 1, "refused, nothing outside touched": 1})


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n[:20]) for n in BAD_NAMES])
def test_commit_record_naming_a_path_outside_is_discarded(tmp_path: Path, outside: Outside,
                                                          name: str) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as mgr:
        mgr.save(1, {"a": 1})
    content = outside.files["secret.bin"][0]
    _, blob = codec_sidecar(name, step=5, content=content)
    commit = run / ".ckpt-00112233445566ff.commit"
    commit.write_bytes(blob)
    with CheckpointManager(run) as mgr:
        assert [c.step for c in mgr.checkpoints] == [1]
    assert not commit.exists()
    assert sorted(os.listdir(run)) == [".ckptmgr-index.json", ".ckptmgr.lock", "ckpt-000000001.h5"]
    outside.check()
    record("hostile", "hostile payload names in commit records", {"cases": 1, "discarded, nothing outside touched": 1})


@pytest.mark.parametrize("what", ["name outside", "name of another payload", "native step", "foreign file"])
def test_index_entries_that_cannot_describe_their_file_are_not_trusted(
        tmp_path: Path, outside: Outside, what: str) -> None:
    """An index edited and re-signed (its CRC recomputed) cannot point a payload outside
    the directory, move a checkpoint to another step, or get a real sidecar deleted."""
    run = tmp_path / "run"
    with CheckpointManager(run, monitor=MONITOR) as mgr:
        for step in (1, 2):
            data = f"payload {step}".encode()
            mgr.save(step, FilePayload(f"m{step}.bin", writes(data)), metrics={MONITOR: 1.0})
        mgr.save(3, {"s": 3}, metrics={MONITOR: 1.0})
    index = run / storage.INDEX_NAME
    data = json.loads(index.read_bytes())
    side1 = storage.sidecar_name("m1.bin")
    if what == "name outside":
        data["entries"][side1]["meta"]["name"] = "../outside/secret.bin"
    elif what == "name of another payload":
        data["entries"][side1]["meta"]["name"] = "m2.bin"
    elif what == "native step":
        data["entries"]["ckpt-000000003.h5"]["meta"]["step"] = 4
    else:
        data["entries"]["notes.txt"] = data["entries"]["ckpt-000000003.h5"]
    data["crc32"] = zlib.crc32(json.dumps(data["entries"], separators=(",", ":")).encode())
    index.write_text(json.dumps(data))
    for read_only in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mgr = CheckpointManager(run, read_only=read_only, monitor=MONITOR)
        with mgr:
            assert [c.step for c in mgr.checkpoints] == [1, 2, 3]
            assert mgr.restore(1).read_bytes() == b"payload 1"
            assert mgr.restore(2).read_bytes() == b"payload 2"
            assert mgr.restore(3) == {"s": 3}
    assert (run / side1).exists()
    outside.check()
    record("hostile", "re-signed index entries", {"cases": 1, "not trusted": 1})


def test_huge_metadata_files_are_read_with_a_bound(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as mgr:
        mgr.save(1, {"a": 1})
    big = b'{"ckptmgr_payload": "' + b"x" * (100 * 2**20) + b'"}'
    (run / storage.sidecar_name("big.bin")).write_bytes(big)
    (run / "big.bin").write_bytes(b"x")
    (run / storage.INDEX_NAME).write_bytes(b'{"version": 1, "entries": {"' + b"y" * (100 * 2**20) + b'": 1}}')
    (run / ".ckpt-0000000000000001.commit").write_bytes(big)

    def open_and_restore() -> None:
        with pytest.warns(CheckpointWarning, match="malformed metadata"), CheckpointManager(run) as mgr:
            assert mgr.restore() == {"a": 1}

    peak = _bounded(open_and_restore)
    assert peak < 200 * 2**20, f"opening allocated {peak} bytes"
    record("hostile", "100 MiB sidecar, index and commit record", {"cases": 1, "peak MiB": peak // 2**20})


# ------------------------------------------------------------ links and FIFOs


def _predictable_names(monkeypatch: pytest.MonkeyPatch, value: str = "00000000000000ab") -> None:
    monkeypatch.setattr(secrets, "token_hex", lambda n=None: value)


@pytest.mark.parametrize("kind", ["native", "payload"])
def test_symlink_at_the_final_name_is_replaced_not_followed(tmp_path: Path, outside: Outside,
                                                            kind: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    name = storage.checkpoint_name(7) if kind == "native" else "model.bin"
    target = outside.dir / ("secret.h5" if kind == "native" else "secret.bin")
    (run / name).symlink_to(target)
    outside.forget()
    with CheckpointManager(run) as mgr:
        assert mgr.checkpoints == []  # a link is never taken for a checkpoint
        with pytest.raises(CheckpointNotFoundError):
            mgr.restore()
        if kind == "native":
            mgr.save(7, {"mine": 7})
            assert mgr.restore(7) == {"mine": 7}
        else:
            mgr.save(7, FilePayload(name, lambda p: p.write_bytes(b"mine")))
            assert mgr.restore(7).read_bytes() == b"mine"
    assert not (run / name).is_symlink()
    outside.check()
    record("hostile", "symlinks at final names", {"cases": 1, "replaced, not followed": 1})


@pytest.mark.parametrize("where", ["sidecar", "index", "lock"])
def test_symlink_at_a_metadata_name_is_not_followed(tmp_path: Path, outside: Outside,
                                                     where: str) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as mgr:
        mgr.save(1, {"a": 1})
    if where == "sidecar":
        link, target = run / storage.sidecar_name("secret.bin"), outside.dir / "sidecar.json"
        (run / "secret.bin").write_bytes(outside.files["secret.bin"][0])
    elif where == "index":
        index = json.loads((run / storage.INDEX_NAME).read_bytes())
        index["entries"]["ckpt-000000001.h5"]["meta"]["metrics"] = {"planted": 1.0}
        index["crc32"] = zlib.crc32(json.dumps(index["entries"], separators=(",", ":")).encode())
        (outside.dir / "index.json").write_text(json.dumps(index))
        link, target = run / storage.INDEX_NAME, outside.dir / "index.json"
    else:
        link, target = run / storage.LOCK_NAME, outside.dir / "secret.bin"
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    outside.forget()
    reader = CheckpointManager(run, read_only=True)
    assert [(c.step, dict(c.metrics)) for c in reader.checkpoints] == [(1, {})]
    if where == "lock":
        with pytest.raises(CheckpointError) as excinfo:
            CheckpointManager(run)
        assert "ELOOP" in str(excinfo.value) or isinstance(excinfo.value, ckptmgr.DirectoryLockedError)
    else:
        with CheckpointManager(run) as mgr:
            assert [c.step for c in mgr.checkpoints] == [1]
            mgr.save(2, {"a": 2})
    outside.check()
    record("hostile", "symlinks at sidecar, index, lock", {"cases": 1, "not followed": 1})


@pytest.mark.parametrize("kind", ["native", "commit record", "index"])
def test_symlink_at_a_predicted_temporary_name_is_not_written_through(
        tmp_path: Path, outside: Outside, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Temporary names are random; if one were guessed and planted as a link, the
    writer creates its file exclusively and refuses rather than write through it."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    mgr.save(1, {"a": 1})
    _predictable_names(monkeypatch)
    suffix = {"native": ".tmp", "commit record": ".commit", "index": ".tmp"}[kind]
    link = run / f".ckpt-00000000000000ab{suffix}"
    target = outside.dir / "secret.bin"
    link.symlink_to(target)
    outside.forget()
    if kind == "native":
        with pytest.raises(ckptmgr.CheckpointIOError, match="EEXIST"):
            mgr.save(2, {"a": 2})
    elif kind == "commit record":
        with pytest.raises(ckptmgr.CheckpointIOError, match="EEXIST"):
            mgr.save(2, FilePayload("m.bin", lambda p: p.write_bytes(b"m")))
    else:
        mgr.close()  # the index is a cache: its update is skipped
    assert [c.step for c in CheckpointManager(run, read_only=True).checkpoints] == [1]
    monkeypatch.undo()
    mgr.close()
    with CheckpointManager(run) as again:  # the planted link is a leftover: removed, not followed
        again.save(3, {"a": 3})
    assert not link.is_symlink()
    outside.check()
    record("hostile", "symlinks at predicted temporary names", {"cases": 1, "not written through": 1})


def test_a_payload_writer_that_makes_a_link_is_refused(tmp_path: Path, outside: Outside) -> None:
    run = tmp_path / "run"
    target = outside.dir / "secret.bin"
    with CheckpointManager(run) as mgr, pytest.raises(CheckpointError, match="regular file"):
        mgr.save(1, FilePayload("m.bin", lambda p: p.symlink_to(target)))
    assert sorted(os.listdir(run)) == [".ckptmgr-index.json", ".ckptmgr.lock"]
    outside.check()
    record("hostile", "payload writer making a link", {"cases": 1, "refused": 1})


@pytest.mark.parametrize("where", ["index", "commit record", "sidecar", "checkpoint", "payload", "leftover"])
def test_fifo_planted_in_the_directory_blocks_nobody(tmp_path: Path, where: str) -> None:
    """Opening a FIFO for reading blocks until a writer comes: the reader and the writer
    must not open one (a child process, killed if it hangs)."""
    run = tmp_path / "run"
    with CheckpointManager(run) as mgr:
        mgr.save(1, {"a": 1})
        mgr.save(2, FilePayload("m.bin", lambda p: p.write_bytes(b"m")))
    fifo = {
        "index": run / storage.INDEX_NAME,
        "commit record": run / ".ckpt-00112233445566ff.commit",
        "sidecar": run / storage.sidecar_name("other.bin"),
        "checkpoint": run / storage.checkpoint_name(9),
        "payload": run / "m.bin",
        "leftover": run / ".ckpt-00112233445566ff.tmp",
    }[where]
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    ctx = processes()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_open_and_restore, args=(child, str(run)), daemon=True)
    proc.start()
    child.close()
    said = parent.recv() if parent.poll(60) else None
    if said is None:
        proc.kill()
    proc.join(60)
    assert said is not None, f"a FIFO at the {where} blocked the manager"
    assert said[0] == "ok", said
    record("hostile", "FIFO planted", {"cases": 1, f"at the {where}": 1})


def _open_and_restore(conn: Connection, directory: str) -> None:
    signal.alarm(120)
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            for read_only in (True, False):
                with CheckpointManager(directory, read_only=read_only) as mgr:
                    for info in mgr.checkpoints:
                        with contextlib.suppress(CheckpointError):
                            mgr.restore(info.step)
                    mgr.restore()
        conn.send(("ok",))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------- pickles


class _Bomb:
    """Unpickling this writes a marker file (and would run anything else)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"with open({self.marker!r}, 'w') as f: f.write('pwned')",))


def test_nothing_is_ever_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    bomb = pickle.dumps(_Bomb(str(marker)))
    pickle.loads(bomb)  # the bomb works
    assert marker.exists()
    marker.unlink()
    calls: list[str] = []

    def forbidden(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called")

        return call

    run = tmp_path / "run"
    with CheckpointManager(run, monitor=MONITOR) as mgr:
        mgr.save(1, {"blob": bomb, "arr": np.frombuffer(bomb, np.uint8), "s": bomb.decode("latin-1")},
                 metrics={MONITOR: 1.0})
        mgr.save(2, FilePayload("model.pkl", lambda p: p.write_bytes(bomb)), metrics={MONITOR: 2.0})
        np.save(tmp_path / "obj.npy", np.array([_Bomb(str(marker))], dtype=object), allow_pickle=True)
        npy = (tmp_path / "obj.npy").read_bytes()
        mgr.save(3, FilePayload("obj.npy", lambda p: p.write_bytes(npy)), metrics={MONITOR: 3.0})
    # Plant the bomb wherever a checkpoint directory could hold one.
    (run / storage.checkpoint_name(4)).write_bytes(bomb)
    (run / storage.sidecar_name("x.bin")).write_bytes(bomb)
    (run / "x.bin").write_bytes(b"x")
    (run / ".ckpt-00112233445566ff.commit").write_bytes(bomb)
    _base(run / storage.checkpoint_name(5), step=5)
    with h5py.File(run / storage.checkpoint_name(5), "r+") as f:
        f.attrs["pickled"] = np.void(bomb)
        f["state"].attrs["pickled"] = np.frombuffer(bomb, np.uint8)
        f["state/w"].attrs["dtype"] = np.void(bomb)
    _base(run / storage.checkpoint_name(6), step=6)
    with h5py.File(run / storage.checkpoint_name(6), "r+") as f:
        del f[codec.MANIFEST]
        f[codec.MANIFEST] = np.frombuffer(bomb, np.uint8)
        f.attrs["ckptmgr_manifest_crc32"] = np.uint32(codec.checksum(bomb))
    for module, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (np, "load")):
        monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))
    import _pickle

    monkeypatch.setattr(_pickle, "loads", forbidden("_pickle.loads"))
    monkeypatch.setattr(_pickle, "load", forbidden("_pickle.load"))
    found: Counter[str] = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for read_only in (True, False):
            with CheckpointManager(run, read_only=read_only, monitor=MONITOR) as mgr:
                for info in mgr.checkpoints:
                    try:
                        value = mgr.restore(info.step)
                    except CorruptCheckpointError:
                        found["refused"] += 1
                        continue
                    found["restored"] += 1
                    if info.step == 1:
                        assert value["blob"] == bomb and bytes(value["arr"]) == bomb
                    elif info.step in (2, 3):
                        assert isinstance(value, Path)
                mgr.restore()
    assert all(issubclass(w.category, CheckpointWarning) for w in caught)
    assert calls == [] and not marker.exists()
    assert found["refused"] >= 2 and found["restored"] >= 3
    record("hostile", "pickles planted", {"cases": 1, "places a pickle was planted": 9, **found})

