"""The state tree stored in tests/fixtures/format1.h5, a file of format 1 written by
ckptmgr at ef46f85 (``codec.write_file(path, format1_tree(), {"step": 7, "time":
1764650000.0, "metrics": {"loss": 0.25}})``): every kind of leaf, odd keys, empty
containers. Kept so that files written before format 2 are tested to restore."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np


def format1_tree() -> dict[str, Any]:
    rng = np.random.default_rng(20261202)
    return {
        "params": {f"layer{i}": {"w": rng.standard_normal((8, 4)).astype(np.float32),
                                 "b": np.arange(4, dtype=np.float16) * i} for i in range(20)},
        "big": rng.standard_normal((64, 100)),
        "bf16": np.arange(12, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(3, 4),
        "mask": np.array([True, False, True]),
        "scalars": [np.int8(-3), np.float32(1.5), 7, 2**70, -2**70, 3.25, 1 + 2j, True, None],
        "text": ("héllo", b"\x00\xffbytes", ""),
        "a/b": {".hidden": np.zeros((0, 3), np.int32), "empty": {}, "elist": []},
        "zero_d": np.array(4.5, np.float64),
        "u64": np.array([2**64 - 1], np.uint64),
        "c64": np.array([1 + 1j, 2 - 2j], np.complex64),
    }
