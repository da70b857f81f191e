"""Exact integer arithmetic on onnxruntime's float kernels, for the ``integer`` target's ONNX export.

The ``integer`` contract (``ir/contract.py``) is unchanged: int32 accumulators, dyadic
``q = clamp((acc * m + 2^(n-1)) >> n, lo, hi)``. This module computes the SAME integers with float ops
where, and only where, the export proves every intermediate value is an integer (or a multiple of 2^-n)
that the float type holds exactly; elsewhere the export keeps ConvInteger and the uint64 chain. So the
file is no longer integer-ops-only: it uses ``Conv`` (float32) and float64 ``BatchNormalization``
(or ``Mul`` + ``Add``), ``Floor`` and ``Clip``. Measured on an AVX2 CPU without VNNI (one thread):
onnxruntime's grouped ``ConvInteger`` is 10-20x slower than its float32 depthwise ``Conv`` (MobileNetV2
at 64x64: 52 of its 105 ms), and the uint64 chain's ``Mul``/``BitShift`` (no 64-bit vector multiply on
AVX2) cost 2-3x the float64 chain.

* Grouped convolution (depthwise included) and average pooling as a float32 ``Conv``, when the
  accumulator bound B = max_c (sum_k |w_ck| * max|q_x| + |q_b[c]|) < 2^24: the input is
  ``Cast(q + zp) - zp`` (exact small integers; Conv's zero padding is q = 0), the weights and bias are
  integers, and every partial sum in ANY summation order (FMA included) is an integer of magnitude
  <= B < 2^24, so float32 represents it exactly: the result is the int32 accumulator, bit for bit.
  Dense convolutions keep ``ConvInteger`` (its u8 x u8 kernel runs dense layers about as fast as float32,
  ONNX_NOTES "Speed", without the Cast of the input to float32), except before a max pool (below).
* Requantization in float64, when P = max_c ((A_c + |b_c|) * m_c + 2^(n_c-1) + zp * 2^n_c) < 2^53
  (A_c: the bound on |acc| of channel c): ``v = float64(acc) * M_c + C_c`` with M_c = m_c 2^-n_c (exact:
  m_c < 2^31) and C_c = (b_c m_c + 2^(n_c-1)) 2^-n_c + zp. Each term and the sum are k * 2^-n_c with
  |k| <= P < 2^53, so float64 holds them exactly and ``v = ((acc + b) m + 2^(n-1)) / 2^n + zp``
  exactly, and the shift's result is floor(v). ``Clip`` to [zp + lo, zp + hi] (scalar bounds even for
  per-channel shifts) then ``Cast`` to uint8 give q + zp = clamp(floor(v), zp + lo, zp + hi): the bounds are
  integers >= 0 and floor is monotone, so clamp(floor(v)) = floor(clamp(v)), and onnxruntime's Cast of a
  non-negative float to an integer type truncates, which is floor there. The scale and shift
  are ONE ``BatchNormalization`` (mean 0, var = 1 - 2^-20, epsilon = 2^-20, so var + epsilon is exactly 1
  and (x - 0) / sqrt(1) * M + C is x * M + C, each step exact): 2x faster than ``Mul`` + ``Add`` on large
  planes and 7x on 2x2 planes, where onnxruntime broadcasts a [1, C, 1, 1] constant in runs of 4 elements.
  Four ops. The ONNX spec does not state how a float-to-integer ``Cast`` rounds; onnxruntime truncates
  (C's conversion; ``tests/backends/test_exact_float.py`` pins it on every fraction class), and
  ``verify`` compares every output bit, so a runtime that rounded otherwise would be caught, not trusted.
  Dropping the ``Floor`` that used to sit before the ``Clip`` took 15 % of MobileNetV2's integer export.

A dense convolution is a float32 ``Conv`` only when a max pool follows it (``onnx_export``: the pool then
runs in float32 before the requantization). Measured alone (LeNet-5, batch 64, one thread), a dense float32
Conv replacing ConvInteger was no faster (16.2 vs 15.1 ms: the Cast of the input to float32 and
onnxruntime's NCHWc reorders eat the kernel's gain), so other dense convs keep ConvInteger.

Not handled: linears in float32 (not measured), bounds that fail the
conditions above (the integer forms are used), and runtimes whose float kernels are not IEEE-exact
on exact integers (onnxruntime's CPU kernels are; ``verify`` compares every output bit).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

F32_EXACT = 2**24  # every integer of magnitude <= 2^24 is a float32
F64_EXACT = 2**53


def channel_bounds(w: np.ndarray, xmax: int) -> list[int]:
    """Per output channel, sum_k |w_ck| * xmax in exact Python ints (no bias)."""
    rows = np.abs(w.astype(np.int64)).reshape(w.shape[0], -1).sum(axis=1)
    return [int(r) * int(xmax) for r in rows.tolist()]


def float_conv(e: Any, name: str, x: gs.Variable, zero_point: int, xmax: int, w: np.ndarray,
               bias: np.ndarray, **attrs: Any) -> gs.Variable | None:
    """float32 Conv giving the exact int32 accumulator (bias included) when its bound is below 2^24, else None."""
    bounds = channel_bounds(w, xmax)
    b = [abs(int(v)) for v in np.broadcast_to(bias, (w.shape[0],)).tolist()]
    if max((a + c for a, c in zip(bounds, b, strict=True)), default=0) >= F32_EXACT:
        return None
    v = e.op("Cast", name, [x], np.float32, to=onnx.TensorProto.FLOAT)
    if zero_point:
        v = e.op("Sub", name, [v, e.const(f"{name}_xzp_f", np.array(zero_point, dtype=np.float32))], np.float32)
    inputs = [v, e.const(f"{name}_w_f", w.astype(np.float32))]
    if np.any(bias != 0):
        inputs.append(e.const(f"{name}_b_f", np.broadcast_to(bias, (w.shape[0],)).astype(np.float32)))
    return e.op("Conv", name, inputs, np.float32, kernel_shape=list(w.shape[2:]), **attrs)


BN_EPSILON = 2.0**-20  # a float32; with var = 1 - 2^-20, var + epsilon is exactly 1 in float64


def _scale_and_shift(e: Any, name: str, v: gs.Variable, scale: np.ndarray, offset: np.ndarray,
                     shape: tuple[int, ...], channels: int | None) -> gs.Variable:
    """v * scale + offset, both exact here: one BatchNormalization (mean 0, var + epsilon = 1, so its
    (x - 0) / sqrt(1) * scale + B is that, whatever the evaluation order) for per-channel or scalar
    constants; Mul + Add for constants of another shape (``param_shape``)."""
    if channels is not None and (not shape or shape[1] == -1):
        def vec(suffix: str, values: np.ndarray) -> gs.Constant:
            return e.const(f"{name}_{suffix}", np.ascontiguousarray(np.broadcast_to(values.reshape(-1), (channels,))))

        inputs = [v, vec("m_f64", scale), vec("c_f64", offset), vec("mean_f64", np.zeros(1)),
                  vec("var_f64", np.array([1.0 - BN_EPSILON]))]
        return e.op("BatchNormalization", name, inputs, np.float64, epsilon=BN_EPSILON)
    v = e.op("Mul", name, [v, e.const(f"{name}_m_f64", scale.reshape(shape))], np.float64)
    return e.op("Add", name, [v, e.const(f"{name}_c_f64", offset.reshape(shape))], np.float64)


def f64_fits(m: list[int], n: list[int], b: list[int], bounds: list[int], zp: int) -> bool:
    """Whether P = max_c ((A_c + |b_c|) m_c + 2^(n_c-1) + zp 2^n_c) < 2^53 (the float64 form is exact)."""
    worst = max((a + abs(bb)) * mm + (1 << (nn - 1)) + zp * (1 << nn)
                for a, bb, mm, nn in zip(bounds, b, m, n, strict=True))
    return worst < F64_EXACT


def f64_requant(e: Any, name: str, acc: gs.Variable, m: list[int], n: list[int], b: list[int], bounds: list[int],
                zp: int, lo: int, hi: int, shape: tuple[int, ...], channels: int | None) -> gs.Variable | None:
    """The dyadic requantization in float64 when P < 2^53 (module docstring), else None.

    ``m``, ``n``, ``b``, ``bounds`` are per channel (or one value) as Python ints; ``shape`` is the constants'
    shape for Mul/Add, ``channels`` the size of axis 1 (None: unknown).
    """
    if not f64_fits(m, n, b, bounds, zp):
        return None
    scale = np.array([mm * 2.0**-nn for mm, nn in zip(m, n, strict=True)], dtype=np.float64)
    # k * 2^-n with |k| < 2^53: float(k) is exact, and so is the power-of-two scaling
    offset = np.array([float(bb * mm + (1 << (nn - 1)) + zp * (1 << nn)) * 2.0**-nn
                       for bb, mm, nn in zip(b, m, n, strict=True)], dtype=np.float64)

    v = acc if acc.dtype == np.float64 else e.op("Cast", name, [acc], np.float64, to=onnx.TensorProto.DOUBLE)
    v = _scale_and_shift(e, name, v, scale, offset, shape, channels)
    assert zp + lo >= 0, "uint8 container: the truncating Cast is floor only on non-negative values"
    bounds_c = [e.const(f"{name}_{k}_f64", np.array(zp + q, dtype=np.float64)) for k, q in (("lo", lo), ("hi", hi))]
    v = e.op("Clip", name, [v, *bounds_c], np.float64)
    return e.op("Cast", name, [v], np.uint8, to=onnx.TensorProto.UINT8)
