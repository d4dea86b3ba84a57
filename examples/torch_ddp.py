"""DistributedDataParallel training on several processes, one checkpoint per step.

Every rank runs this script under ``torchrun``; they share one checkpoint directory.
Rank 0 decides when to save and writes the one copy of the state (the model and the
optimizer are the same on every rank: ``sharded=False``); every rank resumes from it.
A SIGTERM at any rank (a scheduler's pre-emption) makes every rank save the same step
and exit with status 75; a rank killed with SIGKILL makes the others raise
``CoordinatorError`` within the timeout, and ``torchrun --max-restarts=N`` restarts the
job from the last checkpoint. The run ends with the same weights, bit for bit, as a run
never interrupted: each rank's batch is drawn from a generator seeded by (step, rank).

    torchrun --standalone --nproc_per_node=2 examples/torch_ddp.py runs/ddp
    torchrun --standalone --nproc_per_node=2 --max-restarts=3 examples/torch_ddp.py runs/ddp --steps 500

(On one machine without a network interface for gloo, set ``GLOO_SOCKET_IFNAME=lo``.)
"""

from __future__ import annotations

import argparse
import hashlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

import ckptmgr
from ckptmgr.adapters import torch as ckpt_torch
from ckptmgr.adapters.loop import TrainingLoop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="checkpoint directory, the same for every rank (created if missing)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a rank waits for the others")
    args = parser.parse_args(argv)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=0.01)
    # The coordinator's messages go over a gloo group of its own, also in an NCCL job.
    coordinator = ckpt_torch.TorchCoordinator(timeout=args.timeout)
    manager = ckptmgr.CheckpointManager(
        args.directory, coordinator=coordinator,
        save_every=ckptmgr.EverySteps(args.save_every), keep=ckptmgr.KeepLast(3),
    )
    with manager, TrainingLoop(manager) as loop:
        step, tree = loop.resume()
        if tree is not None:
            ckpt_torch.load_tree({"model": model, "opt": opt}, tree)
            if rank == 0:
                print(f"resumed at step {step}", flush=True)
        while step < args.steps:
            step += 1
            batch = torch.Generator().manual_seed(step * 1000 + rank)
            x = torch.randn(64, 8, generator=batch).to(device)
            y = torch.sin(x.sum(dim=1, keepdim=True))
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            opt.step()
            loop.step_done(step, lambda: ckpt_torch.to_tree({"model": model, "opt": opt}),
                           metrics={"loss": float(loss)})
    if rank == 0:
        weights = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters()))
        print(f"done: step {step}, loss {float(loss):.5f}, weights {weights.hexdigest()[:16]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
