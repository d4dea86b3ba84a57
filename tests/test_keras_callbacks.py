"""ckptmgr.adapters.keras against keras.callbacks on identical deterministic runs, and
what Keras lacks: retention, a best that survives restarts, safe file names, resume."""

from __future__ import annotations

import doctest
from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import _keras_child as child  # noqa: E402

import ckptmgr  # noqa: E402
from ckptmgr.adapters import keras as ck  # noqa: E402

# Keras' own weight saving converts TF variables with np.array(copy=False), which
# NumPy 2 reports as deprecated; both implementations call it, so it is not ours.
KERAS_SAVE_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
pytestmark = pytest.mark.filterwarnings(KERAS_SAVE_WARNING)


class FreshModel:
    """One model, reset to the same initial state for every run.

    Reusing it keeps Keras' traced train and test functions: a new model would be
    traced again in every fit(), which is most of the time of these tiny runs.
    """

    def __init__(self) -> None:
        self.model = child.make_model()
        self.model.build((None, 4))
        self.model.optimizer.build(self.model.trainable_variables)
        self.initial = ck.to_tree({"model": self.model, "optimizer": self.model.optimizer})

    def __call__(self) -> Any:
        ck.load_tree({"model": self.model, "optimizer": self.model.optimizer}, self.initial)
        self.model.stop_training = False
        return self.model


@pytest.fixture(scope="module")
def fresh() -> FreshModel:
    return FreshModel()


def fit(model: Any, callbacks: list[Any], *, epochs: int = 4, validation: bool = True, **kwargs: Any) -> Any:
    x, y, vx, vy = child.data()
    return model.fit(
        x, y, batch_size=child.BATCH, epochs=epochs, shuffle=False, verbose=0,
        validation_data=(vx, vy) if validation else None, callbacks=callbacks, **kwargs,
    )


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def file_weights(path: Path) -> list[np.ndarray]:
    if path.name.endswith(".weights.h5"):
        model = child.make_model(compiled=False)
        model.build((None, 4))  # uncompiled: the file's optimizer state is not loaded
        model.load_weights(path)
        return list(model.get_weights())
    return list(keras.models.load_model(path).get_weights())


def assert_same_weights(actual: list[np.ndarray], expected: list[np.ndarray], atol: float = 0.0) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=0, atol=atol)


# ------------------------------------------------------------------ ModelCheckpoint


@pytest.mark.parametrize(
    "filename, kwargs",
    [
        pytest.param("m-{epoch:02d}-{val_loss:.2f}.keras", dict(save_best_only=True, verbose=1), id="best-only-templated"),
        pytest.param("w-{epoch}-{batch:02d}-{loss:.3f}.weights.h5", dict(save_weights_only=True, save_freq=3, verbose=1),
                     id="weights-every-3-batches"),
        pytest.param("best.weights.h5", dict(save_weights_only=True, save_best_only=True, monitor="val_mae",
                                             initial_value_threshold=0.9, verbose=1), id="threshold-fixed-name"),
    ],
)
def test_model_checkpoint_matches_keras(tmp_path: Path, capsys: pytest.CaptureFixture[str], filename: str,
                                        kwargs: dict[str, Any], fresh: FreshModel) -> None:
    results = {}
    for name, cls in (("keras", keras.callbacks.ModelCheckpoint), ("ckptmgr", ck.ModelCheckpoint)):
        directory = tmp_path / name
        model = fresh()
        fit(model, [cls(str(directory / filename), **kwargs)], epochs=5)
        out = capsys.readouterr().out.replace(str(directory), "DIR")
        results[name] = (visible(directory), out)
    (keras_files, keras_out), (our_files, our_out) = results["keras"], results["ckptmgr"]
    assert our_files == keras_files and our_files
    assert our_out == keras_out
    for name in our_files:
        assert_same_weights(file_weights(tmp_path / "ckptmgr" / name), file_weights(tmp_path / "keras" / name))


def test_model_checkpoint_h5_model_loads(tmp_path: Path) -> None:
    # A model of its own: Keras' legacy .h5 saving drops the optimizer from the model's
    # compile config (keras 3.15), which would break later .keras saves of a shared model.
    model = child.make_model()
    callback = ck.ModelCheckpoint(str(tmp_path / "model.h5"), monitor="loss")
    fit(model, [callback], epochs=1, validation=False)
    loaded = keras.models.load_model(tmp_path / "model.h5", compile=False)
    assert_same_weights(loaded.get_weights(), model.get_weights())


def test_keep_last_2_leaves_exactly_the_expected_files(tmp_path: Path, fresh: FreshModel) -> None:
    # Without validation data val_loss is never reported, so no file is "best": exactly two stay.
    callback = ck.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), keep=ckptmgr.KeepLast(2))
    fit(fresh(), [callback], epochs=5, validation=False)
    assert visible(tmp_path) == ["e4.keras", "e5.keras"]
    assert [c.path.name for c in callback.checkpoints] == ["e4.keras", "e5.keras"]
    assert [c.keep_reasons for c in callback.checkpoints] == [("last 2",), ("latest", "last 2")]


def test_best_and_last_callbacks_need_a_directory_each_and_say_so(tmp_path: Path, fresh: FreshModel) -> None:
    """Keras' best + last pattern: one writer per directory here, so two callbacks in one
    directory are refused at the first save, naming both the callback and the way out."""
    best = ck.ModelCheckpoint(str(tmp_path / "shared" / "best.keras"), save_best_only=True)
    last = ck.ModelCheckpoint(str(tmp_path / "shared" / "last.keras"))
    with pytest.raises(ckptmgr.DirectoryLockedError,
                       match=r"ModelCheckpoint\(filepath='.*last\.keras'\) cannot write to .*shared.*a directory of its own"):
        fit(fresh(), [best, last], epochs=2)
    best = ck.ModelCheckpoint(str(tmp_path / "best" / "model.keras"), save_best_only=True)
    last = ck.ModelCheckpoint(str(tmp_path / "last" / "model.keras"))
    backup = ck.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)
    fit(fresh(), [best, last, backup], epochs=2)
    assert visible(tmp_path / "best") == visible(tmp_path / "last") == ["model.keras"]


def test_keep_last_never_deletes_the_best(tmp_path: Path, fresh: FreshModel) -> None:
    # val_loss falls every epoch; with mode="max" the first epoch stays the best.
    callback = ck.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), mode="max", keep=ckptmgr.KeepLast(2))
    history = fit(fresh(), [callback], epochs=4)
    assert np.all(np.diff(history.history["val_loss"]) < 0)
    assert visible(tmp_path) == ["e1.keras", "e3.keras", "e4.keras"]
    assert [c.keep_reasons for c in callback.checkpoints] == [("best val_loss",), ("last 2",), ("latest", "last 2")]


def test_save_best_only_remembers_the_best_across_restarts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           fresh: FreshModel) -> None:
    """keras#17012: a restarted job must not overwrite the best file with a worse model."""
    path = tmp_path / "best.keras"
    first = fresh()
    fit(first, [ck.ModelCheckpoint(str(path), save_best_only=True)], epochs=5)
    saved = path.read_bytes()
    best_weights = first.get_weights()

    # "Restart": a fresh process would build a fresh model and a fresh callback; this one is
    # worse (untrained), so nothing it produces may replace the file.
    second = fresh()
    second.optimizer.learning_rate.assign(0.0)
    callback = ck.ModelCheckpoint(str(path), save_best_only=True, verbose=1)
    history = fit(second, [callback], epochs=2)
    assert path.read_bytes() == saved
    assert callback.best is not None and callback.best < min(history.history["val_loss"])
    assert_same_weights(file_weights(path), best_weights)
    out = capsys.readouterr().out
    assert "Epoch 1: val_loss did not improve from" in out and "saving model" not in out

    # Keras' callback, restarted the same way, overwrites it with the worse model.
    third = fresh()
    third.optimizer.learning_rate.assign(0.0)
    fit(third, [keras.callbacks.ModelCheckpoint(str(path), save_best_only=True)], epochs=1)
    assert path.read_bytes() != saved


def test_async_save_writes_the_same_files(tmp_path: Path, fresh: FreshModel) -> None:
    model = fresh()
    callback = ck.ModelCheckpoint(str(tmp_path / "e{epoch}.weights.h5"), save_weights_only=True, async_save=True)
    fit(model, [callback], epochs=2, validation=False)
    assert visible(tmp_path) == ["e1.weights.h5", "e2.weights.h5"]
    assert callback.manager is None  # closed, its writes committed, at the end of fit()
    assert_same_weights(file_weights(tmp_path / "e2.weights.h5"), model.get_weights())


# ------------------------------------------------------------------ bad file paths


@pytest.mark.parametrize(
    "filepath, kwargs, match",
    [
        pytest.param("{epoch}/m.keras", {}, "not in its directory", id="placeholder-in-directory"),
        pytest.param("m-{epoch.real}.keras", {}, "without attribute or index access", id="attribute"),
        pytest.param("m-{logs[0]}.keras", {}, "without attribute or index access", id="index"),
        pytest.param("m-{}.keras", {}, "named placeholders", id="positional"),
        pytest.param("m-{epoch.keras", {}, "valid str.format template", id="unbalanced"),
        pytest.param("m.ckpt", {}, r"ending in `\.keras`", id="unknown-suffix"),
        pytest.param("m.keras", dict(save_weights_only=True), r"ending in `\.weights\.h5`", id="model-suffix-for-weights"),
        pytest.param("m.keras", dict(save_freq=0), "save_freq", id="save-freq-0"),
        pytest.param("m.keras", dict(keep=3), "retention policy", id="keep-int"),
    ],
)
def test_bad_filepath_or_arguments_raise_at_construction(tmp_path: Path, filepath: str, kwargs: dict[str, Any],
                                                          match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ck.ModelCheckpoint(str(tmp_path / filepath), **kwargs)


def test_placeholder_without_a_value_names_the_key(tmp_path: Path, fresh: FreshModel) -> None:
    callback = ck.ModelCheckpoint(str(tmp_path / "m-{val_acc:.2f}.keras"))
    with pytest.raises(KeyError, match=r"\{val_acc\}.*Received: .*'val_loss'") as info:
        fit(fresh(), [callback], epochs=1)
    assert isinstance(info.value, ValueError)
    assert visible(tmp_path) == []
    # {batch} exists only when saving by batch, as in Keras.
    with pytest.raises(ck.FilepathFormatError, match=r"\{batch\}.*integer save_freq"):
        ck.ModelCheckpoint(str(tmp_path / "m-{batch}.keras")).format_filepath(0, None, {"loss": 1.0})


@pytest.mark.parametrize("value", ["../../escape", "a/b", ".hidden", "x" * 300], ids=["dotdot", "slash", "hidden", "long"])
def test_formatted_names_cannot_leave_the_directory(tmp_path: Path, value: str) -> None:
    callback = ck.ModelCheckpoint(str(tmp_path / "{tag}.keras"))
    with pytest.raises(ck.FilepathFormatError, match="plain file name"):
        callback.format_filepath(0, None, {"tag": value})


def test_formatting_matches_keras(tmp_path: Path) -> None:
    template = str(tmp_path / "m-{epoch:03d}-{batch}-{loss:.4f}-{mae}.keras")
    logs = {"loss": 0.123456, "mae": np.float32(0.5)}
    ours = ck.ModelCheckpoint(template).format_filepath(4, 7, logs)
    theirs = keras.callbacks.ModelCheckpoint(template)._get_file_path(4, 7, logs)
    assert ours == theirs == str(tmp_path / "m-005-8-0.1235-0.5.keras")


# -------------------------------------------------------------- missing metrics, mode


def test_missing_monitor_warns_like_keras_and_never_crashes(tmp_path: Path, fresh: FreshModel) -> None:
    checkpoint = ck.ModelCheckpoint(str(tmp_path / "m.keras"), save_best_only=True)
    early = ck.EarlyStopping(patience=1)
    with pytest.warns(UserWarning) as record:
        history = fit(fresh(), [checkpoint, early], epochs=2, validation=False)
    messages = {str(w.message) for w in record if w.category is UserWarning}
    assert "Can save best model only with val_loss available." in messages
    assert any(m.startswith("Early stopping conditioned on metric `val_loss` which is not available.") for m in messages)
    assert len(history.history["loss"]) == 2
    assert visible(tmp_path) == ["m.keras"]


def test_unknown_mode_falls_back_to_auto_with_keras_warning() -> None:
    with pytest.warns(UserWarning, match="EarlyStopping mode 'up' is unknown, fallback to auto mode."):
        callback = ck.EarlyStopping(mode="up")
    assert callback.mode == "auto"


def test_undecidable_direction_raises_when_it_matters(tmp_path: Path, fresh: FreshModel) -> None:
    callback = ck.ModelCheckpoint(str(tmp_path / "m.keras"), monitor="val_wobble", save_best_only=True)
    with pytest.raises(ValueError, match="mode='min' or mode='max'"):
        fit(fresh(), [callback], epochs=1)


# ------------------------------------------------------------------- EarlyStopping


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(min_delta=0.3, patience=1, restore_best_weights=True, verbose=1), id="restore-best"),
        pytest.param(dict(monitor="val_mae", baseline=0.6, min_delta=0.15, patience=2, restore_best_weights=True,
                          verbose=1),
                     id="baseline"),
        pytest.param(dict(monitor="loss", min_delta=0.5, patience=0, start_from_epoch=3, verbose=1),
                     id="start-from-epoch"),
    ],
)
def test_early_stopping_matches_keras(capsys: pytest.CaptureFixture[str], kwargs: dict[str, Any],
                                      fresh: FreshModel) -> None:
    results = {}
    for name, cls in (("keras", keras.callbacks.EarlyStopping), ("ckptmgr", ck.EarlyStopping)):
        model = fresh()
        callback = cls(**kwargs)
        history = fit(model, [callback], epochs=8)
        results[name] = (len(history.history["loss"]), callback.stopped_epoch, callback.best, callback.wait,
                         model.get_weights(), capsys.readouterr().out)
    theirs, ours = results["keras"], results["ckptmgr"]
    assert ours[:4] == theirs[:4]
    assert 0 < ours[1] < 7, "the configuration must stop early"
    assert_same_weights(ours[4], theirs[4])
    assert ours[5] == theirs[5]


# ------------------------------------------------ one comparator: ckptmgr.MetricTracker
#
# Every "did the monitored value improve?" is decided by a ckptmgr.MetricTracker (in
# Python floats), never by monitor_op (keras.ops in float32). The values below are
# near-ties that the two decide differently: 0.9 - 1e-12 beats 0.9 in float64 and
# equals it in float32.

NEAR_TIES = [0.95, 0.9 - 1e-12, 0.5, 0.5, 0.5 - 1e-12, 0.7, 0.5 - 2e-12]


def drive(callback: Any, model: Any, values: list[float], monitor: str = "val_loss") -> None:
    """Epoch ends with ``monitor`` taking ``values``, without training (as Keras' own tests do)."""
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, value in enumerate(values):
        callback.on_epoch_begin(epoch)
        callback.on_epoch_end(epoch, {monitor: value})
        if model.stop_training:
            break
    callback.on_train_end()


def test_save_best_only_is_the_engines_decision(tmp_path: Path, fresh: FreshModel) -> None:
    callback = ck.ModelCheckpoint(str(tmp_path / "m-{epoch}.keras"), save_best_only=True, initial_value_threshold=0.9)
    opened: list[ckptmgr.CheckpointManager] = []
    original_open = callback._open

    def spy() -> ckptmgr.CheckpointManager:
        manager = original_open()
        opened.append(manager)
        return manager

    callback._open = spy  # type: ignore[method-assign]
    drive(callback, fresh(), NEAR_TIES)
    reference = ckptmgr.MetricTracker("val_loss", mode="min", baseline=0.9)
    expected = [f"m-{epoch + 1}.keras" for epoch, value in enumerate(NEAR_TIES) if reference.update(epoch, value)]
    assert expected == ["m-2.keras", "m-3.keras", "m-5.keras", "m-7.keras"]
    assert visible(tmp_path) == expected
    assert callback.best == reference.best == NEAR_TIES[-1]
    manager = opened[0]
    assert manager.tracker is not None and (manager.tracker.mode, manager.tracker.baseline) == ("min", 0.9)
    assert callback.monitor_op is keras.ops.less  # Keras' comparator, for reading; it decided nothing


def test_early_stopping_decides_with_its_metric_tracker(fresh: FreshModel) -> None:
    stopper = ck.EarlyStopping(monitor="val_loss", patience=1)
    assert stopper.tracker is None  # until the first epoch end decides the direction
    drive(stopper, fresh(), [1.0, 1.0 - 1e-12, 1.0 - 2e-12, 1.0 - 3e-12, 1.0 - 3e-12, 2.0])
    tracker = stopper.tracker
    assert tracker is not None and tracker.mode == "min" and stopper.monitor_op is keras.ops.less
    # Each near-tie improves in float64 (keras.ops.less, in float32, would have stopped at epoch 1).
    assert stopper.stopped_epoch == 4 and stopper.best == tracker.best == 1.0 - 3e-12
    assert (stopper.wait, stopper.best_epoch, tracker.best_step) == (tracker.wait, 3, 3) == (1, 3, 3)


def test_early_stopping_keeps_keras_baseline_rule_on_its_tracker(fresh: FreshModel) -> None:
    # Improving on the best, but not on the baseline, does not restart patience (Keras' rule).
    values = [0.9, 0.8, 0.7, 0.69, 0.4, 0.38, 0.37, 0.36, 0.36, 0.36, 0.1]
    results = []
    for cls in (keras.callbacks.EarlyStopping, ck.EarlyStopping):
        stopper = cls(monitor="val_loss", patience=5, baseline=0.5, min_delta=0.05, restore_best_weights=True)
        drive(stopper, fresh(), values)
        results.append((stopper.best, stopper.best_epoch, stopper.wait, stopper.stopped_epoch))
    assert results[1] == results[0] == (0.4, 4, 5, 9)


def test_non_finite_values_never_improve(tmp_path: Path, fresh: FreshModel) -> None:
    # The engine's rule, for both callbacks: a NaN is never the best (Keras takes a first NaN as the best).
    stopper = ck.EarlyStopping(monitor="val_loss", patience=2)
    with pytest.warns(ckptmgr.CheckpointWarning, match="not finite"):
        drive(stopper, fresh(), [float("nan"), 0.5, 0.6])
    assert (stopper.best, stopper.best_epoch, stopper.wait, stopper.stopped_epoch) == (0.5, 1, 1, 0)
    checkpoint = ck.ModelCheckpoint(str(tmp_path / "m-{epoch}.keras"), save_best_only=True)
    drive(checkpoint, fresh(), [float("nan"), 0.5, float("nan")])
    assert visible(tmp_path) == ["m-2.keras"]


# ---------------------------------------------------------------- BackupAndRestore


class Interrupt(keras.callbacks.Callback):  # type: ignore[misc,name-defined]
    def __init__(self, epoch: int, batch: int) -> None:
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("save_freq, interrupt, resumed_at", [("epoch", (2, 3), (2, 0)), (4, (2, 3), (2, 2))],
                         ids=["epoch", "every-4-batches"])
def test_backup_resumes_in_process_and_is_deleted_at_the_end(tmp_path: Path, save_freq: str | int,
                                                              interrupt: tuple[int, int],
                                                              resumed_at: tuple[int, int], fresh: FreshModel) -> None:
    reference = fresh()
    fit(reference, [], epochs=4)
    expected_weights, expected_iterations = reference.get_weights(), int(reference.optimizer.iterations.numpy())

    model = fresh()
    backup = ck.BackupAndRestore(tmp_path / "backup", save_freq=save_freq, async_save=True)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(model, [backup, Interrupt(*interrupt)], epochs=4)
    assert [p.name for p in (tmp_path / "backup").glob("ckpt-*.h5")]  # one backup, kept

    model = fresh()  # back to the initial state, as after a restart
    history = fit(model, [backup], epochs=4)
    assert backup.resumed_at == resumed_at
    assert len(history.history["loss"]) == 4 - resumed_at[0]
    assert int(model.optimizer.iterations.numpy()) == expected_iterations
    assert_same_weights(model.get_weights(), expected_weights, atol=1e-6)
    assert not (tmp_path / "backup").exists()


def test_backup_kept_with_delete_checkpoint_false(tmp_path: Path, fresh: FreshModel) -> None:
    backup = ck.BackupAndRestore(tmp_path / "backup", delete_checkpoint=False, double_checkpoint=True)
    fit(fresh(), [backup], epochs=3, validation=False)
    assert sorted(p.name for p in (tmp_path / "backup").glob("ckpt-*.h5")) == ["ckpt-000000010.h5", "ckpt-000000015.h5"]
    # A new fit() resumes after the last epoch: nothing left to run (as in Keras).
    history = fit(fresh(), [backup], epochs=3, validation=False)
    assert backup.resumed_at == (3, 0) and history.history == {}


def test_backup_falls_back_to_the_previous_one_when_the_latest_is_corrupt(tmp_path: Path, fresh: FreshModel) -> None:
    backup = ck.BackupAndRestore(tmp_path / "backup", delete_checkpoint=False, double_checkpoint=True)
    fit(fresh(), [backup], epochs=3, validation=False)
    latest = tmp_path / "backup" / "ckpt-000000015.h5"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))
    with pytest.warns(ckptmgr.CheckpointWarning, match="corrupt"):
        fit(fresh(), [backup], epochs=3, validation=False)
    assert backup.resumed_at == (2, 0)


def test_backup_from_another_model_is_refused(tmp_path: Path, fresh: FreshModel) -> None:
    backup = ck.BackupAndRestore(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(fresh(), [backup, Interrupt(1, 0)], epochs=3, validation=False)
    other = keras.Sequential([keras.layers.Dense(3), keras.layers.Dense(1)])
    other.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="Expected 5 variables"):
        fit(other, [backup], epochs=3, validation=False)


@pytest.mark.parametrize("save_freq", ["every", 0, -1, True, 2.5])
def test_backup_bad_save_freq(tmp_path: Path, save_freq: Any) -> None:
    with pytest.raises(ValueError, match="save_freq"):
        ck.BackupAndRestore(tmp_path, save_freq=save_freq)


# -------------------------------------------------------------------------- docs


def test_docstring_examples_run() -> None:
    from ckptmgr.adapters import _keras_backup, _keras_base, _keras_early_stopping, _keras_model_checkpoint

    for module in (ck, _keras_base, _keras_backup, _keras_early_stopping, _keras_model_checkpoint):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
