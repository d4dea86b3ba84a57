"""Checking what users pass: steps, metrics, selections; where a manager was opened."""

from __future__ import annotations

import os
import traceback
from collections.abc import Mapping, Sequence

import numpy as np

from . import codec
from .policies import KeepBest, OnImprovement, RetentionPolicy, SavePolicy, policy_leaves

_MAX_STEP = 2**63 - 1


def check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= _MAX_STEP:
        raise ValueError(f"Expected step to be an int in [0, 2**63 - 1]. Received: step={step!r}")
    return int(step)


def parse_select(select: str | Sequence[str] | None) -> codec.Selection | None:
    if select is None:
        return None
    paths = [select] if isinstance(select, str) else select
    if isinstance(paths, (bytes, Mapping)) or not all(isinstance(p, str) for p in paths) or not paths:
        raise ValueError(
            "Expected select to be a key path such as 'params' or 'params/dense/kernel', or a "
            f"non-empty list of them. Received: select={select!r}"
        )
    split = [p.strip("/").split("/") for p in paths]
    if any(not all(split_path) for split_path in split):
        raise ValueError(f"Expected key paths without empty segments. Received: select={select!r}")
    return codec.selection(split)


def opened_at() -> str:
    """Where the caller opened this manager: the first frame outside ckptmgr."""
    package = os.path.dirname(os.path.abspath(__file__))
    ours = (package + os.sep, os.path.join(os.path.dirname(package), "adapters") + os.sep)
    for frame in reversed(traceback.extract_stack()):
        if not os.path.abspath(frame.filename).startswith(ours):
            return f"a CheckpointManager opened at {frame.filename}:{frame.lineno}"
    return "a CheckpointManager"


def check_metrics(metrics: Mapping[str, object] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ValueError(f"Expected metrics to be a mapping of str to number. Received: metrics={metrics!r}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ValueError(f"Expected metric names to be str. Received: metrics key {key!r}")
        if isinstance(value, (str, bytes, bytearray)):
            # float("0.5") would succeed: a metric logged as text is a bug, say so.
            raise ValueError(
                f"Expected metric values to be numbers. Received: metrics[{key!r}]={value!r} (a {type(value).__name__})"
            )
        try:
            number = float(value)  # type: ignore[arg-type]  # NumPy scalars, 0-d arrays, framework scalars
        except (TypeError, ValueError):
            raise ValueError(
                f"Expected metric values to be numbers. Received: metrics[{key!r}]={value!r}"
            ) from None
        out[key] = number
    return out


def steps_text(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:4])) + ", ..., " + ", ".join(map(str, steps[-3:]))


def check_coordination(
    directory: object, coordinator: object, *, sharded: object, read_only: bool,
) -> None:
    """Check CheckpointManager's ``coordinator=``/``sharded=`` arguments."""
    from .coordinator import Coordinator

    if not isinstance(sharded, bool):
        raise ValueError(f"Expected sharded to be a bool. Received: sharded={sharded!r}")
    if coordinator is None:
        if sharded:
            raise ValueError(
                "Expected a coordinator with sharded=True (each rank saves its own part: the "
                "manager must reach the other ranks). Received: sharded=True, coordinator=None"
            )
        return
    if not isinstance(coordinator, Coordinator):
        raise ValueError(
            "Expected coordinator to implement ckptmgr.Coordinator (rank, world_size, timeout, "
            "barrier, broadcast, all_gather), e.g. ckptmgr.adapters.torch.TorchCoordinator(). "
            f"Received: coordinator={coordinator!r}"
        )
    rank, world = coordinator.rank, coordinator.world_size
    if type(world) is not int or world < 1 or type(rank) is not int or not 0 <= rank < world:
        raise ValueError(
            "Expected a coordinator whose rank is in range(world_size). "
            f"Received: rank={rank!r}, world_size={world!r}"
        )
    if read_only:
        raise ValueError(
            "Expected no coordinator with read_only=True (readers need no coordination: each "
            "process can open the directory read-only and restore(step, rank=k)). "
            "Received: read_only=True with a coordinator"
        )
    if sharded and isinstance(directory, str) and "://" in directory:
        raise ValueError(
            "Expected a local (or shared file system) directory with sharded=True: each rank's "
            "part on object storage is not supported yet (sharded=False is: rank 0 uploads the "
            f"one copy). Received: directory={directory!r}"
        )


def check_options(
    directory: object, save_every: object, keep: object, monitor: object, mode: object,
    *, best_only: object, async_save: object, read_only: object, storage_options: object = None,
) -> None:
    """Check CheckpointManager's arguments ("Expected ... Received: ..." ValueErrors)."""
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise ValueError(f"Expected directory to be a non-empty str or path. Received: directory={directory!r}")
    is_url = isinstance(directory, str) and "://" in directory
    if is_url:
        scheme = str(directory).partition("://")[0]
        if scheme.lower() not in ("s3", "s3a"):
            raise ValueError(
                "Expected a local directory or an s3://bucket/prefix URL. Received: "
                f"directory={directory!r}. Only s3:// is supported for object storage: the commit "
                "needs create-only (If-None-Match: *) and compare-and-swap (If-Match) writes, which "
                f"ckptmgr implements for S3 only so far, not for {scheme}://"
            )
    if storage_options is not None:
        if not isinstance(storage_options, Mapping):
            raise ValueError(
                f"Expected storage_options to be a mapping or None. Received: storage_options={storage_options!r}"
            )
        if not is_url:
            raise ValueError(
                "Expected storage_options only with an s3:// URL (they configure the object store). "
                f"Received: storage_options for the local directory={directory!r}"
            )
    if save_every is not None and not isinstance(save_every, SavePolicy):
        raise ValueError(
            "Expected save_every to be a save policy such as ckptmgr.EverySteps(1000), or None. "
            f"Received: save_every={save_every!r}"
        )
    if keep is not None and not isinstance(keep, RetentionPolicy):
        raise ValueError(
            "Expected keep to be a retention policy such as ckptmgr.KeepLast(3), or None. "
            f"Received: keep={keep!r}"
        )
    for name, flag in (("best_only", best_only), ("async_save", async_save), ("read_only", read_only)):
        if not isinstance(flag, bool):
            raise ValueError(f"Expected {name} to be a bool. Received: {name}={flag!r}")
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise ValueError(f"Expected monitor to be a non-empty str or None. Received: monitor={monitor!r}")
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"Expected mode to be 'auto', 'min' or 'max'. Received: mode={mode!r}")
    if monitor is None:
        if best_only:
            raise ValueError("Expected a monitor= metric with best_only=True. Received: monitor=None")
        needs_monitor = [p for p in (*policy_leaves(save_every), *policy_leaves(keep))
                         if isinstance(p, OnImprovement) or (isinstance(p, KeepBest) and p.monitor is None)]
        if needs_monitor:
            raise ValueError(
                f"Expected a monitor= metric for {needs_monitor[0]!r}. Received: monitor=None"
            )
