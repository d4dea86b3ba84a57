"""Several ranks, one checkpoint per step: the manager's side of the Coordinator protocol.

The ranks here are threads of one process, each with its own CheckpointManager, talking
through :class:`ckptmgr.coordinator.ThreadCoordinator` (the same JSON messages and
timeouts as between processes). The same behaviour with real processes (torchrun,
SIGKILL) is in test_distributed_torch.py.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptmgr
from ckptmgr import storage
from ckptmgr.coordinator import ThreadCoordinator


def run_ranks(world: int, work: Callable[[ThreadCoordinator], Any], *, timeout: float = 20.0,
              limit: float = 60.0, kind: type[ThreadCoordinator] = ThreadCoordinator) -> list[Any]:
    """Run ``work(coordinator)`` on ``world`` threads; each result, or the exception it raised."""
    group = kind.group(world, timeout=timeout)
    results: list[Any] = [None] * world

    def target(c: ThreadCoordinator) -> None:
        try:
            results[c.rank] = work(c)
        except BaseException as exc:  # the test inspects it
            results[c.rank] = exc

    threads = [threading.Thread(target=target, args=(c,), daemon=True) for c in group]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


def shard(rank: int, step: int) -> dict[str, Any]:
    rng = np.random.default_rng(rank * 1000 + step)
    return {"w": rng.normal(size=(64, 8)).astype(np.float32), "b": rng.normal(size=3),
            "rank": rank, "step": step, "name": f"rank-{rank}"}


def assert_tree_equal(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    else:
        assert a == b


def no_errors(results: list[Any]) -> list[Any]:
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def part_files(directory: Path) -> list[str]:
    return sorted(storage.part_files(directory))


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_save_and_restore_each_rank_its_own_part(tmp_path: Path, world: int) -> None:
    def work(c: ThreadCoordinator) -> Any:
        with ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True) as mgr:
            infos = [mgr.save(step, shard(c.rank, step), metrics={"loss": 1.0 / step}) for step in (1, 2)]
        with ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True) as mgr:
            return infos, mgr.restore(), mgr.restore(1), mgr.restored

    results = no_errors(run_ranks(world, work))
    for rank, (infos, latest, first, restored) in enumerate(results):
        assert [i.step for i in infos] == [1, 2]
        assert infos == results[0][0]  # every rank returns the same info
        assert_tree_equal(latest, shard(rank, 2))
        assert_tree_equal(first, shard(rank, 1))
        assert restored.step == 1
    with ckptmgr.CheckpointManager(tmp_path / "one") as single:
        one_part = single.save(2, shard(0, 2))
    assert one_part is not None and infos[1].nbytes == world * one_part.nbytes
    # One commit record per step, one part per rank and step, nothing else.
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.h5") if storage.parse_name(p.name) is not None) == [
        storage.checkpoint_name(1), storage.checkpoint_name(2)]
    assert len(part_files(tmp_path)) == 2 * world


def test_sharded_directory_from_one_process_without_coordinator(tmp_path: Path) -> None:
    no_errors(run_ranks(2, lambda c: ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True).save(
        5, shard(c.rank, 5), metrics={"loss": 0.5})))
    reader = ckptmgr.CheckpointManager(tmp_path, read_only=True)
    assert [c.step for c in reader.checkpoints] == [5]
    assert reader.verify().step == 5
    for rank in (0, 1):
        assert_tree_equal(reader.restore(5, rank=rank), shard(rank, 5))
        assert_tree_equal(reader.restore(rank=rank, select="w"), {"w": shard(rank, 5)["w"]})
    with pytest.raises(ValueError, match=r"sharded across 2 ranks.*rank=None"):
        reader.restore()
    with pytest.raises(ValueError, match=r"rank=2"):
        reader.restore(rank=2)
    # And a single-process writer may open it too (its lock, same listing).
    with ckptmgr.CheckpointManager(tmp_path) as mgr:
        assert [c.step for c in mgr.checkpoints] == [5]
        assert_tree_equal(mgr.restore(rank=1), shard(1, 5))


def test_replicated_rank_zero_writes_the_one_copy_every_rank_restores_it(tmp_path: Path) -> None:
    state = {"w": np.arange(10.0), "step": 3}

    def work(c: ThreadCoordinator) -> Any:
        with ckptmgr.CheckpointManager(tmp_path, coordinator=c) as mgr:
            info = mgr.save(3, state if c.rank == 0 else {"w": np.zeros(10), "step": -1})
        with ckptmgr.CheckpointManager(tmp_path, coordinator=c) as mgr:
            return info, mgr.restore()

    results = no_errors(run_ranks(3, work))
    assert [r[0] for r in results] == [results[0][0]] * 3
    for _, restored in results:
        assert_tree_equal(restored, state)
    assert part_files(tmp_path) == []
    # Replicated checkpoints restore on any number of ranks, and in one process.
    for _, restored in no_errors(run_ranks(2, lambda c: (None, ckptmgr.CheckpointManager(
            tmp_path, coordinator=c).restore()))):
        assert_tree_equal(restored, state)
    assert_tree_equal(ckptmgr.CheckpointManager(tmp_path, read_only=True).restore(), state)


def test_retention_deletes_the_parts_with_the_commit_record(tmp_path: Path) -> None:
    def work(c: ThreadCoordinator) -> Any:
        with ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True, keep=ckptmgr.KeepLast(2),
                                       monitor="loss") as mgr:
            for step in range(1, 6):
                mgr.save(step, shard(c.rank, step), metrics={"loss": 5.0 - step if step != 2 else 0.0})
            # Rank 0 deletes what retention removed after the others have their answer:
            # a listing on another rank is final once rank 0 is past its save().
            c.barrier()
            return [(i.step, i.keep_reasons) for i in mgr.checkpoints], mgr.best

    results = no_errors(run_ranks(2, work))
    assert results[0] == results[1]
    steps = [s for s, _ in results[0][0]]
    assert steps == [2, 4, 5]  # best (step 2) and the last two
    assert results[1][1] is not None and results[1][1].step == 2
    assert sorted({storage.parse_part_name(n)[0] for n in part_files(tmp_path)}) == [2, 4, 5]
    assert len(part_files(tmp_path)) == 6


def test_a_rank_that_fails_its_part_commits_nothing_and_every_rank_raises(tmp_path: Path) -> None:
    def work(c: ThreadCoordinator) -> Any:
        mgr = ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True)
        mgr.save(1, shard(c.rank, 1))
        bad = shard(c.rank, 2) if c.rank == 0 else {"w": object()}
        try:
            mgr.save(2, bad)
        finally:
            steps = [i.step for i in mgr.checkpoints]
            mgr.close()
        return steps

    results = run_ranks(2, work)
    assert isinstance(results[1], TypeError) and "w" in str(results[1])
    assert isinstance(results[0], ckptmgr.CoordinatorError)
    assert "rank 1" in str(results[0]) and "nothing was committed" in str(results[0])
    # Rank 0's part of step 2 was removed, step 1 is whole.
    assert {storage.parse_part_name(n)[0] for n in part_files(tmp_path)} == {1}
    reader = ckptmgr.CheckpointManager(tmp_path, read_only=True)
    assert [c.step for c in reader.checkpoints] == [1]
    # The job goes on: the next save works.
    no_errors(run_ranks(2, lambda c: ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True).save(
        2, shard(c.rank, 2))))
    assert [c.step for c in ckptmgr.CheckpointManager(tmp_path, read_only=True).checkpoints] == [1, 2]


def test_parts_without_a_commit_record_are_removed_when_rank_zero_opens(tmp_path: Path) -> None:
    no_errors(run_ranks(2, lambda c: ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True).save(
        1, shard(c.rank, 1))))
    directory = ckptmgr.CheckpointManager(tmp_path, read_only=True)._dir
    assert isinstance(directory, ckptmgr._directory.CheckpointDirectory)
    # What a job killed between the parts and the commit record leaves.
    orphan = directory.write_part(2, 1, 2, "0123abcd", shard(1, 2), {"step": 2, "time": 0.0})["name"]
    assert orphan in part_files(tmp_path)
    assert [c.step for c in ckptmgr.CheckpointManager(tmp_path, read_only=True).checkpoints] == [1]
    no_errors(run_ranks(2, lambda c: ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True).close()))
    assert orphan not in part_files(tmp_path)
    assert len(part_files(tmp_path)) == 2


def flip_byte_in_array(path: Path) -> None:
    """Damage the array data of a part (its biggest leaf)."""
    from _reliability import leaf_offset

    offset = leaf_offset(path, "/state/w")
    with open(path, "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupt_part_on_one_rank_makes_every_rank_fall_back_together(tmp_path: Path) -> None:
    no_errors(run_ranks(2, lambda c: [ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True).save(
        s, shard(c.rank, s)) for s in (1, 2)]))
    damaged = next(n for n in part_files(tmp_path) if storage.parse_part_name(n)[:2] == (2, 1))
    flip_byte_in_array(tmp_path / damaged)

    def work(c: ThreadCoordinator) -> Any:
        mgr = ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True)
        latest = mgr.restore()
        try:
            mgr.restore(2)
        except ckptmgr.CheckpointError as exc:
            exact: Any = exc
        return latest, mgr.restored, exact

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = no_errors(run_ranks(2, work))
    for rank, (latest, restored, _exact) in enumerate(results):
        assert_tree_equal(latest, shard(rank, 1))
        assert restored.step == 1
    assert isinstance(results[1][2], ckptmgr.CorruptCheckpointError) and damaged in str(results[1][2])
    assert isinstance(results[0][2], ckptmgr.CoordinatorError) and damaged in str(results[0][2])
    texts = [str(w.message) for w in caught if issubclass(w.category, ckptmgr.CheckpointWarning)]
    assert len([t for t in texts if "step 2" in t and damaged in t]) == 2  # one per rank
    assert ckptmgr.CheckpointManager(tmp_path, read_only=True).verify(1).step == 1
    with pytest.raises(ckptmgr.CorruptCheckpointError, match=damaged):
        ckptmgr.CheckpointManager(tmp_path, read_only=True).verify(2)


def test_a_missing_part_counts_as_corrupt(tmp_path: Path) -> None:
    no_errors(run_ranks(2, lambda c: [ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True).save(
        s, shard(c.rank, s)) for s in (1, 2)]))
    missing = next(n for n in part_files(tmp_path) if storage.parse_part_name(n)[:2] == (2, 0))
    (tmp_path / missing).unlink()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        results = no_errors(run_ranks(2, lambda c: ckptmgr.CheckpointManager(
            tmp_path, coordinator=c, sharded=True).restore()))
    for rank, latest in enumerate(results):
        assert_tree_equal(latest, shard(rank, 1))


def test_sharded_checkpoint_on_another_world_size_is_refused_naming_both(tmp_path: Path) -> None:
    no_errors(run_ranks(2, lambda c: ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True).save(
        1, shard(c.rank, 1))))
    results = run_ranks(3, lambda c: ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True).restore())
    for r in results:
        assert isinstance(r, ckptmgr.CheckpointError)
        assert "saved by 2 ranks" in str(r) and "this job has 3" in str(r)


class _Shortened(ThreadCoordinator):
    """A rank whose timeout can be shortened once the slow part (fsyncs) is done."""

    def shorten(self, seconds: float) -> None:
        self._timeout = seconds  # CoordinatorBase: implementations set _timeout


def test_a_rank_that_stops_calling_makes_the_others_raise_within_the_timeout(tmp_path: Path) -> None:
    def work(c: ThreadCoordinator) -> Any:
        assert isinstance(c, _Shortened)
        mgr = ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True)
        mgr.save(1, shard(c.rank, 1))
        c.barrier()
        if c.rank == 1:
            return "gone"  # exits before saving step 2
        c.shorten(1.0)
        started = time.monotonic()
        try:
            mgr.save(2, shard(c.rank, 2))
        except ckptmgr.CoordinatorError as exc:
            return exc, time.monotonic() - started
        return "saved"

    results = run_ranks(2, work, limit=30, kind=_Shortened)
    assert results[1] == "gone"
    error, waited = results[0]
    assert "rank(s) [1]" in str(error) and 1.0 <= waited < 15
    assert [c.step for c in ckptmgr.CheckpointManager(tmp_path, read_only=True).checkpoints] == [1]


def test_ranks_saving_different_steps_all_raise(tmp_path: Path) -> None:
    results = run_ranks(2, lambda c: ckptmgr.CheckpointManager(tmp_path, coordinator=c).save(
        10 + c.rank, {"x": 1}))
    for r in results:
        assert isinstance(r, ckptmgr.CoordinatorError) and "[10, 11]" in str(r)


def test_rank_zero_decides_every_seconds_whatever_the_other_clocks_say(tmp_path: Path) -> None:
    # Rank 1's clock runs 100x faster: on its own it would save every call.
    def work(c: ThreadCoordinator) -> Any:
        now = [0.0]

        def clock() -> float:
            now[0] += 1.0 if c.rank == 0 else 100.0
            return now[0]

        mgr = ckptmgr.CheckpointManager(tmp_path, coordinator=c, save_every=ckptmgr.EverySeconds(10), clock=clock)
        asked = [mgr.should_save(step) for step in range(1, 31)]
        saved = [mgr.save(step, {"step": step}) is not None for step in range(31, 61)]
        mgr.close()
        return asked, saved

    results = no_errors(run_ranks(2, work))
    assert results[0] == results[1]
    assert 1 <= sum(results[0][1]) <= 5  # rank 0's clock: about every 10 calls


def test_force_on_one_rank_saves_the_step_on_every_rank(tmp_path: Path) -> None:
    def work(c: ThreadCoordinator) -> Any:
        mgr = ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True, save_every=ckptmgr.EverySteps(100))
        infos = [mgr.save(step, shard(c.rank, step), force=(c.rank == 1 and step == 7)) for step in range(1, 10)]
        mgr.close()
        return [i.step for i in infos if i is not None]

    assert no_errors(run_ranks(2, work)) == [[7], [7]]


def test_step_order_and_leader_only_operations(tmp_path: Path) -> None:
    def work(c: ThreadCoordinator) -> Any:
        mgr = ckptmgr.CheckpointManager(tmp_path, coordinator=c, monitor="loss")
        mgr.save(5, {"x": 5}, metrics={"loss": 0.5 if c.rank == 0 else 99.0})
        errors: list[Any] = []
        try:
            mgr.save(4, {"x": 4})
        except ckptmgr.StepOrderError as exc:
            errors.append((exc.step, exc.latest))
        if c.rank == 1:
            for call in (lambda: mgr.prune(ckptmgr.KeepLast(1)), lambda: mgr.rollback(5), mgr.delete_all):
                try:
                    call()
                except ckptmgr.CheckpointError as exc:
                    errors.append(str(exc))
        best = mgr.best
        mgr.close()
        return errors, best

    results = no_errors(run_ranks(2, work))
    assert results[0][0] == [(4, 5)]
    assert results[1][0][0] == (4, 5)
    assert all("runs on rank 0 alone (this is rank 1 of 2)" in e for e in results[1][0][1:])
    # The metric that counts is rank 0's, on every rank.
    assert results[0][1] == results[1][1] and results[1][1].metrics == {"loss": 0.5}


def test_restore_or_initialize_agrees_on_every_rank(tmp_path: Path) -> None:
    def work(c: ThreadCoordinator) -> Any:
        with ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True) as mgr:
            first = mgr.restore_or_initialize(lambda: {"init": c.rank})
            mgr.save(1, shard(c.rank, 1))
        with ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True) as mgr:
            return first, mgr.restore_or_initialize(lambda: {"init": c.rank})

    results = no_errors(run_ranks(2, work))
    for rank, (first, second) in enumerate(results):
        assert first == {"init": rank}
        assert_tree_equal(second, shard(rank, 1))


def test_rank_zero_that_cannot_open_tells_the_others(tmp_path: Path) -> None:
    holder = ckptmgr.CheckpointManager(tmp_path)  # holds the writer lock
    try:
        results = run_ranks(2, lambda c: ckptmgr.CheckpointManager(tmp_path, coordinator=c))
    finally:
        holder.close()
    assert isinstance(results[0], ckptmgr.DirectoryLockedError)
    assert isinstance(results[1], ckptmgr.CoordinatorError) and "DirectoryLockedError" in str(results[1])


def test_bad_coordination_arguments(tmp_path: Path) -> None:
    (c,) = ThreadCoordinator.group(1)
    unused = tmp_path / "unused"
    with pytest.raises(ValueError, match="Expected a coordinator with sharded=True"):
        ckptmgr.CheckpointManager(unused, sharded=True)
    with pytest.raises(ValueError, match=r"implement ckptmgr\.Coordinator"):
        ckptmgr.CheckpointManager(unused, coordinator=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="read_only=True"):
        ckptmgr.CheckpointManager(unused, coordinator=c, read_only=True)
    with pytest.raises(ValueError, match="each rank's part on object storage is not supported yet"):
        ckptmgr.CheckpointManager("s3://bucket/x", coordinator=c, sharded=True)
    assert not unused.exists()  # refused before anything was created


def test_hostile_part_list_names_no_file_outside_its_step(tmp_path: Path) -> None:
    from ckptmgr._directory import part_names

    good = {"step": 3, "parts": {"world_size": 1, "token": "0123abcd", "files": [
        {"name": storage.part_name(3, 0, 1, "0123abcd"), "size": 10, "nbytes": 4}]}}
    assert part_names(good, "x") == (storage.part_name(3, 0, 1, "0123abcd"),)
    for bad_files in ([{"name": "../etc/passwd", "size": 1, "nbytes": 1}],
                      [{"name": storage.part_name(4, 0, 1, "0123abcd"), "size": 1, "nbytes": 1}],
                      [{"name": storage.checkpoint_name(3), "size": 1, "nbytes": 1}],
                      [], "x"):
        bad = {"step": 3, "parts": {"world_size": 1, "token": "0123abcd", "files": bad_files}}
        with pytest.raises(ckptmgr.CorruptCheckpointError, match="malformed list of parts"):
            part_names(bad, "x")
    with pytest.raises(ckptmgr.CorruptCheckpointError):
        part_names({"step": 3, "parts": {"world_size": 1, "token": "../../x", "files": []}}, "x")


def test_a_file_payload_is_written_by_rank_zero_alone(tmp_path: Path) -> None:
    def work(c: ThreadCoordinator) -> Any:
        def write(path: Path) -> None:
            path.write_bytes(f"written by rank {c.rank}".encode())

        with ckptmgr.CheckpointManager(tmp_path, coordinator=c) as mgr:
            info = mgr.save(3, ckptmgr.FilePayload("model.bin", write))
            return info, mgr.restore()

    results = no_errors(run_ranks(2, work))
    assert results[0][0] == results[1][0] and results[0][0].kind == "payload"
    for _, path in results:
        assert Path(path).read_bytes() == b"written by rank 0"


def test_the_cli_lists_shows_and_verifies_a_sharded_directory(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    no_errors(run_ranks(2, lambda c: [ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True).save(
        s, shard(c.rank, s)) for s in (1, 2)]))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ckptmgr", *args, str(tmp_path)], capture_output=True,
                              text=True, timeout=60, check=False)

    listed = json.loads(cli("ls", "--json").stdout)
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir() if p.name.startswith("ckpt-")}
    entry = next(e for e in listed["checkpoints"] if e["step"] == 2)
    assert len(entry["parts"]) == 2
    assert entry["file_bytes"] == sum(v for k, v in sizes.items() if k.startswith(storage.checkpoint_name(2)[:-3]))
    assert "sharded across 2 ranks" in cli("show").stdout
    assert cli("verify").returncode == 0
    flip_byte_in_array(tmp_path / next(n for n in part_files(tmp_path) if storage.parse_part_name(n)[:2] == (2, 0)))
    damaged = cli("verify")
    assert damaged.returncode != 0 and "rank-00000-of-00002" in damaged.stdout + damaged.stderr


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "replicated"])
def test_async_saves_commit_at_the_next_collective_call(tmp_path: Path, sharded: bool) -> None:
    def work(c: ThreadCoordinator) -> Any:
        mgr = ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=sharded, async_save=True,
                                        keep=ckptmgr.KeepLast(2))
        mgr.save(1, shard(c.rank if sharded else 0, 1))
        state = shard(c.rank if sharded else 0, 2)
        provisional = mgr.save(2, state)  # concludes step 1
        state["w"][:] = -1  # the save copied it: changing it now changes nothing
        c.barrier()
        listed = [i.step for i in mgr.checkpoints]
        mgr.wait()  # concludes step 2
        c.barrier()
        after_wait = [i.step for i in mgr.checkpoints]
        mgr.save(3, shard(c.rank if sharded else 0, 3))
        mgr.close()  # concludes step 3
        with ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=sharded, async_save=True) as again:
            return provisional, listed, after_wait, again.restore(2), again.restore(), [i.step for i in again.checkpoints]

    results = no_errors(run_ranks(2, work))
    for rank, (provisional, listed, after_wait, second, latest, steps) in enumerate(results):
        assert provisional.step == 2 and provisional == results[0][0]
        assert listed == [1] and after_wait == [1, 2]
        assert_tree_equal(second, shard(rank if sharded else 0, 2))
        assert_tree_equal(latest, shard(rank if sharded else 0, 3))
        assert steps == [2, 3]


class _Rank0WritesFirst(ThreadCoordinator):
    """Holds rank 1 after step 2's decision until rank 0 has written its part of step 2.

    Rank 0's next collective call after that decision is its report, made once its part
    is written (sync) or its background write joined (async). Without the hold the two
    writes race, and rank 0's small part may meet the disk rank 1 has just filled.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written = threading.Event()  # group() gives its ranks one
        self._decided = False

    @classmethod
    def group(cls, world_size: int, *, timeout: float = 20.0) -> list[ThreadCoordinator]:
        ranks = super().group(world_size, timeout=timeout)
        written = threading.Event()
        for rank in ranks:
            assert isinstance(rank, _Rank0WritesFirst)
            rank.written = written
        return ranks

    def all_gather(self, value: Any) -> list[Any]:
        if self.rank == 0 and self._decided:
            self.written.set()
        gathered = super().all_gather(value)
        if isinstance(value, dict) and value.get("step") == 2 and "force" in value:  # step 2's decision
            self._decided = True
            if self.rank == 1:
                assert self.written.wait(30), "rank 0 never reported its part of step 2"
        return gathered


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_at_one_rank_fails_the_step_on_every_rank_and_commits_nothing(
    tmpfs: tuple[Path, Callable[[str], None]], async_save: bool,
) -> None:
    mnt, _ = tmpfs  # 4 MiB
    directory = mnt / "ckpt"

    def state(rank: int, step: int) -> dict[str, Any]:
        # Rank 1's part of step 2 (6 MiB) does not fit; everything else does.
        size = 6 * 2**20 if (rank, step) == (1, 2) else 64 * 2**10
        return {"w": np.full(size // 8, float(step)), "rank": rank}

    def work(c: ThreadCoordinator) -> Any:
        mgr = ckptmgr.CheckpointManager(directory, coordinator=c, sharded=True, async_save=async_save)
        mgr.save(1, state(c.rank, 1))
        mgr.wait()
        errors = []
        try:
            mgr.save(2, state(c.rank, 2))
            mgr.wait()
        except ckptmgr.CheckpointError as exc:
            errors.append(exc)
        steps = [i.step for i in mgr.checkpoints]
        mgr.save(3, state(c.rank, 3))  # the job goes on
        mgr.close()
        return errors, steps

    results = no_errors(run_ranks(2, work, kind=_Rank0WritesFirst))
    (errors0, steps0), (errors1, _) = results
    assert len(errors1) == 1 and isinstance(errors1[0], ckptmgr.CheckpointIOError)
    assert "No space left on device" in str(errors1[0])
    assert len(errors0) == 1 and isinstance(errors0[0], ckptmgr.CoordinatorError)
    assert "rank 1" in str(errors0[0]) and "nothing was committed" in str(errors0[0])
    assert steps0 == [1]
    assert sorted({storage.parse_part_name(n)[0] for n in storage.part_files(directory)}) == [1, 3]
    assert [c.step for c in ckptmgr.CheckpointManager(directory, read_only=True).checkpoints] == [1, 3]


def test_follow_lists_a_sharded_run_and_each_part_restores(tmp_path: Path) -> None:
    no_errors(run_ranks(2, lambda c: [ckptmgr.CheckpointManager(tmp_path, coordinator=c, sharded=True).save(
        s, shard(c.rank, s)) for s in (1, 2)]))
    followed = list(ckptmgr.follow(tmp_path, "latest", timeout=0))
    assert [i.step for i in followed] == [2] and len(followed[0].parts) == 2
    reader = ckptmgr.CheckpointManager(tmp_path, read_only=True)
    for rank in (0, 1):
        assert_tree_equal(reader.restore(followed[0].step, rank=rank), shard(rank, 2))
