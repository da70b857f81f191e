"""frontends/onnx_layout.py: where the batch is in each tensor of a seq-first export (torchvision's
nn.MultiheadAttention as the TorchScript exporter writes it), and the float import at other batches."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from conftest import random_inputs
from vit import TorchvisionViT

from qcompile.frontends import onnx_import, onnx_layout
from qcompile.frontends.onnx_layout import Layout
from qcompile.frontends.onnx_shapes import resolve_runtime_inputs

SHAPE = (1, 8, 8)


def _export(path: Path) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TorchvisionViT().eval(), (random_inputs(1, shape=SHAPE),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "N"}})
    return path


def test_the_batch_axis_of_every_attention_tensor_is_measured(tmp_path: Path) -> None:
    model = onnx_import._read(_export(tmp_path / "tv.onnx"))
    graph = onnx_import._folded(model)
    assert resolve_runtime_inputs(graph, model, SHAPE)  # [L, N, 3, E]: the batch off the first entry
    graph = onnx_import._refolded(graph)
    layouts = onnx_layout.analyse(graph, onnx_layout.probe_shapes(graph, SHAPE), SHAPE)
    attention = [n for n in graph.nodes if "self_attention" in n.name]
    (gemm,) = [n for n in attention if n.op == "Gemm"]  # the out-projection on [L N, E]: inside the tokens
    assert layouts[gemm.inputs[0].name] == Layout(axis=0, outer=5, factor=5, dims=(5, 16))
    assert layouts[gemm.inputs[0].name].first == (5, 16)
    heads = {layouts[n.outputs[0].name] for n in attention if n.op == "Reshape"}
    folded = Layout(axis=1, outer=1, factor=2, dims=(5, 2, 8))  # [L, N h, d]: N outside the heads
    assert folded in heads and folded.first == (5, 2, 8) and folded.first_axis(0) == 1
    assert Layout(axis=1, outer=1, factor=1, dims=(5, 1, 16)).first_axis(2) == 2  # k = 1: axis b dropped
    inputs = [n for n in attention if n.op == "Transpose" and n.inputs[0].name in layouts]
    assert any(layouts[n.inputs[0].name].plain and layouts[n.outputs[0].name].axis == 1 for n in inputs)


def test_the_float_import_runs_at_any_batch(tmp_path: Path) -> None:
    path = _export(tmp_path / "tv.onnx")
    gm = onnx_import.load_onnx(path, random_inputs(2, shape=SHAPE))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = random_inputs(batch, shape=SHAPE, seed=batch)
        (want,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(gm(x), torch.from_numpy(want), rtol=1e-4, atol=1e-5)
