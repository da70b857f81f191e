"""Input validation of ONNX models: what onnxruntime refuses is refused in one line naming the cause; sparse
initializers compile exactly like their dense form; the declared input shape is respected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import random_inputs
from onnx import TensorProto, helper, numpy_helper
from test_onnx_import import Net, save, stem

import qcompile
from qcompile.cli import main
from qcompile.frontends.onnx_check import OnnxValidationError, densify
from qcompile.frontends.onnx_import import ModelFileError, load_onnx
from qcompile.passes.base import QCompileError


def model(**conv2: Any) -> onnx.ModelProto:
    """x -> stem conv -> relu -> conv 'c2' (with ``conv2`` attributes) -> relu -> head."""
    net = Net(17)
    attrs = {"pads": [1, 1, 1, 1], **conv2}
    x = net.op("Relu", [net.conv(stem(net), 4, 4, "c2", **attrs)], "c2_relu")
    return net.model(net.head(x, 4))


def set_initializer(m: onnx.ModelProto, name: str, values: np.ndarray) -> onnx.ModelProto:
    t = next(t for t in m.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(values, name))
    return m


def set_attr(m: onnx.ModelProto, node: str, **attrs: Any) -> onnx.ModelProto:
    n = next(n for n in m.graph.node if n.name == node)
    for key, value in attrs.items():
        for a in list(n.attribute):
            if a.name == key:
                n.attribute.remove(a)
        n.attribute.append(helper.make_attribute(key, value))
    return m


def compile_error(path: Path, shape: tuple[int, ...] = (2, 1, 8, 8)) -> str:
    with pytest.raises(QCompileError) as info:
        qcompile.compile(path, random_inputs(shape[0], shape=shape[1:]))
    text = str(info.value)
    assert "\n" not in text and len(text.replace(str(path), "m.onnx")) <= 300, text
    return text


w = np.random.default_rng(0).uniform(-0.3, 0.3, (4, 4, 3, 3)).astype(np.float32)
INVALID = {
    "group not dividing the channels": (lambda: set_attr(model(), "c2", group=3), "c2"),
    "strides of the wrong length": (lambda: set_attr(model(), "c2", strides=[1]), "c2"),
    "zero strides": (lambda: set_attr(model(), "c2", strides=[0, 0]), "c2"),
    "negative pads": (lambda: set_attr(model(), "c2", pads=[-1, -1, -1, -1]), "c2"),
    "zero dilations": (lambda: set_attr(model(), "c2", dilations=[0, 0]), "c2"),
    "kernel larger than the input": (lambda: model(pads=[0, 0, 0, 0], k=11), "c2"),
    "kernel_shape contradicting the weight": (lambda: set_attr(model(), "c2", kernel_shape=[5, 5]), "c2"),
    "0-size weights": (lambda: set_initializer(model(), "c2.w", np.zeros((0, 4, 3, 3), np.float32)), "c2"),
    "bias of the wrong length": (lambda: set_initializer(model(), "c2.b", np.zeros(3, np.float32)), "c2"),
    "int8 weights": (lambda: set_initializer(model(), "c2.w", (w * 100).astype(np.int8)), "int8"),
    "float16 weights": (lambda: set_initializer(model(), "c2.w", w.astype(np.float16)), "float16"),
    "float64 weights": (lambda: set_initializer(model(), "c2.w", w.astype(np.float64)), "double"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_models_are_refused_naming_the_cause(case: str, tmp_path: Path) -> None:
    make, named = INVALID[case]
    path = save(make(), tmp_path / "m.onnx")
    text = compile_error(path)
    assert named in text, text
    try:
        ort.InferenceSession(str(path)).run(None, {"x": np.zeros((1, 1, 8, 8), np.float32)})
    except Exception:  # noqa: BLE001 - onnxruntime refuses it too: the point of the test
        return
    pytest.fail(f"onnxruntime accepts the '{case}' model; the test does not test refusal")


@pytest.mark.parametrize("dtype", [TensorProto.INT64, TensorProto.BOOL, TensorProto.STRING, TensorProto.DOUBLE])
def test_non_float32_inputs_are_refused(dtype: int, tmp_path: Path) -> None:
    m = model()
    m.graph.input[0].type.tensor_type.elem_type = dtype
    text = compile_error(save(m, tmp_path / "m.onnx"))
    assert "graph input/output 'x'" in text or "not a valid ONNX model" in text


def test_duplicate_node_names_are_refused(tmp_path: Path) -> None:
    m = model()
    m.graph.node[1].name = m.graph.node[0].name
    assert "same node name" in compile_error(save(m, tmp_path / "m.onnx"))


def test_keyword_node_names_compile(tmp_path: Path) -> None:
    m = model()
    for node, name in zip(m.graph.node, ["lambda", "class", "a.b/c d", "forward"], strict=False):
        node.name = name
    cm = qcompile.compile(save(m, tmp_path / "m.onnx"), random_inputs(2))
    onnx.checker.check_model(cm.to_onnx(), full_check=True)


def test_declared_input_shape_is_respected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save(model(), tmp_path / "m.onnx")
    code = main(["compile", str(path), "--input-shape", "3,2000,2000", "--data", "random", "-o",
                 str(tmp_path / "o.onnx"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "declared ['N', 1, 8, 8]; pass --input-shape 1,8,8" in err
    m = model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    assert "size <= 0" in compile_error(save(m, tmp_path / "zero.onnx"))


def sparse_model(coordinates: bool) -> onnx.ModelProto:
    m = model()
    for name in ("c2.w", "fc.w"):
        t = next(t for t in m.graph.initializer if t.name == name)
        a = numpy_helper.to_array(t).copy()
        a[np.random.default_rng(1).random(a.shape) < 0.6] = 0
        flat = np.flatnonzero(a)
        idx = np.stack(np.unravel_index(flat, a.shape), axis=1) if coordinates else flat
        values = numpy_helper.from_array(a.reshape(-1)[flat], name)
        m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, numpy_helper.from_array(
            idx.astype(np.int64), f"{name}.idx"), list(a.shape)))
        m.graph.initializer.remove(t)
    return m


@pytest.mark.parametrize("coordinates", [False, True])
def test_sparse_initializers_compile_exactly_like_their_dense_form(coordinates: bool, tmp_path: Path) -> None:
    sparse = save(sparse_model(coordinates), tmp_path / "sparse.onnx")
    dense_proto = onnx.load(str(sparse))
    densify(dense_proto)
    assert not dense_proto.graph.sparse_initializer
    dense = save(dense_proto, tmp_path / "dense.onnx")
    x = random_inputs(16)
    ref = [ort.InferenceSession(str(p)).run(None, {"x": x.numpy()})[0] for p in (sparse, dense)]
    np.testing.assert_array_equal(ref[0], ref[1])  # onnxruntime's own densification agrees bit for bit
    with torch.no_grad():
        np.testing.assert_allclose(load_onnx(sparse)(x).numpy(), ref[0], rtol=1e-5, atol=1e-6)
    a, b = (qcompile.compile(p, x, data=lambda: [x]) for p in (sparse, dense))
    assert a.to_onnx().SerializeToString() == b.to_onnx().SerializeToString()
    sess = ort.InferenceSession(a.to_onnx().SerializeToString())
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    want = a.reference(x)
    np.testing.assert_array_equal(got, want.numpy() if isinstance(want, torch.Tensor) else np.asarray(want))


def test_a_sparse_initializer_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    m = sparse_model(False)
    s = m.graph.sparse_initializer[0]
    s.indices.CopyFrom(numpy_helper.from_array(np.full(len(numpy_helper.to_array(s.values)), 10**6, np.int64),
                                               s.indices.name))
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    with pytest.raises((OnnxValidationError, ModelFileError), match="sparse initializer 'c2.w'"):
        load_onnx(path)


def test_nan_weights_name_the_weight(tmp_path: Path) -> None:
    m = set_initializer(model(), "c2.b", np.array([0, np.nan, 0, 0], np.float32))
    assert "NaN or Inf" in compile_error(save(m, tmp_path / "m.onnx"))
