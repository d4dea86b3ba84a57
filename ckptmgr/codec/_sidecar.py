"""Payload sidecars: a payload checkpoint's metadata as checksummed JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import CorruptCheckpointError
from ._format import CHECKSUM_NAME, FORMAT_VERSION, checksum

# ------------------------------------------------------------------ payload sidecars


def encode_sidecar(meta: Mapping[str, Any]) -> bytes:
    """The sidecar of a payload checkpoint: its metadata as JSON, with its own CRC.

    ``meta`` holds ``name``, ``size`` and ``crc32`` of the payload file besides the
    usual ``step``, ``time``, ``metrics``, ``tracker``.
    """
    body = json.dumps(dict(meta, format=FORMAT_VERSION, checksum=CHECKSUM_NAME),
                      separators=(",", ":"), sort_keys=True, allow_nan=True)
    return json.dumps({"ckptmgr_payload": body, "crc32": checksum(body.encode("utf-8"))}).encode("utf-8")


def decode_sidecar(blob: bytes, where: str = "") -> dict[str, Any]:
    """Parse and check a sidecar written by :func:`encode_sidecar`.

    Raises:
        CorruptCheckpointError: damaged, tampered with or malformed.
    """
    try:
        outer = json.loads(blob.decode("utf-8"))
        body = outer["ckptmgr_payload"]
        if not isinstance(body, str) or checksum(body.encode("utf-8")) != outer["crc32"]:
            raise CorruptCheckpointError(f"{where}: metadata checksum mismatch")
        meta = json.loads(body)
    except CorruptCheckpointError:
        raise
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed metadata ({exc})") from exc
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT_VERSION
        or meta.get("checksum") != CHECKSUM_NAME
        or not isinstance(meta.get("name"), str)
        or type(meta.get("step")) is not int
        or meta["step"] < 0
        or type(meta.get("size")) is not int
        or type(meta.get("crc32")) is not int
    ):
        raise CorruptCheckpointError(f"{where}: malformed metadata")
    return meta
