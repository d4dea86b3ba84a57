"""State trees round-trip exactly through a checkpoint; unsupported values are refused.

Round trips go through the real CheckpointManager (save -> HDF5 file -> restore) as
well as the codec; damaged files only ever raise CorruptCheckpointError.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import decimal
import enum
import errno
import fractions
import gc
import json
import os
import random
import re
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import ml_dtypes
import numpy as np
import pytest
from _reliability import leaf_offset
from _trees import assert_tree_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ckptmgr
from ckptmgr import codec, storage

# ------------------------------------------------------------------------ strategies

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
FLOAT_DTYPES = [np.float16, np.float32, np.float64, np.longdouble]
COMPLEX_DTYPES = [np.complex64, np.complex128]
NATIVE_DTYPES = [np.dtype(t) for t in (*INT_DTYPES, *FLOAT_DTYPES, *COMPLEX_DTYPES, np.bool_)]
BIG_ENDIAN = [np.dtype(t).newbyteorder(">") for t in (np.int16, np.int32, np.uint64, np.float32, np.float64,
                                                     np.complex128)]
ML_DTYPES = [np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)]

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


def _non_contiguous(array: np.ndarray[Any, Any], how: int) -> np.ndarray[Any, Any]:
    if array.ndim == 0:
        return array
    if how == 0:
        return array[::-1]
    if how == 1:
        return array.T
    # A strided view into a bigger buffer.
    return np.repeat(array, 2, axis=0)[::2]


native_arrays = st.sampled_from(NATIVE_DTYPES + BIG_ENDIAN).flatmap(lambda dt: hnp.arrays(dt, shapes))
ml_arrays = st.tuples(st.sampled_from(ML_DTYPES), hnp.arrays(np.float32, shapes, elements=st.floats(-448, 448,
                                                                                                    width=32))).map(
    lambda t: t[1].astype(t[0])
)
arrays = st.one_of(
    native_arrays,
    ml_arrays,
    st.tuples(native_arrays, st.integers(0, 2)).map(lambda t: _non_contiguous(*t)),
)
numpy_scalars = st.one_of(
    st.sampled_from(NATIVE_DTYPES).flatmap(lambda dt: hnp.arrays(dt, ())).map(lambda a: a[()]),
    st.floats(-100, 100, width=32).map(ml_dtypes.bfloat16),
)
python_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**200), 2**200),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 2**127 + 12345, -(2**127)]),
    st.floats(),  # nan and inf included
    st.complex_numbers(),
    st.text(),
    st.binary(),
)
keys = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["/", ".", "", "~0", "~1", "a/b", "..", "./x", " ", "ключ", "🔑", "x" * 200, "state",
                     "ckptmgr_manifest", "0", "-", "a.b"]),
)
leaves = st.one_of(arrays, numpy_scalars, python_leaves)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=16,
)


def _roundtrip_through_manager(tree: Any) -> Any:
    with tempfile.TemporaryDirectory() as directory:
        with ckptmgr.CheckpointManager(directory) as mgr:
            mgr.save(7, tree)
        # A fresh reader: the tree comes from the file, not from anything in memory.
        return ckptmgr.CheckpointManager(directory, read_only=True).restore()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees)
def test_random_trees_round_trip_exactly(tree: Any) -> None:
    assert_tree_equal(_roundtrip_through_manager(tree), tree)


@settings(max_examples=60, deadline=None)
@given(tree=st.dictionaries(keys, leaves, max_size=6))
def test_random_dicts_round_trip_through_codec(tree: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "x.h5"
        codec.write_file(path, tree, {"step": 1})
        restored, manifest = codec.read_file(path)
    assert_tree_equal(restored, tree)
    assert manifest["step"] == 1


def _new_values(tree: Any, rng: np.random.Generator) -> Any:
    """A tree of the same structure (containers, keys, dtypes, shapes) with other values;
    Python ints may cross into bigints and strings change length (other structures)."""
    if type(tree) is dict:
        return {key: _new_values(child, rng) for key, child in tree.items()}
    if type(tree) in (list, tuple):
        return type(tree)(_new_values(child, rng) for child in tree)
    if isinstance(tree, (np.ndarray, np.generic)):
        array = np.asarray(tree)
        if array.dtype.kind == "b":
            fresh = rng.integers(0, 2, array.shape).astype(bool)
        else:
            fresh = np.frombuffer(rng.bytes(array.nbytes), array.dtype).reshape(array.shape).copy()
        return fresh if isinstance(tree, np.ndarray) else fresh[()]
    if type(tree) is bool:
        return not tree
    if type(tree) is int:
        return tree * 3 + 1
    if type(tree) is float:
        return float(rng.standard_normal())
    if type(tree) is complex:
        return complex(rng.standard_normal(), 1.0)
    if type(tree) is str:
        return tree[::-1] + "x" * int(rng.integers(0, 2))
    if type(tree) is bytes:
        return rng.bytes(len(tree) + int(rng.integers(0, 2)))
    return tree


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, seed=st.integers(0, 2**32 - 1))
def test_a_tree_saved_after_one_of_its_structure_stores_its_own_values(tree: Any, seed: int) -> None:
    """The second tree reuses the first one's plan where the structure is the same (the
    usual case in a training run); both files restore their own values exactly."""
    other = _new_values(tree, np.random.default_rng(seed))
    with tempfile.TemporaryDirectory() as directory:
        first, second = Path(directory) / "1.h5", Path(directory) / "2.h5"
        codec.write_file(first, tree, {"step": 1})
        codec.write_file(second, other, {"step": 2})
        assert_tree_equal(codec.read_file(first)[0], tree)
        assert_tree_equal(codec.read_file(second)[0], other)
        codec.verify_file(second)


def test_a_plan_is_reused_only_for_a_tree_of_the_same_structure() -> None:
    base = {"w": np.zeros((4, 3), np.float32), "b": np.ones(3, np.float32), "opt": {"step": 3, "name": "adam"}}
    plan = codec.encode_tree(base).plan
    same = {"w": np.full((4, 3), 7, np.float32), "b": np.arange(3, dtype=np.float32)[::-1],
            "opt": {"step": 4, "name": "sgdm"}}
    assert codec.encode_tree(same).plan is plan
    different = {
        "a key renamed": {**{"W" if k == "w" else k: v for k, v in base.items()}},
        "keys in another order": {"b": base["b"], "w": base["w"], "opt": base["opt"]},
        "a dtype": {**base, "b": np.ones(3, np.float64)},
        "byte order": {**base, "b": np.ones(3, ">f4")},
        "a shape": {**base, "w": np.zeros((3, 4), np.float32)},
        "an int beyond int64": {**base, "opt": {"step": 2**64, "name": "adam"}},
        "a string's length": {**base, "opt": {"step": 3, "name": "adamw"}},
        "a list for a dict": {**base, "opt": [3, "adam"]},
        "an array for a scalar": {**base, "opt": {"step": np.int64(3), "name": "adam"}},
    }
    for what, tree in different.items():
        encoded = codec.encode_tree(tree)
        assert encoded.plan is not plan, what
        with tempfile.TemporaryDirectory() as directory:
            codec.write_file(Path(directory) / "x.h5", tree, {"step": 1})
            assert_tree_equal(codec.read_file(Path(directory) / "x.h5")[0], tree)


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_restored_state_is_freed_when_dropped_without_the_collector(tmp_path: Path) -> None:
    """The reader leaves no cycle holding the pack or a big leaf's array."""
    import weakref

    tree = {"big": np.ones(1 << 20, np.float32), "layers": [{"b": np.ones(7, np.float32), "n": i} for i in range(50)]}
    codec.write_file(tmp_path / "x.h5", tree, {"step": 1})
    with collector_off():
        restored, _ = codec.read_file(tmp_path / "x.h5")
        assert_tree_equal(restored, tree)
        bases = [restored["big"], restored["layers"][0]["b"]]
        while any(b.base is not None for b in bases):
            bases = [b if b.base is None else b.base for b in bases]
        assert all(isinstance(b, np.ndarray) for b in bases)
        refs = [weakref.ref(b) for b in bases]
        del restored, bases
        assert [ref() is None for ref in refs] == [True, True]


def test_a_kept_plan_holds_no_array_of_the_trees_it_was_made_for(tmp_path: Path) -> None:
    """Plans are kept per process: they must not keep a saved state's memory alive."""
    import weakref

    big, small = np.ones(1 << 20, np.float32), np.ones(7, np.float32)  # a dataset of its own; packed
    refs = [weakref.ref(big), weakref.ref(small)]
    with collector_off():  # freed as soon as dropped: nothing the save made is left in a cycle
        for _ in range(2):  # the second save reuses the plan
            codec.write_file(tmp_path / f"x{_}.h5", {"big": big, "small": small, "n": 3}, {"step": 1})
        del big, small
        assert [ref() is None for ref in refs] == [True, True]
    # ... though its plan is kept: a tree of the same structure reuses it.
    same = {"big": np.zeros(1 << 20, np.float32), "small": np.zeros(7, np.float32), "n": 4}
    assert codec.encode_tree(same).plan is codec.encode_tree({**same, "n": 5}).plan


def test_a_plan_is_not_reused_once_the_pack_threshold_changes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tree = {"small": np.arange(10.0), "also": np.arange(3)}
    codec.write_file(tmp_path / "packed.h5", tree, {"step": 1})
    monkeypatch.setattr(codec._format, "PACK_THRESHOLD", 0)
    codec.write_file(tmp_path / "datasets.h5", tree, {"step": 1})
    with h5py.File(tmp_path / "datasets.h5", "r") as f:
        assert sorted(f["state"]) == ["also", "small"] and "ckptmgr_packed" not in f
    assert_tree_equal(codec.read_file(tmp_path / "datasets.h5")[0], tree)


# ------------------------------------------------------------------ explicit examples


def _every_kind() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 6))
    return {
        **{f"{np.dtype(t).name}": rng.integers(0, 100, 5).astype(t)
           for t in (*INT_DTYPES, *FLOAT_DTYPES, *COMPLEX_DTYPES, np.bool_)},
        "zero_d": np.array(3.5, dtype=np.float16),
        "zero_d_bool": np.array(True),
        "empty": np.zeros((0, 3), dtype=np.int16),
        "empty_1d": np.array([], dtype=np.complex64),
        "fortran": np.asfortranarray(base),
        "transposed": base.T,
        "strided": base[::2, ::3],
        "reversed": base[::-1],
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "big_endian_float": np.array([1.5, -0.0, np.nan], dtype=">f8"),
        "bfloat16": np.array([1.0, -2.5, np.inf], dtype=ml_dtypes.bfloat16),
        "bfloat16_scalar": ml_dtypes.bfloat16(0.333),
        "np_scalars": [np.float32(1.25), np.int8(-3), np.uint64(2**64 - 1), np.bool_(False), np.complex64(1 - 2j),
                       np.float16(np.inf), np.longdouble("1.000000000000000000001")],
        "py": (True, False, 0, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**1000, -(2**1000)),
        "floats": [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 5e-324, 1.7976931348623157e308],
        "complex": [complex(0, -0.0), complex(float("nan"), 1), 1j],
        "text": ["", "plain", "ünïcödé ✓ 🔑", "lone \ud800 surrogate", "nul\x00inside"],
        "bytes": [b"", b"\x00\xff" * 3],
        "none": None,
        "containers": {"empty_dict": {}, "empty_list": [], "empty_tuple": (), "nested": [(1, [{}]), ((),)]},
        "keys": {"/": 1, ".": 2, "": 3, "~0": 4, "~1": 5, "a/b": 6, "ключ": 7, "🔑": 8, "x" * 300: 9, "0": 10,
                 ".hidden": 11, "ckptmgr_manifest": 12},
    }


def test_every_supported_kind_round_trips(tmp_path: Path) -> None:
    tree = _every_kind()
    with ckptmgr.CheckpointManager(tmp_path) as mgr:
        info = mgr.save(1, tree)
        assert_tree_equal(mgr.restore(), tree)
    assert info is not None and info.nbytes > 0
    assert_tree_equal(ckptmgr.CheckpointManager(tmp_path, read_only=True).restore(1), tree)


def test_key_order_is_kept(tmp_path: Path) -> None:
    tree = {"b": 1, "a": 2, "~0": 3, "/": 4, "c": {"z": 1, "y": 2}}
    with ckptmgr.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, tree)
        restored = mgr.restore()
    assert list(restored) == ["b", "a", "~0", "/", "c"]
    assert list(restored["c"]) == ["z", "y"]


def test_pcg64_state_with_128_bit_ints_round_trips_and_resumes_the_stream(tmp_path: Path) -> None:
    rng = np.random.default_rng(12345)
    rng.random(17)
    state = rng.bit_generator.state
    assert state["state"]["state"] > 2**64  # really a 128-bit int
    expected = rng.random(5)
    with ckptmgr.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"rng": state, "legacy": np.random.RandomState(7).get_state(legacy=False)})
        restored = mgr.restore()
    assert_tree_equal(restored["rng"], state)
    resumed = np.random.default_rng()
    resumed.bit_generator.state = restored["rng"]
    np.testing.assert_array_equal(resumed.random(5), expected)


def test_numpy_scalars_stay_numpy_scalars_and_arrays_stay_arrays(tmp_path: Path) -> None:
    tree = {"s": np.float64(1.5), "a0": np.array(1.5), "i": np.int32(4), "py": 1.5}
    with ckptmgr.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, tree)
        restored = mgr.restore()
    assert type(restored["s"]) is np.float64
    assert type(restored["a0"]) is np.ndarray and restored["a0"].shape == ()
    assert type(restored["i"]) is np.int32
    assert type(restored["py"]) is float
    assert_tree_equal(restored, tree)


def test_checkpoint_is_readable_with_plain_h5py(tmp_path: Path) -> None:
    """Big leaves are datasets under their key path; small ones are found through the
    pack's index table (name, dtype, shape, offset, size), as a person with h5py or
    HDFView would; the manifest is JSON."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    big = np.arange(2**16, dtype=np.float64)  # 512 KiB: above the packing threshold
    with ckptmgr.CheckpointManager(tmp_path) as mgr:
        info = mgr.save(3, {"params": {"w": w, "big": big}, "opt": [np.int64(5)], "a/b": np.ones(2)})
    assert info is not None
    with h5py.File(info.path, "r") as f:
        assert f.attrs["ckptmgr_format"] == 2
        np.testing.assert_array_equal(f["state/params/big"][()], big)
        index = {row["name"].decode(): row for row in f["ckptmgr_packed_index"][()]}
        assert sorted(index) == ["/state/opt/0", "/state/params/w", "/state/~2"]
        packed = f["ckptmgr_packed"][()]

        def packed_leaf(name: str) -> np.ndarray:
            row = index[name]
            raw = packed[row["offset"]:row["offset"] + row["nbytes"]]
            return raw.view(np.dtype(row["dtype"].decode())).reshape(json.loads(row["shape"]))

        np.testing.assert_array_equal(packed_leaf("/state/params/w"), w)
        assert packed_leaf("/state/opt/0") == 5
        manifest = json.loads(f["ckptmgr_manifest"][()].tobytes())
    assert manifest["step"] == 3
    # The key that is not a plain HDF5 name is described in the manifest.
    assert [item[0] for item in manifest["tree"]["items"]] == ["params", "opt", "a/b"]


# ------------------------------------------------------------------- unsupported types


class _Custom:
    pass


class _Color(enum.Enum):
    RED = 1


Point = collections.namedtuple("Point", "x y")


class _DictSub(dict):  # type: ignore[type-arg]
    pass


class _ArraySub(np.ndarray):  # type: ignore[type-arg]
    pass


UNSUPPORTED = [
    pytest.param({"a": [1, {"b": np.array([object()], dtype=object)}]}, "state['a'][1]['b']", id="object-array"),
    pytest.param({"s": {1, 2}}, "state['s']", id="set"),
    pytest.param({"f": [frozenset()]}, "state['f'][0]", id="frozenset"),
    pytest.param({"p": Point(1, 2)}, "state['p']", id="namedtuple"),
    pytest.param({"o": [(_Custom(),)]}, "state['o'][0][0]", id="custom-class"),
    pytest.param({"e": _Color.RED}, "state['e']", id="enum"),
    pytest.param({"od": collections.OrderedDict(a=1)}, "state['od']", id="OrderedDict"),
    pytest.param({"dd": _DictSub()}, "state['dd']", id="dict-subclass"),
    pytest.param({"k": {1: "x"}}, "state['k']", id="int-key"),
    pytest.param({"k": {"ok": {("t",): 1}}}, "state['k']['ok']", id="tuple-key"),
    # Equal to the key of the state saved before it: refused all the same.
    pytest.param({np.str_("ok"): 1}, "state", id="numpy-str-key"),
    pytest.param({"u": np.array(["text"])}, "state['u']", id="unicode-array"),
    pytest.param({"u": np.str_("x")}, "state['u']", id="numpy-str-scalar"),
    pytest.param({"t": np.datetime64("2024-01-01")}, "state['t']", id="datetime64"),
    pytest.param({"r": np.zeros(2, dtype=[("a", "i4")])}, "state['r']", id="structured-array"),
    pytest.param({"m": np.zeros(2).view(_ArraySub)}, "state['m']", id="ndarray-subclass"),
    pytest.param({"b": bytearray(b"x")}, "state['b']", id="bytearray"),
    pytest.param({"d": decimal.Decimal(1)}, "state['d']", id="Decimal"),
    pytest.param({"q": fractions.Fraction(1, 3)}, "state['q']", id="Fraction"),
    pytest.param([1, 2, print], "state[2]", id="function"),
]


@pytest.mark.parametrize(("tree", "where"), UNSUPPORTED)
def test_unsupported_values_raise_type_error_naming_the_key_path(tmp_path: Path, tree: Any, where: str) -> None:
    with ckptmgr.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"ok": 1})
        with pytest.raises(TypeError, match=re.escape(where)):
            mgr.save(2, tree)
        # Nothing was written, and the manager still works.
        assert [c.step for c in mgr.checkpoints] == [1]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("ckpt-", ".ckpt-"))) == [
            "ckpt-000000001.h5"
        ]
        mgr.save(3, {"ok": 3})
        assert mgr.restore() == {"ok": 3}


def test_too_deep_and_cyclic_trees_raise_value_error() -> None:
    deep: Any = 0
    for _ in range(codec.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ValueError, match=r"^Expected a state tree .* Received: "):
        codec.encode_tree(deep)
    for leaf in (np.ones(3), 1.0):  # an array in a dict is described without a call per leaf
        with pytest.raises(ValueError, match=r"^Expected a state tree at most 200 levels deep"):
            codec.encode_tree(_nested(codec.MAX_DEPTH + 1, leaf))
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError, match=r"^Expected a state tree"):
        codec.encode_tree(cyclic)


def _nested(depth: int, leaf: Any) -> Any:
    """``leaf`` at ``depth`` levels down: {"k": {"k": ... leaf}}."""
    for _ in range(depth):
        leaf = {"k": leaf}
    return leaf


def test_the_deepest_tree_written_is_read_and_verified(tmp_path: Path) -> None:
    for i, leaf in enumerate((np.ones(3), 1.0, np.ones(2**16))):
        tree = _nested(codec.MAX_DEPTH, leaf)
        codec.write_file(tmp_path / f"{i}.h5", tree, {"step": 1})
        assert_tree_equal(codec.read_file(tmp_path / f"{i}.h5")[0], tree)
        codec.verify_file(tmp_path / f"{i}.h5")


@pytest.mark.parametrize("leaf", [
    np.arange(2**16, dtype=np.float64), np.arange(5, dtype=np.float32), np.float32(2.5), 7, "x" * 300_000,
    b"\0" * 300_000, None,
], ids=["big-array", "small-array", "npscalar", "int", "big-str", "big-bytes", "none"])
def test_a_lone_leaf_is_a_whole_state(tmp_path: Path, leaf: Any) -> None:
    with ckptmgr.CheckpointManager(tmp_path) as mgr:
        for step in (1, 2):  # the second reuses the plan
            mgr.save(step, leaf)
        assert_tree_equal(mgr.restore(), leaf)
        assert_tree_equal(mgr.restore(1, mmap=True), leaf)
        mgr.verify(2)


def test_the_pack_index_names_long_dtypes_and_shapes_whole(tmp_path: Path) -> None:
    tree = {"f8": np.ones(3, ml_dtypes.float8_e4m3b11fnuz), "deep": np.ones((1,) * 32)}
    codec.write_file(tmp_path / "x.h5", tree, {"step": 1})
    with h5py.File(tmp_path / "x.h5", "r") as f:
        rows = {row["name"].decode(): row for row in f["ckptmgr_packed_index"][()]}
    assert rows["/state/f8"]["dtype"].decode() == "float8_e4m3b11fnuz"
    assert json.loads(rows["/state/deep"]["shape"]) == [1] * 32


def test_a_tree_whose_manifest_readers_would_refuse_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real cap is 256 MiB of description (millions of keys); lowered here so that a
    # small tree crosses it. Readers apply the same constant.
    with ckptmgr.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"ok": np.ones(3)})
        monkeypatch.setattr(codec._format, "MAX_MANIFEST_BYTES", 4096)
        vocab = {f"token-{i}": i for i in range(500)}
        with pytest.raises(ValueError, match=r"^Expected a state tree whose description .* 500 leaves"):
            mgr.save(2, {"vocab": vocab})
        # No checkpoint nobody could restore, no leftover, and the earlier one is intact.
        assert [c.step for c in mgr.checkpoints] == [1]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("ckpt-", ".ckpt-"))) == [
            "ckpt-000000001.h5"
        ]
        assert_tree_equal(mgr.restore(), {"ok": np.ones(3)})
        mgr.save(3, {"vocab": dict(list(vocab.items())[:5])})
        assert mgr.restore(3)["vocab"]["token-4"] == 4


# -------------------------------------------------------------------- damaged files


def _sample_tree() -> dict[str, Any]:
    return {
        "w": np.arange(200, dtype=np.float32),
        "opt": [np.ones((3, 3)), (1, "x", 2**100)],
        "name": "hello",
        "none": None,
        "k/": {"z": np.int8(3)},
        "bf": np.ones(4, dtype=ml_dtypes.bfloat16),
    }


def _flip(data: bytes, position: int, bit: int) -> bytes:
    buf = bytearray(data)
    buf[position] ^= 1 << bit
    return bytes(buf)


def test_bit_flips_anywhere_never_give_wrong_data_or_a_foreign_exception(tmp_path: Path) -> None:
    original = tmp_path / "good.h5"
    tree = _sample_tree()
    codec.write_file(original, tree, {"step": 1})
    data = original.read_bytes()
    damaged = tmp_path / "bad.h5"
    rnd = random.Random(20240601)
    # HDF5 keeps its metadata at the start and the end of the file: sample those densely.
    positions = sorted(set(rnd.sample(range(0, 2048), 120) + rnd.sample(range(len(data) - 600, len(data)), 80)
                           + rnd.sample(range(len(data)), 60)))
    outcomes = collections.Counter()
    for position in positions:
        damaged.write_bytes(_flip(data, position, rnd.randrange(8)))
        try:
            restored, _ = codec.read_file(damaged)
        except ckptmgr.CorruptCheckpointError:
            outcomes["corrupt"] += 1
            continue
        assert_tree_equal(restored, tree)  # a harmless flip (padding, timestamps)
        outcomes["harmless"] += 1
    assert outcomes["corrupt"] > 0


def test_truncation_at_any_length_is_corrupt(tmp_path: Path) -> None:
    original = tmp_path / "good.h5"
    codec.write_file(original, _sample_tree(), {"step": 1})
    data = original.read_bytes()
    damaged = tmp_path / "bad.h5"
    for length in [0, 1, 7, 8, 100, 511, 512, *range(1000, len(data), 331), len(data) - 1]:
        damaged.write_bytes(data[:length])
        with pytest.raises(ckptmgr.CorruptCheckpointError):
            codec.read_file(damaged)
        with pytest.raises(ckptmgr.CorruptCheckpointError):
            codec.read_meta(damaged)


@pytest.mark.parametrize("layout", ["packed", "unpacked"])
def test_flipped_array_byte_fails_its_checksum(tmp_path: Path, layout: str, request: pytest.FixtureRequest) -> None:
    if layout == "unpacked":
        request.getfixturevalue("unpacked")
    path = tmp_path / "x.h5"
    codec.write_file(path, _sample_tree(), {"step": 1})
    offset = leaf_offset(path, "/state/w")
    data = path.read_bytes()
    path.write_bytes(_flip(data, offset + 4 * 100 + 1, 3))
    assert codec.read_meta(path)["step"] == 1  # the manifest itself is intact
    with pytest.raises(ckptmgr.CorruptCheckpointError, match=r"checksum mismatch in /state/w"):
        codec.read_file(path)
    with pytest.raises(ckptmgr.CorruptCheckpointError, match=r"checksum mismatch"):
        codec.verify_file(path)
    tree, _ = codec.read_file(path, verify=False)
    assert tree["w"][100] != 100.0


def _rewrite_manifest(path: Path, change: Any) -> None:
    with h5py.File(path, "r+") as f:
        manifest = json.loads(f["ckptmgr_manifest"][()].tobytes())
        change(manifest)
        blob = json.dumps(manifest).encode()
        del f["ckptmgr_manifest"]
        f.create_dataset("ckptmgr_manifest", data=np.frombuffer(blob, np.uint8))
        f.attrs["ckptmgr_manifest_crc32"] = np.uint32(codec.checksum(blob))


def test_hostile_manifest_cannot_make_the_reader_allocate_without_bound(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    codec.write_file(path, {"w": np.zeros(4)}, {"step": 1})

    def huge(manifest: dict[str, Any]) -> None:
        manifest["tree"]["items"][0][1]["shape"] = [2**40, 2**20]

    _rewrite_manifest(path, huge)
    with pytest.raises(ckptmgr.CorruptCheckpointError):
        codec.read_file(path)


@pytest.mark.usefixtures("unpacked")  # one dataset per leaf, as big leaves are stored
def test_links_in_the_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    codec.write_file(path, {"w": np.zeros(4), "v": np.ones(4)}, {"step": 1})
    with h5py.File(path, "r+") as f:
        del f["state/w"]
        f["state/w"] = h5py.SoftLink("/state/v")
    with pytest.raises(ckptmgr.CorruptCheckpointError, match="SoftLink"):
        codec.read_file(path)
    with h5py.File(path, "r+") as f:
        del f["state/w"]
        f["state/w"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/x")
    with pytest.raises(ckptmgr.CorruptCheckpointError, match="ExternalLink"):
        codec.read_file(path)


def test_a_file_that_is_not_a_checkpoint_is_corrupt(tmp_path: Path) -> None:
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ckptmgr.CorruptCheckpointError, match="not a ckptmgr checkpoint"):
        codec.read_file(plain)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(ckptmgr.CorruptCheckpointError):
        codec.read_meta(text)


def test_arrays_bigger_than_a_write_slab_round_trip_and_are_verified(tmp_path: Path) -> None:
    """Arrays over the codec's slab size (16 MiB) are written and checksummed in pieces."""
    rng = np.random.default_rng(3)
    tree = {
        "matrix": rng.standard_normal((2600, 850)),  # 17.7 MB, many rows per slab
        "two_rows": rng.integers(-(2**31), 2**31, (2, 2_300_000), dtype=np.int32).astype(">i4"),  # 1 row a slab
        "bf16": rng.standard_normal((3000, 3001), dtype=np.float32).astype(ml_dtypes.bfloat16),  # raw, 18 MB
        "transposed": rng.standard_normal((1500, 3000), dtype=np.float32).T,  # not C-contiguous
        "cube": np.arange(17 * 1024 * 1024 // 8 + 13, dtype=np.float64).reshape(-1, 1, 1),
    }
    with ckptmgr.CheckpointManager(tmp_path) as mgr:
        info = mgr.save(1, tree)
        assert_tree_equal(mgr.restore(), tree)
    assert info is not None
    with h5py.File(info.path, "r") as f:
        offset = f["state/cube"].id.get_offset()
    data = bytearray(info.path.read_bytes())
    data[offset + 16 * 1024 * 1024 + 5] ^= 0x10  # in the second slab
    info.path.write_bytes(bytes(data))
    with pytest.raises(ckptmgr.CorruptCheckpointError, match=r"checksum mismatch in /state/cube"):
        codec.read_file(info.path)


# ------------------------------------------------------------------------ read paths


def _multi_slab_tree() -> dict[str, Any]:
    rng = np.random.default_rng(5)
    return {
        "big": rng.standard_normal((700, 531)),  # 2.97 MB: three read slabs, the last one partial
        "c": (rng.standard_normal(70_000) + 1j).astype(">c16"),
        "bf": rng.standard_normal(600_000, dtype=np.float32).astype(ml_dtypes.bfloat16),  # raw
        "flags": rng.integers(0, 2, 5000).astype(bool),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.float64(2.5),
        "n": 7,
    }


@pytest.mark.usefixtures("unpacked")  # one dataset per leaf, as big leaves are stored
@pytest.mark.parametrize("direct", [True, False], ids=["pread", "hdf5-read"])
def test_both_read_paths_return_the_tree_and_catch_a_flip_in_any_slab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Plain contiguous leaves are read with pread in slabs, the rest (or all, on another
    HDF5 driver) by HDF5: both verify every byte."""
    preads = collections.Counter()
    pread_checked = codec._pread_checked

    def counting(*args: Any) -> int:
        preads["calls"] += 1
        return pread_checked(*args)

    monkeypatch.setattr(codec, "_pread_checked", counting)
    if not direct:
        monkeypatch.setattr(codec, "_direct_fd", lambda f: None)
    tree = _multi_slab_tree()
    path = tmp_path / "x.h5"
    codec.write_file(path, tree, {"step": 1})
    assert_tree_equal(codec.read_file(path)[0], tree)
    assert_tree_equal(codec.read_file(path, verify=False)[0], tree)
    codec.verify_file(path)
    # big, c, bf, scalar and n, three times; flags (bool) and empty go through HDF5.
    assert preads["calls"] == (15 if direct else 0)
    with h5py.File(path, "r") as f:
        offset, nbytes = f["state/big"].id.get_offset(), f["state/big"].id.get_storage_size()
    data = path.read_bytes()
    slab = codec._READ_SLAB_BYTES
    for position in (0, slab - 1, slab, 2 * slab + 17, nbytes - 1):
        path.write_bytes(_flip(data, offset + position, 2))
        message = rf"^{re.escape(str(path))}: checksum mismatch in /state/big$"
        with pytest.raises(ckptmgr.CorruptCheckpointError, match=message):
            codec.read_file(path)
        with pytest.raises(ckptmgr.CorruptCheckpointError, match=message):
            codec.verify_file(path)
        damaged, _ = codec.read_file(path, verify=False)
        assert damaged["big"].tobytes() != tree["big"].tobytes()
        assert_tree_equal(damaged["c"], tree["c"])


@pytest.mark.usefixtures("unpacked")  # one dataset per leaf, as big leaves are stored
def test_a_compact_dataset_is_read_through_hdf5_and_verified(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    tree = {"w": np.arange(50, dtype=np.float32), "v": np.ones(3)}
    codec.write_file(path, tree, {"step": 1})
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.COMPACT)  # stored in the object header: no offset to pread from
    with h5py.File(path, "r+") as f:
        del f["state/w"]
        f.create_dataset("state/w", data=tree["w"], dcpl=dcpl)
        assert f["state/w"].id.get_offset() is None
    assert_tree_equal(codec.read_file(path)[0], tree)
    with h5py.File(path, "r+") as f:
        f["state/w"][3] = -1
    with pytest.raises(ckptmgr.CorruptCheckpointError, match=r"checksum mismatch in /state/w$"):
        codec.read_file(path)


def test_a_verified_read_allocates_only_the_state(tmp_path: Path) -> None:
    """Slabs are read into the final arrays: no buffer, no copy, no per-slab garbage."""
    path = tmp_path / "x.h5"
    state = [np.ones((1024, 1024), np.float32), np.ones(3 * 1024 * 1024 + 5, np.uint8)]
    codec.write_file(path, state, {"step": 1})
    nbytes = sum(a.nbytes for a in state)
    codec.read_file(path)  # first-call costs (lazy imports, caches)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        restored, _ = codec.read_file(path)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert_tree_equal(restored, state)
    assert nbytes <= peak < nbytes + 256 * 1024


@pytest.mark.usefixtures("unpacked")  # one dataset per leaf, as big leaves are stored
def test_reads_close_everything_they_open_also_when_they_refuse_a_file(tmp_path: Path) -> None:
    """Nothing stays open in HDF5 after a read, even while the error of a refused file
    (and with it the reader's frames) is alive: an object left open keeps its file open."""
    tree = {"a": {"b": [np.arange(3), {"c": np.ones(2)}], "d": np.zeros(4)}, "e": np.int8(1), "f": "text"}
    good = tmp_path / "good.h5"
    codec.write_file(good, tree, {"step": 1})
    linked = tmp_path / "linked.h5"
    codec.write_file(linked, tree, {"step": 1})
    with h5py.File(linked, "r+") as f:
        del f["state/a/b/1/c"]
        f["state/a/b/1/c"] = h5py.SoftLink("/state/a/d")
    flipped = tmp_path / "flipped.h5"
    with h5py.File(good, "r") as f:
        offset = f["state/a/b/1/c"].id.get_offset()
    flipped.write_bytes(_flip(good.read_bytes(), offset + 3, 1))

    def open_objects() -> int:
        # Not OBJ_DATATYPE: that counts the library's (and the codec's cached) memory types.
        kinds = h5py.h5f.OBJ_FILE | h5py.h5f.OBJ_GROUP | h5py.h5f.OBJ_DATASET | h5py.h5f.OBJ_ATTR
        return int(h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, kinds))

    before = open_objects()
    assert_tree_equal(codec.read_file(good)[0], tree)
    codec.verify_file(good)
    codec.read_meta(good)
    assert open_objects() == before
    errors = []
    for path, read, message in [
        (linked, codec.read_file, "SoftLink"),
        (linked, codec.verify_file, "SoftLink"),
        (flipped, codec.read_file, r"checksum mismatch in /state/a/b/1/c$"),
        (flipped, codec.verify_file, r"checksum mismatch in /state/a/b/1/c$"),
    ]:
        with pytest.raises(ckptmgr.CorruptCheckpointError, match=message) as excinfo:
            read(path)
        errors.append(excinfo)
        assert open_objects() == before


# ------------------------------------------------------------------------ writeback


def test_the_disk_is_started_on_each_early_slab_then_kicked_every_32_mib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 16 MiB array goes out in 4 MiB slabs, each queued for the disk once written;
    past 32 MiB a background fdatasync takes over. The bytes are the same either way."""
    calls: list[tuple[str, int]] = []
    for name in ("start", "kick"):
        method = getattr(storage.Writeback, name)

        def spy(self: storage.Writeback, _name: str = name, _method: Any = method) -> None:
            calls.append((_name, os.fstat(self._fd).st_size))
            _method(self)

        monkeypatch.setattr(storage.Writeback, name, spy)
    mib = 1024 * 1024
    small = {"w": np.arange(4 * mib, dtype=np.float32)}
    codec.write_file(tmp_path / "small.h5", small, {"step": 1}, writeback=storage.Writeback)
    assert [name for name, _ in calls] == ["start"] * 4
    assert all(size >= n * 4 * mib for n, (_, size) in enumerate(calls, 1))
    assert_tree_equal(codec.read_file(tmp_path / "small.h5")[0], small)
    calls.clear()
    big = {"a": np.arange(5 * mib, dtype=np.float64), "b": np.ones((3, 10 * mib), np.uint8)}  # 40 + 30 MiB
    codec.write_file(tmp_path / "big.h5", big, {"step": 1}, writeback=storage.Writeback)
    assert [name for name, _ in calls] == ["start"] * 7 + ["kick", "kick"]
    assert_tree_equal(codec.read_file(tmp_path / "big.h5")[0], big)


@pytest.mark.parametrize(("code", "fails"), [(errno.EIO, True), (errno.ENOSPC, True), (errno.ENOSYS, False),
                                             (errno.EINVAL, False)], ids=["EIO", "ENOSPC", "ENOSYS", "EINVAL"])
def test_a_failure_to_start_the_disk_fails_the_save_unless_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, fails: bool
) -> None:
    """An I/O error from queueing writes is the file's error (Linux reports it to one
    caller only); "not supported here" is not an error: the final fsync is enough."""

    def failing(fd: int, offset: int, nbytes: int, flags: int) -> int:
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(storage._writeback, "_sync_file_range", failing)
    tree = {"w": np.ones(4 * 1024 * 1024, np.float32)}
    if fails:
        with pytest.raises(OSError) as excinfo:
            codec.write_file(tmp_path / "x.h5", tree, {"step": 1}, writeback=storage.Writeback)
        assert excinfo.value.errno == code
        with ckptmgr.CheckpointManager(tmp_path / "run") as mgr, pytest.raises(ckptmgr.CheckpointIOError):
            mgr.save(1, tree)
        assert list((tmp_path / "run").glob(".ckpt-*")) == []
    else:
        codec.write_file(tmp_path / "x.h5", tree, {"step": 1}, writeback=storage.Writeback)
        assert_tree_equal(codec.read_file(tmp_path / "x.h5")[0], tree)
