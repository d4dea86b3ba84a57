"""The ``ckptmgr`` command, driven as a real subprocess on real checkpoint directories."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptmgr

CLI = [sys.executable, "-m", "ckptmgr"]
STEPS = (100, 200, 300, 400, 500)
BEST = 200  # val_loss is lowest there
TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def run(*args: object, cmd: list[str] = CLI) -> subprocess.CompletedProcess[str]:
    """Run the command; never raises on a non-zero exit (the tests check it)."""
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=60)


def run_json(*args: object) -> Any:
    """Run with ``--json``, expect exit 0 and strict JSON (no NaN/Infinity)."""
    result = run(*args, "--json")
    assert result.returncode == 0, result.stderr

    def reject(name: str) -> None:
        raise AssertionError(f"not strict JSON: {name}")

    return json.loads(result.stdout, parse_constant=reject)


def val_loss(step: int) -> float:
    return abs(step - BEST) / 100 + 0.1


def weights(step: int) -> np.ndarray[Any, Any]:
    # 64 KiB: the middle of the file lies in the array data.
    return np.arange(16384, dtype=np.float32) * step / 100


def state(step: int) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "params": {"w": weights(step), "b": np.zeros(3)},
        "opt": [np.ones(2), "adam"],
        "step": step,
        "dense/kernel": np.eye(2, dtype=np.float32),
    }
    if step == STEPS[-1]:  # the last one changes the tree's structure
        tree["params"]["b"] = np.zeros(4)  # shape
        tree["params"]["new"] = np.ones(4, np.int32)  # added
        tree["opt"][0] = np.ones(2, np.float32)  # dtype
        del tree["dense/kernel"]  # removed
    return tree


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Five checkpoints, best at step 200, a NaN metric on each."""
    directory = tmp_path / "run"
    with ckptmgr.CheckpointManager(directory, monitor="val_loss") as mgr:
        for step in STEPS:
            mgr.save(step, state(step), metrics={"val_loss": val_loss(step), "grad_norm": float("nan")})
    return directory


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def flip_middle_byte(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


def checkpoint(directory: Path, step: int) -> Path:
    return directory / f"ckpt-{step:09d}.h5"


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int, *needles: str) -> None:
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ckptmgr"), lines[0]
    for needle in needles:
        assert needle in lines[0]


# ---------------------------------------------------------------------------------- ls


def test_ls_shows_each_checkpoint_with_time_size_metrics_reasons_and_marks(run_dir: Path) -> None:
    result = run("ls", run_dir)
    assert result.returncode == 0, result.stderr
    rows = {int(line.split()[0]): line for line in result.stdout.splitlines()[1:-1]}
    assert sorted(rows) == list(STEPS)
    for step, line in rows.items():
        assert TIME.search(line)
        assert "KiB" in line
        assert f"val_loss={val_loss(step):g}" in line
        assert "grad_norm=nan" in line
    assert "best" in rows[BEST].split()[1]
    assert "latest" in rows[STEPS[-1]].split()[1]
    assert "latest" not in rows[BEST] and "best" not in rows[STEPS[-1]]
    assert "keep all" in rows[300]


def test_ls_json(run_dir: Path) -> None:
    out = run_json("ls", run_dir)
    assert out["latest"] == STEPS[-1] and out["best"] == BEST
    assert out["tracker"] == {"monitor": "val_loss", "mode": "min"}
    listed = out["checkpoints"]
    assert [c["step"] for c in listed] == list(STEPS)
    for c in listed:
        assert c["metrics"] == {"val_loss": val_loss(c["step"]), "grad_norm": None}  # NaN -> null
        assert c["file_bytes"] == os.path.getsize(c["path"]) == os.path.getsize(checkpoint(run_dir, c["step"]))
        assert c["kind"] == "native" and c["corrupt"] is None
        assert c["latest"] == (c["step"] == STEPS[-1]) and c["best"] == (c["step"] == BEST)
        assert "keep all" in c["keep_reasons"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", c["time_local"])


def test_ls_of_an_empty_managed_directory(tmp_path: Path) -> None:
    ckptmgr.CheckpointManager(tmp_path / "new").close()
    assert run_json("ls", tmp_path / "new")["checkpoints"] == []
    assert run("ls", tmp_path / "new").returncode == 0


# -------------------------------------------------------------------------------- show


@pytest.mark.parametrize(("which", "step"), [("latest", 500), ("best", BEST), ("300", 300), (None, 500)])
def test_show_metadata_and_tree(run_dir: Path, which: str | None, step: int) -> None:
    result = run("show", run_dir, *([which] if which else []))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert str(checkpoint(run_dir, step)) in out
    assert re.search(rf"^step\s+{step}\b", out, re.M)
    assert re.search(rf"^metrics\s+val_loss={val_loss(step):g}", out, re.M)
    assert re.search(r"^params/w\s+ndarray\s+float32\s+\[16384\]\s+65536$", out, re.M)
    assert re.search(r"^opt/1\s+str\s+uint8\s+\[4\]\s+4$", out, re.M)


def test_show_json(run_dir: Path) -> None:
    out = run_json("show", run_dir, "best")
    assert out["step"] == BEST and out["best"] and not out["latest"]
    assert out["meta"]["step"] == BEST and out["meta"]["metrics"]["grad_norm"] is None
    assert out["meta"]["tracker"]["monitor"] == "val_loss"
    leaves = {leaf["key"]: leaf for leaf in out["leaves"]}
    assert list(leaves) == ["params/w", "params/b", "opt/0", "opt/1", "step", "'dense/kernel'"]
    assert leaves["params/w"] == {"key": "params/w", "path": ["params", "w"], "kind": "ndarray",
                                  "dtype": "float32", "shape": [16384], "bytes": 65536}
    assert leaves["opt/0"]["path"] == ["opt", 0]
    assert leaves["'dense/kernel'"]["path"] == ["dense/kernel"]
    assert leaves["step"]["kind"] == "int" and leaves["step"]["shape"] == []


# ------------------------------------------------------------------------------ verify


def test_verify_all_good(run_dir: Path) -> None:
    result = run("verify", run_dir)
    assert result.returncode == 0, result.stderr
    assert [line.split()[:2] for line in result.stdout.splitlines()[:-1]] == [["ok", str(s)] for s in STEPS]
    assert "5 ok" in result.stdout.splitlines()[-1]
    assert result.stderr == ""  # not a terminal: no progress


def test_verify_names_the_corrupt_file_and_why(run_dir: Path) -> None:
    flip_middle_byte(checkpoint(run_dir, 300))
    result = run("verify", run_dir)
    assert result.returncode == 1
    bad = [line for line in result.stdout.splitlines() if line.startswith("CORRUPT")]
    assert len(bad) == 1
    assert str(checkpoint(run_dir, 300)) in bad[0] and "checksum mismatch" in bad[0]
    assert "4 ok, 1 corrupt" in result.stdout
    assert run("verify", run_dir, 100, "best", "latest").returncode == 0

    result = run("verify", run_dir, "--json")
    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert out["ok"] is False
    assert {c["step"]: c["status"] for c in out["checkpoints"]} == {100: "ok", 200: "ok", 300: "corrupt", 400: "ok", 500: "ok"}
    assert "checksum mismatch" in out["checkpoints"][2]["error"]


@pytest.mark.parametrize("args", [["999"], ["abc"], ["100", "-1"], ["--keep-last", "1"]], ids=str)
def test_verify_usage_errors_exit_2(run_dir: Path, args: list[str]) -> None:
    assert_one_line_error(run("verify", run_dir, *args), 2)


def test_verify_progress_on_stderr_when_asked(run_dir: Path) -> None:
    result = run("verify", run_dir, 100, "--progress", 300)  # options may sit between the steps
    assert result.returncode == 0
    assert [line.split()[:2] for line in result.stdout.splitlines()[:-1]] == [["ok", "100"], ["ok", "300"]]
    assert "[1/2]" in result.stderr and "[2/2]" in result.stderr
    assert run("verify", run_dir, "--no-progress").stderr == ""


def test_verify_progress_by_default_on_a_terminal(run_dir: Path) -> None:
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run([*CLI, "verify", str(run_dir)], stdout=subprocess.PIPE, stderr=terminal,
                                text=True, timeout=60)
    finally:
        os.close(terminal)
    progress = b""
    try:
        while chunk := os.read(controller, 65536):
            progress += chunk
    except OSError:  # EIO: the terminal's other end is closed and everything was read
        pass
    finally:
        os.close(controller)
    assert result.returncode == 0
    assert b"\r" in progress and b"[5/5] ckpt-000000500.h5" in progress  # one line, redrawn
    assert "[1/5]" not in result.stdout


# ------------------------------------------------------------------------------- prune


def test_prune_dry_run_removes_nothing(run_dir: Path) -> None:
    before = files(run_dir)
    result = run("prune", run_dir, "--keep-last", 1, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would remove 3 checkpoints" in result.stdout
    assert files(run_dir) == before
    out = run_json("prune", run_dir, "--keep-last", 1, "--dry-run")
    assert out["dry_run"] is True
    assert [c["step"] for c in out["removed"]] == [100, 300, 400]


def test_prune_never_removes_the_latest_or_the_best(run_dir: Path) -> None:
    out = run_json("prune", run_dir, "--keep-last", 1)
    assert {c["step"]: c["keep_reasons"] for c in out["kept"]} == {
        BEST: ["best val_loss"], 500: ["latest", "last 1"],
    }
    assert [c["step"] for c in out["removed"]] == [100, 300, 400] and out["failed"] == []
    assert files(run_dir) == [checkpoint(run_dir, s).name for s in (BEST, 500)]
    # The directory stays consistent for the library and for readers.
    listed = run_json("ls", run_dir)
    assert [c["step"] for c in listed["checkpoints"]] == [BEST, 500]
    assert listed["checkpoints"][1]["keep_reasons"] == ["latest", "last 1"]
    with ckptmgr.CheckpointManager(run_dir, monitor="val_loss") as mgr:
        assert [c.step for c in mgr.checkpoints] == [BEST, 500]
        assert mgr.best is not None and mgr.best.step == BEST


def test_prune_combines_policies(run_dir: Path) -> None:
    result = run("prune", run_dir, "--keep-last", 1, "--keep-every-steps", 200, "--keep-best", 2)
    assert result.returncode == 0, result.stderr
    # last 1: 500; every 200 steps: 100, 200, 400; best 2: 200, then 100 (ties with 300: earlier wins)
    assert files(run_dir) == [checkpoint(run_dir, s).name for s in (100, 200, 400, 500)]
    assert re.search(r"^removed\s+300\b", result.stdout, re.M)


def test_prune_refuses_while_a_writer_holds_the_lock(run_dir: Path) -> None:
    holder_code = (
        "import sys, ckptmgr\n"
        "mgr = ckptmgr.CheckpointManager(sys.argv[1])\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"  # hold the lock until the test closes our stdin
        "mgr.close()\n"
    )
    with subprocess.Popen([sys.executable, "-c", holder_code, str(run_dir)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdin is not None and holder.stdout is not None
        try:
            assert holder.stdout.readline().strip() == "locked"
            before = files(run_dir)
            assert_one_line_error(run("prune", run_dir, "--keep-last", 1), 1, "lock", str(run_dir))
            assert files(run_dir) == before
            assert run("prune", run_dir, "--keep-last", 1, "--dry-run").returncode == 0  # looking needs no lock
        finally:
            holder.stdin.close()
            assert holder.wait(timeout=30) == 0
    assert run("prune", run_dir, "--keep-last", 1).returncode == 0  # released: now it works
    assert len(files(run_dir)) == 2


def test_prune_usage_errors(run_dir: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("prune", run_dir), 2, "--keep-last")
    assert_one_line_error(run("prune", run_dir, "--keep-last", 0), 2)
    plain = tmp_path / "plain"
    with ckptmgr.CheckpointManager(plain) as mgr:  # no monitor: there is no "best"
        mgr.save(1, {"x": 1})
        mgr.save(2, {"x": 2})
    assert_one_line_error(run("prune", plain, "--keep-best", 1), 2, "--keep-best")
    assert run("prune", plain, "--keep-last", 1).returncode == 0
    assert files(plain) == [checkpoint(plain, 2).name]


def test_prune_removes_a_payload_with_its_metadata(tmp_path: Path) -> None:
    directory = tmp_path / "keras"
    with ckptmgr.CheckpointManager(directory, monitor="val_loss") as mgr:
        for step, loss in [(1, 0.5), (2, 0.7), (3, 0.6)]:
            def write(path: Path, step: int = step) -> None:
                path.write_bytes(bytes([step]) * 1000)

            mgr.save(step, ckptmgr.FilePayload(f"model-{step}.keras", write), metrics={"val_loss": loss})

    def sidecars() -> list[str]:
        return sorted(p.name for p in directory.glob(".ckptmgr-*.json") if p.name != ".ckptmgr-index.json")

    assert len(sidecars()) == 3
    assert run("verify", directory).returncode == 0
    shown = run_json("show", directory, 2)
    assert shown["kind"] == "payload" and shown["leaves"] is None
    assert shown["file_bytes"] == 1000 and shown["meta"]["size"] == 1000
    assert_one_line_error(run("diff", directory, 1, 3), 2, "native")

    assert run("prune", directory, "--keep-last", 1).returncode == 0
    assert files(directory) == ["model-1.keras", "model-3.keras"]  # best and latest
    assert len(sidecars()) == 2
    assert [c["step"] for c in run_json("ls", directory)["checkpoints"]] == [1, 3]


# -------------------------------------------------------------------------------- diff


def test_diff_json_reports_what_changed_and_by_how_much(run_dir: Path) -> None:
    out = run_json("diff", run_dir, 100, "latest")
    assert out["a"]["step"] == 100 and out["b"]["step"] == 500
    entries = {e["key"]: e for e in out["entries"]}
    w = entries["params/w"]
    a, b = weights(100).astype(np.float64), weights(500).astype(np.float64)
    assert w["status"] == "changed"
    assert w["max_abs_diff"] == pytest.approx(np.abs(b - a).max())
    assert w["norm_a"] == pytest.approx(np.linalg.norm(a))
    assert w["norm_b"] == pytest.approx(np.linalg.norm(b))
    assert w["norm_diff"] == pytest.approx(np.linalg.norm(b - a))
    assert w["changed_elements"] == 16383 and w["elements"] == 16384  # element 0 is 0 in both
    assert entries["params/b"]["status"] == "changed" and entries["params/b"]["shape_changed"]
    assert entries["opt/0"]["status"] == "changed" and entries["opt/0"]["dtype_changed"]
    assert entries["opt/0"]["max_abs_diff"] == 0.0
    assert entries["params/new"]["status"] == "added" and entries["params/new"]["norm_b"] == 2.0
    assert entries["'dense/kernel'"]["status"] == "removed"
    assert entries["step"]["status"] == "changed" and entries["step"]["max_abs_diff"] == 400
    assert entries["opt/1"]["status"] == "unchanged"
    assert out["summary"] == {"changed": 4, "added": 1, "removed": 1, "unchanged": 1}


def test_diff_text(run_dir: Path) -> None:
    result = run("diff", run_dir, 100, 300)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line.split() for line in result.stdout.splitlines()
            if line.split()[:1] in (["changed"], ["added"], ["removed"])}
    assert set(rows) == {"params/w", "step"}
    assert rows["params/w"][2:4] == ["float32[16384]", "float32[16384]"]
    assert float(rows["params/w"][4]) == pytest.approx(16383 * 2, rel=1e-5)
    assert "val_loss: 1.1 -> 1.1" in result.stdout
    same = run("diff", run_dir, "best", BEST)
    assert same.returncode == 0 and "no differences" in same.stdout


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        pytest.param(["ls", "{tmp}/nope"], 2, "no such directory", id="missing directory"),
        pytest.param(["show", "{tmp}/file"], 2, "not a directory", id="a file"),
        pytest.param(["verify", "{tmp}/other"], 2, "not a ckptmgr", id="not ckptmgr"),
        pytest.param(["show", "{run}", "42"], 2, "no checkpoint of step 42", id="unknown step"),
        pytest.param(["diff", "{run}", "100", "42"], 2, "step 42", id="unknown step in diff"),
        pytest.param(["diff", "{run}", "100", "x"], 2, "'x'", id="bad step"),
        pytest.param(["show", "{run}", "400"], 1, "ckpt-000000400.h5", id="unreadable file"),
        pytest.param(["diff", "{run}", "100", "300"], 1, "checksum mismatch", id="corrupt array"),
        pytest.param([], 2, "COMMAND", id="no command"),
        pytest.param(["frobnicate", "{run}"], 2, "frobnicate", id="unknown command"),
        pytest.param(["ls", "gs://bucket/run"], 2, "Only s3:// is supported", id="another scheme"),
        pytest.param(["ls", "s3://bucket/a//b"], 2, "Received: url='s3://bucket/a//b'", id="bad s3 url"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(
    run_dir: Path, tmp_path: Path, args: list[str], status: int, needle: str
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with open(checkpoint(run_dir, 400), "r+b") as fh:  # the HDF5 signature
        fh.write(b"XXXX")
    flip_middle_byte(checkpoint(run_dir, 300))
    result = run(*(a.format(tmp=tmp_path, run=run_dir) for a in args))
    assert_one_line_error(result, status, needle)
    assert result.stdout == ""


def test_ls_marks_an_unreadable_checkpoint(run_dir: Path) -> None:
    with open(checkpoint(run_dir, 400), "r+b") as fh:
        fh.write(b"XXXX")
    # Without the writer's index: a reader then shows its own keep reasons, which name
    # the corrupt checkpoints (with the index it shows the writer's, which cannot).
    (run_dir / ".ckptmgr-index.json").unlink()
    listed = {c["step"]: c for c in run_json("ls", run_dir)["checkpoints"]}
    assert listed[400]["corrupt"] and listed[300]["corrupt"] is None
    assert run("verify", run_dir, 400).returncode == 1


def test_help_and_version() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("ls", "show", "verify", "prune", "diff"):
        assert command in result.stdout
    assert run("--version").stdout.strip() == f"ckptmgr {ckptmgr.__version__}"


def test_installed_console_script(run_dir: Path) -> None:
    script = Path(sys.executable).with_name("ckptmgr")
    assert script.exists(), f"{script} is missing: pip install -e . installs it"
    result = run("ls", run_dir, "--json", cmd=[str(script)])
    assert result.returncode == 0, result.stderr
    assert [c["step"] for c in json.loads(result.stdout)["checkpoints"]] == list(STEPS)
    assert_one_line_error(run("verify", run_dir, "nope", cmd=[str(script)]), 2)
