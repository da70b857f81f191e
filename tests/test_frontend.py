"""Frontends: torch.fx tracing, the torch.export fallback, saved .pt2 programs, and the errors users see."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import calibration_data, compile_model, make_model, random_inputs
from torch import nn

import qcompile
from qcompile.api import ModelError
from qcompile.backends.ort import run_onnx
from qcompile.frontends import TraceError, load_pt2, trace_module
from qcompile.frontends.torch_fx import ModelFileError
from qcompile.ir.meta import Stage, get_info, get_stage
from qcompile.passes import PassError
from qcompile.passes.base import PassContext
from qcompile.passes.canonicalize import Canonicalize, UnsupportedOpsError

X = random_inputs(2)


def line_of(obj: object, code: str) -> int:
    """The line number of the first source line of ``obj`` containing ``code``."""
    lines, start = inspect.getsourcelines(obj)  # type: ignore[arg-type]
    return start + next(i for i, line in enumerate(lines) if code in line)


def assert_onnx_matches_reference(cm: qcompile.CompiledModel, x: torch.Tensor) -> None:
    ref, fast = cm.reference(x), cm(x)
    # every executor keeps the model's calling convention: one tensor in, one tensor out
    assert isinstance(ref, torch.Tensor) and isinstance(fast, torch.Tensor)
    (got,) = run_onnx(cm.to_onnx(), x.numpy())
    assert torch.equal(ref, fast)
    assert np.array_equal(ref.numpy().view(np.uint32), got.view(np.uint32))


class Simple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_fx_trace_records_stage_and_source_lines() -> None:
    model = Simple().eval()
    gm = trace_module(model, (X,))
    assert get_stage(gm) is Stage.TRACED
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv")
    source = get_info(conv).source
    assert source is not None and source.endswith(f"test_frontend.py:{line_of(Simple.forward, 'self.conv(x)')}")
    with torch.no_grad():
        assert torch.equal(gm(X), model(X))


class ShapeBranch(nn.Module):
    """Control flow on a shape: torch.fx cannot trace it, torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        if x.shape[-1] > 4:
            x = F.relu6(self.dw(x))
        else:
            x = torch.sigmoid(x)
        x = torch.clip(x, 0.0, 5.0)
        return self.fc(x.mean((2, 3)))


def test_shape_dependent_control_flow_falls_back_to_torch_export() -> None:
    model = ShapeBranch().eval()
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)
    gm = trace_module(model, (X,))
    assert get_stage(gm) is Stage.TRACED
    assert not any(n.target is torch.sigmoid for n in gm.graph.nodes)  # the branch not taken is gone
    x = random_inputs(8, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_exported_model_compiles_and_is_bit_exact() -> None:
    model = ShapeBranch().eval()
    cm = compile_model(model, "w4a8")
    x = random_inputs(16, seed=6)
    assert_onnx_matches_reference(cm, x)
    with torch.no_grad():
        sim, integer = cm.simulate(x), cm(x)
    (out_node,) = torch.utils._pytree.tree_leaves(
        next(n for n in cm.integer_graph.graph.nodes if n.op == "output").args[0])
    steps = (sim - integer).abs() / get_info(out_node).scale  # in output quantization steps
    assert float(steps.max()) <= 2


class DataBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return x


def test_data_dependent_control_flow_names_the_model_and_line() -> None:
    with pytest.raises(TraceError) as info:
        trace_module(DataBranch().eval(), (X,))
    message = str(info.value)
    assert "DataBranch" in message
    assert f"test_frontend.py:{line_of(DataBranch.forward, 'if x.sum() > 0:')}" in message
    assert isinstance(info.value, qcompile.QCompileError)
    with pytest.raises(TraceError):
        qcompile.compile(DataBranch(), X)


def test_user_code_in_a_folder_named_qcompile_is_still_located(tmp_path: Path) -> None:
    folder = tmp_path / "qcompile"  # e.g. a checkout of this repository: still the user's code, not the library
    folder.mkdir()
    source = folder / "user_model.py"
    source.write_text(inspect.getsource(DataBranch).replace("class DataBranch", "class UserBranch"))
    namespace: dict[str, object] = {"nn": nn, "torch": torch}
    exec(compile(source.read_text(), str(source), "exec"), namespace)  # noqa: S102 - a user's model file
    model = namespace["UserBranch"]()  # type: ignore[operator]
    with pytest.raises(TraceError) as info:
        trace_module(model, (X,))  # type: ignore[arg-type]
    line = 1 + source.read_text().splitlines().index("        if x.sum() > 0:")
    assert f"user_model.py:{line} in UserBranch" in str(info.value)


# ------------------------------------------------------------------------------------------ .pt2 files


def save_pt2(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model, (X,)), str(path))
    return path


@pytest.mark.parametrize("name", ["residual", "depthwise", "bn"])
def test_saved_pt2_loads_and_compiles_like_the_module(tmp_path: Path, name: str) -> None:
    model = make_model(name)
    path = save_pt2(model, tmp_path / f"{name}.pt2")
    gm = load_pt2(path)
    assert get_stage(gm) is Stage.TRACED
    x = random_inputs(8, seed=9)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    from_file = compile_model(str(path), "w4a8")
    from_module = compile_model(model, "w4a8")
    assert torch.equal(from_file.reference(x), from_module.reference(x))
    assert [c.name for c in from_file.layer_costs()] == [c.name for c in from_module.layer_costs()]
    assert_onnx_matches_reference(from_file, x)


def test_compile_accepts_a_path_object(tmp_path: Path) -> None:
    path = save_pt2(make_model("mlp"), tmp_path / "mlp.pt2")
    cm = qcompile.compile(path, X, data=calibration_data())
    assert get_stage(cm.integer_graph) is Stage.INTEGER


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "flipped"])
def test_corrupt_pt2_raises_model_file_error(tmp_path: Path, damage: str) -> None:
    data = save_pt2(make_model("mlp"), tmp_path / "good.pt2").read_bytes()
    bad = tmp_path / "bad.pt2"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"not a zip file" * 100)
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        flipped = bytearray(data)
        rng = np.random.default_rng(0)
        for pos in rng.integers(0, len(data), 40):
            flipped[pos] ^= 0xFF
        bad.write_bytes(bytes(flipped))
    with pytest.raises(ModelFileError, match="bad.pt2"):
        qcompile.compile(bad, X)


def test_missing_pt2_raises_model_file_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such file"):
        load_pt2(tmp_path / "missing.pt2")


# ------------------------------------------------------------------------------------ unsupported ops


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sin(self.conv(x))
        x = torch.abs(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_unsupported_ops_are_listed_together() -> None:
    model = Unsupported().eval()
    gm = trace_module(model, (X,))
    with pytest.raises(UnsupportedOpsError) as info:
        Canonicalize()(gm, PassContext((X,)))
    items = info.value.items
    assert len(items) == 2
    assert "sin" in items[0] and f"test_frontend.py:{line_of(Unsupported.forward, 'torch.sin')}" in items[0]
    assert "abs" in items[1] and f"test_frontend.py:{line_of(Unsupported.forward, 'torch.abs')}" in items[1]


def test_unsupported_ops_through_compile() -> None:
    with pytest.raises(PassError, match="pass 'canonicalize' failed: 2 unsupported op") as info:
        qcompile.compile(Unsupported(), X)
    assert isinstance(info.value.__cause__, UnsupportedOpsError)


def test_unsupported_ops_after_the_export_fallback() -> None:
    class ShapeAndSigmoid(ShapeBranch):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] > 4:
                x = torch.exp(self.conv(x))
            return self.fc(x.mean((2, 3)))

    with pytest.raises(PassError) as info:
        qcompile.compile(ShapeAndSigmoid(), X)
    cause = info.value.__cause__
    assert isinstance(cause, UnsupportedOpsError)
    assert len(cause.items) == 1 and "exp" in cause.items[0]


# ------------------------------------------------------------------------------------ model checks


def test_nan_weights_are_named() -> None:
    model = Simple()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match="'fc.weight'"):
        qcompile.compile(model, X)


def test_wrong_input_shape_is_explained() -> None:
    with pytest.raises(ModelError, match=r"does not accept inputs of shape \(2, 3, 8, 8\)"):
        qcompile.compile(Simple(), torch.randn(2, 3, 8, 8))
