"""ONNX converters for data movement and single-axis means (registered into ``onnx_ops.CONVERTERS``).

Each keeps the computed function (the canonical forms are those of ``ir/movement.py``):

  Transpose(perm), perm[0] = 0                     -> torch.permute(x, perm)
  Slice(constant starts/ends/axes, steps 1)        -> torch.narrow per sliced axis (the batch axis whole)
  Split(axis >= 1; sizes from input, attribute or num_outputs, else equal parts)
                                                   -> one torch.narrow per output
  Squeeze / Unsqueeze (not of the batch axis)      -> torch.reshape(x, (-1, *output shape[1:]))
  Gather(x, constant index or contiguous run)     -> torch.narrow (+ torch.reshape for a scalar index)
  Resize / Upsample (nearest or linear 2-D, integer factors)
                                                  -> F.interpolate(mode="nearest" / "bilinear")
  ReduceMean over axes other than the batch       -> torch.mean(x, axes, keepdim) (canonicalize turns
                                                      (2, 3) of NCHW, and a chain of single-axis means
                                                      reducing H and W, into a pool; it refuses others)

Shape-like inputs computed at run time are constants by now (``onnx_shapes.py``), and shapes are static.
Not handled: steps other than 1, slicing or splitting the batch, perms that move the batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch

from qcompile.frontends import onnx_ops
from qcompile.frontends.onnx_ops import Builder, Unsupported, _constant, _label, _present
from qcompile.ir.meta import set_info

INT_MAX = 2**63 - 1


def _static_shape(t: gs.Tensor) -> list[int]:
    shape = t.shape
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        raise Unsupported(f"needs a static shape of '{t.name}' (got {shape}); export with a fixed input size")
    return [d if isinstance(d, int) else -1 for d in shape]


def _transpose(imp: Builder, node: gs.Node) -> None:
    x = node.inputs[0]
    rank = len(_static_shape(x))
    perm = [int(p) for p in node.attrs.get("perm", list(range(rank))[::-1])]
    if perm[:1] != [0]:
        raise Unsupported(f"perm {perm} moves the batch axis")
    imp.emit_function(node, torch.permute, (imp.value(x), tuple(perm)))


def _ints_input(node: gs.Node, index: int, default: list[int] | None) -> list[int] | None:
    t = _present(node, index)
    if t is None:
        return default
    values = _constant(t)
    if values is None:
        raise Unsupported(f"run-time input '{t.name}'")
    return [int(v) for v in values.reshape(-1)]


def _slice(imp: Builder, node: gs.Node) -> None:
    shape = _static_shape(node.inputs[0])
    starts, ends = _ints_input(node, 1, None), _ints_input(node, 2, None)
    assert starts is not None and ends is not None, "Slice has starts and ends"
    axes = [a % len(shape) for a in (_ints_input(node, 3, None) or list(range(len(starts))))]
    steps = _ints_input(node, 4, [1] * len(starts)) or []
    if any(s != 1 for s in steps):
        raise Unsupported(f"steps {steps} (only 1 is supported)")
    x = value = imp.value(node.inputs[0])
    for axis, start, end in zip(axes, starts, ends, strict=True):
        if axis == 0:
            if start != 0 or end < (shape[0] if shape[0] > 0 else INT_MAX):
                raise Unsupported("slices the batch axis")
            continue
        begin, stop, _ = slice(start, end).indices(shape[axis])
        if (begin, stop) != (0, shape[axis]):
            value = imp.fx_graph.call_function(torch.narrow, (value, axis, begin, max(0, stop - begin)))
    if value is x:
        imp.bind(node, x)
    else:
        imp._finish(node, value)


def _split_sizes(node: gs.Node, size: int) -> list[int]:
    sizes = _ints_input(node, 1, None) or [int(v) for v in node.attrs.get("split", [])]
    if sizes:
        return sizes
    parts = int(node.attrs.get("num_outputs", len(node.outputs)))
    step = -(-size // parts)
    return [min(step, size - s) for s in range(0, size, step)]


def _split(imp: Builder, node: gs.Node) -> None:
    shape = _static_shape(node.inputs[0])
    axis = int(node.attrs.get("axis", 0)) % len(shape)
    if axis == 0:
        raise Unsupported("splits the batch axis")
    sizes = _split_sizes(node, shape[axis])
    if len(sizes) != len(node.outputs) or sum(sizes) != shape[axis]:
        raise Unsupported(f"split sizes {sizes} do not match {len(node.outputs)} outputs of {shape[axis]}")
    x = imp.value(node.inputs[0])
    for out, start, length in zip(node.outputs, np.cumsum([0, *sizes[:-1]]).tolist(), sizes, strict=True):
        piece = imp.fx_graph.call_function(torch.narrow, (x, axis, int(start), int(length)))
        set_info(piece, source=_label(node))
        imp.env[out.name] = piece


def _squeeze(imp: Builder, node: gs.Node) -> None:
    out_shape = _static_shape(node.outputs[0])
    in_shape = node.inputs[0].shape
    if in_shape is None or not out_shape or (in_shape[0] != out_shape[0]):
        raise Unsupported("squeezes or unsqueezes the batch axis")
    imp.emit_function(node, torch.reshape, (imp.value(node.inputs[0]), (-1, *out_shape[1:])))


def _reduce_mean(imp: Builder, node: gs.Node) -> None:
    axes = _ints_input(node, 1, None) or [int(a) for a in node.attrs.get("axes", [])]
    rank = len(node.inputs[0].shape or [])
    reduced = sorted({a % rank for a in axes}) if rank else []
    if not reduced or 0 in reduced:
        raise Unsupported(f"mean over axes {axes} of a rank-{rank} tensor (only over H and/or W of NCHW)")
    keep = bool(node.attrs.get("keepdims", 1))
    dims = tuple(reduced) if len(reduced) > 1 else reduced[0]
    imp.emit_function(node, torch.mean, (imp.value(node.inputs[0]), dims), {"keepdim": keep})


def _gather(imp: Builder, node: gs.Node) -> None:
    """Gather of a constant index (x[:, i]) or a contiguous run of indices along an axis other than the batch."""
    shape = _static_shape(node.inputs[0])
    axis = int(node.attrs.get("axis", 0)) % len(shape)
    indices = _constant(node.inputs[1])
    if indices is None or axis == 0 or indices.ndim > 1 or indices.size == 0:
        raise Unsupported("run-time, multi-dimensional or batch-axis indices")
    flat = [int(i) % shape[axis] for i in indices.reshape(-1)]
    if flat != list(range(flat[0], flat[0] + len(flat))):
        raise Unsupported(f"indices {flat} are not a contiguous run")
    piece = imp.fx_graph.call_function(torch.narrow, (imp.value(node.inputs[0]), axis, flat[0], len(flat)))
    if indices.ndim == 0:
        out = [d for i, d in enumerate(shape) if i != axis]
        imp.emit_function(node, torch.reshape, (piece, (-1, *out[1:])))
    else:
        imp._finish(node, piece)


EXACT_NEAREST = {("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"), ("half_pixel", "round_prefer_ceil"),
                 ("pytorch_half_pixel", "round_prefer_floor"), ("pytorch_half_pixel", "round_prefer_ceil")}


LINEAR_COORDINATES = {"half_pixel": False, "pytorch_half_pixel": False, "align_corners": True}


def _resize(imp: Builder, node: gs.Node) -> None:
    """Nearest Resize by integer factors: every mode listed picks source pixel floor(i / a) (no ties occur)."""
    mode = node.attrs.get("mode", "nearest")
    coords = (node.attrs.get("coordinate_transformation_mode", "half_pixel"),
              node.attrs.get("nearest_mode", "round_prefer_floor"))
    linear = mode == "linear" and coords[0] in LINEAR_COORDINATES
    if not linear and (mode != "nearest" or coords not in EXACT_NEAREST):
        raise Unsupported(f"mode {mode} with {coords[0]} / {coords[1]} (only nearest or bilinear upsampling)")
    in_shape = _static_shape(node.inputs[0])
    scales, sizes = _constant(_present(node, 2)), _constant(_present(node, 3))
    if sizes is not None and sizes.size:
        factors = [s / i for s, i in zip(sizes.reshape(-1)[2:].tolist(), in_shape[2:], strict=True)]
    elif scales is not None and scales.size:
        factors = scales.reshape(-1).tolist()[2:]
    else:
        raise Unsupported("neither constant scales nor sizes")
    if len(in_shape) != 4 or not all(float(f).is_integer() and f >= 1 for f in factors):
        raise Unsupported(f"factors {factors} (only integer upsampling of NCHW)")
    kwargs: dict[str, Any] = {"scale_factor": tuple(float(f) for f in factors),
                              "mode": "bilinear" if linear else "nearest"}
    if linear:
        kwargs["align_corners"] = LINEAR_COORDINATES[coords[0]]
    imp.emit_function(node, torch.nn.functional.interpolate, (imp.value(node.inputs[0]),), kwargs)


onnx_ops.CONVERTERS.update({
    "Resize": _resize, "Upsample": _resize, "Gather": _gather,
    "Transpose": _transpose, "Slice": _slice, "Split": _split, "Squeeze": _squeeze, "Unsqueeze": _squeeze,
    "ReduceMean": _reduce_mean,
})
