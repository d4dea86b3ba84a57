"""Faults: disk full on a real (tmpfs) file system, injected OS errors, damaged files.

Invariant 9: an OS error surfaces as a CheckpointIOError (a CheckpointError and an
OSError) naming the path and the cause; no earlier checkpoint is touched; the manager
stays usable. Invariant 4: restore() falls back past a damaged newest checkpoint with a
warning naming it; restore(step) of a damaged one raises CorruptCheckpointError.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import assert_tree_equal, checkpoint_files, temp_files

from ckptmgr import (
    CheckpointError,
    CheckpointIOError,
    CheckpointManager,
    CheckpointWarning,
    CorruptCheckpointError,
    KeepLast,
)


def state_of(step: int, n: int = 1000) -> dict[str, Any]:
    return {"step": step, "w": np.arange(n, dtype=np.float64) + step, "meta": [f"s{step}", (step, None)]}


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every checkpoint file with its inode, mtime and bytes: to prove nothing was touched."""
    out = {}
    for name in checkpoint_files(directory):
        st = os.stat(directory / name)
        out[name] = (st.st_ino, st.st_mtime_ns, (directory / name).read_bytes())
    return out


def open_fds_under(directory: Path) -> list[str]:
    """Files this process still has open under ``directory`` (a leaked HDF5 handle, say)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)) and not target.endswith(".ckptmgr.lock"):
            out.append(target)
    return out


# ----------------------------------------------------------------------- disk full


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[tuple[Path, Callable[[str], None]]]:
    """A 2 MiB tmpfs, and a function to resize it; unmounted at the end."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True, capture_output=True,
                       timeout=60)

    try:
        yield mnt, resize
    finally:
        done = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)


def many_leaves(step: int, n: int) -> dict[str, Any]:
    return {"step": step, "leaves": {f"k{i}": np.full(40, step + i, dtype=np.int32) for i in range(n)}}


DISK_FULL_STATES = [
    pytest.param("2m", lambda step: state_of(step, 40_000), id="320KB-arrays"),
    pytest.param("2m", lambda step: state_of(step, 110_000), id="880KB-arrays"),
    pytest.param("2m", lambda step: state_of(step, 300_000), id="too-big-for-the-disk"),
    pytest.param("2m", lambda step: state_of(step, 9_000), id="72KB-arrays"),
    pytest.param("160k", lambda step: many_leaves(step, 100), id="metadata-heavy"),
]


@pytest.mark.parametrize(("size", "make_state"), DISK_FULL_STATES)
def test_disk_full(tmpfs: tuple[Path, Callable[[str], None]], size: str, make_state: Callable[[int], Any]) -> None:
    mnt, resize = tmpfs
    resize(size)
    mgr = CheckpointManager(mnt, monitor="val_loss")
    saved: list[int] = []
    with pytest.raises(CheckpointIOError) as excinfo:
        for step in range(1000):
            mgr.save(step, make_state(step), metrics={"val_loss": 1.0 / (step + 1)})
            saved.append(step)
    failed = len(saved)
    exc = excinfo.value
    assert isinstance(exc, CheckpointError) and isinstance(exc, OSError)
    assert exc.errno == errno.ENOSPC
    path = str(mnt / f"ckpt-{failed:09d}.h5")
    assert exc.filename == path
    assert path in str(exc) and "ENOSPC" in str(exc)
    # Every earlier checkpoint is intact; nothing of the failed one is left behind.
    assert [c.step for c in mgr.checkpoints] == saved
    assert checkpoint_files(mnt) == [f"ckpt-{s:09d}.h5" for s in saved]
    assert temp_files(mnt) == []
    assert open_fds_under(mnt) == []
    for step in saved:
        assert_tree_equal(mgr.restore(step), make_state(step))
    # Once there is room, the same manager saves again.
    resize("16m")
    assert mgr.save(failed, make_state(failed), metrics={"val_loss": 0.0}) is not None
    assert_tree_equal(mgr.restore(), make_state(failed))
    assert mgr.best is not None and mgr.best.step == failed
    mgr.close()
    with CheckpointManager(mnt, read_only=True) as reader:
        assert [c.step for c in reader.checkpoints] == [*saved, failed]


def test_disk_full_in_the_background_writer(tmpfs: tuple[Path, Callable[[str], None]]) -> None:
    mnt, resize = tmpfs
    mgr = CheckpointManager(mnt, async_save=True)
    saved: list[int] = []
    with pytest.raises(CheckpointIOError) as excinfo:
        for step in range(100):
            mgr.save(step, state_of(step, 40_000))
            mgr.wait()
            saved.append(step)
    assert excinfo.value.errno == errno.ENOSPC and "ENOSPC" in str(excinfo.value)
    assert [c.step for c in mgr.checkpoints] == saved
    assert temp_files(mnt) == []
    resize("16m")
    mgr.save(len(saved), state_of(len(saved), 40_000))
    mgr.close()
    with CheckpointManager(mnt, read_only=True) as reader:
        assert_tree_equal(reader.restore(), state_of(len(saved), 40_000))


def test_disk_full_is_survived_by_a_new_writer_too(tmpfs: tuple[Path, Callable[[str], None]]) -> None:
    mnt, resize = tmpfs
    with CheckpointManager(mnt) as mgr, pytest.raises(CheckpointIOError):
        for step in range(100):
            mgr.save(step, state_of(step, 40_000))
    resize("16m")
    with CheckpointManager(mnt) as mgr:
        steps = [c.step for c in mgr.checkpoints]
        assert steps == list(range(len(steps))) and steps
        for step in steps:
            assert_tree_equal(mgr.restore(step), state_of(step, 40_000))


# -------------------------------------------------------------- injected OS errors


def _fail_for_checkpoints(real: Callable[..., Any], code: int, *, arg: int = 1) -> Callable[..., Any]:
    """Wrap an os function so that it fails with ``code`` when argument ``arg`` names a checkpoint."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        target = os.fspath(args[arg]) if len(args) > arg else ""
        if os.path.basename(target).startswith("ckpt-"):
            raise OSError(code, os.strerror(code), target)
        return real(*args, **kwargs)

    return wrapper


def _failing_fsync(code: int) -> Callable[[int], None]:
    def fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    return fsync


INJECTED = [
    pytest.param("replace", errno.EACCES, id="replace-EACCES"),
    pytest.param("replace", errno.EIO, id="replace-EIO"),
    pytest.param("replace", errno.EROFS, id="replace-EROFS"),
    pytest.param("fsync", errno.EIO, id="fsync-EIO"),
    pytest.param("fsync", errno.ENOSPC, id="fsync-ENOSPC"),
]


@pytest.mark.parametrize(("function", "code"), INJECTED)
def test_injected_write_errors(ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch, function: str, code: int) -> None:
    name = errno.errorcode[code]
    with CheckpointManager(ckpt_dir, keep=KeepLast(2), monitor="val_loss") as mgr:
        mgr.save(1, state_of(1), metrics={"val_loss": 0.5})
        mgr.save(2, state_of(2), metrics={"val_loss": 0.6})
        before = snapshot(ckpt_dir)
        with monkeypatch.context() as patch:
            if function == "replace":
                patch.setattr(os, "replace", _fail_for_checkpoints(os.replace, code))
            else:
                patch.setattr(os, "fsync", _failing_fsync(code))
            with pytest.raises(CheckpointIOError) as excinfo:
                mgr.save(3, state_of(3), metrics={"val_loss": 0.7})
        exc = excinfo.value
        path = str(ckpt_dir / "ckpt-000000003.h5")
        assert exc.errno == code and exc.filename == path
        assert path in str(exc) and name in str(exc)
        assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == code
        # Nothing earlier was touched (not even by retention), nothing was left behind.
        assert snapshot(ckpt_dir) == before
        assert temp_files(ckpt_dir) == []
        assert [c.step for c in mgr.checkpoints] == [1, 2]
        # Usable again: the retried save commits and retention resumes.
        mgr.save(3, state_of(3), metrics={"val_loss": 0.7})
        mgr.save(4, state_of(4), metrics={"val_loss": 0.8})
        assert [c.step for c in mgr.checkpoints] == [1, 3, 4]
        assert_tree_equal(mgr.restore(), state_of(4))
        assert_tree_equal(mgr.restore("best"), state_of(1))


def test_cleanup_failure_leaves_a_leftover_that_the_next_open_removes(ckpt_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, state_of(1))
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", _fail_for_checkpoints(os.replace, errno.EIO))
            patch.setattr(os, "unlink", _fail_tmp_unlink(os.unlink))
            with pytest.raises(CheckpointIOError, match="EIO"):
                mgr.save(2, state_of(2))
        assert len(temp_files(ckpt_dir)) == 1  # the temporary file could not be removed
        assert [c.step for c in mgr.checkpoints] == [1]
        # The leftover is never mistaken for a checkpoint.
        assert_tree_equal(mgr.restore(), state_of(1))
    with CheckpointManager(ckpt_dir) as mgr:
        assert temp_files(ckpt_dir) == []
        assert [c.step for c in mgr.checkpoints] == [1]


def _fail_tmp_unlink(real: Callable[..., Any]) -> Callable[..., Any]:
    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.path.basename(os.fspath(path)).startswith(".ckpt-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))
        real(path, *args, **kwargs)

    return unlink


def test_retention_delete_failure_warns_and_is_retried(ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with CheckpointManager(ckpt_dir, keep=KeepLast(1)) as mgr:
        mgr.save(1, state_of(1))
        with monkeypatch.context() as patch:
            patch.setattr(os, "unlink", _fail_for_checkpoints(os.unlink, errno.EACCES, arg=0))
            with pytest.warns(CheckpointWarning, match=r"cannot delete .*ckpt-000000001\.h5.*Permission denied"):
                info = mgr.save(2, state_of(2))
        assert info is not None  # the save itself succeeded
        reasons = {c.step: c.keep_reasons for c in mgr.checkpoints}
        assert reasons[2] == ("latest", "last 1")
        assert len(reasons[1]) == 1 and reasons[1][0].startswith("not deleted:")
        mgr.save(3, state_of(3))
        assert [c.step for c in mgr.checkpoints] == [3]
    assert checkpoint_files(ckpt_dir) == ["ckpt-000000003.h5"]


def test_directory_that_cannot_be_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointIOError, match=str(blocker)):
        CheckpointManager(blocker)
    with pytest.raises(CheckpointIOError, match=str(blocker / "sub")):
        CheckpointManager(blocker / "sub")

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(CheckpointIOError, match="EROFS") as excinfo:
        CheckpointManager(tmp_path / "new")
    assert excinfo.value.errno == errno.EROFS and str(tmp_path / "new") in str(excinfo.value)


def test_failed_save_does_not_count_as_best(ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with CheckpointManager(ckpt_dir, monitor="val_loss", best_only=True) as mgr:
        mgr.save(1, state_of(1), metrics={"val_loss": 0.5})
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", _fail_for_checkpoints(os.replace, errno.EIO))
            with pytest.raises(CheckpointIOError):
                mgr.save(2, state_of(2), metrics={"val_loss": 0.3})
        # Retrying the step saves it: no checkpoint holds that value yet, so it still improves.
        assert mgr.save(2, state_of(2), metrics={"val_loss": 0.3}) is not None
        assert mgr.best is not None and mgr.best.step == 2


# ------------------------------------------------------------------ damaged files


@pytest.fixture
def three(ckpt_dir: Path) -> Path:
    """A directory with checkpoints 1, 2, 3 (3 is the best) written and closed."""
    with CheckpointManager(ckpt_dir, monitor="val_loss") as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state_of(step), metrics={"val_loss": 1.0 / step})
    return ckpt_dir


def ckpt(directory: Path, step: int) -> Path:
    return directory / f"ckpt-{step:09d}.h5"


def flip(path: Path, position: int, bit: int = 0, *, keep_mtime: bool = False) -> None:
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def data_offset(path: Path, dataset: str = "state/w") -> int:
    with h5py.File(path, "r") as f:
        return int(f[dataset].id.get_offset())


def assert_falls_back(directory: Path, bad: Path, expected_step: int, **kwargs: Any) -> None:
    for mgr in (CheckpointManager(directory, read_only=True), CheckpointManager(directory, **kwargs)):
        with mgr, pytest.warns(CheckpointWarning, match=str(bad)):
            restored = mgr.restore()
        assert_tree_equal(restored, state_of(expected_step))


@pytest.mark.parametrize("where", ["array-data", "manifest", "superblock"])
def test_bit_flip_in_the_newest_falls_back_with_a_warning(three: Path, where: str) -> None:
    bad = ckpt(three, 3)
    position = {
        "array-data": data_offset(bad) + 8 * 500 + 3,
        "manifest": data_offset(bad, "ckptmgr_manifest") + 20,
        "superblock": 0,
    }[where]
    flip(bad, position, 2)
    assert_falls_back(three, bad, 2)
    with CheckpointManager(three, monitor="val_loss") as mgr:
        with pytest.raises(CorruptCheckpointError, match=str(bad)) as excinfo:
            mgr.restore(3)
        assert isinstance(excinfo.value, ValueError)
        if where == "array-data":
            # The metadata is intact, so 3 is still the best: exactly that one, no fallback.
            with pytest.raises(CorruptCheckpointError, match=str(bad)):
                mgr.restore("best")
        else:
            # Its metrics are unreadable: it is never ranked best.
            assert mgr.best is not None and mgr.best.step == 2
            assert any(r.startswith("corrupt: ") for r in mgr.checkpoints[-1].keep_reasons)
        assert_tree_equal(mgr.restore(2), state_of(2))


def test_damage_behind_an_up_to_date_index_is_still_caught(three: Path) -> None:
    """The index cache says the file is fine (same size and mtime): restore verifies anyway."""
    bad = ckpt(three, 3)
    flip(bad, data_offset(bad) + 100, 5, keep_mtime=True)
    assert_falls_back(three, bad, 2)
    bad.unlink()
    # The same with the manifest, which the index caches.
    bad = ckpt(three, 2)
    flip(bad, data_offset(bad, "ckptmgr_manifest") + 7, 1, keep_mtime=True)
    assert_falls_back(three, bad, 1)


def test_random_bit_flips_in_the_newest_never_give_wrong_data(three: Path) -> None:
    bad = ckpt(three, 3)
    pristine = bad.read_bytes()
    rnd = random.Random(7)
    positions = rnd.sample(range(0, 4096), 40) + rnd.sample(range(len(pristine) - 2048, len(pristine)), 30)
    fell_back = 0
    for position in positions:
        data = bytearray(pristine)
        data[position] ^= 1 << rnd.randrange(8)
        bad.write_bytes(bytes(data))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restored = CheckpointManager(three, read_only=True).restore()
        assert all(issubclass(w.category, CheckpointWarning) and str(bad) in str(w.message) for w in caught)
        expected = 3 if not caught else 2
        fell_back += bool(caught)
        assert_tree_equal(restored, state_of(expected))
    assert fell_back > 0


@pytest.mark.parametrize("keep_fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_newest_falls_back(three: Path, keep_fraction: float) -> None:
    bad = ckpt(three, 3)
    data = bad.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep_fraction)])
    assert_falls_back(three, bad, 2)
    with CheckpointManager(three) as mgr, pytest.raises(CorruptCheckpointError, match=str(bad)):
        mgr.restore(3)


def test_all_corrupt(three: Path) -> None:
    for step in (1, 2, 3):
        path = ckpt(three, step)
        path.write_bytes(path.read_bytes()[:1000])
    calls = []
    with CheckpointManager(three) as mgr:
        with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpointError, match="verifies"):
            mgr.restore()
        # Initialising would silently throw the run away.
        with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpointError):
            mgr.restore_or_initialize(lambda: calls.append(1))
    assert calls == []


def test_a_file_swapped_between_two_steps_is_detected(three: Path) -> None:
    shutil.copyfile(ckpt(three, 2), ckpt(three, 3))
    with CheckpointManager(three) as mgr:
        with pytest.raises(CorruptCheckpointError, match=r"holds step 2"):
            mgr.restore(3)
        with pytest.warns(CheckpointWarning, match=str(ckpt(three, 3))):
            assert_tree_equal(mgr.restore(), state_of(2))
    # Both ways round: neither is taken for the other.
    os.replace(ckpt(three, 1), three / "tmp")
    os.replace(ckpt(three, 2), ckpt(three, 1))
    os.replace(three / "tmp", ckpt(three, 2))
    with CheckpointManager(three, read_only=True) as reader:
        for step in (1, 2, 3):
            with pytest.raises(CorruptCheckpointError, match="holds step"):
                reader.restore(step)


def test_corruption_while_the_writer_is_open(three: Path) -> None:
    with CheckpointManager(three, monitor="val_loss") as mgr:
        bad = ckpt(three, 3)
        flip(bad, data_offset(bad) + 16, 0)
        with pytest.warns(CheckpointWarning, match=str(bad)):
            assert_tree_equal(mgr.restore(), state_of(2))
        mgr.save(4, state_of(4), metrics={"val_loss": 0.1})
        assert_tree_equal(mgr.restore(), state_of(4))


def test_an_empty_file_under_a_checkpoint_name_is_skipped(three: Path) -> None:
    ckpt(three, 9).write_bytes(b"")
    assert_falls_back(three, ckpt(three, 9), 3)
    with CheckpointManager(three, read_only=True) as reader:
        assert reader.latest is not None and reader.latest.step == 9
        assert any(r.startswith("corrupt: ") for r in reader.latest.keep_reasons)
