"""A worker of the multi-process tests (test_distributed_torch.py), run under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_torch_job.py RESULTS MODE CKPT_DIR

(started by ``tests/_dist.run_torchrun``). Each rank reports what it saw as ``rank<rank>``
(``_dist.report``); the test asserts on it.
Modes:

- ``roundtrip``: sharded and replicated saves, restored bit-exact in a second manager;
  ranks running at different speeds under ``EverySeconds`` (no deadlock, same decisions).
- ``save-big``: sharded saves of a large state per rank, steps 1, 2, ...; rank 1 SIGKILLs
  itself while writing its part of step ``KILL_AT`` (env).
- ``resume``: restore the latest sharded step on every rank and report it.
- ``preempt``: a TrainingLoop where only rank 1 gets SIGTERM (at step 7).
- ``exit-early`` / ``stall``: rank 1 leaves (exit 0) or sleeps past the timeout before
  the second save; rank 0 reports what it raised and how long it took.

(A DDP training killed and restarted by torchrun is examples/torch_ddp.py's test.)
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from _dist import report

import ckptmgr
from ckptmgr.adapters import torch as ckpt_torch
from ckptmgr.adapters.loop import TrainingLoop

TIMEOUT = float(os.environ.get("COORD_TIMEOUT", "60"))
MIB = float(os.environ.get("SHARD_MIB", "32"))  # per rank, in save-big and resume


def shard(rank: int, step: int, mib: float = 0.05) -> dict[str, Any]:
    rng = np.random.default_rng(rank * 100_003 + step)
    n = int(mib * 2**20 / 4)
    return {"w": rng.standard_normal(n).astype(np.float32), "small": [rng.standard_normal(3) for _ in range(50)],
            "rank": rank, "step": step}


def digest(tree: Any) -> str:
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k in sorted(x):
                h.update(k.encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, np.ndarray):
            h.update(str(x.dtype).encode() + str(x.shape).encode())
            h.update(np.ascontiguousarray(x).tobytes())
        else:
            h.update(repr(x).encode())

    walk(tree)
    return h.hexdigest()


def kill_self_while_writing(directory: Path, min_bytes: int) -> None:
    """SIGKILL this process once a temporary file of a save in progress holds ``min_bytes``."""

    def watch() -> None:
        while True:
            for p in directory.glob(".ckpt-*.tmp"):
                try:
                    if p.stat().st_size >= min_bytes:
                        os.kill(os.getpid(), signal.SIGKILL)
                except FileNotFoundError:
                    pass
            time.sleep(0.001)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    results, mode, ckpt_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    # The default group's timeout only bounds the ranks' meeting (imports may keep one
    # late); the coordinator's collectives have their own group and TIMEOUT.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=max(TIMEOUT, 60)))
    c = ckpt_torch.TorchCoordinator(timeout=TIMEOUT)
    rank = c.rank
    out: dict[str, Any] = {"rank": rank, "world": c.world_size}
    if mode == "roundtrip":
        with ckptmgr.CheckpointManager(ckpt_dir / "sharded", coordinator=c, sharded=True) as mgr:
            out["saved"] = [mgr.save(s, shard(rank, s), metrics={"loss": 1.0 / s}).step for s in (1, 2)]
        with ckptmgr.CheckpointManager(ckpt_dir / "sharded", coordinator=c, sharded=True) as mgr:
            out["latest_ok"] = digest(mgr.restore()) == digest(shard(rank, 2))
            out["first_ok"] = digest(mgr.restore(1)) == digest(shard(rank, 1))
            out["checkpoints"] = [i.step for i in mgr.checkpoints]
        replicated = {"w": np.arange(1000, dtype=np.float64), "note": "rank 0's"} if rank == 0 else {"junk": 1}
        with ckptmgr.CheckpointManager(ckpt_dir / "replicated", coordinator=c) as mgr:
            mgr.save(7, replicated)
            out["replicated_ok"] = digest(mgr.restore()) == digest(
                {"w": np.arange(1000, dtype=np.float64), "note": "rank 0's"})
        # Async: each rank writes its part in the background; committed at the next call.
        with ckptmgr.CheckpointManager(ckpt_dir / "async", coordinator=c, sharded=True, async_save=True) as mgr:
            for s in (1, 2, 3):
                mgr.save(s, shard(rank, s, 4))
        with ckptmgr.CheckpointManager(ckpt_dir / "async", coordinator=c, sharded=True) as mgr:
            out["async_ok"] = digest(mgr.restore()) == digest(shard(rank, 3, 4))
            out["async_checkpoints"] = [i.step for i in mgr.checkpoints]
        # Ranks at different speeds: rank 1 is slower; rank 0's clock decides for all.
        with ckptmgr.CheckpointManager(ckpt_dir / "seconds", coordinator=c, sharded=True,
                                       save_every=ckptmgr.EverySeconds(0.05)) as mgr:
            saved = []
            for step in range(1, 41):
                time.sleep(0.002 if rank == 0 else 0.01)
                info = mgr.save(step, shard(rank, step, 0.001))
                if info is not None:
                    saved.append(info.step)
            out["seconds_saved"] = saved
    elif mode == "save-big":
        kill_at = int(os.environ.get("KILL_AT", "0"))
        with ckptmgr.CheckpointManager(ckpt_dir, coordinator=c, sharded=True) as mgr:
            for step in range(1, 4):
                state = shard(rank, step, MIB)
                if rank == 1 and step == kill_at:
                    kill_self_while_writing(ckpt_dir, 8 * 2**20)
                mgr.save(step, state)
                out.setdefault("saved", []).append(step)
                report(results, f"rank{rank}", out)
    elif mode == "resume":
        with ckptmgr.CheckpointManager(ckpt_dir, coordinator=c, sharded=True) as mgr:
            state = mgr.restore()
            out["step"] = state["step"]
            out["ok"] = digest(state) == digest(shard(rank, state["step"], MIB))
            out["checkpoints"] = [i.step for i in mgr.checkpoints]
    elif mode == "preempt":
        # SIGTERM reaches rank 1 only, at step 7: both ranks save step 7 and stop.
        mgr = ckptmgr.CheckpointManager(ckpt_dir, coordinator=c, sharded=True, save_every=ckptmgr.EverySteps(5))
        with mgr, TrainingLoop(mgr, exit_code=None) as loop:
            step, _ = loop.resume()
            while step < 20 and not loop.preempted:
                step += 1
                if rank == 1 and step == 7:
                    signal.raise_signal(signal.SIGTERM)
                loop.step_done(step, lambda s=step: shard(rank, s))
            out["stopped_at"] = step
            out["signal"] = None if loop.received_signal is None else loop.received_signal.name
        out["checkpoints"] = [i.step for i in ckptmgr.CheckpointManager(ckpt_dir, read_only=True).checkpoints]
    elif mode in ("exit-early", "stall"):
        mgr = ckptmgr.CheckpointManager(ckpt_dir, coordinator=c, sharded=True)
        mgr.save(1, shard(rank, 1))
        if rank == 1:
            out["left"] = True
            report(results, f"rank{rank}", out)
            if mode == "stall":
                # Stalled (alive, not calling) until rank 0 has given up and reported.
                while not (Path(results) / "rank0.json").exists():
                    time.sleep(0.05)
            os._exit(0)
        started = time.monotonic()
        try:
            mgr.save(2, shard(rank, 2))
            out["raised"] = None
        except ckptmgr.CheckpointError as exc:
            out["raised"] = type(exc).__name__
            out["message"] = str(exc)
        out["elapsed"] = time.monotonic() - started
        out["checkpoints"] = [i.step for i in ckptmgr.CheckpointManager(ckpt_dir, read_only=True).checkpoints]
        report(results, f"rank{rank}", out)
        os._exit(0)
    report(results, f"rank{rank}", out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
