"""Child process for test_loop.py: a NumPy loop that draws from every kind of generator.

    python tests/_loop_child.py DIR --steps N [--save-every K] [--block-in-preemption-save]

It uses Python's and NumPy's global generators, a ``random.Random``, a NumPy
``Generator``, a bare ``BitGenerator`` and a ``RandomState``, so an exact resume needs
all of them restored. With ``--block-in-preemption-save`` the first fsync of a temp file
after a signal blocks (fault injection by patching ``os.fsync``) until the parent's second
signal ends the process, in the middle of a save.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys

import numpy as np

import ckptmgr
from ckptmgr.adapters.loop import TrainingLoop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--block-in-preemption-save", action="store_true")
    args = parser.parse_args()

    # The parent may run as a background job, which has SIGINT ignored; TrainingLoop
    # leaves ignored signals alone, and the test wants Ctrl-C's behaviour.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    random.seed(1)
    np.random.seed(2)
    generators = {
        "py": random.Random(3),
        "gen": np.random.default_rng(4),
        "bits": np.random.Philox(5),
        "legacy": np.random.RandomState(6),
    }
    mgr = ckptmgr.CheckpointManager(
        args.directory, save_every=ckptmgr.EverySteps(args.save_every), keep=ckptmgr.KeepLast(3)
    )
    loop = TrainingLoop(mgr, generators=generators, frameworks=("python", "numpy"))

    if args.block_in_preemption_save:
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            # Only a temp file's: a signal that lands while a regular save's temp file is
            # fsynced (in C) is handled once that returns, and that save then commits;
            # the forced save after it blocks instead.
            if loop.preempted and os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
                print("blocked in a save after a signal", flush=True)
                sys.stdin.readline()  # the parent never writes: its next signal ends us here
            real_fsync(fd)

        os.fsync = fsync

    with mgr, loop:
        step, state = loop.resume(lambda: {"w": np.zeros(16), "order": list(range(8))})
        print(f"starting at step {step}", flush=True)
        while step < args.steps:
            random.shuffle(state["order"])
            noise = (
                generators["gen"].normal(size=16)
                + generators["legacy"].standard_normal(16)
                + np.random.normal(size=16)
                + generators["bits"].random_raw(16) / 2.0**64
                + random.gauss(0.0, 1.0)
                + generators["py"].random()
            )
            state["w"] = 0.99 * state["w"] + 0.01 * noise * (state["order"][0] + 1)
            step += 1
            print(f"step {step}", flush=True)
            loop.step_done(step, state)
        loop.save(step, state, force=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
