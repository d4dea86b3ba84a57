"""Keras' own callback tests, run against ckptmgr's drop-in callbacks.

The keras wheel ships the tests of its callbacks (``keras/src/callbacks/*_test.py``).
This runner takes three of them from the *installed* wheel when pytest collects it
(``pytest_generate_tests``; nothing of Keras is copied into this repository) and runs
every test method in them as one pytest test each (id ``<module>.<TestCase>.<method>``),
with ``ModelCheckpoint``, ``BackupAndRestore`` and ``EarlyStopping`` replaced by
:mod:`ckptmgr.adapters.keras`'s:

1. **Load a private copy of each test module.** Its file is found through
   ``importlib.util.find_spec("keras.src.callbacks.<name>")`` (never imported as
   itself), and executed as a new module under a name of our own
   (``_ckptmgr_keras_conformance.<name>``). Keras' real test module, if anything else
   imported it, is untouched, and nothing of ours leaks into Keras.
2. **Swap the references, not the source.** After the module ran, every global of it
   that *is* ``keras.src.callbacks`` (the tests write ``callbacks.EarlyStopping(...)``)
   or another module holding Keras' classes becomes a proxy module in which the three
   names are ours and every other name (``callbacks.Callback``, ...) is Keras'; a
   global bound to one of Keras' three classes themselves becomes ours. Patching the
   namespace rather than rewriting source text survives reformatting and new tests; a
   module in which nothing could be swapped fails loudly (the tests would otherwise
   silently test Keras against itself).
3. **Guard each run.** While a test runs, constructing Keras' own ``ModelCheckpoint``,
   ``BackupAndRestore`` or ``EarlyStopping`` fails the test (a reference the swap
   missed), and a test that constructed none of ours fails too.

Each ``unittest`` method runs through ``TestCase.debug()`` (setUp, the test, tearDown;
its exceptions reach pytest unchanged), then its cleanups; Keras' temporary
directories go to pytest's ``tmp_path``. Pytest marks on Keras' methods are honoured:
``skip``, ``skipif`` and ``requires_trainable_backend`` (registered for
``--strict-markers``; skipped on the NumPy and OpenVINO backends, as Keras' conftest
does). One warning of ckptmgr's is expected and ignored (``NEW_MONITOR_WARNING``).

Tests that check Keras-private attributes or file layout, or behaviour that ckptmgr
changes on purpose, are listed in ``SKIPPED`` with the reason, and reported as
skipped with it; everything else must pass. A wheel without these test files (another
Keras version, a stripped install) skips them with a reason that says so.

The tests after the runner compare ckptmgr's errors and ``monitor_op`` with what
Keras' own classes produce for the same input: each error message must start with
Keras' exact wording.
"""

from __future__ import annotations

import functools
import importlib.util
import tempfile
import types
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from ckptmgr.adapters import keras as ours  # noqa: E402

# Keras' own weight saving converts TF variables with np.array(copy=False), which
# NumPy 2 reports as deprecated; Keras' code, not ours (as in test_keras_callbacks.py).
KERAS_SAVE_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
# ckptmgr's ModelCheckpoint remembers the best of its directory across runs, and warns
# when a new run monitors another metric there (the remembered best is dropped). Keras'
# test_model_checkpoint_options reuses one directory for several monitors; the warning
# is intended, and outside this suite's filterwarnings=error it is only printed.
NEW_MONITOR_WARNING = (
    "ignore:ckptmgr. the checkpoints in .* tracked .* starting a new best:ckptmgr.CheckpointWarning"
)
pytestmark = [pytest.mark.filterwarnings(KERAS_SAVE_WARNING), pytest.mark.filterwarnings(NEW_MONITOR_WARNING)]

SWAPPED = ("ModelCheckpoint", "BackupAndRestore", "EarlyStopping")
TEST_MODULES = ("model_checkpoint_test", "early_stopping_test", "backup_and_restore_test")
_PRIVATE_PREFIX = "_ckptmgr_keras_conformance"

# "<module>.<TestCase>.<method>" (the pytest id) -> why it is skipped. Each is a row of
# README.md's "Differences from Keras". test_skip_list_names_existing_tests fails on an
# entry that names no test of the installed Keras.
SKIPPED: dict[str, str] = {
    "backup_and_restore_test.BackupAndRestoreCallbackTest.test_best_case_step": (
        "exact mid-epoch resume (intentional): ckptmgr resumes at the batch after the backup, where Keras "
        "restarts the epoch and trains its first batches twice, so the test's count of 17 layer calls is 15 "
        "here; it also reads Keras-private attributes (_current_epoch, _last_batch_seen)"
    ),
    "backup_and_restore_test.BackupAndRestoreCallbackTest.test_best_case_epoch": (
        "reads the Keras-private attribute _current_epoch (the epoch to resume at is public here: "
        "BackupAndRestore.resumed_at)"
    ),
    "backup_and_restore_test.BackupAndRestoreCallbackTest.test_backup_corrupted": (
        "Keras-private file layout: reads _weights_path, _training_metadata_path and their .bkp copies and "
        "corrupts _weights_path; ckptmgr keeps checksummed checkpoints and falls back to the previous one "
        "itself (tests/test_keras_callbacks.py::test_backup_falls_back_to_the_previous_one_when_the_latest_is_corrupt)"
    ),
}


# ------------------------------------------------------------------ loading and swapping


class _CallbacksProxy(types.ModuleType):
    """A stand-in for a Keras callbacks module: ckptmgr's three classes, Keras' everything else."""

    def __init__(self, real: types.ModuleType) -> None:
        super().__init__(real.__name__, real.__doc__)
        self.__wrapped__ = real
        for name in SWAPPED:
            setattr(self, name, getattr(ours, name))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__wrapped__, name)


def _keras_classes() -> dict[str, type]:
    from keras.src import callbacks as keras_callbacks

    return {name: getattr(keras_callbacks, name) for name in SWAPPED}


def _swap(module: types.ModuleType) -> list[str]:
    """Point ``module``'s references to Keras' three callbacks at ours; returns what was swapped."""
    theirs = _keras_classes()
    by_id = {id(cls): name for name, cls in theirs.items()}
    swapped = []
    for attr, value in list(vars(module).items()):
        if isinstance(value, types.ModuleType) and any(
            getattr(value, name, None) is cls for name, cls in theirs.items()
        ):
            setattr(module, attr, _CallbacksProxy(value))
            swapped.append(f"{attr} (module {value.__name__})")
        elif isinstance(value, type) and id(value) in by_id:
            setattr(module, attr, getattr(ours, by_id[id(value)]))
            swapped.append(attr)
    return swapped


@functools.cache
def _load(stem: str) -> types.ModuleType | str:
    """A private, swapped copy of ``keras.src.callbacks.<stem>``, or why there is none."""
    try:
        spec = importlib.util.find_spec(f"keras.src.callbacks.{stem}")
    except ImportError as exc:
        return f"keras.src.callbacks cannot be imported ({exc})"
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return (
            f"keras {keras.__version__} does not ship keras/src/callbacks/{stem}.py "
            "(another Keras version, or a wheel without tests)"
        )
    name = f"{_PRIVATE_PREFIX}.{stem}"
    private = importlib.util.spec_from_file_location(name, spec.origin)
    assert private is not None and private.loader is not None
    module = importlib.util.module_from_spec(private)
    try:
        private.loader.exec_module(module)
    except ImportError as exc:  # a test-only dependency this environment lacks
        return f"{spec.origin} cannot be imported here ({exc})"
    swapped = _swap(module)
    if not swapped:
        raise AssertionError(
            f"{spec.origin} refers to none of keras.src.callbacks' {', '.join(SWAPPED)} the way this runner "
            "knows (a callbacks module, or the classes by name); update _swap()"
        )
    return module


KERAS_MARKERS = ("requires_trainable_backend: Keras' mark for tests that train (skipped on the NumPy backend)",)


def _cases(config: pytest.Config) -> list[Any]:
    """One pytest param per test method of the three modules (or one skip per missing module)."""
    registered = config.getini("markers")
    for line in KERAS_MARKERS:  # Keras' marks, known under --strict-markers
        if line not in registered:
            config.addinivalue_line("markers", line)
    cases = []
    for stem in TEST_MODULES:
        loaded = _load(stem)
        if isinstance(loaded, str):
            cases.append(pytest.param(stem, None, None, id=f"{stem}.missing", marks=pytest.mark.skip(reason=loaded)))
            continue
        loader = unittest.TestLoader()
        found = 0
        for _attr, cls in sorted(vars(loaded).items()):
            if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase) and cls.__module__ == loaded.__name__):
                continue
            for method in loader.getTestCaseNames(cls):
                key = f"{stem}.{cls.__name__}.{method}"
                marks = [pytest.mark.skip(reason=f"Keras' {method}: {SKIPPED[key]}")] if key in SKIPPED else []
                cases.append(pytest.param(stem, cls, method, id=key, marks=marks))
                found += 1
        if not found:
            raise AssertionError(f"{loaded.__file__} holds no unittest test methods; update this runner")
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.name == "test_keras":
        metafunc.parametrize("stem, case_class, method", _cases(metafunc.config))


def test_skip_list_names_existing_tests(pytestconfig: pytest.Config) -> None:
    """A test renamed or removed in Keras must not leave a stale entry in SKIPPED."""
    cases = _cases(pytestconfig)
    if all(case.id.endswith(".missing") for case in cases):
        pytest.skip("the installed keras ships none of the callback tests")
    assert sorted(set(SKIPPED) - {case.id for case in cases}) == []


# ------------------------------------------------------------------------------ running


def _mark_skip_reason(method: Callable[..., Any]) -> str | None:
    """Why Keras' pytest marks on ``method`` skip it here, or None."""
    for mark in getattr(method, "pytestmark", []):
        if mark.name == "skip":
            return str(mark.kwargs.get("reason", mark.args[0] if mark.args else "skipped by Keras' mark"))
        # Keras writes its conditions as booleans; a string condition is not evaluated here.
        if mark.name == "skipif" and any(c for c in mark.args if not isinstance(c, str)):
            return str(mark.kwargs.get("reason", "skipif condition of Keras' mark"))
        if mark.name == "requires_trainable_backend" and keras.backend.backend() in ("numpy", "openvino"):
            return f"requires a trainable backend (Keras' mark); backend is {keras.backend.backend()}"
    return None


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the ckptmgr callbacks constructed; constructing Keras' own fails the test."""
    made = dict.fromkeys(SWAPPED, 0)
    for name, cls in _keras_classes().items():

        def refuse(self: Any, *args: Any, _name: str = name, **kwargs: Any) -> None:
            raise AssertionError(f"keras.callbacks.{_name} was constructed: the swap to ckptmgr's missed a reference")

        monkeypatch.setattr(cls, "__init__", refuse)
    for name in SWAPPED:
        cls = getattr(ours, name)
        original = cls.__init__

        @functools.wraps(original)
        def counting(self: Any, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> None:
            made[_name] += 1
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    return made


def test_keras(stem: str, case_class: type[unittest.TestCase], method: str, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch, guarded: dict[str, int]) -> None:
    reason = _mark_skip_reason(getattr(case_class, method))
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # Keras' get_temp_dir()
    monkeypatch.chdir(tmp_path)  # some tests pass relative directories
    case = case_class(method)
    try:
        case.debug()
    finally:
        case.doCleanups()
    assert sum(guarded.values()) > 0, f"{stem}: the test constructed none of ckptmgr's {', '.join(SWAPPED)}"


# --------------------------------------------- errors worded as Keras', monitor_op as Keras'
#
# Keras' own classes produce the expected wording here, at test time: ckptmgr's message
# must start with exactly what Keras says for the same mistake (its own detail follows).


def _error(make: Callable[[], Any]) -> BaseException:
    try:
        make()
    except Exception as exc:
        return exc
    raise AssertionError(f"{make} raised nothing")


def _message(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        pytest.param("ModelCheckpoint", dict(filepath="m.keras", save_freq="invalid_save_freq"), id="mc-save-freq"),
        pytest.param("ModelCheckpoint", dict(filepath="m.keras", save_freq=2.5), id="mc-save-freq-float"),
        pytest.param("ModelCheckpoint", dict(filepath="m.ckpt"), id="mc-suffix"),
        pytest.param("ModelCheckpoint", dict(filepath=""), id="mc-empty"),
        pytest.param("ModelCheckpoint", dict(filepath="m.keras", save_weights_only=True), id="mc-weights-suffix"),
        pytest.param("BackupAndRestore", dict(backup_dir=""), id="br-empty-dir"),
        pytest.param("BackupAndRestore", dict(backup_dir=None), id="br-none-dir"),
        pytest.param("BackupAndRestore", dict(backup_dir="b", save_freq="batch"), id="br-save-freq"),
        pytest.param("BackupAndRestore", dict(backup_dir="b", save_freq=0.15), id="br-save-freq-float"),
    ],
)
def test_argument_errors_start_with_keras_wording(name: str, kwargs: dict[str, Any]) -> None:
    theirs = _error(lambda: getattr(keras.callbacks, name)(**kwargs))
    mine = _error(lambda: getattr(ours, name)(**kwargs))
    assert isinstance(theirs, ValueError) and isinstance(mine, ValueError)
    assert _message(mine).startswith(_message(theirs)), (_message(mine), _message(theirs))
    assert len(_message(mine)) > len(_message(theirs)), "ckptmgr's own detail follows Keras' wording"


@pytest.mark.parametrize(
    "template, logs",
    [
        pytest.param("m-{val_acc:.2f}.keras", {"loss": 1.0}, id="missing-key"),
        pytest.param("m-{epoch:s}.keras", {}, id="bad-format-spec"),
    ],
)
def test_filepath_format_errors_start_with_keras_wording(template: str, logs: dict[str, float]) -> None:
    theirs = _error(lambda: keras.callbacks.ModelCheckpoint(template)._get_file_path(0, None, logs))
    mine = _error(lambda: ours.ModelCheckpoint(template).format_filepath(0, None, logs))
    assert isinstance(mine, type(theirs)) or isinstance(theirs, TypeError)
    assert _message(mine).startswith(_message(theirs)), (_message(mine), _message(theirs))


def _tiny_model() -> Any:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


@pytest.mark.parametrize("name", ["EarlyStopping", "ModelCheckpoint"])
def test_undecidable_direction_error_starts_with_keras_wording(tmp_path: Path, name: str) -> None:
    def callback(module: Any) -> Any:
        if name == "EarlyStopping":
            return module.EarlyStopping(monitor="wobble")
        return module.ModelCheckpoint(str(tmp_path / f"{module.__name__}.keras"), monitor="wobble", save_best_only=True)

    model = _tiny_model()
    messages = []
    for module in (keras.callbacks, ours):
        cb = callback(module)
        cb.set_model(model)
        cb.on_train_begin()
        cb.on_epoch_begin(0)
        messages.append(_message(_error(lambda cb=cb: cb.on_epoch_end(0, {"loss": 1.0, "wobble": 0.5}))))
        cb.on_train_end()
    theirs, mine = messages
    assert mine.startswith(theirs) and "mode='min' or mode='max'" in mine[len(theirs):]


def test_directory_as_filepath_error_starts_with_keras_wording(tmp_path: Path) -> None:
    target = tmp_path / "m.keras"
    target.mkdir()
    x, y = np.ones((4, 2), "float32"), np.ones((4, 1), "float32")
    messages = []
    for module in (keras.callbacks, ours):
        model = _tiny_model()
        cb = module.ModelCheckpoint(str(target), monitor="loss")
        exc = _error(lambda cb=cb, model=model: model.fit(x, y, epochs=1, verbose=0, callbacks=[cb]))
        assert isinstance(exc, OSError)
        messages.append(_message(exc))
    theirs, mine = messages
    assert mine.startswith(theirs)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["m.keras"]


@pytest.mark.parametrize(
    "monitor, mode, expected",
    [("loss", "auto", "less"), ("val_loss", "auto", "less"), ("loss", "max", "greater"), ("wobble", "min", "less")],
)
def test_monitor_op_is_keras_comparator_of_the_direction(monitor: str, mode: str, expected: str) -> None:
    model = _tiny_model()
    logs = {"loss": 1.0, "val_loss": 1.0, "wobble": 1.0}
    results = []
    for module in (keras.callbacks, ours):
        cb = module.EarlyStopping(monitor=monitor, mode=mode)
        assert cb.monitor_op is None  # decided at the first epoch end, as in Keras
        cb.set_model(model)
        cb.on_train_begin()
        cb.on_epoch_begin(0)
        cb.on_epoch_end(0, logs)
        results.append(cb.monitor_op)
    assert results[1] is results[0] is getattr(keras.ops, expected)
    assert ours.EarlyStopping(monitor=monitor, mode=mode).monitor_op is None


def test_monitor_op_set_by_the_user_sets_the_direction(tmp_path: Path) -> None:
    stopper = ours.EarlyStopping(monitor="loss", patience=1)
    stopper.monitor_op = np.greater  # Keras 2 code sets NumPy's comparators
    assert stopper.direction == "max" and stopper.monitor_op is keras.ops.greater
    stopper.set_model(_tiny_model())
    stopper.on_train_begin()
    for epoch, loss in enumerate([1.0, 2.0, 1.5, 1.2]):  # larger is better now
        stopper.on_epoch_begin(epoch)
        stopper.on_epoch_end(epoch, {"loss": loss})
    assert stopper.best == 2.0 and stopper.stopped_epoch == 3
    stopper.monitor_op = None  # decided again from mode at the next epoch end, as in Keras
    assert stopper.direction is None
    with pytest.raises(ValueError, match=r"monitor_op to be keras\.ops\.less"):
        stopper.monitor_op = lambda a, b: a < b
    checkpoint = ours.ModelCheckpoint(str(tmp_path / "m.keras"), monitor="val_thing")
    checkpoint.monitor_op = keras.ops.less
    assert checkpoint.monitor_op is keras.ops.less
