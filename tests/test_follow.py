"""ckptmgr.follow: a reader's generator of the best/latest checkpoint as training commits them."""

from __future__ import annotations

import importlib
import math
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import ckptmgr
from ckptmgr import follow

# The module (private), whose sleep the tests replace.
follow_module = importlib.import_module("ckptmgr._follow")


def _writer(directory: Path, **kwargs: Any) -> ckptmgr.CheckpointManager:
    kwargs.setdefault("monitor", "val_loss")
    return ckptmgr.CheckpointManager(directory, **kwargs)


def _save(mgr: ckptmgr.CheckpointManager, step: int, val_loss: float | None = None) -> ckptmgr.CheckpointInfo:
    metrics = None if val_loss is None else {"val_loss": val_loss}
    info = mgr.save(step, {"step": step}, metrics=metrics)
    assert info is not None
    return info


def test_waits_for_the_directory_to_appear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "not-yet"
    seen_missing: list[bool] = []
    writers: list[ckptmgr.CheckpointManager] = []

    def sleep(seconds: float) -> None:
        # Called only between polls: the first poll found no directory. The writer
        # starts now, deterministically between two polls.
        assert seconds <= 0.01
        seen_missing.append(not directory.exists())
        if not writers:
            writers.append(_writer(directory))
            _save(writers[0], 1, 0.5)

    monkeypatch.setattr(follow_module, "sleep", sleep)
    try:
        gen = follow(directory, interval=0.01, timeout=10)
        assert not directory.exists()  # nothing happens before iterating
        info = next(gen)
        assert (info.step, info.metrics) == (1, {"val_loss": 0.5})
        assert seen_missing[0] is True
        gen.close()
    finally:
        for mgr in writers:
            mgr.close()


def test_missing_directory_with_timeout_yields_nothing_and_creates_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "absent"
    started = time.monotonic()
    assert list(follow(directory, interval=0.01, timeout=0.1)) == []
    assert 0.1 <= time.monotonic() - started < 5
    assert not directory.exists()


def test_yields_the_current_best_first(tmp_path: Path) -> None:
    with _writer(tmp_path) as mgr:
        for step, val_loss in ((1, 0.9), (2, 0.3), (3, 0.5), (4, 0.6)):
            _save(mgr, step, val_loss)
    infos = list(follow(tmp_path, timeout=0))
    assert [(i.step, i.metrics["val_loss"]) for i in infos] == [(2, 0.3)]
    assert infos[0].path.exists()


def test_yields_each_new_best_and_not_the_others(tmp_path: Path) -> None:
    with _writer(tmp_path) as mgr:  # the writer holds the lock: follow needs none
        _save(mgr, 1, 1.0)
        gen = follow(tmp_path, interval=0.01, timeout=0.3)
        assert next(gen).step == 1
        _save(mgr, 2, 1.5)  # worse
        _save(mgr, 3, 0.5)  # better
        assert next(gen).step == 3
        _save(mgr, 4, 0.7)
        _save(mgr, 5, 0.2)
        _save(mgr, 6, 0.9)
        assert next(gen).step == 5
        _save(mgr, 7, 0.8)  # not a new best: the generator times out
        started = time.monotonic()
        assert list(gen) == []
        assert time.monotonic() - started >= 0.3


def test_same_step_saved_again_is_yielded_again(tmp_path: Path) -> None:
    clock = iter(range(1000, 2000)).__next__
    with _writer(tmp_path, monitor=None, clock=lambda: float(clock())) as mgr:
        first = _save(mgr, 5)
        gen = follow(tmp_path, "latest", interval=0.01, timeout=0.2)
        assert (next(gen).step, first.step) == (5, 5)
        again = _save(mgr, 5)
        assert again.time != first.time
        info = next(gen)
        assert (info.step, info.time) == (5, again.time)
        assert list(gen) == []


def test_latest(tmp_path: Path) -> None:
    with _writer(tmp_path) as mgr:
        _save(mgr, 1, 0.5)
        _save(mgr, 2, 0.9)
        gen = follow(tmp_path, "latest", interval=0.01, timeout=0.2)
        assert next(gen).step == 2
        _save(mgr, 3, 1.0)  # worse, but the latest
        assert next(gen).step == 3
        assert list(gen) == []


def test_best_of_a_run_without_monitor_yields_nothing(tmp_path: Path) -> None:
    with _writer(tmp_path, monitor=None) as mgr:
        _save(mgr, 1, 0.5)
    assert list(follow(tmp_path, "best", interval=0.01, timeout=0.05)) == []
    assert [i.step for i in follow(tmp_path, "latest", timeout=0)] == [1]


def test_follows_a_writer_thread_while_retention_deletes(tmp_path: Path) -> None:
    """A real concurrent writer: every yield is a committed best, in order, up to the last."""
    steps = 61  # the last save is not a best: retention keeps it and the best
    # Every third save improves; the others are worse than the best and retention
    # deletes them (and the bests they replace) while follow lists the directory.
    losses = {s: (1.0 / s if s % 3 == 0 else 10.0 + s) for s in range(1, steps + 1)}
    final_best = max(s for s in losses if s % 3 == 0)
    errors: list[BaseException] = []
    ready = threading.Event()

    def write() -> None:
        try:
            with _writer(tmp_path, keep=ckptmgr.KeepLast(1) | ckptmgr.KeepBest(1)) as mgr:
                ready.set()
                for step in range(1, steps + 1):
                    _save(mgr, step, losses[step])
                    time.sleep(0.002)  # pacing only: follow must cope with any timing
        except BaseException as exc:
            errors.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=write, daemon=True)
    yielded: list[ckptmgr.CheckpointInfo] = []
    thread.start()
    try:
        assert ready.wait(timeout=10)
        gen = follow(tmp_path, interval=0.001, timeout=10)
        for info in gen:
            yielded.append(info)
            if info.step == final_best:
                break
        gen.close()
    finally:
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert not errors, errors
    got = [i.step for i in yielded]
    assert got and got[-1] == final_best, got
    assert got == sorted(set(got)), got  # strictly forward, no repeats
    assert all(s == 1 or s % 3 == 0 for s in got), got  # only bests (1: the first), never a worse save
    assert all(i.metrics["val_loss"] == losses[i.step] for i in yielded)
    with ckptmgr.CheckpointManager(tmp_path, read_only=True) as reader:
        assert [c.step for c in reader.checkpoints] == [final_best, steps]


def test_timeout_counts_from_the_last_change(tmp_path: Path) -> None:
    with _writer(tmp_path) as mgr:
        _save(mgr, 1, 0.5)
    gen = follow(tmp_path, interval=0.01, timeout=0.2)
    assert next(gen).step == 1
    started = time.monotonic()
    assert next(gen, None) is None
    assert 0.2 <= time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"which": "first"}, "Expected which to be 'best' or 'latest'. Received: which='first'"),
        ({"which": 3}, "Received: which=3"),
        ({"interval": 0}, "Expected interval to be a finite number of seconds > 0. Received: interval=0"),
        ({"interval": -1.0}, "Received: interval=-1.0"),
        ({"interval": math.nan}, "Received: interval=nan"),
        ({"interval": math.inf}, "Received: interval=inf"),
        ({"interval": True}, "Received: interval=True"),
        ({"interval": "1"}, "Received: interval='1'"),
        ({"timeout": -0.5}, "Expected timeout to be a number of seconds >= 0, or None. Received: timeout=-0.5"),
        ({"timeout": math.nan}, "Received: timeout=nan"),
        ({"timeout": "3"}, "Received: timeout='3'"),
        ({"directory": ""}, "Received: directory=''"),
        ({"directory": None}, "Received: directory=None"),
    ],
)
def test_argument_errors_at_call_time(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"directory": tmp_path, **kwargs}
    pattern = "^" + re.escape(message) if message.startswith("Expected") else "^Expected .*" + re.escape(message)
    with pytest.raises(ValueError, match=pattern + "$"):
        follow(**args)  # raised by the call, before any next()


# ------------------------------------------------------- a long-lived reader stays current


def test_a_long_lived_reader_follows_the_writers_best(tmp_path: Path) -> None:
    with ckptmgr.CheckpointManager(tmp_path / "run", monitor="val_loss", keep=ckptmgr.KeepLast(10)) as writer:
        writer.save(1, {"s": 1}, metrics={"val_loss": 1.0})
        with ckptmgr.CheckpointManager(tmp_path / "run", read_only=True) as reader:
            for step in range(2, 6):
                writer.save(step, {"s": step}, metrics={"val_loss": 1.0 / step})
                assert reader.best is not None and reader.best.step == step
                assert reader.restore("best") == {"s": step}


def test_a_reader_opened_before_the_first_save_learns_the_runs_metric(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with ckptmgr.CheckpointManager(tmp_path / "run", read_only=True) as reader:
        assert reader.best is None
        with ckptmgr.CheckpointManager(tmp_path / "run", monitor="val_loss") as writer:
            writer.save(1, {"s": 1}, metrics={"val_loss": 1.0})
            writer.save(2, {"s": 2}, metrics={"val_loss": 0.5})
            writer.save(3, {"s": 3}, metrics={"val_loss": 0.7})
        assert reader.best is not None and reader.best.step == 2
