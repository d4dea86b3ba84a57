"""Checksummed JSON records: a payload checkpoint's sidecar (and the object store's commit markers)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import CorruptCheckpointError
from ._format import CHECKSUM_NAME, FORMAT_VERSION, checksum

# ------------------------------------------------------------ checksummed JSON records


def encode_signed(kind: str, meta: Mapping[str, Any]) -> bytes:
    """``meta`` as canonical JSON, wrapped with its CRC-32 under the key ``kind``
    (a payload's sidecar, an object store's commit marker)."""
    body = json.dumps(dict(meta), separators=(",", ":"), sort_keys=True, allow_nan=True)
    return json.dumps({kind: body, "crc32": checksum(body.encode("utf-8"))}).encode("utf-8")


def decode_signed(blob: bytes, kind: str, where: str, what: str) -> Any:
    """The JSON value :func:`encode_signed` wrapped, its CRC checked (not its content).

    Raises:
        CorruptCheckpointError: damaged or malformed (``what`` names it in the message).
    """
    try:
        outer = json.loads(blob.decode("utf-8"))
        body = outer[kind]
        if not isinstance(body, str) or checksum(body.encode("utf-8")) != outer["crc32"]:
            raise CorruptCheckpointError(f"{where}: {what} checksum mismatch")
        return json.loads(body)
    except CorruptCheckpointError:
        raise
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed {what} ({exc})") from exc


# ------------------------------------------------------------------ payload sidecars


def encode_sidecar(meta: Mapping[str, Any]) -> bytes:
    """The sidecar of a payload checkpoint: its metadata as JSON, with its own CRC.

    ``meta`` holds ``name``, ``size`` and ``crc32`` of the payload file besides the
    usual ``step``, ``time``, ``metrics``, ``tracker``.
    """
    return encode_signed("ckptmgr_payload", dict(meta, format=FORMAT_VERSION, checksum=CHECKSUM_NAME))


def decode_sidecar(blob: bytes, where: str = "") -> dict[str, Any]:
    """Parse and check a sidecar written by :func:`encode_sidecar`.

    Raises:
        CorruptCheckpointError: damaged, tampered with or malformed.
    """
    meta = decode_signed(blob, "ckptmgr_payload", where, "metadata")
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
