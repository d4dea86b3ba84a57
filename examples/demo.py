"""ckptmgr demo: a training run killed with SIGKILL part-way resumes exactly.

Trains a small NumPy MLP with SGD + momentum on synthetic data, shuffling with a
seeded NumPy Generator. The script runs the training as a child process, kills it with
SIGKILL in the middle, starts it again, lets it finish, and then compares the result
with an uninterrupted run in another directory: the parameters must be bit-identical.

    python examples/demo.py            # the whole demo
    python examples/demo.py --train DIR --steps 600   # one training process
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import ckptmgr

STEPS = 600
BATCH = 32


def make_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 8))
    y = np.sin(x @ rng.normal(size=(8, 1))) + 0.1 * rng.normal(size=(1024, 1))
    return x, y


def init_state() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    params = {"w1": rng.normal(scale=0.3, size=(8, 32)), "b1": np.zeros(32),
              "w2": rng.normal(scale=0.3, size=(32, 1)), "b2": np.zeros(1)}
    return {
        "params": params,
        "momentum": {k: np.zeros_like(v) for k, v in params.items()},
        "step": 0,
        # The shuffling generator's full state (it holds 128-bit Python ints).
        "rng": np.random.default_rng(2).bit_generator.state,
    }


def loss_and_grads(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    h = np.tanh(x @ params["w1"] + params["b1"])
    err = h @ params["w2"] + params["b2"] - y
    dh = (err @ params["w2"].T) * (1 - h**2)
    n = len(x)
    grads = {"w2": h.T @ err / n, "b2": err.mean(0), "w1": x.T @ dh / n, "b1": dh.mean(0)}
    return float((err**2).mean()), grads


def train(directory: str, steps: int) -> None:
    """One training process: resume from the latest checkpoint, or start fresh."""
    x, y = make_data()
    x_val, y_val = x[896:], y[896:]
    x, y = x[:896], y[:896]
    with ckptmgr.CheckpointManager(
        directory,
        save_every=ckptmgr.EverySteps(50),
        keep=ckptmgr.KeepLast(2) | ckptmgr.KeepBest(1) | ckptmgr.KeepEvery(steps=200),
        monitor="val_loss",
    ) as mgr:
        state = mgr.restore_or_initialize(init_state)
        print(f"started at step {state['step']}", flush=True)
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        params, momentum = state["params"], state["momentum"]
        for step in range(state["step"] + 1, steps + 1):
            batch = rng.choice(len(x), BATCH, replace=False)
            _, grads = loss_and_grads(params, x[batch], y[batch])
            for k in params:
                momentum[k] = 0.9 * momentum[k] + grads[k]
                params[k] = params[k] - 0.05 * momentum[k]
            if mgr.should_save(step):
                val_loss, _ = loss_and_grads(params, x_val, y_val)
                state = {"params": params, "momentum": momentum, "step": step,
                         "rng": rng.bit_generator.state}
                mgr.save(step, state, metrics={"val_loss": val_loss})
                print(f"saved {step} val_loss={val_loss:.4f}", flush=True)
        val_loss, _ = loss_and_grads(params, x_val, y_val)
        mgr.save(steps, {"params": params, "momentum": momentum, "step": steps,
                         "rng": rng.bit_generator.state}, metrics={"val_loss": val_loss}, force=True)
        print("finished", flush=True)


def run_child(directory: Path, kill_after: int | None = None) -> list[str]:
    """Run one training process; SIGKILL it once it has saved step ``kill_after``."""
    cmd = [sys.executable, __file__, "--train", str(directory), "--steps", str(STEPS)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    lines = []
    for line in child.stdout:
        lines.append(line.strip())
        if kill_after is not None and line.startswith(f"saved {kill_after} "):
            # Let it run into the next steps, then kill it mid-flight.
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    return lines


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ckptmgr-demo-"))
    interrupted, reference = work / "interrupted", work / "reference"
    print(f"ckptmgr demo — checkpoints in {work}\n")

    t0 = time.perf_counter()
    print(f"1. training run A (steps 1..{STEPS}), killed with SIGKILL after saving step 350")
    lines = run_child(interrupted, kill_after=350)
    print(f"   ... killed after: {lines[-1]!r}")
    print("2. run A restarted: it resumes from its latest checkpoint")
    lines = run_child(interrupted)
    print(f"   ... {lines[0]}, then {lines[-1]}")
    print("3. run B, the same training without interruption, for comparison")
    run_child(reference)

    mgr = ckptmgr.CheckpointManager(interrupted, read_only=True)
    print("\nCheckpoints kept in run A, and why:")
    print(f"   {'step':>5}  {'val_loss':>9}  {'size':>7}  reasons")
    for c in mgr.checkpoints:
        val = c.metrics.get("val_loss")
        print(f"   {c.step:>5}  {'' if val is None else f'{val:9.4f}':>9}  {c.nbytes:>6}B  {', '.join(c.keep_reasons)}")
    a = mgr.restore()
    b = ckptmgr.CheckpointManager(reference, read_only=True).restore()
    same = all(np.array_equal(a["params"][k], b["params"][k]) for k in a["params"])
    same_rng = a["rng"] == b["rng"]
    print(f"\nFinal parameters of A and B bit-identical: {same}; RNG state identical: {same_rng}")
    print(f"Best checkpoint: step {mgr.best.step if mgr.best else None}; "
          f"demo took {time.perf_counter() - t0:.1f} s")
    if not (same and same_rng):
        sys.exit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", metavar="DIR", help="run one training process in DIR")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    if args.train:
        train(args.train, args.steps)
    else:
        main()
