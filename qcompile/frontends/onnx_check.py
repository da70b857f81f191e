"""Validation of an input ONNX model before it is imported: what onnxruntime would refuse, qcompile refuses.

* ``densify(model)``: sparse initializers become dense ones, exactly: a SparseTensorProto holds ``values``
  [NNZ] and ``indices`` [NNZ] (positions in the row-major flattened tensor) or [NNZ, rank] (coordinates);
  dense = zeros(dims); dense[indices] = values. Indices outside the tensor, or repeated, are refused.
* ``check_types(model)``: graph inputs and outputs and every floating-point initializer must be float32
  (qcompile compiles float32 models; an fp16/fp64/integer input or weight would be reinterpreted), and
  no float initializer may be empty (a 0-size weight).
* ``check_declared_shape(model, shape)``: the per-sample dims of ``--input-shape`` (or of the data) must equal
  the static dims the model declares for its input (symbolic dims accept any size); a declared size <= 0
  is refused.
* ``onnxruntime_problem(path, model, example)``: onnxruntime loads the model and runs it once on the
  example (at the model's static batch, if it declares one); its first complaint, or None. That catches
  what the ONNX checker does not: invalid attributes (group, strides, pads, dilations), kernels larger
  than the input, biases of the wrong length, duplicate node names, types no kernel accepts.

Not handled: models onnxruntime runs but qcompile cannot import (the importer names those nodes).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from qcompile.frontends.onnx_ops import OnnxImportError


class OnnxValidationError(OnnxImportError):
    """An input model that is invalid, or that onnxruntime refuses."""


FLOATS = {TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def _dense(sparse: onnx.SparseTensorProto) -> TensorProto:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    size = int(np.prod(dims))
    name = sparse.values.name
    flat = np.full(len(indices), -1) if indices.ndim else np.full(1, -1)
    if indices.ndim == 1:
        flat = indices
    elif indices.ndim == 2 and indices.shape[1] == len(dims) and ((indices >= 0) & (indices < dims)).all():
        flat = np.ravel_multi_index(tuple(indices.T), dims)
    if values.ndim != 1 or len(flat) != len(values) or (flat.size and (flat.min() < 0 or flat.max() >= size)):
        raise OnnxValidationError(f"sparse initializer '{name}': {len(values)} values with indices of shape "
                                  f"{list(indices.shape)} do not fit dims {list(dims)}; fix or densify it")
    if len(np.unique(flat)) != len(flat):
        raise OnnxValidationError(f"sparse initializer '{name}' repeats an index; fix or densify it")
    dense = np.zeros(size, dtype=values.dtype)
    dense[flat] = values
    return numpy_helper.from_array(dense.reshape(dims), name)


def densify(model: onnx.ModelProto) -> None:
    """Replace every sparse initializer of the main graph by the dense initializer it stands for."""
    graph = model.graph
    dense = [_dense(s) for s in graph.sparse_initializer]
    del graph.sparse_initializer[:]
    graph.initializer.extend(dense)


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def check_types(model: onnx.ModelProto, path: Path) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        t = value.type
        if not t.HasField("tensor_type") or t.tensor_type.elem_type != TensorProto.FLOAT:
            kind = _type_name(t.tensor_type.elem_type) if t.HasField("tensor_type") else "not a tensor"
            raise OnnxValidationError(f"{path}: graph input/output '{value.name}' is {kind}; qcompile compiles "
                                      "models with float32 inputs and outputs: export it in float32")
    for init in model.graph.initializer:
        if init.data_type in FLOATS:
            raise OnnxValidationError(f"{path}: initializer '{init.name}' is {_type_name(init.data_type)}; qcompile "
                                      "reads float32 weights: convert the model to float32 first")
        if init.data_type == TensorProto.FLOAT and 0 in init.dims:
            raise OnnxValidationError(f"{path}: initializer '{init.name}' has shape {list(init.dims)}, no values; "
                                      "fix the model (a layer needs at least one weight)")


def declared_dims(model: onnx.ModelProto) -> list[int | str | None]:
    """The first graph input's declared dims: ints, names of symbolic dims, or None where unknown."""
    shape = model.graph.input[0].type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def check_declared_shape(model: onnx.ModelProto, path: Path, shape: tuple[int, ...]) -> None:
    """The example's (batch, *shape) against the model's declared input dims."""
    dims = declared_dims(model)
    if not dims:
        return
    if any(isinstance(d, int) and d <= 0 for d in dims):
        raise OnnxValidationError(f"{path}: input '{model.graph.input[0].name}' declares shape {dims} with a size "
                                  "<= 0; fix the model's input shape")
    per_sample = dims[1:]
    fits = len(per_sample) == len(shape) and all(not isinstance(d, int) or d == s
                                                 for d, s in zip(per_sample, shape, strict=True))
    if not fits:
        want = ",".join(str(d) if isinstance(d, int) else "?" for d in per_sample)
        raise OnnxValidationError(f"input shape {','.join(map(str, shape))} does not fit {path}, whose input "
                                  f"'{model.graph.input[0].name}' is declared {dims}; pass --input-shape {want}")


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Load model from .*? failed:)?")


def _ort_message(exc: BaseException) -> str:
    text = " ".join(_ORT_PREFIX.sub("", str(exc).strip()).split())
    text = text.replace("This is an invalid model. ", "").replace("Non-zero status code returned while running ", "")
    return text[:150] + ("..." if len(text) > 150 else "")


def onnxruntime_problem(path: Path, model: onnx.ModelProto, example: torch.Tensor) -> str | None:
    """onnxruntime's complaint about loading ``path`` and running it once on ``example``, or None."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    dims = declared_dims(model)
    batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else 1
    x = example[:1].expand(batch, *example.shape[1:]).contiguous().numpy()
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        sess.run(None, {sess.get_inputs()[0].name: x})
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        return _ort_message(exc)
    return None
