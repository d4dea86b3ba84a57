"""Serve predictions from the best checkpoint of a training run, hot-swapping as it improves.

A background thread follows the run's best checkpoint (``ckptmgr.follow``), loads each
new one with a read-only manager (no lock: training keeps running) and swaps the model
in with a single assignment of an immutable ``(step, model)`` pair, so a request sees
either the old model or the new one, never a half-loaded one.

The checkpoints hold a linear model: a state tree with ``"w"`` (shape ``(d,)`` or
``(d, k)``) and ``"b"`` (a scalar or shape ``(k,)``), as ``examples/numpy_loop.py``-style
loops save it.

    python examples/serve.py runs/exp1                    # port 8000 on 127.0.0.1
    python examples/serve.py runs/exp1 --port 0           # any free port, printed first
    curl -s localhost:8000/health
    curl -s -X POST localhost:8000/predict -d '{"x": [[1, 2, 3]]}'

Endpoints:
    POST /predict  {"x": [[...], ...]}  ->  {"y": [...], "step": N}
    GET  /health   ->  {"step": N}, or 503 until a model is loaded

The first line printed to stdout is the bound port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

import ckptmgr
from ckptmgr import follow


@dataclass(frozen=True)
class LinearModel:
    """y = x @ w + b, with read-only arrays (the model never changes once built)."""

    w: np.ndarray
    b: np.ndarray

    @classmethod
    def from_state(cls, state: Any) -> LinearModel:
        w = np.array(state["w"], dtype=np.float64)
        b = np.array(state["b"], dtype=np.float64)
        if w.ndim not in (1, 2) or b.ndim > 1:
            raise ValueError(f"Expected w of 1 or 2 dimensions and b of 0 or 1. Received: w.shape={w.shape}, b.shape={b.shape}")
        w.setflags(write=False)
        b.setflags(write=False)
        return cls(w, b)

    def predict(self, x: np.ndarray) -> np.ndarray:
        y: np.ndarray = x @ self.w + self.b
        return y


class ModelHolder:
    """The served model. ``current`` is replaced, never mutated: read it once per request."""

    def __init__(self, directory: Path, interval: float) -> None:
        self.directory = directory
        self.interval = interval
        self.current: tuple[int, LinearModel] | None = None
        self._loaded: tuple[int, float] | None = None  # (step, time) of the checkpoint last loaded (or refused)

    def load(self, info: ckptmgr.CheckpointInfo) -> None:
        """Load one checkpoint and swap it in (skipped if it vanished or is damaged)."""
        if self._loaded == (info.step, info.time):
            return
        try:
            with ckptmgr.CheckpointManager(self.directory, read_only=True) as reader:
                state = reader.restore(info.step)
        except ckptmgr.CheckpointNotFoundError:
            # Retention deleted it under us: a newer best replaced it, follow() yields that next.
            return
        except ckptmgr.CorruptCheckpointError as exc:
            print(f"serve: not serving step {info.step}: {exc}", file=sys.stderr, flush=True)
            return
        try:
            model = LinearModel.from_state(state)
        except (KeyError, TypeError, ValueError) as exc:
            # Not a model this server can serve: said once, not retried until a new best.
            print(f"serve: not serving step {info.step}: not a linear model ({type(exc).__name__}: {exc})",
                  file=sys.stderr, flush=True)
            self._loaded = (info.step, info.time)
            return
        self.current = (info.step, model)  # the atomic swap
        self._loaded = (info.step, info.time)
        print(f"serve: serving step {info.step}", file=sys.stderr, flush=True)

    def watch(self) -> None:
        """Follow the best checkpoint forever (the background thread's body)."""
        while True:
            try:
                for info in follow(self.directory, "best", interval=self.interval):
                    self.load(info)
            except Exception:  # keep serving the current model; try again
                traceback.print_exc()
                time.sleep(self.interval)


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        if self.path != "/health":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path: {self.path}"})
            return
        current = self.server.holder.current
        if current is None:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no model loaded yet"})
        else:
            self._reply(HTTPStatus.OK, {"step": current[0]})

    def do_POST(self) -> None:
        if self.path != "/predict":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path: {self.path}"})
            return
        current = self.server.holder.current  # one read: step and model stay a pair
        if current is None:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no model loaded yet"})
            return
        step, model = current
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            x = np.asarray(body["x"], dtype=np.float64)
            if x.ndim != 2 or x.shape[1] != model.w.shape[0]:
                raise ValueError(f"Expected x of shape (n, {model.w.shape[0]}). Received: shape {x.shape}")
        except (ValueError, KeyError, TypeError) as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        self._reply(HTTPStatus.OK, {"y": model.predict(x).tolist(), "step": step})

    def _reply(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], holder: ModelHolder, verbose: bool = False) -> None:
        super().__init__(address, Handler)
        self.holder = holder
        self.verbose = verbose


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="the training run's checkpoint directory (need not exist yet)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between checks for a new best")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    if not 0 < args.interval < float("inf"):
        parser.error(f"Expected --interval to be a number of seconds > 0. Received: --interval={args.interval}")

    holder = ModelHolder(args.directory, args.interval)
    with Server((args.host, args.port), holder, args.verbose) as server:
        print(server.server_address[1], flush=True)
        threading.Thread(target=holder.watch, name="follow-best", daemon=True).start()
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


if __name__ == "__main__":
    main()
