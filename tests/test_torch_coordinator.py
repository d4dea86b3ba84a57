"""ckptmgr.adapters.torch.TorchCoordinator: the Coordinator protocol over torch.distributed,
between real ranks started by torchrun (two CPU processes over gloo): JSON values arrive
identical on every rank, a value that is not JSON fails locally, a peer that exited or
stalls makes the other raise CoordinatorError within the timeout, and the coordinator
talks over a gloo group of its own. A few argument checks run in this process."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from _dist import TorchrunResult, run_torchrun  # noqa: E402 - after the importorskip

from ckptmgr.adapters.torch import TorchCoordinator  # noqa: E402
from ckptmgr.coordinator import Coordinator  # noqa: E402

if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

STALL_TIMEOUT = 3.0  # the coordinator's timeout where a peer stalls
SLACK = 10.0  # what a timeout may take beyond itself on a loaded two-core machine
GLOO_ERRORS = {"RuntimeError", "DistBackendError", "DistNetworkError"}  # what torch has raised

# One worker for every job; argv: RESULTS SCENARIO. Each rank reports a dict under
# "rank<k>"; attempt() reports an outcome: {"value": ...} or {"error": type, "message",
# "cause": type of __cause__, "cause_message"}, with "elapsed" seconds either way.
WORKER = r'''
import datetime, hashlib, os, sys, time

import numpy as np
import torch
import torch.distributed as dist

from _dist import report
from ckptmgr.adapters.torch import TorchCoordinator
from ckptmgr.errors import CoordinatorError

results, scenario = sys.argv[1], sys.argv[2]
STALL_TIMEOUT = float(sys.argv[3])
# A default group whose timeout is not the coordinator's: the coordinator's must apply.
dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
rank = dist.get_rank()

NESTED = {
    "step": 1200,
    "big": 2**200,
    "negative": -(2**63) - 1,
    "floats": [0.1, -0.0, 1e-310, 1.7976931348623157e308, 1 / 3],
    "special": [float("nan"), float("inf"), float("-inf")],
    "text": "na\u00efve \u0394 \u4e2d\u6587 \U0001f3d6\ufe0f \x00 \ud800 \"'\\",
    "nested": {"a": [1, [2, [3, {"b": None}]]], "tuple": (1, 2), "flags": [True, False]},
    "int_keys": {1: "one"},
    "empty": [{}, [], ""],
}
BIG = ("ckpt-\u00e9-\u4e2d-\U0001f3d6-" * 100_000)[:1_000_000]


def digest(text):
    return {"len": len(text), "sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()}


def attempt(fn):
    start = time.monotonic()
    try:
        value = fn()
    except Exception as exc:
        cause = exc.__cause__
        return {
            "error": type(exc).__name__, "message": str(exc),
            "is_coordinator_error": isinstance(exc, CoordinatorError),
            "cause": None if cause is None else type(cause).__name__,
            "cause_message": None if cause is None else str(cause),
            "elapsed": time.monotonic() - start,
        }
    return {"value": value, "elapsed": time.monotonic() - start}


def wait_for(path, limit=60.0):
    """Block until ``path`` exists: this rank stalls until the other has given up on it."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


out = {}
if scenario == "exchange":
    c = TorchCoordinator(timeout=30)
    out["rank"], out["world_size"], out["timeout"], out["repr"] = c.rank, c.world_size, c.timeout, repr(c)
    out["own_group"] = c.process_group is not dist.group.WORLD
    out["broadcast_from_0"] = c.broadcast(NESTED if rank == 0 else None)
    out["broadcast_from_1"] = c.broadcast({"from": rank} if rank == 1 else object(), src=1)
    out["all_gather"] = c.all_gather({"rank": rank, "text": "\u00e9" * rank, "tuple": (rank,)})
    # The default group between the coordinator's collectives: messages do not mix.
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    out["all_reduce"] = total.item()
    out["broadcast_big"] = digest(c.broadcast(BIG if rank == 0 else None))
    gathered = c.all_gather(BIG if rank == 0 else "small")  # lengths differ: padded
    out["all_gather_big"] = [digest(text) for text in gathered]
    out["barrier"] = attempt(c.barrier)
    # Raised before anything is sent, on the ranks that have the bad value.
    out["all_gather_object"] = attempt(lambda: c.all_gather(object()))
    out["all_gather_ndarray"] = attempt(lambda: c.all_gather({"weights": np.arange(3)}))
    out["broadcast_set"] = attempt(lambda: c.broadcast({1, 2}, src=rank))
    out["broadcast_bad_src"] = attempt(lambda: c.broadcast(1, src=2))
    out["after_local_errors"] = attempt(lambda: c.all_gather(rank))
    # A coordinator over a subgroup: ranks outside it take part in the construction
    # (new_group is collective) and get ValueError.
    solo = dist.new_group([0], backend="gloo")
    out["subgroup"] = attempt(lambda: (lambda s: [s.rank, s.world_size, s.all_gather(rank)])(TorchCoordinator(solo, timeout=30)))
    # A group in another order: the coordinator's ranks are the group's.
    backwards = dist.new_group([1, 0], sort_ranks=False)
    rev = TorchCoordinator(backwards, timeout=30)
    out["reversed"] = {
        "rank": rev.rank, "group_rank": dist.get_rank(backwards),
        "all_gather": rev.all_gather(rank), "broadcast_from_0": rev.broadcast(rank, src=0),
    }
    out["world_again"] = TorchCoordinator(timeout=30).all_gather(rank)  # groups still numbered alike
    report(results, f"rank{rank}", out)
    dist.destroy_process_group()

elif scenario == "dead":
    c = TorchCoordinator(timeout=60)
    c.barrier()
    if rank == 1:
        report(results, "rank1", {"exiting": True})
        os._exit(0)  # a clean exit, without the collectives rank 0 still expects
    out["first"] = attempt(lambda: c.broadcast({"step": 1}))
    out["second"] = attempt(lambda: c.all_gather(rank))
    report(results, "rank0", out)
    dist.destroy_process_group()

elif scenario == "stall":
    c = TorchCoordinator(timeout=STALL_TIMEOUT)
    c.barrier()
    if rank == 1:
        wait_for(os.path.join(results, "rank0.json"))
        out["late"] = attempt(lambda: c.all_gather(rank))
    else:
        out["first"] = attempt(lambda: c.all_gather(rank))
        out["second"] = attempt(c.barrier)
    report(results, f"rank{rank}", out)
    dist.destroy_process_group()

elif scenario == "late_construction":
    if rank == 1:
        wait_for(os.path.join(results, "rank0.json"))
        os._exit(0)
    out["construct"] = attempt(lambda: repr(TorchCoordinator(timeout=STALL_TIMEOUT)))
    report(results, "rank0", out)
    dist.destroy_process_group()
'''

# What NESTED (above) becomes through JSON: tuples are lists, dict keys str; "special"
# (NaN and infinities) is compared on its own.
NESTED_AFTER_JSON = {
    "step": 1200,
    "big": 2**200,
    "negative": -(2**63) - 1,
    "floats": [0.1, -0.0, 1e-310, 1.7976931348623157e308, 1 / 3],
    "text": "na\u00efve \u0394 \u4e2d\u6587 \U0001f3d6\ufe0f \x00 \ud800 \"'\\",
    "nested": {"a": [1, [2, [3, {"b": None}]]], "tuple": [1, 2], "flags": [True, False]},
    "int_keys": {"1": "one"},
    "empty": [{}, [], ""],
}
BIG = ("ckpt-\u00e9-\u4e2d-\U0001f3d6-" * 100_000)[:1_000_000]


def digest(text: str) -> dict[str, Any]:
    return {"len": len(text), "sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()}


def job(directory: Path, scenario: str) -> TorchrunResult:
    script = directory / "worker.py"
    if not script.exists():
        script.write_text(WORKER, encoding="utf-8")
    return run_torchrun(script, [scenario, str(STALL_TIMEOUT)], nproc=2, timeout=90, workdir=directory).check()


@pytest.fixture(scope="module")
def exchange(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rank 0's and rank 1's reports from one job of the "exchange" scenario."""
    result = job(tmp_path_factory.mktemp("exchange"), "exchange")
    assert set(result.results) == {"rank0", "rank1"}, result.describe()
    return result.results["rank0"], result.results["rank1"]


# ------------------------------------------------------------------ between two ranks


def test_ranks_are_those_of_the_coordinators_own_gloo_group(exchange: tuple[dict[str, Any], ...]) -> None:
    for rank, report in enumerate(exchange):
        assert (report["rank"], report["world_size"], report["timeout"]) == (rank, 2, 30.0)
        assert report["repr"] == f"TorchCoordinator(rank={rank}, world_size=2, timeout=30)"
        assert report["own_group"] is True
        assert report["all_reduce"] == 3.0  # the default group, used in between, is unaffected


def test_broadcast_gives_every_rank_the_json_value_of_src(exchange: tuple[dict[str, Any], ...]) -> None:
    for report in exchange:  # rank 0 (the source) gets the value back through JSON too
        received = dict(report["broadcast_from_0"])
        special = received.pop("special")
        assert received == NESTED_AFTER_JSON
        assert math.copysign(1.0, received["floats"][1]) == -1.0  # -0.0 kept its sign
        assert math.isnan(special[0]) and special[1:] == [math.inf, -math.inf]
        assert report["broadcast_from_1"] == {"from": 1}
        assert report["broadcast_big"] == digest(BIG)
    assert json.dumps(exchange[0]["broadcast_from_0"]) == json.dumps(exchange[1]["broadcast_from_0"])


def test_all_gather_gives_every_rank_all_values_by_rank(exchange: tuple[dict[str, Any], ...]) -> None:
    for report in exchange:
        assert report["all_gather"] == [{"rank": 0, "text": "", "tuple": [0]}, {"rank": 1, "text": "é", "tuple": [1]}]
        assert report["all_gather_big"] == [digest(BIG), digest("small")]  # 1 MB next to 7 bytes
        assert report["barrier"]["value"] is None


def test_a_value_that_is_not_json_raises_type_error_before_sending(exchange: tuple[dict[str, Any], ...]) -> None:
    for report in exchange:
        for key, kind in [("all_gather_object", "object"), ("all_gather_ndarray", "ndarray"), ("broadcast_set", "set")]:
            assert report[key]["error"] == "TypeError", (key, report[key])
            assert "Expected a coordinator message made of JSON values" in report[key]["message"]
            assert kind in report[key]["message"]
        assert report["broadcast_bad_src"]["error"] == "ValueError"
        assert "Expected src to be a rank in range(2). Received: src=2" in report["broadcast_bad_src"]["message"]
        # Nothing was sent, so the ranks are still in step and the coordinator works.
        assert report["after_local_errors"]["value"] == [0, 1]


def test_group_selects_and_orders_the_ranks(exchange: tuple[dict[str, Any], ...]) -> None:
    rank0, rank1 = exchange
    assert rank0["subgroup"]["value"] == [0, 1, [0]]  # rank 0 alone: rank 0 of 1
    assert rank1["subgroup"]["error"] == "ValueError"
    assert "Expected this process to be a member of group" in rank1["subgroup"]["message"]
    # The group [1, 0]: job rank 1 is the coordinator's rank 0.
    assert rank0["reversed"] == {"rank": 1, "group_rank": 1, "all_gather": [1, 0], "broadcast_from_0": 1}
    assert rank1["reversed"] == {"rank": 0, "group_rank": 0, "all_gather": [1, 0], "broadcast_from_0": 1}
    assert rank0["world_again"] == rank1["world_again"] == [0, 1]


def test_a_peer_that_exited_makes_the_other_raise_at_once(tmp_path: Path) -> None:
    result = job(tmp_path, "dead")
    first, second = result.results["rank0"]["first"], result.results["rank0"]["second"]
    assert result.results["rank1"] == {"exiting": True}
    assert first["is_coordinator_error"], first
    # gloo raises RuntimeError: "Connection closed by peer" or "Read error ...: Connection reset by peer".
    assert first["cause"] in GLOO_ERRORS, first
    assert "TorchCoordinator broadcast failed on rank 0 of 2 (timeout 60 s)" in first["message"]
    assert first["elapsed"] < SLACK  # the peer's exit is seen, not waited out (timeout 60 s)
    # Broken from then on: the next call raises without trying.
    assert second["is_coordinator_error"] and "broken" in second["message"], second
    assert second["elapsed"] < 1.0


def test_a_peer_that_stalls_makes_the_other_raise_after_the_timeout(tmp_path: Path) -> None:
    result = job(tmp_path, "stall")
    first, second = result.results["rank0"]["first"], result.results["rank0"]["second"]
    assert first["is_coordinator_error"], first
    assert f"TorchCoordinator all_gather failed on rank 0 of 2 (timeout {STALL_TIMEOUT:g} s)" in first["message"]
    assert first["cause"] in GLOO_ERRORS and "Timed out" in first["cause_message"], first
    # The coordinator's timeout, not the default group's (10 minutes).
    assert STALL_TIMEOUT * 0.5 <= first["elapsed"] < STALL_TIMEOUT + SLACK, first
    assert second["is_coordinator_error"] and "broken" in second["message"], second
    assert second["elapsed"] < 1.0
    # The stalled rank, back too late, finds its peer gone and raises too.
    late = result.results["rank1"]["late"]
    assert late["is_coordinator_error"], late
    assert "TorchCoordinator all_gather failed on rank 1 of 2" in late["message"]
    assert late["elapsed"] < STALL_TIMEOUT + SLACK


def test_a_peer_that_never_constructs_its_coordinator_raises_after_the_timeout(tmp_path: Path) -> None:
    result = job(tmp_path, "late_construction")
    construct = result.results["rank0"]["construct"]
    assert construct["is_coordinator_error"], construct
    assert "creating its gloo group failed on rank 0 of the job's 2" in construct["message"]
    assert STALL_TIMEOUT * 0.5 <= construct["elapsed"] < STALL_TIMEOUT + SLACK, construct


# ------------------------------------------------------------------------ in process


def test_without_init_process_group_the_error_says_to_call_it() -> None:
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"call torch\.distributed\.init_process_group\(\) first"):
        TorchCoordinator()


@pytest.mark.parametrize(
    "timeout",
    [0, -1.0, math.nan, math.inf, "30", True, None, datetime.timedelta(0)],
    ids=["zero", "negative", "nan", "inf", "str", "bool", "none", "zero-timedelta"],
)
def test_timeout_must_be_positive_seconds(timeout: Any) -> None:
    with pytest.raises(ValueError, match=r"Expected timeout to be a finite number of seconds > 0"):
        TorchCoordinator(timeout=timeout)


@pytest.fixture
def single_process_group(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A job of one process (this one), over gloo on the loopback interface."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("single_process_group")
def test_a_job_of_one_process() -> None:
    coordinator = TorchCoordinator(timeout=datetime.timedelta(seconds=5))
    assert isinstance(coordinator, Coordinator)
    assert (coordinator.rank, coordinator.world_size, coordinator.timeout) == (0, 1, 5.0)
    assert coordinator.broadcast({"a": (1, 2)}) == {"a": [1, 2]}
    assert coordinator.all_gather("é") == ["é"]
    coordinator.barrier()
    with pytest.raises(TypeError, match="JSON"):
        coordinator.broadcast(b"bytes")
    with pytest.raises(ValueError, match=r"Expected src to be a rank in range\(1\)\. Received: src=1"):
        coordinator.broadcast(1, src=1)
    assert coordinator.all_gather(None) == [None]  # local errors leave it usable
    with pytest.raises(ValueError, match=r"Expected group to be a torch\.distributed process group"):
        TorchCoordinator([0])
