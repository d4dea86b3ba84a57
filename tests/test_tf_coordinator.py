"""ckptmgr.adapters.tf.MultiWorkerCoordinator between two real TensorFlow workers of a
``MultiWorkerMirroredStrategy`` job (CPU, ``TF_CONFIG`` on free local ports).

Each job runs a worker script written to ``tmp_path`` in two processes (own sessions,
SIGKILLed by process group past a hard deadline: a hang fails the test); each process
writes what it saw as a JSON file. A job costs seconds (TensorFlow starts slowly), so
each one checks several things.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from _dist import free_ports, wait_for

tf = pytest.importorskip("tensorflow")

from ckptmgr.adapters.tf import MultiWorkerCoordinator  # noqa: E402 - after the importorskip
from ckptmgr.coordinator import Coordinator  # noqa: E402

DEADLINE = 75.0  # seconds a whole job may take: past it, both processes are killed and the test fails
ROUNDS = 6


def sent_value(rank: int, k: int) -> Any:
    """What rank ``rank`` sends in round ``k``: nested JSON of a length that varies with
    both (the messages are padded to 4-byte words), non-ASCII text included."""
    return {
        "rank": rank,
        "round": k,
        "nested": {"list": [1, 2.5, None, True, False, "\u00e9\u20ac\U0001f600"], "empty": {}, "deep": [[[k]]]},
        "text": "x" * (rank * 37 + k * 5),
        "big": list(range(3000)) if k == 2 else [],
    }


# The annotations of sent_value stay strings in the worker (it has no typing import).
WORKER = "from __future__ import annotations\n\n" + inspect.getsource(sent_value) + textwrap.dedent(
    """
    import json, os, signal, sys, time

    out, params = sys.argv[1], json.loads(sys.argv[2])
    scenario, timeout = params["scenario"], params["timeout"]
    started = time.monotonic()

    import tensorflow as tf

    from ckptmgr.adapters.tf import MultiWorkerCoordinator
    from ckptmgr.errors import CoordinatorError

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        c = MultiWorkerCoordinator(timeout=timeout)  # the strategy in scope
    rank = c.rank
    resolver = strategy.cluster_resolver
    result = {"ids": [c.rank, c.world_size, resolver.task_type, resolver.task_id], "startup": time.monotonic() - started}

    def write():
        tmp = f"{out}/result{rank}.json.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, f"{out}/result{rank}.json")

    def wait_for_result_of(other):
        # Bounded by the test's deadline, which kills a hang.
        while not os.path.exists(f"{out}/result{other}.json"):
            time.sleep(0.05)

    def attempt(call):
        start = time.monotonic()
        try:
            return {"value": call(), "elapsed": time.monotonic() - start}
        except Exception as exc:
            return {
                "error": type(exc).__name__, "message": str(exc), "elapsed": time.monotonic() - start,
                "coordinator_error": isinstance(exc, CoordinatorError),
                "timeout_error": isinstance(exc, TimeoutError),
                "cause": type(exc.__cause__).__name__ if exc.__cause__ is not None else None,
            }

    if scenario == "rounds":
        explicit = MultiWorkerCoordinator(strategy, timeout)  # outside the scope, strategy passed
        rounds, start = [], time.monotonic()
        for k in range(params["rounds"]):
            # The training's own collectives in between: they share the strategy's sequence.
            total = strategy.reduce("SUM", strategy.run(lambda: tf.constant(float(rank + 1))), axis=None)
            with strategy.scope():
                seen = {
                    "broadcast0": c.broadcast(sent_value(0, k) if rank == 0 else None),
                    "broadcast1": c.broadcast(sent_value(1, k) if rank == 1 else "ignored", src=1),
                }
            seen["all_gather"] = c.all_gather(sent_value(rank, k))
            seen["barrier"] = c.barrier()
            seen["explicit"] = explicit.all_gather([rank, k])
            seen["training_sum"] = float(total)
            rounds.append(seen)
        result["rounds"], result["rounds_seconds"] = rounds, time.monotonic() - start
        # The manager over the coordinator: each worker saves and restores its own shard.
        import ckptmgr
        from ckptmgr.adapters.tf import to_tree

        w = tf.Variable([float(rank), 1.0])
        with ckptmgr.CheckpointManager(f"{out}/ckpt", coordinator=c, sharded=True) as mgr:
            for step in (1, 2):
                w.assign([float(rank * step), float(step)])
                mgr.save(step, to_tree({"w": w}))
            restored = mgr.restore()
            result["manager"] = {"steps": [info.step for info in mgr.checkpoints], "w": restored["w"].tolist()}
        # A value that is not JSON on one rank: a TypeError there, a CoordinatorError on
        # the other, and the coordinator stays usable (the header round told everyone).
        result["not_json"] = attempt(lambda: c.all_gather(object() if rank == 1 else "fine"))
        result["not_json_broadcast"] = attempt(lambda: c.broadcast({1, 2} if rank == 0 else None))
        result["bad_src"] = attempt(lambda: c.broadcast(None, src=2))
        result["in_tf_function"] = attempt(lambda: tf.function(lambda: c.barrier())())
        result["after"] = attempt(lambda: c.all_gather(f"still in step {rank}"))
        # Ranks that call different collectives: both find out, from the header round.
        result["mismatch"] = attempt(lambda: c.barrier() if rank == 0 else c.all_gather(rank))
        result["mismatch_next"] = attempt(lambda: c.barrier())
        # TF's collectives are intact (the header round completed): a new coordinator works.
        result["fresh"] = attempt(lambda: MultiWorkerCoordinator(strategy, timeout).all_gather(rank))
        result["repr"] = repr(c)
        write()

    elif scenario == "stall":
        staller = params["staller"]
        result["first"] = attempt(lambda: c.all_gather(rank))
        if rank == staller:
            wait_for_result_of(1 - rank)  # stalls until the other rank gave up on it
        result["late"] = attempt(lambda: c.all_gather(rank))
        result["next"] = attempt(lambda: c.barrier())
        write()
        if rank != staller:
            wait_for_result_of(staller)  # alive until the staller has tried

    elif scenario == "peer_dies":
        result["first"] = attempt(lambda: c.all_gather(rank))
        if rank == params["dies"]:
            write()
            if params["how"] == "exit":
                sys.exit(0)
            os.kill(os.getpid(), signal.SIGKILL)
        result["after_death"] = attempt(lambda: c.all_gather(rank))
        result["next"] = attempt(lambda: c.broadcast("x"))
        write()
    """
)


def _tf_configs(layout: str) -> list[str]:
    """TF_CONFIG of the two tasks: two workers, or a chief and a worker."""
    p0, p1 = (f"127.0.0.1:{port}" for port in free_ports(2))
    if layout == "worker":
        cluster: dict[str, list[str]] = {"worker": [p0, p1]}
        tasks = [("worker", 0), ("worker", 1)]
    else:
        cluster = {"chief": [p0], "worker": [p1]}
        tasks = [("chief", 0), ("worker", 0)]
    return [json.dumps({"cluster": cluster, "task": {"type": t, "index": i}}) for t, i in tasks]


def run_job(tmp_path: Path, *, layout: str = "worker", **params: Any) -> dict[int, dict[str, Any]]:
    """Run WORKER as the two tasks of a job; per task (0: the first of ``layout``): rc,
    wall seconds, the result file of the rank it found it has (or None), the log."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    base = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    base.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    start = time.monotonic()
    procs = []
    for task, tf_config in enumerate(_tf_configs(layout)):
        log = (tmp_path / f"log{task}.txt").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), json.dumps(params)],
            stdout=log, stderr=subprocess.STDOUT, env={**base, "TF_CONFIG": tf_config}, start_new_session=True,
        ))
        log.close()
    walls, _ = wait_for(procs, start=start, deadline=DEADLINE)
    logs = {task: (tmp_path / f"log{task}.txt").read_text(errors="replace") for task in range(2)}
    if len(walls) < 2:
        pytest.fail(f"the job passed its {DEADLINE:g} s deadline (a hang); logs:\n" + "\n".join(
            f"--- task {task}:\n{log[-3000:]}" for task, log in logs.items()))
    out: dict[int, dict[str, Any]] = {}
    for task, proc in enumerate(procs):
        # Both layouts put task 0 (worker 0, or the chief) at rank 0: rank == task here.
        path = tmp_path / f"result{task}.json"
        out[task] = {"rc": proc.returncode, "wall": walls[task], "log": logs[task],
                     "result": json.loads(path.read_text()) if path.exists() else None}
    return out


def _ok(job: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    for task, proc in job.items():
        assert proc["rc"] == 0 and proc["result"] is not None, f"task {task} failed:\n{proc['log'][-3000:]}"
    return [job[0]["result"], job[1]["result"]]


def _assert_coordinator_error(attempt: dict[str, Any], *, what: str, rank: int, timeout: float) -> None:
    """A CoordinatorError (also a TimeoutError) naming the collective, the rank, the
    world size and the timeout."""
    assert attempt.get("error") == "CoordinatorError", attempt
    assert attempt["timeout_error"], attempt
    message = attempt["message"]
    assert what in message and f"on rank {rank}" in message, message
    assert "world_size=2" in message and f"timeout={timeout:g} s" in message, message


# ----------------------------------------------------------------- collectives


@pytest.fixture(scope="module")
def rounds_job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One job of two workers: ROUNDS rounds of collectives, then the error cases;
    shared by the tests below (a job costs seconds)."""
    return _ok(run_job(tmp_path_factory.mktemp("rounds"), scenario="rounds", timeout=30, rounds=ROUNDS))


def _assert_rounds(results: list[dict[str, Any]], rounds: int) -> None:
    assert len(results[0]["rounds"]) == rounds
    assert results[0]["rounds"] == results[1]["rounds"]  # identical on both workers
    for k, seen in enumerate(results[0]["rounds"]):
        expected = [json.loads(json.dumps(sent_value(rank, k))) for rank in range(2)]
        assert seen["broadcast0"] == expected[0]
        assert seen["broadcast1"] == expected[1]
        assert seen["all_gather"] == expected
        assert seen["barrier"] is None
        assert seen["explicit"] == [[0, k], [1, k]]
        assert seen["training_sum"] == 3.0  # the strategy's own collectives were not disturbed


def test_collectives_agree_on_both_workers_round_after_round(rounds_job: list[dict[str, Any]]) -> None:
    assert [r["ids"] for r in rounds_job] == [[0, 2, "worker", 0], [1, 2, "worker", 1]]
    _assert_rounds(rounds_job, ROUNDS)
    assert rounds_job[0]["repr"].startswith("MultiWorkerCoordinator(rank=0, world_size=2, timeout=30")


def test_a_checkpoint_manager_saves_and_restores_through_it(rounds_job: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(rounds_job):
        assert result["manager"] == {"steps": [1, 2], "w": [2.0 * rank, 2.0]}, result["manager"]


def test_with_a_chief_task_the_chief_is_rank_0(tmp_path: Path) -> None:
    results = _ok(run_job(tmp_path, layout="chief", scenario="rounds", timeout=30, rounds=2))
    assert [r["ids"] for r in results] == [[0, 2, "chief", 0], [1, 2, "worker", 0]]
    _assert_rounds(results, 2)


def test_bad_values_and_mismatched_calls_raise_on_every_worker(rounds_job: list[dict[str, Any]]) -> None:
    timeout = 30.0
    results = rounds_job
    zero, one = results
    # A value that is not JSON: TypeError on its rank, CoordinatorError on the other, at once.
    assert one["not_json"]["error"] == "TypeError" and "object" in one["not_json"]["message"]
    _assert_coordinator_error(zero["not_json"], what="all_gather", rank=0, timeout=timeout)
    assert "rank(s) [1]" in zero["not_json"]["message"] and "not a JSON value" in zero["not_json"]["message"]
    assert zero["not_json_broadcast"]["error"] == "TypeError" and "set" in zero["not_json_broadcast"]["message"]
    _assert_coordinator_error(one["not_json_broadcast"], what="broadcast", rank=1, timeout=timeout)
    for result in results:
        assert result["not_json"]["elapsed"] < 5 and result["not_json_broadcast"]["elapsed"] < 5
        assert result["bad_src"]["error"] == "ValueError" and "src=2" in result["bad_src"]["message"]
        assert result["in_tf_function"]["error"] == "RuntimeError" and "eagerly" in result["in_tf_function"]["message"]
        # ...and the coordinator is still in step.
        assert result["after"]["value"] == ["still in step 0", "still in step 1"], result["after"]
    # Different collectives: both ranks see it in the header round and raise at once.
    _assert_coordinator_error(zero["mismatch"], what="barrier", rank=0, timeout=timeout)
    _assert_coordinator_error(one["mismatch"], what="all_gather", rank=1, timeout=timeout)
    for rank, result in enumerate(results):
        assert "different collectives" in result["mismatch"]["message"], result["mismatch"]
        assert "rank 0: barrier" in result["mismatch"]["message"]
        assert "rank 1: all_gather" in result["mismatch"]["message"]
        assert result["mismatch"]["elapsed"] < 5
        _assert_coordinator_error(result["mismatch_next"], what="barrier", rank=rank, timeout=timeout)
        assert "failed earlier" in result["mismatch_next"]["message"]
        # TF's collectives are intact: a new coordinator works.
        assert result["fresh"]["value"] == [0, 1], result["fresh"]


# ----------------------------------------------------------------- failures


@pytest.mark.parametrize("staller", [1, pytest.param(0, marks=pytest.mark.slow)], ids=["worker-stalls", "chief-stalls"])
def test_a_stalled_peer_makes_both_sides_raise_coordinator_error(tmp_path: Path, staller: int) -> None:
    timeout = 5.0
    results = _ok(run_job(tmp_path, scenario="stall", timeout=timeout, staller=staller))
    assert results[0]["first"]["value"] == results[1]["first"]["value"] == [0, 1]
    waiter, late = results[1 - staller], results[staller]
    # The rank that waited raises after its timeout, no sooner and not much later.
    _assert_coordinator_error(waiter["late"], what="all_gather #1", rank=1 - staller, timeout=timeout)
    assert waiter["late"]["cause"] == "DeadlineExceededError", waiter["late"]
    assert "not every worker reached it in time" in waiter["late"]["message"]
    assert timeout - 0.1 <= waiter["late"]["elapsed"] < timeout + 5, waiter["late"]
    # The stalled rank, arriving after the other gave up, raises too, at once rather than
    # after its own timeout: TF aborted the collective on both sides.
    _assert_coordinator_error(late["late"], what="all_gather #1", rank=staller, timeout=timeout)
    assert late["late"]["cause"] == "DeadlineExceededError", late["late"]
    assert late["late"]["elapsed"] < timeout / 2, late["late"]
    # A broken coordinator refuses every later call at once, on both ranks.
    for rank, result in enumerate(results):
        _assert_coordinator_error(result["next"], what="barrier #2", rank=rank, timeout=timeout)
        assert "failed earlier" in result["next"]["message"] and result["next"]["elapsed"] < 0.5


@pytest.mark.parametrize(
    ("how", "dies"),
    [("exit", 1), ("kill", 0)],
    ids=["worker-exits", "chief-killed"],
)
def test_a_dead_peer_makes_the_survivor_raise_within_the_timeout(tmp_path: Path, how: str, dies: int) -> None:
    timeout = 5.0
    job = run_job(tmp_path, scenario="peer_dies", timeout=timeout, how=how, dies=dies)
    dead, survivor = job[dies], job[1 - dies]
    assert dead["result"]["first"]["value"] == [0, 1]
    assert dead["rc"] == (0 if how == "exit" else -signal.SIGKILL), dead["log"][-3000:]
    # TF neither kills nor hangs the survivor: it raises, and exits normally.
    assert survivor["rc"] == 0 and survivor["result"] is not None, survivor["log"][-3000:]
    after = survivor["result"]["after_death"]
    _assert_coordinator_error(after, what="all_gather #1", rank=1 - dies, timeout=timeout)
    if dies == 1:
        # The chief (TF's collective leader) waits for the dead worker until the timeout.
        assert after["cause"] == "DeadlineExceededError", after
        assert timeout - 0.1 <= after["elapsed"] < timeout + 5, after
    else:
        # A worker asks the dead chief, whose port is closed: it learns at once.
        assert after["cause"] == "UnavailableError" and "unreachable" in after["message"], after
        assert after["elapsed"] < timeout, after
    assert "failed earlier" in survivor["result"]["next"]["message"]
    assert survivor["result"]["next"]["elapsed"] < 0.5


# ----------------------------------------------------------------- in this process


def test_outside_a_cluster_it_is_a_world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    c = MultiWorkerCoordinator(timeout=10)
    assert isinstance(c, Coordinator)
    assert (c.rank, c.world_size, c.timeout) == (0, 1, 10.0)
    assert c.broadcast({"t": (1, 2)}) == {"t": [1, 2]}  # through JSON, as between workers
    assert c.all_gather([None, 2.5]) == [[None, 2.5]]
    assert c.barrier() is None
    with pytest.raises(TypeError, match="JSON"):
        c.all_gather(object())
    with pytest.raises(ValueError, match="src=1"):
        c.broadcast(None, src=1)
    assert MultiWorkerCoordinator(tf.distribute.OneDeviceStrategy("/cpu:0")).world_size == 1


def test_arguments_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (0, -1.0, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError, match="Expected timeout"):
            MultiWorkerCoordinator(timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Expected strategy"):
        MultiWorkerCoordinator(strategy="mirrored")
    # A cluster in TF_CONFIG but no multi-worker strategy in scope: every worker would
    # believe it is rank 0 of 1.
    cluster = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    with pytest.raises(ValueError, match=r"cluster of 2 workers.*strategy\.scope\(\)"):
        MultiWorkerCoordinator()
