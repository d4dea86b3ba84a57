"""Damaged and tampered directories, fuzzed (invariant 4): detected every time.

A pristine directory holds five checkpoints, native and payload (steps 1, 3, 5 native;
2 and 4 payloads with sidecars) and the index. Each fuzz case copies it, damages the
copy one random way, and opens it as a reader or a writer:

- bit flips (1-4, biased towards HDF5's metadata at the start and end of a file) and
  truncation of any file, checkpoint, payload, sidecar or index;
- deleted files; files swapped between checkpoints, or one copied over another;
- tampered metadata: a manifest edited with or without recomputing its CRC (step,
  dtype, shape, leaf checksum, kind, structure), HDF5 attributes, a dataset replaced by
  another of a different type or shape, sidecars edited with or without their CRC,
  the index edited (steps, names, metrics, sizes, flags) or garbled.

Then every step is restored, plus ``restore()`` and ``restore("best")``. A result is
accepted only if it is exactly what was saved at that step; a failure only as a
:class:`CorruptCheckpointError` (or a :class:`CheckpointNotFoundError` for a checkpoint
whose files were deleted, or whose unreadable metadata a :class:`CheckpointWarning`
named); a fallback of ``restore()`` to an older checkpoint only with a warning. Any
other exception, any wrong data, any silent fallback fails the case.

Hand-made cases complete the fuzz: one damage each (a bit flip in array data, the
manifest or the superblock; truncation; every checkpoint damaged; two files swapped; an
empty file under a checkpoint name), behind an up-to-date index and under an open writer.

Out of scope by design: an edit that recomputes the CRCs and stays consistent (a
metric, a dict key stored under ``~N``) cannot be told from a real checkpoint without a
secret key; such edits are not generated.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from _reliability import MONITOR, copy_directory, leaf_offset, payload_bytes, record, state_for, writes
from _trees import assert_tree_equal

import ckptmgr
from ckptmgr import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    codec,
    storage,
)
from ckptmgr.codec import _format

STEPS = (1, 2, 3, 4, 5)
PAYLOAD_STEPS = (2, 4)
METRICS = {1: 0.9, 2: 0.5, 3: 0.2, 4: 0.6, 5: 0.7}
BEST = 3
DEFAULT_CASES = 1000
SLOW_CASES = 5_000


@pytest.fixture(scope="module", autouse=True, params=["packed", "unpacked"])
def layout(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs on both layouts of format 2: small leaves packed into one dataset
    (what is written), and every leaf its own dataset (the layout of big leaves)."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "unpacked":
            patch.setattr(_format, "PACK_THRESHOLD", 0)
        yield str(request.param)


def _name(step: int) -> str:
    return f"model-{step}.bin" if step in PAYLOAD_STEPS else storage.checkpoint_name(step)


def _files(step: int) -> list[str]:
    """The files of a checkpoint (a payload's sidecar too)."""
    name = _name(step)
    return [name, storage.sidecar_name(name)] if step in PAYLOAD_STEPS else [name]


FILE_STEP = {f: s for s in STEPS for f in _files(s)}
INDEX = storage.INDEX_NAME


def _state(step: int) -> dict[str, Any]:
    # Few leaves (each read costs a little): an array, a scalar, a str under keys that
    # are stored by position, a bigint in a tuple.
    return {
        "step": step,
        "w": np.arange(400, dtype=np.float64) * (step + 0.5),
        "odd keys": {"a/b": np.arange(3, dtype=np.int16) + step, ".hidden": f"h{step}", "~0": None},
        "t": (2**70 + step,),
    }


def _check(mgr: CheckpointManager, step: int, value: Any) -> None:
    if step in PAYLOAD_STEPS:
        assert isinstance(value, Path) and value == mgr.directory / _name(step), value
        assert value.read_bytes() == payload_bytes(step, 3000), f"wrong payload content for step {step}"
    else:
        assert_tree_equal(value, _state(step))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pristine") / "run"
    with CheckpointManager(directory, monitor=MONITOR) as mgr:
        for step in STEPS:
            if step in PAYLOAD_STEPS:
                data = payload_bytes(step, 3000)
                value: Any = ckptmgr.FilePayload(_name(step), writes(data))
            else:
                value = _state(step)
            mgr.save(step, value, metrics={MONITOR: METRICS[step]})
    assert sorted(os.listdir(directory)) == sorted([*FILE_STEP, INDEX, storage.LOCK_NAME])
    return directory


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """Where the cases are copied: a tmpfs when there is one (thousands of small copies
    and deletions; the file system plays no part in what is tested), else tmp_path."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="ckptmgr-fuzz-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------- mutations


@dataclass
class Damage:
    """What a mutation did: a description, and the steps whose files it deleted."""

    kind: str
    detail: str
    removed: set[int] = field(default_factory=set)


def _targets(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n != storage.LOCK_NAME)


def _flip_bits(rng: random.Random, directory: Path) -> Damage:
    name = rng.choice(_targets(directory))
    path = directory / name
    data = bytearray(path.read_bytes())
    flips = []
    for _ in range(rng.randint(1, 4)):
        region = rng.random()
        if region < 0.4:
            position = rng.randrange(min(len(data), 4096))
        elif region < 0.7:
            position = len(data) - 1 - rng.randrange(min(len(data), 2048))
        else:
            position = rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
        flips.append(position)
    path.write_bytes(bytes(data))
    return Damage("bit flips", f"{name} at {flips}")


def _truncate(rng: random.Random, directory: Path) -> Damage:
    name = rng.choice(_targets(directory))
    path = directory / name
    size = path.stat().st_size
    length = rng.choice([0, 1, rng.randrange(size), size - 1]) if size > 1 else 0
    os.truncate(path, length)
    return Damage("truncation", f"{name} to {length} of {size} bytes")


def _delete(rng: random.Random, directory: Path) -> Damage:
    name = rng.choice(_targets(directory))
    (directory / name).unlink()
    removed = {FILE_STEP[name]} if name in FILE_STEP else set()
    return Damage("deleted file", name, removed)


def _swap(rng: random.Random, directory: Path) -> Damage:
    groups = [
        [_name(s) for s in STEPS if s not in PAYLOAD_STEPS],
        [_name(s) for s in PAYLOAD_STEPS],
        [_name(s) for s in STEPS],
    ]
    a, b = rng.sample(rng.choice(groups), 2)
    tmp = directory / "swap.tmp"
    os.replace(directory / a, tmp)
    os.replace(directory / b, directory / a)
    os.replace(tmp, directory / b)
    return Damage("swapped files", f"{a} <-> {b}")


def _copy_over(rng: random.Random, directory: Path) -> Damage:
    # Not a sidecar over another: test_a_sidecar_under_another_payloads_name (a manager bug).
    a, b = rng.sample([_name(s) for s in STEPS], 2)
    shutil.copyfile(directory / a, directory / b)
    return Damage("file copied over another", f"{a} over {b}")


def _manifest(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return dict(json.loads(f[codec.MANIFEST][()].tobytes()))


def _write_manifest(path: Path, manifest: dict[str, Any], *, fix_crc: bool) -> None:
    blob = json.dumps(manifest).encode()
    with h5py.File(path, "r+") as f:
        old_crc = f.attrs["ckptmgr_manifest_crc32"]
        del f[codec.MANIFEST]
        f.create_dataset(codec.MANIFEST, data=np.frombuffer(blob, np.uint8))
        f.attrs["ckptmgr_manifest_crc32"] = np.uint32(codec.checksum(blob)) if fix_crc else old_crc


def _leaves(tree: Any) -> list[dict[str, Any]]:
    return [node for _keys, _h5, node in codec.iter_leaves(tree)]


# (what, re-signable, edit): a re-signable edit is caught by a consistency check even
# with the manifest's CRC recomputed; the others only by the CRC.
MANIFEST_EDITS: list[tuple[str, bool, Callable[[random.Random, dict[str, Any]], None]]] = [
    ("step", True, lambda rng, m: m.update(step=m["step"] + rng.choice([-1, 1, 2]))),
    ("step type", True, lambda rng, m: m.update(step=rng.choice([str(m["step"]), None, [m["step"]]]))),
    ("dtype", True, lambda rng, m: rng.choice(_leaves(m["tree"])).update(
        dtype=rng.choice(["<f4", "<i8", "|u1", "<c8", "bfloat16", "|b1", ">f8"]))),
    ("shape", True, lambda rng, m: rng.choice(_leaves(m["tree"])).update(
        shape=rng.choice([[1], [2, 2], [], [10**12], [3, 0]]))),
    ("leaf checksum", True, lambda rng, m: rng.choice(_leaves(m["tree"])).update(crc=rng.randrange(2**32))),
    ("kind", False, lambda rng, m: rng.choice(_leaves(m["tree"])).update(
        t=rng.choice(["str", "bytes", "int", "float", "bool", "bigint", "npscalar", "ndarray", "none"]))),
    ("structure", False, lambda rng, m: m["tree"]["items"].pop(rng.randrange(len(m["tree"]["items"])))),
    ("safe key", True, lambda rng, m: m["tree"]["items"][0].__setitem__(0, "renamed")),
    ("tree type", True, lambda rng, m: m.update(tree=rng.choice([[], "x", {"t": "dict"}, {"t": "list", "items": 3}]))),
    ("checksum name", True, lambda rng, m: m.update(checksum=rng.choice(["md5", None, "crc32"]))),
]


def _tamper_manifest(rng: random.Random, directory: Path) -> Damage:
    step = rng.choice([s for s in STEPS if s not in PAYLOAD_STEPS])
    path = directory / _name(step)
    st = os.stat(path)
    manifest = _manifest(path)
    what, resignable, edit = rng.choice(MANIFEST_EDITS)
    edit(rng, manifest)
    fix_crc = resignable and rng.random() < 0.7
    _write_manifest(path, manifest, fix_crc=fix_crc)
    if rng.random() < 0.5:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # behind the index's back
    return Damage("tampered manifest", f"{path.name}: {what}{'' if fix_crc else ' (CRC not updated)'}")


def _tamper_hdf5(rng: random.Random, directory: Path) -> Damage:
    step = rng.choice([s for s in STEPS if s not in PAYLOAD_STEPS])
    path = directory / _name(step)
    what = rng.choice(["format attribute", "manifest CRC attribute", "dataset type", "dataset shape",
                       "dataset values", "extra dataset", "missing dataset"])
    with h5py.File(path, "r+") as f:
        if what == "format attribute":
            f.attrs["ckptmgr_format"] = rng.choice([3, 0, "2", 1.5])
        elif what == "manifest CRC attribute":
            f.attrs["ckptmgr_manifest_crc32"] = rng.choice([np.uint32(1), "x", np.float64(3)])
        else:
            target = rng.choice([name for name in ("state/w", "state/t/0", "state/step", "ckptmgr_packed") if name in f])
            data = f[target][()]
            if what == "missing dataset":
                del f[target]
            elif what == "extra dataset":
                f["state/extra"] = np.zeros(3)
            else:
                del f[target]
                if what == "dataset type":
                    f[target] = np.asarray(data).astype(rng.choice([np.float32, np.int64, np.uint8]))
                elif what == "dataset shape":
                    f[target] = np.resize(np.asarray(data), (np.asarray(data).size + 1,))
                else:
                    f[target] = np.asarray(data) + np.asarray(1).astype(np.asarray(data).dtype)
    harmless = what == "extra dataset"
    return Damage("tampered HDF5 structure" if not harmless else "harmless HDF5 addition", f"{path.name}: {what}")


def _tamper_sidecar(rng: random.Random, directory: Path) -> Damage:
    step = rng.choice(PAYLOAD_STEPS)
    path = directory / storage.sidecar_name(_name(step))
    outer = json.loads(path.read_text())
    body = json.loads(outer["ckptmgr_payload"])
    # A re-signed edit of the step or metrics is consistent (the sidecar is the only
    # record of them), and a re-signed name of another payload is a manager bug
    # (test_a_sidecar_under_another_payloads_name): those only without the CRC.
    what = rng.choice(["step", "size", "crc32", "name", "format", "step type", "metrics"])
    fix_crc = rng.random() < 0.7 and what not in ("step", "metrics")
    if what == "step":
        body["step"] += rng.choice([-1, 1, 10])
    elif what == "size":
        body["size"] += rng.choice([-1, 1])
    elif what == "crc32":
        body["crc32"] ^= 1 << rng.randrange(32)
    elif what == "name":
        body["name"] = rng.choice(["../outside.bin", "a/b", "ckpt-000000001.h5", "x\0y", "z" * 300, ".hidden", "",
                                   *([] if fix_crc else [_name(6 - step)])])
    elif what == "format":
        body["format"] = rng.choice([2, "1", None])
    elif what == "step type":
        body["step"] = rng.choice([str(step), float(step), None, -step, True])
    else:
        body["metrics"] = {MONITOR: 0.0}
    text = json.dumps(body, sort_keys=True)
    outer["ckptmgr_payload"] = text
    if fix_crc:
        outer["crc32"] = zlib.crc32(text.encode())
    path.write_text(json.dumps(outer))
    return Damage("tampered sidecar", f"{path.name} (step {step}): {what}{'' if fix_crc else ' (CRC not updated)'}")


def _tamper_index(rng: random.Random, directory: Path) -> Damage:
    path = directory / INDEX
    data = json.loads(path.read_text())
    entries = data["entries"]
    name = rng.choice(sorted(entries))
    entry = entries[name]
    # Re-signed (the index's CRC recomputed): only edits that an entry's own check
    # catches, or that fail safe ("corrupt"); a re-signed metric or payload step is a
    # consistent lie the index cannot be asked to detect.
    what = rng.choice(["step", "metrics", "name", "size", "corrupt", "meta type", "garbage", "version",
                       "entry for another file", "time"])
    fix_crc = rng.random() < 0.5 and what != "metrics" and not (what == "step" and storage.parse_name(name) is None)
    if what == "step":
        entry["meta"]["step"] += rng.choice([-1, 1])
    elif what == "metrics":
        entry["meta"]["metrics"] = {MONITOR: rng.choice([0.0, -1.0, 5.0])}
    elif what == "name":
        entry["meta"]["name"] = rng.choice(["../outside.bin", _name(rng.choice(PAYLOAD_STEPS)), "x\0y"])
    elif what == "size":
        entry["size"] += 1
    elif what == "corrupt":
        entry["corrupt"] = "tampered"
    elif what == "meta type":
        entry["meta"] = rng.choice([[], "x", None, {"step": "3"}])
    elif what == "version":
        data["version"] = 99
    elif what == "entry for another file":
        entries[name] = entries[rng.choice(sorted(entries))]
    elif what == "time":
        entry["meta"]["time"] = rng.choice(["x", 1e308 * 10, None])
    if what == "garbage":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    else:
        if fix_crc:
            data["crc32"] = zlib.crc32(json.dumps(data["entries"], separators=(",", ":")).encode())
        path.write_text(json.dumps(data))
    return Damage("tampered index", f"{name}: {what}{' (CRC recomputed)' if fix_crc else ''}")


MUTATIONS: list[tuple[str, float, Callable[[random.Random, Path], Damage]]] = [
    ("bit flips", 0.25, _flip_bits),
    ("truncation", 0.10, _truncate),
    ("deleted file", 0.08, _delete),
    ("swapped files", 0.08, _swap),
    ("copied over", 0.07, _copy_over),
    ("tampered manifest", 0.15, _tamper_manifest),
    ("tampered HDF5 structure", 0.07, _tamper_hdf5),
    ("tampered sidecar", 0.10, _tamper_sidecar),
    ("tampered index", 0.10, _tamper_index),
]


# ---------------------------------------------------------------------- oracle


class Verdict(Exception):
    """A case failed: wrong data, a foreign exception, a silent loss or fallback."""


def _noticed(caught: list[warnings.WarningMessage], step: int, directory: Path) -> bool:
    names = [str(directory / f) for f in _files(step)]
    return any(any(n in str(w.message) for n in names) for w in caught)


def _judge(directory: Path, damage: Damage, *, writer: bool, outcomes: Counter[str]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mgr = CheckpointManager(directory, read_only=not writer, monitor=MONITOR)
        except CorruptCheckpointError:
            outcomes["refused at open"] += 1
            return
        with mgr:
            corrupt = set()
            for step in STEPS:
                try:
                    value = mgr.restore(step)
                except CorruptCheckpointError:
                    outcomes["restore(step): corrupt"] += 1
                    corrupt.add(step)
                    continue
                except CheckpointNotFoundError:
                    if step not in damage.removed and not _noticed(caught, step, directory):
                        raise Verdict(f"step {step} vanished without a warning") from None
                    outcomes["restore(step): gone"] += 1
                    continue
                try:
                    _check(mgr, step, value)
                except AssertionError as exc:
                    raise Verdict(f"restore({step}) returned wrong data: {exc}") from None
                outcomes["restore(step): exact"] += 1
            before = len(caught)
            alive = [s for s in STEPS if s not in damage.removed]
            try:
                value = mgr.restore()
            except CorruptCheckpointError:
                outcomes["restore(): none verifies"] += 1
            except CheckpointNotFoundError:
                if alive:
                    raise Verdict(f"restore() found nothing; steps {alive} were not deleted") from None
            else:
                assert mgr.restored is not None
                got = mgr.restored.step
                try:
                    _check(mgr, got, value)
                except AssertionError as exc:
                    raise Verdict(f"restore() returned wrong data for step {got}: {exc}") from None
                skipped = [s for s in alive if s > got]
                if skipped and not any(_noticed(caught, s, directory) for s in skipped):
                    raise Verdict(f"restore() fell back to {got} past {skipped} without a warning")
                outcomes["restore(): fell back with a warning" if skipped else "restore(): latest"] += 1
                if len(caught) > before:
                    outcomes["warnings naming the damaged file"] += 1
            try:
                value = mgr.restore("best")
            except (CorruptCheckpointError, CheckpointNotFoundError):
                outcomes["restore('best'): refused"] += 1
            else:
                best = mgr.best
                assert best is not None
                try:
                    _check(mgr, best.step, value)
                except AssertionError as exc:
                    raise Verdict(f"restore('best') returned wrong data: {exc}") from None
                if best.step != BEST and BEST not in damage.removed and not _noticed(caught, BEST, directory):
                    raise Verdict(f"restore('best') silently returned step {best.step}, not {BEST}")
                outcomes["restore('best'): exact"] += 1
    foreign = [w for w in caught if not issubclass(w.category, CheckpointWarning)]
    if foreign:
        raise Verdict(f"a warning that is not a CheckpointWarning: {foreign[0].message}")


def _fuzz(pristine: Path, work: Path, cases: int, seed: int,
          mutations: list[tuple[str, float, Callable[[random.Random, Path], Damage]]]) -> Counter[str]:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    failures: list[str] = []
    names = [m[0] for m in mutations]
    weights = [m[1] for m in mutations]
    for case in range(cases):
        directory = copy_directory(pristine, work / "case")
        mutate = mutations[names.index(rng.choices(names, weights)[0])][2]
        damage = mutate(rng, directory)
        writer = case % 3 == 0
        counts[f"case: {damage.kind}"] += 1
        try:
            _judge(directory, damage, writer=writer, outcomes=counts)
        except Verdict as exc:
            failures.append(f"case {case} ({'writer' if writer else 'reader'}), {damage.kind}: {damage.detail}: {exc}")
        except Exception as exc:
            failures.append(f"case {case} ({'writer' if writer else 'reader'}), {damage.kind}: {damage.detail}: "
                            f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")
    counts["cases"] = cases
    counts["failures"] = len(failures)
    assert failures == [], f"{len(failures)} of {cases} cases failed (seed {seed}):\n" + "\n".join(failures[:40])
    return counts


def test_fuzzed_damage_is_always_detected(pristine: Path, scratch: Path) -> None:
    seed = int(os.environ.get("CKPTMGR_FUZZ_SEED", "0")) or 424242
    counts = _fuzz(pristine, scratch, DEFAULT_CASES, seed, MUTATIONS)
    record("corruption", "fuzz", counts)


@pytest.mark.slow
def test_fuzzed_damage_is_always_detected_long(pristine: Path, scratch: Path) -> None:
    seed = int(os.environ.get("CKPTMGR_FUZZ_SEED", "0")) or random.randrange(2**32)
    print(f"seed={seed}")
    counts = _fuzz(pristine, scratch, SLOW_CASES, seed, MUTATIONS)
    record("corruption", "fuzz-long", counts)


# ------------------------------------------- manager bugs this harness found (fixed)


@pytest.mark.parametrize("how", ["swapped", "copied-over"])
@pytest.mark.parametrize("writer", [False, True], ids=["reader", "writer"])
def test_a_sidecar_under_another_payloads_name(pristine: Path, scratch: Path, how: str, writer: bool) -> None:
    directory = copy_directory(pristine, scratch / "case")
    a, b = (directory / storage.sidecar_name(_name(s)) for s in PAYLOAD_STEPS)
    if how == "swapped":
        os.replace(a, directory / "tmp")
        os.replace(b, a)
        os.replace(directory / "tmp", b)
    else:
        shutil.copyfile(a, b)
    _judge(directory, Damage("sidecars", how), writer=writer, outcomes=Counter())


@pytest.mark.parametrize("writer", [False, True], ids=["reader", "writer"])
def test_restore_best_when_the_best_is_damaged(pristine: Path, scratch: Path, writer: bool) -> None:
    """M3: the best checkpoint's manifest is damaged (one bit flipped). The tracker still
    says which step is best, and a damaged best stays the best: ``best`` is that step,
    and restore("best") raises CorruptCheckpointError naming its file, as restore(step)
    does. It never falls back to the runner-up, and nothing is warned instead."""
    directory = copy_directory(pristine, scratch / "case")
    bad = directory / _name(BEST)
    with h5py.File(bad, "r") as f:
        offset = int(f[codec.MANIFEST].id.get_offset())
    data = bytearray(bad.read_bytes())
    data[offset + 10] ^= 0x04
    bad.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(directory, read_only=not writer, monitor=MONITOR) as mgr:
            with pytest.raises(CorruptCheckpointError, match=re.escape(str(bad))):
                mgr.restore(BEST)
            assert mgr.best is not None and mgr.best.step == BEST
            with pytest.raises(CorruptCheckpointError, match=re.escape(str(bad))):
                mgr.restore("best")
            assert mgr.best is not None and mgr.best.step == BEST
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_resuming_below_a_damaged_newest_checkpoint(tmp_path: Path, async_save: bool) -> None:
    keep = ckptmgr.KeepLast(1) | ckptmgr.KeepBest(1)
    with CheckpointManager(tmp_path / "run", keep=keep, monitor=MONITOR) as mgr:
        for step, loss in ((1, 0.1), (2, 0.5), (3, 0.6)):
            mgr.save(step, _state(step), metrics={MONITOR: loss})
        assert [c.step for c in mgr.checkpoints] == [1, 3]
    newest = tmp_path / "run" / _name(3)
    newest.write_bytes(newest.read_bytes()[:1000])
    with CheckpointManager(tmp_path / "run", keep=keep, monitor=MONITOR, async_save=async_save) as mgr:
        with pytest.warns(CheckpointWarning, match=str(newest)):
            state = mgr.restore()
        assert state["step"] == 1
        try:
            info = mgr.save(2, _state(2), metrics={MONITOR: 0.4})
            mgr.wait()
        except CheckpointError as exc:  # the async writer wraps what the commit raised
            raise exc.__cause__ or exc from None
        assert info is not None and info.step == 2


# ------------------------------------------------------------ hand-made damage
#
# Deterministic cases (one damage each, by hand) on three native checkpoints: restore()
# falls back past a damaged newest checkpoint with a warning naming it; restore(step) of
# a damaged one raises CorruptCheckpointError.


@pytest.fixture
def three(ckpt_dir: Path) -> Path:
    """A directory with checkpoints 1, 2, 3 (3 is the best) written and closed."""
    with CheckpointManager(ckpt_dir, monitor="val_loss") as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state_for(step, 1000), metrics={"val_loss": 1.0 / step})
    return ckpt_dir


def _ckpt(directory: Path, step: int) -> Path:
    return directory / f"ckpt-{step:09d}.h5"


def _flip(path: Path, position: int, bit: int = 0, *, keep_mtime: bool = False) -> None:
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _data_offset(path: Path, dataset: str = "state/w") -> int:
    return leaf_offset(path, "/" + dataset)


def _assert_falls_back(directory: Path, bad: Path, expected_step: int, **kwargs: Any) -> None:
    for mgr in (CheckpointManager(directory, read_only=True), CheckpointManager(directory, **kwargs)):
        with mgr, pytest.warns(CheckpointWarning, match=str(bad)):
            restored = mgr.restore()
        assert_tree_equal(restored, state_for(expected_step, 1000))


@pytest.mark.parametrize("where", ["array-data", "manifest", "superblock"])
def test_bit_flip_in_the_newest_falls_back_with_a_warning(three: Path, where: str) -> None:
    bad = _ckpt(three, 3)
    position = {
        "array-data": _data_offset(bad) + 8 * 500 + 3,
        "manifest": _data_offset(bad, "ckptmgr_manifest") + 20,
        "superblock": 0,
    }[where]
    _flip(bad, position, 2)
    _assert_falls_back(three, bad, 2)
    with CheckpointManager(three, monitor="val_loss") as mgr:
        with pytest.raises(CorruptCheckpointError, match=str(bad)) as excinfo:
            mgr.restore(3)
        assert isinstance(excinfo.value, ValueError)
        if where == "array-data":
            # The metadata is intact, so 3 is still the best: exactly that one, no fallback.
            with pytest.raises(CorruptCheckpointError, match=str(bad)):
                mgr.restore("best")
        else:
            # Its metrics are unreadable: it is never ranked best.
            assert mgr.best is not None and mgr.best.step == 2
            assert any(r.startswith("corrupt: ") for r in mgr.checkpoints[-1].keep_reasons)
        assert_tree_equal(mgr.restore(2), state_for(2, 1000))


def test_damage_behind_an_up_to_date_index_is_still_caught(three: Path) -> None:
    """The index cache says the file is fine (same size and mtime): restore verifies anyway."""
    bad = _ckpt(three, 3)
    _flip(bad, _data_offset(bad) + 100, 5, keep_mtime=True)
    _assert_falls_back(three, bad, 2)
    bad.unlink()
    # The same with the manifest, which the index caches.
    bad = _ckpt(three, 2)
    _flip(bad, _data_offset(bad, "ckptmgr_manifest") + 7, 1, keep_mtime=True)
    _assert_falls_back(three, bad, 1)


def test_random_bit_flips_in_the_newest_never_give_wrong_data(three: Path) -> None:
    bad = _ckpt(three, 3)
    original = bad.read_bytes()
    rnd = random.Random(7)
    positions = rnd.sample(range(0, 4096), 40) + rnd.sample(range(len(original) - 2048, len(original)), 30)
    fell_back = 0
    for position in positions:
        data = bytearray(original)
        data[position] ^= 1 << rnd.randrange(8)
        bad.write_bytes(bytes(data))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restored = CheckpointManager(three, read_only=True).restore()
        assert all(issubclass(w.category, CheckpointWarning) and str(bad) in str(w.message) for w in caught)
        expected = 3 if not caught else 2
        fell_back += bool(caught)
        assert_tree_equal(restored, state_for(expected, 1000))
    assert fell_back > 0


@pytest.mark.parametrize("keep_fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_newest_falls_back(three: Path, keep_fraction: float) -> None:
    bad = _ckpt(three, 3)
    data = bad.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep_fraction)])
    _assert_falls_back(three, bad, 2)
    with CheckpointManager(three) as mgr, pytest.raises(CorruptCheckpointError, match=str(bad)):
        mgr.restore(3)


def test_all_corrupt(three: Path) -> None:
    for step in (1, 2, 3):
        path = _ckpt(three, step)
        path.write_bytes(path.read_bytes()[:1000])
    calls = []
    with CheckpointManager(three) as mgr:
        with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpointError, match="verifies"):
            mgr.restore()
        # Initialising would silently throw the run away.
        with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpointError):
            mgr.restore_or_initialize(lambda: calls.append(1))
    assert calls == []


def test_a_file_swapped_between_two_steps_is_detected(three: Path) -> None:
    shutil.copyfile(_ckpt(three, 2), _ckpt(three, 3))
    with CheckpointManager(three) as mgr:
        with pytest.raises(CorruptCheckpointError, match=r"holds step 2"):
            mgr.restore(3)
        with pytest.warns(CheckpointWarning, match=str(_ckpt(three, 3))):
            assert_tree_equal(mgr.restore(), state_for(2, 1000))
    # Both ways round: neither is taken for the other.
    os.replace(_ckpt(three, 1), three / "tmp")
    os.replace(_ckpt(three, 2), _ckpt(three, 1))
    os.replace(three / "tmp", _ckpt(three, 2))
    with CheckpointManager(three, read_only=True) as reader:
        for step in (1, 2, 3):
            with pytest.raises(CorruptCheckpointError, match="holds step"):
                reader.restore(step)


def test_corruption_while_the_writer_is_open(three: Path) -> None:
    with CheckpointManager(three, monitor="val_loss") as mgr:
        bad = _ckpt(three, 3)
        _flip(bad, _data_offset(bad) + 16, 0)
        with pytest.warns(CheckpointWarning, match=str(bad)):
            assert_tree_equal(mgr.restore(), state_for(2, 1000))
        mgr.save(4, state_for(4, 1000), metrics={"val_loss": 0.1})
        assert_tree_equal(mgr.restore(), state_for(4, 1000))


def test_an_empty_file_under_a_checkpoint_name_is_skipped(three: Path) -> None:
    _ckpt(three, 9).write_bytes(b"")
    _assert_falls_back(three, _ckpt(three, 9), 3)
    with CheckpointManager(three, read_only=True) as reader:
        assert reader.latest is not None and reader.latest.step == 9
        assert any(r.startswith("corrupt: ") for r in reader.latest.keep_reasons)
