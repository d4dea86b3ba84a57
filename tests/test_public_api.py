"""The public surface: it changes only on purpose (update this file in the same commit)."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest

import ckptmgr

EXPECTED_ALL = [
    "CheckpointDescription",
    "CheckpointError",
    "CheckpointIOError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "Coordinator",
    "CoordinatorError",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "EverySeconds",
    "EverySteps",
    "FilePayload",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepReason",
    "LeafInfo",
    "MetricTracker",
    "MissingMetricWarning",
    "ObjectStoreError",
    "ObjectURL",
    "OnImprovement",
    "RetentionContext",
    "RetentionPolicy",
    "SaveContext",
    "SavePolicy",
    "StepOrderError",
    "Which",
    "__version__",
    "follow",
    "is_checkpoint_directory",
]


def test_all_is_exactly_the_expected_sorted_list() -> None:
    assert ckptmgr.__all__ == EXPECTED_ALL
    assert sorted(ckptmgr.__all__) == ckptmgr.__all__
    for name in ckptmgr.__all__:
        assert hasattr(ckptmgr, name), name


def test_nothing_public_is_missing_from_all() -> None:
    public = {n for n, v in vars(ckptmgr).items()
              if not n.startswith("_") and not inspect.ismodule(v) and n != "annotations"}
    assert public <= set(EXPECTED_ALL)


def test_version() -> None:
    assert isinstance(ckptmgr.__version__, str)
    assert all(part.isdigit() for part in ckptmgr.__version__.split(".")[:2])


@pytest.mark.parametrize(
    ("error", "bases"),
    [
        (ckptmgr.CheckpointError, (Exception,)),
        (ckptmgr.CheckpointNotFoundError, (ckptmgr.CheckpointError, FileNotFoundError)),
        (ckptmgr.CorruptCheckpointError, (ckptmgr.CheckpointError, ValueError)),
        (ckptmgr.DirectoryLockedError, (ckptmgr.CheckpointError, BlockingIOError)),
        (ckptmgr.CheckpointIOError, (ckptmgr.CheckpointError, OSError)),
        (ckptmgr.ObjectStoreError, (ckptmgr.CheckpointIOError,)),
        (ckptmgr.StepOrderError, (ckptmgr.CheckpointError, ValueError)),
        (ckptmgr.CheckpointWarning, (UserWarning,)),
        (ckptmgr.MissingMetricWarning, (ckptmgr.CheckpointWarning,)),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_error_hierarchy(error: type, bases: tuple[type, ...]) -> None:
    for base in bases:
        assert issubclass(error, base)


def test_checkpoint_io_error_carries_path_errno_and_cause() -> None:
    import errno

    cause = OSError(errno.ENOSPC, "No space left on device")
    exc = ckptmgr.CheckpointIOError("Cannot write /x/ckpt-000000001.h5: disk full (ENOSPC)", "/x/ckpt-000000001.h5",
                                    cause)
    assert exc.errno == errno.ENOSPC
    assert exc.filename == exc.path == "/x/ckpt-000000001.h5"
    assert str(exc) == "Cannot write /x/ckpt-000000001.h5: disk full (ENOSPC)"


def test_checkpoint_manager_signature() -> None:
    """The argument names of DESIGN.md are fixed, keyword-only after the directory."""
    params = inspect.signature(ckptmgr.CheckpointManager).parameters
    assert next(iter(params)) == "directory"
    fixed = {"save_every": None, "keep": None, "monitor": None, "mode": "auto", "min_delta": 0.0,
             "best_only": False, "async_save": False}
    for name, default in fixed.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name
    methods = {"save", "restore", "restore_or_initialize", "should_save", "wait", "close", "__enter__", "__exit__"}
    assert methods <= set(dir(ckptmgr.CheckpointManager))
    for prop in ("latest", "best", "checkpoints"):
        assert isinstance(inspect.getattr_static(ckptmgr.CheckpointManager, prop), property), prop
    save = inspect.signature(ckptmgr.CheckpointManager.save).parameters
    assert save["metrics"].kind is save["force"].kind is inspect.Parameter.KEYWORD_ONLY


def test_checkpoint_info_fields() -> None:
    names = [f.name for f in dataclasses.fields(ckptmgr.CheckpointInfo)]
    assert names[:6] == ["step", "path", "metrics", "time", "nbytes", "keep_reasons"]


def test_core_imports_no_ml_framework() -> None:
    code = (
        "import sys, ckptmgr, ckptmgr.codec, ckptmgr.storage, ckptmgr.policies, ckptmgr.metrics, ckptmgr.manager;"
        "print(sorted(m for m in ('tensorflow', 'keras', 'torch', 'jax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_the_cli_uses_only_the_public_api() -> None:
    """The ``ckptmgr`` command is a user of the library like any other: it imports only
    names in ``ckptmgr.__all__`` (and its own modules), never a private module."""
    import ast
    from pathlib import Path

    cli = Path(ckptmgr.__file__).parent / "cli"
    files = sorted(cli.glob("*.py"))
    assert files, "no cli package"
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the cli package's own modules
                    assert node.level == 1, f"{path.name}: from {'.' * node.level}{node.module} import ..."
                    continue
                if node.module == "ckptmgr":
                    for alias in node.names:
                        assert alias.name in ckptmgr.__all__, f"{path.name}: imports private ckptmgr.{alias.name}"
                else:
                    assert not (node.module or "").startswith("ckptmgr"), f"{path.name}: from {node.module} import ..."
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("ckptmgr"), f"{path.name}: import {alias.name}"
