"""ckptmgr.adapters.torch and the PyTorch side of ckptmgr.adapters.loop: state dicts <->
trees without unpickling, torch RNG state, and examples/torch_loop.py killed and resumed
bit-identically."""

from __future__ import annotations

import doctest
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _loop_harness import (  # noqa: E402 - after the importorskip
    Child,
    assert_same_training,
    final_tree,
    plan_seed,
    random_plan,
    run_interrupted,
)

import ckptmgr  # noqa: E402
from ckptmgr.adapters import torch as ckpt_torch  # noqa: E402
from ckptmgr.adapters.loop import capture_rng, restore_rng  # noqa: E402


def roundtrip(tree: Any, tmp_path: Path) -> Any:
    with ckptmgr.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(0, tree)
        return mgr.restore()


def raw(tensor: Any) -> tuple[str, tuple[int, ...], bytes]:
    """dtype, shape and bytes, so that NaNs and -0.0 compare too."""
    return str(tensor.dtype), tuple(tensor.shape), ckpt_torch.to_numpy(tensor).tobytes()


DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
def test_tensors_survive_a_checkpoint_bit_for_bit(dtype: Any, tmp_path: Path) -> None:
    base = torch.tensor([[0.0, -0.0, 1.5, -2.25], [float("nan"), float("inf"), 3.0, 1e-3]])
    if dtype.is_complex:
        base = base * (1 + 1j)
    elif not dtype.is_floating_point:
        base = torch.arange(8).reshape(2, 4) % 2 if dtype == torch.bool else torch.arange(8).reshape(2, 4) * 13
    tensors = {"plain": base.to(dtype), "transposed": base.to(dtype).T, "scalar": base.to(dtype)[1, 2]}
    saved = roundtrip(ckpt_torch.to_tree(tensors), tmp_path)
    restored = ckpt_torch.from_tree(saved)
    for key, tensor in tensors.items():
        assert isinstance(restored[key], torch.Tensor) and raw(restored[key]) == raw(tensor), key


def test_tensor_views_are_resolved_and_copied() -> None:
    weight = torch.nn.Parameter(torch.ones(2, 2))
    array = ckpt_torch.to_numpy(weight)  # requires grad: detached
    with torch.no_grad():
        weight.add_(1)
    assert array.tolist() == [[1, 1], [1, 1]]  # a copy, not a view of the parameter
    conj = torch.tensor([1 + 2j]).conj()
    assert ckpt_torch.to_numpy(conj).tolist() == [1 - 2j]
    assert ckpt_torch.to_numpy(-torch.tensor([1 + 2j]).conj()).tolist() == [-1 + 2j]


def test_unsupported_tensors_are_refused_by_path() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "ComplexHalf support is experimental"
        half_complex = torch.zeros(2, dtype=torch.complex32)
    with pytest.raises(TypeError, match=r"tree\['x'\].*NumPy dtype"):
        ckpt_torch.to_tree({"x": half_complex})
    with pytest.raises(TypeError, match=r"tree\['s'\]\[0\].*dense"):
        ckpt_torch.to_tree({"s": [torch.eye(2).to_sparse()]})
    with pytest.raises(TypeError, match=r"tree\['d'\].*torch.device"):
        ckpt_torch.to_tree({"d": torch.device("cpu")})
    with pytest.raises(ValueError, match="__ckptmgr_"):
        ckpt_torch.to_tree({"__ckptmgr_items__": 1})


def test_state_dict_encoding_keeps_int_keys_and_module_metadata() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 2)).sum().backward()
    optimizer.step()
    back = ckpt_torch.from_tree(ckpt_torch.to_tree({"model": model, "opt": optimizer}))
    assert back["model"]._metadata == model.state_dict()._metadata  # BatchNorm's version 2
    assert list(back["opt"]["state"]) == [0, 1, 2, 3]
    assert back["opt"]["param_groups"][0]["params"] == [0, 1, 2, 3]


def make(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
    )
    adam = torch.optim.Adam(model[0].parameters(), lr=0.01, amsgrad=True)
    sgd = torch.optim.SGD([*model[1].parameters(), *model[4].parameters()], lr=0.05, momentum=0.9, nesterov=True)
    return {
        "model": model,
        "adam": adam,
        "sgd": sgd,
        "cycle": torch.optim.lr_scheduler.OneCycleLR(adam, max_lr=0.05, total_steps=50),
        "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau(sgd, patience=1),
        "scaler": torch.amp.GradScaler("cpu", init_scale=2.0**4),
    }


def train(objects: dict[str, Any], gen: Any, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        loss = torch.mean((objects["model"](x) - x.sum(1, keepdim=True)) ** 2)  # dropout: global generator
        objects["adam"].zero_grad()
        objects["sgd"].zero_grad()
        objects["scaler"].scale(loss).backward()
        objects["scaler"].step(objects["adam"])
        objects["scaler"].step(objects["sgd"])
        objects["scaler"].update()
        objects["cycle"].step()
        objects["plateau"].step(loss.item())


def test_modules_optimizers_schedulers_and_scaler_resume_bit_identical(tmp_path: Path) -> None:
    objects, gen = make(0), torch.Generator().manual_seed(1)
    train(objects, gen, 5)
    saved = roundtrip({"objects": ckpt_torch.to_tree(objects), "rng": capture_rng({"gen": gen})}, tmp_path)
    train(objects, gen, 5)

    objects2, gen2 = make(1), torch.Generator().manual_seed(2)
    ckpt_torch.load_tree(objects2, saved["objects"])
    restore_rng(saved["rng"], {"gen": gen2})
    train(objects2, gen2, 5)
    for name, obj in objects.items():
        assert str(ckpt_torch.to_tree(objects2[name])) == str(ckpt_torch.to_tree(obj)), name  # floats, ints, lists
    for a, b in zip(objects["model"].state_dict().values(), objects2["model"].state_dict().values(), strict=True):
        assert raw(a) == raw(b)


def test_restoring_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = make(0)
    train(objects, torch.Generator().manual_seed(1), 2)
    saved = ckpt_torch.to_tree(objects)
    with ckptmgr.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, saved)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling was attempted")

    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(module, name, refuse)
    with ckptmgr.CheckpointManager(tmp_path / "ckpt") as mgr:
        ckpt_torch.load_tree(make(1), mgr.restore())


def test_load_tree_errors() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"Expected keys .*Received: no 'opt'"):
        ckpt_torch.load_tree({"model": model, "opt": torch.optim.SGD(model.parameters(), lr=1)}, {"model": {}})
    with pytest.raises(TypeError, match=r"tree\['epoch'\].*cannot be loaded in place"):
        ckpt_torch.load_tree({"epoch": 3}, {"epoch": 3})
    with pytest.raises(RuntimeError, match="Missing key"):
        ckpt_torch.load_tree(model, ckpt_torch.to_tree({"weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        ckpt_torch.load_tree([model.weight], [np.zeros((3, 2), np.float32)])
    buffer = torch.zeros(3)
    ckpt_torch.load_tree((buffer,), (np.arange(3, dtype=np.float32),))
    assert buffer.tolist() == [0, 1, 2]


def test_torch_rng_survives_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    torch.randn(5)
    saved = roundtrip(capture_rng({"g": gen}), tmp_path)
    assert "torch" in saved
    expected = [torch.randn(4).tolist(), torch.randn(4, generator=gen).tolist(), torch.rand(3).tolist()]
    torch.manual_seed(0)
    gen2 = torch.Generator()
    restore_rng(saved, {"g": gen2})
    assert [torch.randn(4).tolist(), torch.randn(4, generator=gen2).tolist(), torch.rand(3).tolist()] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_survives_a_checkpoint(tmp_path: Path) -> None:
    torch.cuda.manual_seed_all(5)
    torch.randn(2, device="cuda")
    saved = roundtrip(capture_rng(), tmp_path)
    assert len(saved["torch"]["cuda"]) == torch.cuda.device_count()
    expected = torch.randn(4, device="cuda").tolist()
    torch.cuda.manual_seed_all(0)
    restore_rng(saved)
    assert torch.randn(4, device="cuda").tolist() == expected


def test_docstring_examples() -> None:
    result = doctest.testmod(ckpt_torch, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 10


def test_torch_example_resumes_bit_identical_after_kills_and_sigterm(tmp_path: Path) -> None:
    seed = plan_seed()
    plan = random_plan(random.Random(seed), ["kill", "term", "kill"], 5, 40)
    argv = ["examples/torch_loop.py", "--steps", "160", "--save-every", "9"]
    reference = Child([*argv, str(tmp_path / "ref")], tmp_path / "ref.log")
    run = run_interrupted([*argv, str(tmp_path / "run")], tmp_path / "run.log", plan=plan, save_every=9, seed=seed)
    assert reference.wait() == 0, reference.describe()
    assert len(run.history) >= 2
    assert_same_training(final_tree(tmp_path / "run"), final_tree(tmp_path / "ref"))
