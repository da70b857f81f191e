"""Fuzz cases for the command line: mutated ONNX models, .pt2 archives, weights files and .npz data.

Every case is a few files and the arguments of one ``qcompile compile`` run. ``generate(kind, n, seed)``
draws ``n`` cases of a kind from a fixed seed (the same seed gives the same files). A case ends in one of
the outcomes of ``OUTCOMES`` (``classify``); a good compiler shows only ``success`` and ``clean error``:

* ``success``: exit 0, and the written model passes ``onnx.checker`` (full check), runs in onnxruntime,
  and its outputs stay near the float model's (relative L2 error below ``WRONG_REL_ERROR``: far beyond
  8-bit quantization error, which is a few percent on these models); otherwise ``succeeded but wrong``.
* ``success on a model onnxruntime refuses``: exit 0 although onnxruntime cannot load or run the input.
* ``clean error``: non-zero exit with one ``error: ...`` line of at most 300 characters on stderr.
* ``messy error``: non-zero exit with more lines, a longer line, or no ``error:`` line.
* ``internal error`` / ``traceback``: qcompile's "internal error" line, or a Python traceback.
* ``ran code``: a crafted pickle wrote its marker file.
* ``hang`` / ``signal``: the run passed its timeout, or died of a signal (subprocess runs only).

Not covered: models larger than a few kilobytes, and mutations of the integer export itself.
"""

from __future__ import annotations

import copy
import io
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUTCOMES = ("success", "clean error", "messy error", "internal error", "traceback", "hang", "signal",
            "succeeded but wrong", "success on a model onnxruntime refuses", "ran code")
BAD = OUTCOMES[2:]
WRONG_REL_ERROR = 0.5
MAX_LINE = 300
MARKER = "MARKER"
CLASSES = 10
SHAPE = (1, 8, 8)


@dataclass
class Case:
    """One run: ``files`` (name -> bytes) written into a fresh folder, then ``qcompile compile *args``."""

    name: str
    kind: str
    files: dict[str, bytes]
    args: list[str]
    reference: str | None = None  # the float ONNX model whose outputs a success must stay near
    notes: list[str] = field(default_factory=list)

    def write(self, folder: Path) -> None:
        for name, data in self.files.items():
            (folder / name).write_bytes(data)


# ------------------------------------------------------------------------------------------ ONNX models


def _init(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def base_onnx(seed: int = 0) -> onnx.ModelProto:
    """x[N,1,8,8] -> conv3x3(4)+relu -> depthwise 3x3 s2(4)+relu -> conv1x1(6)+relu -> maxpool -> gap -> gemm(10)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return rng.uniform(-1, 1, shape) / np.sqrt(np.prod(shape[1:]))

    inits = [_init("c1.w", w(4, 1, 3, 3)), _init("c1.b", rng.uniform(-0.1, 0.1, 4)),
             _init("dw.w", w(4, 1, 3, 3)), _init("dw.b", rng.uniform(-0.1, 0.1, 4)),
             _init("c3.w", w(6, 4, 1, 1)), _init("c3.b", rng.uniform(-0.1, 0.1, 6)),
             _init("fc.w", w(CLASSES, 6)), _init("fc.b", rng.uniform(-0.1, 0.1, CLASSES))]
    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        mk("Relu", ["c1"], ["r1"], name="r1"),
        mk("Conv", ["r1", "dw.w", "dw.b"], ["dw"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=4,
           strides=[2, 2]),
        mk("Relu", ["dw"], ["r2"], name="r2"),
        mk("Conv", ["r2", "c3.w", "c3.b"], ["c3"], name="c3", kernel_shape=[1, 1]),
        mk("Relu", ["c3"], ["r3"], name="r3"),
        mk("MaxPool", ["r3"], ["mp"], name="mp", kernel_shape=[2, 2], strides=[1, 1]),
        mk("GlobalAveragePool", ["mp"], ["gap"], name="gap"),
        mk("Flatten", ["gap"], ["flat"], name="flat", axis=1),
        mk("Gemm", ["flat", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])], inits)
    opset = helper.make_opsetid("", 17)
    return helper.make_model(graph, opset_imports=[opset], ir_version=8)


Mutation = Callable[[onnx.ModelProto, np.random.Generator], str]


def _pick(rng: np.random.Generator, items: list[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _node(m: onnx.ModelProto, rng: np.random.Generator, op: str | None = None) -> onnx.NodeProto:
    return _pick(rng, [n for n in m.graph.node if op is None or n.op_type == op])


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


def _initializer(m: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


def _replace(m: onnx.ModelProto, name: str, values: np.ndarray) -> None:
    _initializer(m, name).CopyFrom(numpy_helper.from_array(values, name))


def _array(m: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(_initializer(m, name))


def m_attribute(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _node(m, rng, _pick(rng, ["Conv", "Conv", "MaxPool"]))
    name, values = _pick(rng, [
        ("group", [0, -1, 2, 3, 5, 8]), ("strides", [[1], [0, 0], [1, 1, 1], [-1, 1], [3, 3], [9, 9]]),
        ("pads", [[-1, -1, -1, -1], [1, 1], [0, 0, 1, 1], [5, 5, 5, 5], [2, 2, 2, 2]]),
        ("dilations", [[0, 0], [1], [5, 5], [2, 2]]), ("kernel_shape", [[5, 5], [1], [1, 1], [20, 20]]),
        ("auto_pad", ["SAME_UPPER", "VALID", "FOO", "SAME_LOWER"]), ("ceil_mode", [1]), ("storage_order", [1]),
    ])
    value = _pick(rng, values)
    _set_attr(node, name, value)
    return f"{node.name}.{name}={value}"


def m_weight_values(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    name = _pick(rng, [t.name for t in m.graph.initializer])
    a = _array(m, name).astype(np.float32)
    how = _pick(rng, ["x1e30", "x1e-30", "x1e-45", "nan", "inf", "zero", "x1e6", "-inf"])
    if how.startswith("x"):
        a = (a * np.float32(float(how[1:]))).astype(np.float32)
    elif how == "zero":
        a = np.zeros_like(a)
    else:
        a.reshape(-1)[int(rng.integers(a.size))] = float(how)
    _replace(m, name, a)
    return f"{name} {how}"


def m_weight_shape(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    name = _pick(rng, [t.name for t in m.graph.initializer])
    a = _array(m, name)
    how = _pick(rng, ["empty", "short", "long", "rank", "scalar"])
    shaped = {"empty": np.zeros((0, *a.shape[1:]), np.float32), "short": a.reshape(-1)[:-1].copy(),
              "long": np.concatenate([a.reshape(-1), [0.1]]).astype(np.float32),
              "rank": a.reshape(1, *a.shape), "scalar": np.float32(0.5)}[how]
    if how in ("short", "long") and a.ndim > 1:
        shaped = np.concatenate([a, a[:1]]) if how == "long" else a[:-1]
    _replace(m, name, np.asarray(shaped, dtype=np.float32))
    return f"{name} {how}"


def m_dtype(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        dtype = _pick(rng, [TensorProto.STRING, TensorProto.BOOL, TensorProto.INT64, TensorProto.FLOAT16,
                            TensorProto.DOUBLE, TensorProto.UINT8])
        m.graph.input[0].type.tensor_type.elem_type = dtype
        return f"input dtype {TensorProto.DataType.Name(dtype)}"
    name = _pick(rng, [t.name for t in m.graph.initializer])
    dtype = _pick(rng, [np.int8, np.float16, np.float64, np.int64, np.int32])
    _replace(m, name, (_array(m, name) * 50).astype(dtype))
    return f"{name} as {np.dtype(dtype).name}"


def m_sparse(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    """A weight becomes a sparse initializer (a valid model: it must compile correctly)."""
    name = _pick(rng, ["c1.w", "c3.w", "fc.w", "dw.w"])
    a = _array(m, name)
    a = np.where(rng.random(a.shape) < 0.5, 0, a).astype(np.float32)
    flat = np.flatnonzero(a)
    values = numpy_helper.from_array(a.reshape(-1)[flat], name)
    coo = flat if rng.random() < 0.5 else np.stack(np.unravel_index(flat, a.shape), axis=1)
    indices = numpy_helper.from_array(np.asarray(coo, dtype=np.int64), f"{name}_indices")
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(a.shape)))
    m.graph.initializer.remove(_initializer(m, name))
    return f"{name} sparse ({'linear' if coo.ndim == 1 else 'coordinate'} indices)"


def m_input_shape(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    dims = _pick(rng, [["N", 3, 8, 8], ["N", 1, 16, 16], [1, 1, 8, 8], ["N", "C", "H", "W"], ["N", 1, 8],
                       ["N", 1, 2, 2], [0, 1, 8, 8]])
    shape = m.graph.input[0].type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add().CopyFrom(onnx.TensorShapeProto.Dimension(**({"dim_param": d} if isinstance(d, str)
                                                                    else {"dim_value": d})))
    return f"declared input {dims}"


def m_names(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _node(m, rng)
    name = _pick(rng, ["lambda", "class", "", "1abc", "a.b/c d", "forward", "x", "__init__", m.graph.node[0].name,
                       "ñ-é", "self", "None"])
    node.name = name
    return f"node {node.op_type} named {name!r}"


def m_op_type(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _node(m, rng)
    if rng.random() < 0.3:
        node.domain = "com.example"
        m.opset_import.append(helper.make_opsetid("com.example", 1))
        return f"{node.name} in domain com.example"
    node.op_type = _pick(rng, ["Hardswish", "Sigmoid", "FooBar", "Softmax", "Tanh", "LeakyRelu", "Neg"])
    return f"{node.name} -> {node.op_type}"


def m_graph_structure(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    how = _pick(rng, ["drop node", "drop initializer", "drop input", "output is initializer", "two outputs",
                      "cycle", "dangling input"])
    g = m.graph
    if how == "drop node":
        g.node.remove(_node(m, rng))
    elif how == "drop initializer":
        g.initializer.remove(_pick(rng, list(g.initializer)))
    elif how == "drop input":
        node = _node(m, rng)
        del node.input[-1]
    elif how == "output is initializer":
        g.output[0].name = "fc.b"
    elif how == "two outputs":
        g.output.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, None))
    elif how == "cycle":
        g.node[0].input[0] = "r3"
    else:
        g.node[2].input[0] = "nowhere"
    return how


def m_opset(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    version = _pick(rng, [7, 10, 11, 13, 21, 22, 25])
    m.opset_import[0].version = version
    return f"opset {version}"


def m_gemm(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _node(m, rng, "Gemm")
    name, value = _pick(rng, [("transA", 1), ("transB", 0), ("alpha", 1e30), ("alpha", float("nan")),
                              ("beta", 0.0), ("alpha", 0.0), ("beta", 1e38)])
    _set_attr(node, name, value)
    return f"gemm {name}={value}"


def m_clip(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _node(m, rng, "Relu")
    lo, hi = _pick(rng, [(1.0, -1.0), (0.0, 6.0), (float("nan"), 1.0), (-1e30, 1e30), (2.0, 2.0)])
    node.op_type = "Clip"
    m.graph.initializer.extend([_init(f"{node.name}.lo", np.float32(lo)), _init(f"{node.name}.hi", np.float32(hi))])
    node.input.extend([f"{node.name}.lo", f"{node.name}.hi"])
    return f"clip [{lo}, {hi}]"


def m_duplicate_names(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        m.graph.node[3].name = m.graph.node[1].name
        return "duplicate node names"
    m.graph.node[1].output[0] = "c1"
    m.graph.node[2].input[0] = "c1"
    return "duplicate tensor names"


MUTATIONS: list[Mutation] = [m_attribute, m_attribute, m_weight_values, m_weight_values, m_weight_shape, m_dtype,
                             m_sparse, m_sparse, m_input_shape, m_names, m_op_type, m_graph_structure, m_opset,
                             m_gemm, m_clip, m_duplicate_names]


def _bytes_mutation(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    if rng.random() < 0.5:
        cut = int(rng.integers(0, len(data)))
        return data[:cut], f"truncated at {cut}/{len(data)}"
    raw = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        raw[int(rng.integers(len(raw)))] = int(rng.integers(256))
    return bytes(raw), "bytes flipped"


def _shape_args(rng: np.random.Generator) -> list[str]:
    return _pick(rng, [["--input-shape", "1,8,8", "--data", "random"]] * 6 + [["--data", "digits"]] * 2
                 + [["--input-shape", "3,2000,2000", "--data", "random"], ["--input-shape", "1,16,16"],
                    ["--input-shape", "1,2,2", "--data", "random"]])


def onnx_case(i: int, rng: np.random.Generator) -> Case:
    m = base_onnx(int(rng.integers(1000)))
    notes = []
    if rng.random() < 0.1:
        data, note = _bytes_mutation(m.SerializeToString(), rng)
        notes.append(note)
    else:
        for _ in range(1 if rng.random() < 0.75 else 2):
            m2 = copy.deepcopy(m)
            notes.append(_pick(rng, MUTATIONS)(m2, rng))
            m = m2
        data = m.SerializeToString()
    return Case(f"onnx-{i:03d}", "onnx", {"model.onnx": data}, ["model.onnx", *_shape_args(rng)], "model.onnx", notes)


# ------------------------------------------------------------------------------------------ .pt2, weights, npz

FACTORY = '''
import torch
from torch import nn


def small():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10)).eval()
'''


class Payload:
    """Unpickling this writes the marker file ``MARKER`` into the working folder."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({MARKER!r}, 'w').write('ran')",))


def _torch_bytes(obj: object) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _small_model() -> Any:
    import torch

    torch.manual_seed(0)
    namespace: dict[str, Any] = {}
    exec(FACTORY, namespace)  # noqa: S102 - our own factory source, also written as models.py
    return namespace["small"]()


def base_pt2() -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.export.save(torch.export.export(_small_model(), (torch.zeros(2, *SHAPE),)), buffer)
    return buffer.getvalue()


def _rezip(data: bytes, edit: Callable[[str, bytes], bytes | None], extra: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            new = edit(info.filename, zin.read(info))
            if new is not None:
                zout.writestr(info, new)
        for name, content in (extra or {}).items():
            zout.writestr(f"{zin.namelist()[0].split('/')[0]}/{name}", content)
    return out.getvalue()


def _pickled_weight(name: str, content: bytes) -> bytes | None:
    if name.endswith("model_weights_config.json"):
        config = json.loads(content)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()
    return _torch_bytes(Payload()) if name.endswith("weights/weight_0") else content


def pt2_case(i: int, rng: np.random.Generator, base: bytes) -> Case:
    how = _pick(rng, ["truncate", "flip", "drop config", "drop model", "drop inputs", "drop weight", "bad json",
                      "payload inputs", "payload weight", "payload opaque", "plain"])
    opaque = {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                               "tensor_meta": None}}}
    import pickle

    edits: dict[str, Callable[[], bytes]] = {
        "truncate": lambda: _bytes_mutation(base, rng)[0][: max(1, int(len(base) * rng.random()))],
        "flip": lambda: _bytes_mutation(base, rng)[0],
        "drop config": lambda: _rezip(base, lambda n, c: None if n.endswith("config.json") else c),
        "drop model": lambda: _rezip(base, lambda n, c: None if n.endswith("models/model.json") else c),
        "drop inputs": lambda: _rezip(base, lambda n, c: None if "sample_inputs" in n else c),
        "drop weight": lambda: _rezip(base, lambda n, c: None if n.endswith("weight_0") else c),
        "bad json": lambda: _rezip(base, lambda n, c: c[: len(c) // 2] if n.endswith("model.json") else c),
        "payload inputs": lambda: _rezip(base, lambda n, c: _torch_bytes(Payload()) if "sample_inputs" in n else c),
        "payload weight": lambda: _rezip(base, _pickled_weight),
        "payload opaque": lambda: _rezip(
            base, lambda n, c: json.dumps(opaque).encode() if n.endswith("model_constants_config.json") else c,
            {"data/constants/opaque_obj_0": pickle.dumps(Payload())}),
        "plain": lambda: base,
    }
    shape = ["--input-shape", "1,8,8"] if rng.random() < 0.8 else ["--input-shape", "3,8,8"]
    shape += ["--data", "random"]
    return Case(f"pt2-{i:03d}", "pt2", {"model.pt2": edits[how]()}, ["model.pt2", *shape], None, [how])


def weights_case(i: int, rng: np.random.Generator, state: dict[str, Any]) -> Case:
    import torch

    good = _torch_bytes(state)
    how = _pick(rng, ["truncate", "garbage", "payload", "wrong keys", "wrong shape", "nan", "list", "empty",
                      "nested", "plain"])
    key = next(iter(state))
    made: dict[str, Callable[[], bytes]] = {
        "truncate": lambda: good[: int(rng.integers(1, len(good)))],
        "garbage": lambda: bytes(rng.integers(0, 256, 500, dtype=np.uint8)),
        "payload": lambda: _torch_bytes({key: Payload()}),
        "wrong keys": lambda: _torch_bytes({f"x{k}": v for k, v in state.items()}),
        "wrong shape": lambda: _torch_bytes({**state, key: torch.zeros(3)}),
        "nan": lambda: _torch_bytes({**state, key: torch.full_like(state[key], float("nan"))}),
        "list": lambda: _torch_bytes(list(state.values())),
        "empty": lambda: b"",
        "nested": lambda: _torch_bytes({"state_dict": state}),
        "plain": lambda: good,
    }
    files = {"models.py": FACTORY.encode(), "w.pt": made[how]()}
    args = ["models.py:small", "--weights", "w.pt", "--data", "random", "--input-shape", "1,8,8"]
    return Case(f"weights-{i:03d}", "weights", files, args, None, [how])


def _npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npz_case(i: int, rng: np.random.Generator) -> Case:
    x = rng.random((40, *SHAPE), dtype=np.float32)
    y = rng.integers(0, CLASSES, 40)
    how = _pick(rng, ["short labels", "labels out of range", "negative labels", "float labels", "empty x", "nan x",
                      "inf x", "truncated", "empty file", "object array", "1-d x", "no x", "test shape", "huge x",
                      "one sample", "plain", "only y_test", "x_test only"])
    arrays: dict[str, Callable[[], bytes]] = {
        "short labels": lambda: _npz(x=x, y=y[:10]), "labels out of range": lambda: _npz(x=x, y=y + 20),
        "negative labels": lambda: _npz(x=x, y=y - 5), "float labels": lambda: _npz(x=x, y=y + 0.5),
        "empty x": lambda: _npz(x=x[:0], y=y[:0]), "nan x": lambda: _npz(x=np.where(x > 0.9, np.nan, x), y=y),
        "inf x": lambda: _npz(x=np.where(x > 0.9, np.inf, x), y=y),
        "truncated": lambda: _npz(x=x, y=y)[: int(rng.integers(1, 2000))], "empty file": lambda: b"",
        "object array": lambda: _npz(x=np.array([Payload()] * 3, dtype=object)),
        "1-d x": lambda: _npz(x=x.reshape(-1)), "no x": lambda: _npz(y=y),
        "test shape": lambda: _npz(x=x, y=y, x_test=x[:, :, :4], y_test=y),
        "huge x": lambda: _npz(x=x.astype(np.float64) * 1e300, y=y), "one sample": lambda: _npz(x=x[:1], y=y[:1]),
        "plain": lambda: _npz(x=x, y=y), "only y_test": lambda: _npz(x=x, x_test=x, y_test=y),
        "x_test only": lambda: _npz(x=x, x_test=x),
    }
    files = {"models.py": FACTORY.encode(), "d.npz": arrays[how]()}
    return Case(f"npz-{i:03d}", "npz", files, ["models.py:small", "--data", "d.npz"], None, [how])


def generate(kind: str, n: int, seed: int = 0) -> list[Case]:
    """``n`` cases of ``kind`` (onnx, pt2, weights, npz) drawn from ``seed``."""
    rng = np.random.default_rng([seed, len(kind), ord(kind[0])])
    if kind == "onnx":
        return [onnx_case(i, rng) for i in range(n)]
    if kind == "pt2":
        base = base_pt2()
        return [pt2_case(i, rng, base) for i in range(n)]
    if kind == "weights":
        state = _small_model().state_dict()
        return [weights_case(i, rng, state) for i in range(n)]
    return [npz_case(i, rng) for i in range(n)]
