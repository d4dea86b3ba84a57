"""ckptmgr.adapters.jax: JaxCoordinator between two real JAX processes (CPU backend, joined by
``jax.distributed.initialize`` on a free local port), and the tree helpers.

Each job runs a worker script written to ``tmp_path`` in two processes (own sessions,
SIGKILLed by process group past a hard deadline: a hang fails the test); each process
writes what it saw as a JSON file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _dist import free_ports, wait_for

jax = pytest.importorskip("jax")

import ckptmgr  # noqa: E402 - after the importorskip
from ckptmgr.adapters import jax as ckpt_jax  # noqa: E402

DEADLINE = 60.0  # seconds a whole job may take: past it, both processes are killed and the test fails

WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time

    rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    params = json.loads(sys.argv[4])
    scenario = params["scenario"]

    import jax
    import numpy as np
    # Imported before the ranks meet, so that neither's imports count against the
    # other's collective timeouts.
    from ckptmgr import CoordinatorError
    from ckptmgr.adapters.jax import JaxCoordinator, to_tree

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank,
        initialization_timeout=30, heartbeat_timeout_seconds=params.get("heartbeat", 100),
    )

    result = {"rank": rank}

    def write(name="result"):
        tmp = f"{out}/{name}{rank}.json.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, f"{out}/{name}{rank}.json")

    def attempt(call):
        start = time.monotonic()
        try:
            return {"value": call(), "elapsed": time.monotonic() - start}
        except Exception as exc:
            return {
                "error": type(exc).__name__, "message": str(exc), "elapsed": time.monotonic() - start,
                "timeout_error": isinstance(exc, TimeoutError),
                "cause": type(exc.__cause__).__name__ if exc.__cause__ is not None else None,
            }

    c = JaxCoordinator(timeout=params["timeout"])

    if scenario == "rounds":
        result["ids"] = [c.rank, c.world_size, jax.process_index(), jax.process_count()]
        other = JaxCoordinator(timeout=params["timeout"])  # its own key space, used in between
        rounds = []
        for k in range(params["rounds"]):
            src = k % 2
            sent = {"round": k, "from": rank, "nested": {"list": [1, 2.5, None, True, "\u00e9"], "t": (k, "x")}}
            rounds.append({
                "broadcast": c.broadcast(sent if rank == src else None, src=src),
                "other": other.all_gather([rank, k]),
                "all_gather": c.all_gather({"rank": rank, "k": k, "payload": [rank] * (k % 4)}),
                "barrier": c.barrier(),
            })
        result["rounds"] = rounds
        result["not_json"] = [
            attempt(lambda: c.all_gather({1, 2})),
            attempt(lambda: c.broadcast(object(), src=rank)),  # raised on src, before anything is sent
            attempt(lambda: c.all_gather(float)),
            attempt(lambda: c.broadcast(None, src=2)),
        ]
        result["after"] = c.all_gather(f"still in step {rank}")
        c.barrier()
        other.barrier()
        if rank == 0:  # past the last barriers: every round's values were read, and deleted
            from jax._src import distributed
            result["keys_left"] = [k for k, _ in distributed.global_state.client.key_value_dir_get_bytes("ckptmgr/")]
        # An array spread over both processes has no whole value in either of them.
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
        local = jax.device_put(np.full((1, 3), rank, np.float32), jax.local_devices()[0])
        global_array = jax.make_array_from_single_device_arrays((2, 3), sharding, [local])
        result["global_array"] = attempt(lambda: to_tree({"w": global_array}))
        write()

    elif scenario == "stall":
        result["first"] = attempt(lambda: c.all_gather(rank))
        if rank == 1:
            # Stalls until rank 0 has given up on it (bounded: the test kills a hang).
            while not os.path.exists(f"{out}/result0.json"):
                time.sleep(0.05)
        result["late"] = attempt(lambda: c.all_gather(rank))
        result["next"] = attempt(lambda: c.barrier())
        write()

    elif scenario == "manager":
        import ckptmgr
        from ckptmgr.adapters.jax import from_tree

        def state(step, of=rank):
            key = jax.random.PRNGKey(step * 10 + of)
            return {"params": {"w": jax.random.normal(key, (64, 32)), "b": jax.numpy.full((32,), float(of))},
                    "step": step, "rank": of}

        def same(a, b):
            la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
            return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))

        directory = params["directory"]
        with ckptmgr.CheckpointManager(directory, coordinator=c, sharded=True, keep=ckptmgr.KeepLast(2)) as mgr:
            result["saved"] = [mgr.save(s, to_tree(state(s))).step for s in (1, 2, 3)]
        c2 = JaxCoordinator(timeout=params["timeout"])
        with ckptmgr.CheckpointManager(directory, coordinator=c2, sharded=True) as mgr:
            restored = from_tree(mgr.restore())
            result["restored_step"] = restored["step"]
            result["exact"] = same(restored, state(3))
            result["checkpoints"] = [i.step for i in mgr.checkpoints]
        with ckptmgr.CheckpointManager(params["replicated"], coordinator=c2) as mgr:
            mgr.save(5, to_tree(state(5)) if rank == 0 else None)
            result["replicated_exact"] = same(from_tree(mgr.restore()), state(5, of=0))
        write()

    elif scenario == "peer_dies":
        result["first"] = attempt(lambda: c.all_gather(rank))
        if rank == params["dies"]:
            write()
            # Dies while the survivor waits in its next collective (not while the survivor
            # may still be finishing the first one).
            while not os.path.exists(f"{out}/progress{1 - rank}.json"):
                time.sleep(0.02)
            if params["how"] == "exit":
                sys.exit(0)  # a clean exit: JAX's atexit shutdown barrier waits for the others
            os.kill(os.getpid(), signal.SIGKILL)
        result["waiting_since"] = time.time()  # JAX may abort this process: the test reads this
        write("progress")
        result["after_death"] = attempt(lambda: c.all_gather(rank))
        result["next"] = attempt(lambda: c.broadcast("x"))
        write()
    """
)


def run_job(tmp_path: Path, **params: Any) -> dict[int, dict[str, Any]]:
    """Run WORKER in two processes; per rank: rc, wall seconds, the time.time() it ended,
    its result file (or None), its progress file (or None), its log."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    (port,) = free_ports(1)
    start = time.monotonic()
    procs = []
    for rank in range(2):
        log = (tmp_path / f"log{rank}.txt").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(rank), str(port), str(tmp_path), json.dumps(params)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        ))
        log.close()
    walls, ended_at = wait_for(procs, start=start, deadline=DEADLINE)
    logs = {rank: (tmp_path / f"log{rank}.txt").read_text(errors="replace") for rank in range(2)}
    if len(walls) < 2:
        pytest.fail(f"the job passed its {DEADLINE:g} s deadline (a hang); logs:\n" + "\n".join(
            f"--- rank {rank}:\n{log[-3000:]}" for rank, log in logs.items()))
    out: dict[int, dict[str, Any]] = {}
    for rank, proc in enumerate(procs):
        files = {name: tmp_path / f"{name}{rank}.json" for name in ("result", "progress")}
        out[rank] = {"rc": proc.returncode, "wall": walls[rank], "ended_at": ended_at[rank], "log": logs[rank]}
        out[rank].update({name: json.loads(path.read_text()) if path.exists() else None for name, path in files.items()})
    return out


def _ok(job: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    for rank, proc in job.items():
        assert proc["rc"] == 0 and proc["result"] is not None, f"rank {rank} failed:\n{proc['log'][-3000:]}"
    return [job[0]["result"], job[1]["result"]]


def _assert_coordinator_error(attempt: dict[str, Any], *, what: str, rank: int, timeout: float) -> None:
    assert attempt.get("error") == "CoordinatorError", attempt
    assert attempt["timeout_error"]  # CoordinatorError is also a TimeoutError
    assert what in attempt["message"] and f"on rank {rank}" in attempt["message"]
    assert "world_size=2" in attempt["message"] and f"timeout={timeout:g} s" in attempt["message"]
    assert attempt["cause"] == "JaxRuntimeError"  # chained from JAX's own error


# ----------------------------------------------------------------- collectives


ROUNDS = 50


@pytest.fixture(scope="module")
def rounds_job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One job of ROUNDS rounds of collectives and then the error cases, shared by the
    tests below (a job costs seconds)."""
    return _ok(run_job(tmp_path_factory.mktemp("rounds"), scenario="rounds", timeout=30, rounds=ROUNDS))


def test_collectives_agree_on_both_processes_round_after_round(rounds_job: list[dict[str, Any]]) -> None:
    results = rounds_job
    assert [r["ids"] for r in results] == [[0, 2, 0, 2], [1, 2, 1, 2]]  # the runtime's ids are JAX's
    assert len(results[0]["rounds"]) == ROUNDS
    assert results[0]["rounds"] == results[1]["rounds"]  # identical on both processes
    for k, seen in enumerate(results[0]["rounds"]):
        # The values of this round, never an earlier one's (keys are unique per call).
        assert seen["broadcast"] == {"round": k, "from": k % 2, "nested": {"list": [1, 2.5, None, True, "\u00e9"], "t": [k, "x"]}}
        assert seen["all_gather"] == [{"rank": r, "k": k, "payload": [r] * (k % 4)} for r in range(2)]
        assert seen["other"] == [[0, k], [1, k]]
        assert seen["barrier"] is None
    assert results[0]["keys_left"] == []  # each round's keys are deleted once every rank read them


def test_non_json_values_raise_type_error_and_send_nothing(rounds_job: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(rounds_job):
        set_, obj, type_, bad_src = result["not_json"]
        for attempt, name in ((set_, "set"), (obj, "object"), (type_, "type")):
            assert attempt["error"] == "TypeError" and "JSON" in attempt["message"], attempt
            assert name in attempt["message"]
        assert bad_src["error"] == "ValueError" and "src=2" in bad_src["message"]
        # Nothing was sent: the processes are still in step, the coordinator works.
        assert result["after"] == ["still in step 0", "still in step 1"], rank


def test_a_global_array_is_refused_by_to_tree(rounds_job: list[dict[str, Any]]) -> None:
    for result in rounds_job:
        refused = result["global_array"]
        assert refused["error"] == "ValueError", refused
        assert "tree['w']" in refused["message"] and "sharded=True" in refused["message"]
        assert "addressable_shards" in refused["message"]


# ----------------------------------------------------------------- failures


def test_a_stalled_peer_makes_both_sides_raise_coordinator_error(tmp_path: Path) -> None:
    timeout = 3.0
    first, second = _ok(run_job(tmp_path, scenario="stall", timeout=timeout))
    assert first["first"]["value"] == second["first"]["value"] == [0, 1]
    # Rank 0 waits its timeout, no more (rank 1 is stalled until rank 0 gave up).
    _assert_coordinator_error(first["late"], what="all_gather #1", rank=0, timeout=timeout)
    assert timeout - 0.1 <= first["late"]["elapsed"] < timeout + 5, first["late"]
    assert "not every process reached it in time" in first["late"]["message"]
    # The stalled rank, arriving late, raises at once instead of waiting its own timeout.
    _assert_coordinator_error(second["late"], what="all_gather #1", rank=1, timeout=timeout)
    assert second["late"]["elapsed"] < timeout, second["late"]
    # A broken coordinator refuses every later call at once, on both ranks.
    for rank, result in enumerate((first, second)):
        _assert_coordinator_error(result["next"], what="barrier #2", rank=rank, timeout=timeout)
        assert "failed earlier" in result["next"]["message"] and result["next"]["elapsed"] < 0.5


@pytest.mark.parametrize(
    ("how", "dies", "heartbeat"),
    [
        ("exit", 1, 100),  # a clean exit waits in JAX's shutdown barrier: a stalled peer
        # SIGKILL: unnoticed until our timeout (3 s) < JAX's heartbeat timeout (slow: it
        # then waits for JAX's heartbeat to abort the survivor at exit).
        pytest.param("kill", 1, 8, marks=pytest.mark.slow),
    ],
    ids=["clean-exit", "sigkill"],
)
def test_a_dead_peer_makes_the_survivor_raise_within_the_timeout(
    tmp_path: Path, how: str, dies: int, heartbeat: int
) -> None:
    timeout = 3.0
    job = run_job(tmp_path, scenario="peer_dies", timeout=timeout, how=how, dies=dies, heartbeat=heartbeat)
    dead, survivor = job[dies], job[1 - dies]
    assert dead["result"]["first"]["value"] == [0, 1]
    assert dead["rc"] == (0 if how == "exit" else -signal.SIGKILL), dead["log"][-3000:]
    result = survivor["result"]
    assert result is not None, survivor["log"][-3000:]
    _assert_coordinator_error(result["after_death"], what="all_gather #1", rank=1 - dies, timeout=timeout)
    assert timeout - 0.1 <= result["after_death"]["elapsed"] < timeout + 5, result["after_death"]
    assert "failed earlier" in result["next"]["message"] and result["next"]["elapsed"] < 0.5
    if how == "exit":
        assert survivor["rc"] == 0  # its own exit releases the dead peer's shutdown barrier
    else:
        # Its exit then waits in JAX's shutdown barrier for the dead peer until JAX's
        # heartbeat timeout, when JAX aborts it (SIGABRT): bounded, not a hang.
        assert survivor["rc"] in (0, -signal.SIGABRT), survivor["log"][-3000:]
        assert survivor["ended_at"] - result["waiting_since"] < heartbeat + 10


@pytest.mark.parametrize(
    ("dies", "heartbeat", "bound"),
    [(0, 100, 10), pytest.param(1, 3, 15, marks=pytest.mark.slow)],
    ids=["service-host-dies", "heartbeat-timeout-first"],
)
def test_jax_ends_the_survivor_first_when_it_notices_the_death_first(
    tmp_path: Path, dies: int, heartbeat: int, bound: float
) -> None:
    """When process 0 (which hosts JAX's coordination service) dies, or JAX's heartbeat
    timeout is shorter than the coordinator's, JAX terminates the survivor itself
    (SIGABRT from a fatal log), possibly just after the coordinator raised: either way
    it ends within seconds, long before the coordinator's 60 s timeout."""
    job = run_job(tmp_path, scenario="peer_dies", timeout=60, how="kill", dies=dies, heartbeat=heartbeat)
    survivor = job[1 - dies]
    assert job[dies]["rc"] == -signal.SIGKILL
    # Measured from the moment the survivor entered the collective the peer never joined.
    assert survivor["progress"] is not None, survivor["log"][-3000:]
    assert survivor["ended_at"] - survivor["progress"]["waiting_since"] < bound, survivor
    result = survivor["result"]
    if result is None:
        assert survivor["rc"] == -signal.SIGABRT, survivor["log"][-3000:]
        assert "Terminating process because the JAX distributed service detected fatal errors" in survivor["log"]
    else:
        assert result["after_death"]["error"] == "CoordinatorError", result
        assert result["after_death"]["elapsed"] < 60


# ----------------------------------------------------------------- in this process


def test_two_jax_processes_save_and_restore_through_the_manager(tmp_path: Path) -> None:
    """Each process saves its own part (sharded=True) and gets it back bit-exact; a
    replicated state is written by process 0 and restored by both."""
    job = run_job(tmp_path, scenario="manager", timeout=30, directory=str(tmp_path / "ckpt"),
                  replicated=str(tmp_path / "replicated"))
    for result in _ok(job):
        assert result["saved"] == [1, 2, 3]
        assert result["restored_step"] == 3 and result["exact"] is True
        assert result["checkpoints"] == [2, 3]
        assert result["replicated_exact"] is True
    import ckptmgr

    reader = ckptmgr.CheckpointManager(tmp_path / "ckpt", read_only=True)
    assert reader.verify(3).step == 3
    assert [reader.restore(3, rank=k)["rank"] for k in (0, 1)] == [0, 1]


def test_a_coordinator_needs_jax_distributed_and_a_valid_timeout() -> None:
    with pytest.raises(RuntimeError, match=r"jax\.distributed\.initialize"):
        ckpt_jax.JaxCoordinator()
    for bad in (0, -1.0, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError, match="Expected timeout"):
            ckpt_jax.JaxCoordinator(timeout=bad)  # type: ignore[arg-type]


def test_trees_of_jax_arrays_survive_a_checkpoint(tmp_path: Path) -> None:
    jnp = jax.numpy
    Pair = namedtuple("Pair", ["mu", "nu"])
    state = {
        "params": {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.zeros(3, jnp.bfloat16)},
        "opt": Pair(jnp.ones(2, jnp.int32), [jnp.asarray(1.5)]),
        "step": 7,
        "host": np.arange(3),
    }
    tree = ckpt_jax.to_tree(state)
    assert type(tree["params"]["w"]) is np.ndarray and type(tree["opt"]) is tuple
    assert tree["params"]["b"].dtype.name == "bfloat16"
    with ckptmgr.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, tree)
        restored = ckpt_jax.from_tree(mgr.restore())
    assert restored["step"] == 7 and type(restored["step"]) is int
    leaves = jax.tree_util.tree_leaves_with_path(state)
    arrays = [(path, leaf, got) for (path, leaf), got in zip(leaves, jax.tree_util.tree_leaves(restored), strict=True)
              if path != (jax.tree_util.DictKey("step"),)]
    assert len(arrays) == 5
    for path, leaf, got in arrays:
        assert isinstance(got, jax.Array), path
        # JAX's dtype for the value: int64 becomes int32 unless jax_enable_x64 is set.
        assert got.dtype == jax.dtypes.canonicalize_dtype(np.asarray(leaf).dtype), path
        assert np.array_equal(np.asarray(got), np.asarray(leaf)), path
    # The structure of the NamedTuple comes back through a template, as from_tree documents.
    opt = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state["opt"]), jax.tree_util.tree_leaves(restored["opt"]))
    assert isinstance(opt, Pair) and int(opt.mu[0]) == 1


def test_typed_prng_keys_survive_a_checkpoint(tmp_path: Path) -> None:
    """jax.random.key (JAX's recommended keys; NumPy has no key dtype) and split batches
    of them, of two implementations, come back as the same keys: the same draws."""
    keys = {"key": jax.random.key(0), "batch": jax.random.split(jax.random.key(1), 3),
            "rbg": jax.random.key(2, impl="rbg"), "raw": jax.random.PRNGKey(3)}
    with ckptmgr.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, ckpt_jax.to_tree(keys))
        restored = ckpt_jax.from_tree(mgr.restore())
    for name in ("key", "batch", "rbg"):
        got, want = restored[name], keys[name]
        assert jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key), name
        assert str(jax.random.key_impl(got)) == str(jax.random.key_impl(want)) and got.shape == want.shape, name
        np.testing.assert_array_equal(jax.random.normal(got.reshape(-1)[0], (4,)),
                                      jax.random.normal(want.reshape(-1)[0], (4,)))
    np.testing.assert_array_equal(np.asarray(restored["raw"]), np.asarray(keys["raw"]))  # a plain uint32 array
