"""The child process of test_crash.py: a save loop that the parent kills with SIGKILL.

Usage: ``python _crash_child.py DIRECTORY KEEP_EVERY [async]``

Resumes from the directory's latest checkpoint and saves every following step, with
``KeepLast(KEEP_LAST) | KeepEvery(steps=KEEP_EVERY)`` retention and ``val_loss`` as the
monitored metric. A step is printed (and flushed) only once ``save()`` has returned
for it (with ``async``, once ``wait()`` has), so every printed step is a promise the
directory must keep. The state and the metric are pure functions of the step, so the
parent can check any checkpoint it finds.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

import ckptmgr

KEEP_LAST = 2
MAX_STEPS_PER_RUN = 100_000  # the parent kills it long before


def state_for(step: int) -> dict[str, Any]:
    return {
        "step": step,
        "w": np.arange(20_000, dtype=np.float64) * step,
        "b": np.full((7, 3), step % 251, dtype=np.uint8),
        "rng": np.random.default_rng(step).bit_generator.state,
        "tag": f"step-{step}",
        "hist": [(step, b"x" * (step % 7)), None],
    }


def metric_for(step: int) -> float:
    # Scrambled, so that a new best turns up now and then.
    return ((step * 2654435761) % 9973) / 9973


def keep_policy(keep_every: int) -> ckptmgr.KeepLast | ckptmgr.RetentionPolicy:
    return ckptmgr.KeepLast(KEEP_LAST) | ckptmgr.KeepEvery(steps=keep_every)


def main(argv: list[str]) -> None:
    directory, keep_every = argv[1], int(argv[2])
    async_save = argv[3:] == ["async"]
    mgr = ckptmgr.CheckpointManager(
        directory, keep=keep_policy(keep_every), monitor="val_loss", async_save=async_save
    )
    state = mgr.restore_or_initialize(lambda: {"step": 0})
    start = state["step"]
    for step in range(start + 1, start + 1 + MAX_STEPS_PER_RUN):
        mgr.save(step, state_for(step), metrics={"val_loss": metric_for(step)})
        if async_save:
            mgr.wait()
        sys.stdout.write(f"{step}\n")
        sys.stdout.flush()
    mgr.close()


if __name__ == "__main__":
    main(sys.argv)
