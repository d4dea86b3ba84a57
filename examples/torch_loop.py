"""A PyTorch training loop that resumes exactly after kill -9, SIGTERM or Ctrl-C.

A small MLP with dropout, AdamW and a step LR schedule, trained on random
mini-batches drawn from a ``torch.Generator``. Each checkpoint holds the model's,
optimizer's and scheduler's ``state_dict`` (as arrays: no pickle, no ``torch.load``)
and every generator's state, so a resumed run ends with the same weights, bit for
bit, as a run that was never interrupted.

    python examples/torch_loop.py runs/torch              # Ctrl-C it, run it again
    python examples/torch_loop.py runs/torch --steps 500

On SIGTERM or Ctrl-C it saves the current step and exits with status 75
(``ckptmgr.adapters.loop.PREEMPTED_EXIT_CODE``); a second one stops it at once.
"""

from __future__ import annotations

import argparse

import torch

import ckptmgr
from ckptmgr.adapters import torch as ckpt_torch
from ckptmgr.adapters.loop import TrainingLoop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="checkpoint directory (created if missing)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=10)
    args = parser.parse_args(argv)

    torch.manual_seed(0)  # initial weights, the same in every process
    torch.use_deterministic_algorithms(True)
    x = torch.randn(512, 8)
    y = torch.sin(x @ torch.randn(8, 1))

    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)
    batches = torch.Generator().manual_seed(1)  # mini-batch sampling: its state is checkpointed
    trainables = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    mgr = ckptmgr.CheckpointManager(
        args.directory, save_every=ckptmgr.EverySteps(args.save_every), keep=ckptmgr.KeepLast(2)
    )
    # Dropout draws from torch's global generator, which TrainingLoop captures too.
    with mgr, TrainingLoop(mgr, generators={"batches": batches}) as loop:
        step, state = loop.resume()
        if state is not None:
            ckpt_torch.load_tree(trainables, state)
        print(f"starting at step {step}", flush=True)
        while step < args.steps:
            batch = torch.randint(len(x), (32,), generator=batches)
            loss = torch.mean((model(x[batch]) - y[batch]) ** 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            print(f"step {step} loss {loss.item():.6f}", flush=True)
            # A function: the state dicts are copied only on the steps that are saved.
            loop.step_done(step, lambda: ckpt_torch.to_tree(trainables))
        loop.save(step, ckpt_torch.to_tree(trainables), force=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
