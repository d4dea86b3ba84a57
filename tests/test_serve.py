"""examples/serve.py: serve the best checkpoint while another process trains, hot-swapping.

The training child runs this file as a script (``python tests/test_serve.py DIR``); the
test recomputes the same trajectory in-process to check every prediction.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

import ckptmgr

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "examples" / "serve.py"
SEED = 1234
STEPS = 24
DIM = 3
PACE = 0.12  # seconds between training steps, so the server sees several bests


def trajectory(steps: int = STEPS) -> Iterator[tuple[int, np.ndarray, np.float64, float]]:
    """(step, w, b, val_loss) of full-batch gradient descent: the same in every process."""
    gen = np.random.default_rng(SEED)
    true_w = gen.normal(size=DIM)
    x, xv = gen.normal(size=(64, DIM)), gen.normal(size=(64, DIM))
    y = x @ true_w + 0.5 + 0.01 * gen.normal(size=64)
    yv = xv @ true_w + 0.5 + 0.01 * gen.normal(size=64)
    w, b = np.zeros(DIM), np.float64(0.0)
    for step in range(1, steps + 1):
        err = x @ w + b - y
        w = w - 0.1 * (2 / len(x)) * (x.T @ err)
        b = np.float64(b - 0.1 * 2 * err.mean())
        yield step, w, b, float(np.mean((xv @ w + b - yv) ** 2))


def train(directory: str) -> None:
    """The training child: one save per step, improving val_loss, retention deleting."""
    with ckptmgr.CheckpointManager(
        directory, monitor="val_loss", keep=ckptmgr.KeepLast(2) | ckptmgr.KeepBest(1)
    ) as mgr:
        for step, w, b, val_loss in trajectory():
            mgr.save(step, {"w": w, "b": b, "step": step}, metrics={"val_loss": val_loss})
            time.sleep(PACE)


def _readline(stream: IO[str], timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no line from the server within {timeout} s") from None


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _predict(base: str, x: np.ndarray) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base}/predict", data=json.dumps({"x": x.tolist()}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # an HTTP error raises: fails the test
        assert response.status == 200
        result: dict[str, Any] = json.loads(response.read())
    return result


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def test_trajectory_improves_every_step() -> None:
    losses = [val_loss for *_, val_loss in trajectory()]
    assert all(a > b for a, b in itertools.pairwise(losses))


def test_serves_best_and_hot_swaps_while_training(tmp_path: Path) -> None:
    directory = tmp_path / "run"  # does not exist yet: the server waits for it
    weights = {step: (w, b) for step, w, b, _ in trajectory()}
    x = np.random.default_rng(7).normal(size=(5, DIM))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    server_log, train_log = tmp_path / "server.log", tmp_path / "train.log"
    server = trainer = None
    try:
        with open(server_log, "w") as err:
            server = subprocess.Popen(
                [sys.executable, str(SERVE), str(directory), "--port", "0", "--interval", "0.05"],
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env,
            )
        assert server.stdout is not None
        base = f"http://127.0.0.1:{int(_readline(server.stdout, timeout=20))}"
        status, body = _get(f"{base}/health")
        assert status == 503, body

        with open(train_log, "w") as err:
            trainer = subprocess.Popen(
                [sys.executable, __file__, str(directory)], stdout=err, stderr=err, cwd=ROOT, env=env,
            )
        deadline = time.monotonic() + 30
        while _get(f"{base}/health")[0] != 200:
            assert time.monotonic() < deadline, "no model served within 30 s"
            assert trainer.poll() in (None, 0), train_log.read_text()
            time.sleep(0.01)

        served: list[int] = []
        final_best: int | None = None
        while final_best is None or served[-1] != final_best:
            assert time.monotonic() < deadline, f"served steps {served}, final best {final_best}"
            result = _predict(base, x)
            step = result["step"]
            assert not served or step >= served[-1], f"served step went back: {served[-1]} -> {step}"
            w, b = weights[step]
            np.testing.assert_allclose(result["y"], x @ w + b, rtol=1e-12, atol=1e-12)
            served.append(step)
            if final_best is None and trainer.poll() is not None:
                assert trainer.returncode == 0, train_log.read_text()
                with ckptmgr.CheckpointManager(directory, read_only=True) as reader:
                    best = reader.best
                assert best is not None
                final_best = best.step
        assert final_best == STEPS
        distinct = sorted(set(served))
        assert len(distinct) >= 3, f"the served step moved forward fewer than twice: {distinct}"
        assert server.poll() is None, server_log.read_text()
        assert "Traceback" not in server_log.read_text(), server_log.read_text()
    finally:
        _stop(trainer)
        _stop(server)
        if server is not None and server.stdout is not None:
            server.stdout.close()


if __name__ == "__main__":
    train(sys.argv[1])


def test_a_best_that_is_not_a_model_is_refused_once_and_the_served_one_stays(
    tmp_path: Path, capsys: Any,
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_example", SERVE)
    assert spec is not None and spec.loader is not None
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    with ckptmgr.CheckpointManager(tmp_path, monitor="loss") as mgr:
        good = mgr.save(1, {"w": np.ones(2), "b": np.zeros(())}, metrics={"loss": 0.5})
        odd = mgr.save(2, {"weights": np.ones(2)}, metrics={"loss": 0.1})  # the new best: no "w"
    assert good is not None and odd is not None
    holder = serve.ModelHolder(tmp_path, interval=0.1)
    holder.load(good)
    for _ in range(3):  # follow() yields it again after a restart: refused once, not retried
        holder.load(odd)
    assert holder.current is not None and holder.current[0] == 1
    refused = [line for line in capsys.readouterr().err.splitlines() if "not serving step 2" in line]
    assert len(refused) == 1 and "not a linear model (KeyError" in refused[0]
