"""A NumPy training loop that resumes exactly after kill -9, SIGTERM or Ctrl-C.

Linear regression by SGD with momentum, with random mini-batches and a dropout-like
random mask. Interrupt it however you like and run it again: it continues from the
last checkpoint, random number generators included, and ends with the same weights,
bit for bit, as a run that was never interrupted.

    python examples/numpy_loop.py runs/numpy              # Ctrl-C it, run it again
    python examples/numpy_loop.py runs/numpy --steps 500

On SIGTERM or Ctrl-C it saves the current step and exits with status 75
(``ckptmgr.adapters.loop.PREEMPTED_EXIT_CODE``); a second one stops it at once.
"""

from __future__ import annotations

import argparse

import numpy as np

import ckptmgr
from ckptmgr.adapters.loop import TrainingLoop


def make_data() -> tuple[np.ndarray, np.ndarray]:
    """Synthetic data, the same in every process."""
    gen = np.random.default_rng(0)
    x = gen.normal(size=(512, 8))
    y = x @ gen.normal(size=8) + 0.1 * gen.normal(size=512)
    return x, y


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="checkpoint directory (created if missing)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=10)
    args = parser.parse_args(argv)

    x, y = make_data()
    rng = np.random.default_rng(1)  # mini-batches and masks: its state is checkpointed

    mgr = ckptmgr.CheckpointManager(
        args.directory, save_every=ckptmgr.EverySteps(args.save_every), keep=ckptmgr.KeepLast(2)
    )
    with mgr, TrainingLoop(mgr, generators={"data": rng}) as loop:
        step, state = loop.resume(lambda: {"w": np.zeros(8), "velocity": np.zeros(8)})
        print(f"starting at step {step}", flush=True)
        while step < args.steps:
            batch = rng.choice(len(x), size=32, replace=False)
            mask = rng.random(8) > 0.1  # drop ~10% of the weights this step
            err = x[batch] @ (state["w"] * mask) - y[batch]
            grad = (x[batch].T @ err) / len(batch) * mask
            state["velocity"] = 0.9 * state["velocity"] + grad
            state["w"] = state["w"] - 0.01 * state["velocity"]
            step += 1
            print(f"step {step} loss {np.mean(err**2):.6f}", flush=True)
            loop.step_done(step, state)  # saves every --save-every steps, and on SIGTERM
        loop.save(step, state, force=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
