"""Run exported models in onnxruntime (CPU) and compare them with the reference executor.

``verify`` refuses a file whose recorded target (its ``qcompile.target`` metadata) is not the integer
graph's, and when it finds mismatches in a file exported with ``ort_cpu=vnni`` on a CPU without VNNI it
names that as the cause (AVX2-only u8 x s8 kernels saturate 16-bit pair sums; see ONNX_NOTES.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx as fx

from qcompile.backends.reference import run_reference
from qcompile.errors import QCompileError
from qcompile.ir.meta import get_target


class TargetMismatchError(QCompileError):
    """An ONNX file verified against an integer graph of another requantization target."""


@functools.cache
def cpu_has_vnni() -> bool | None:
    """True/False from /proc/cpuinfo's flags (avx512_vnni or avx_vnni); None where that cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_vnni" in flags or "avx_vnni" in flags


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def session(model: onnx.ModelProto | bytes, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run_onnx(model: onnx.ModelProto | bytes | ort.InferenceSession, x: np.ndarray) -> list[np.ndarray]:
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    name = sess.get_inputs()[0].name
    return list(sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)}))


@dataclass(frozen=True)
class VerifyResult:
    """Output elements compared between onnxruntime and the reference executor, and how many differ."""

    mismatches: int
    compared: int
    cause: str | None = None  # a known reason for mismatches (the CPU), when there is one

    @property
    def ok(self) -> bool:
        return self.mismatches == 0


def _check_target(gm: fx.GraphModule, model: onnx.ModelProto) -> None:
    recorded = metadata(model).get("qcompile.target")
    target = get_target(gm).value
    if recorded is not None and recorded != target:
        raise TargetMismatchError(f"the ONNX file follows target '{recorded}' but the integer graph follows "
                                  f"'{target}'; export the graph again, or compile with --target {recorded}")


def _cause(model: onnx.ModelProto, mismatches: int) -> str | None:
    if mismatches and metadata(model).get("qcompile.ort_cpu") == "vnni" and cpu_has_vnni() is False:
        return ("exported with --ort-cpu vnni and run on a CPU without VNNI, whose u8 x s8 kernels saturate; "
                "export with --ort-cpu any")
    return None


def verify(gm: fx.GraphModule, model: onnx.ModelProto | bytes, inputs: torch.Tensor, batch: int = 256,
           progress: bool = False) -> VerifyResult:
    """Run both on ``inputs`` (in batches) and count output elements that are not bit-identical."""
    from tqdm import tqdm

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
    _check_target(gm, proto)
    sess = session(proto)
    mismatches = compared = 0
    for start in tqdm(range(0, len(inputs), batch), "verify", disable=not progress, leave=False):
        x = inputs[start : start + batch]
        ref = run_reference(gm, x)
        refs = [ref] if isinstance(ref, torch.Tensor) else list(torch.utils._pytree.tree_leaves(ref))
        got = run_onnx(sess, x.numpy())
        for r, g in zip(refs, got, strict=True):
            r_np = r.numpy()
            mismatches += int(np.sum(r_np.view(np.uint32) != g.astype(np.float32).view(np.uint32)))
            compared += r_np.size
    return VerifyResult(mismatches, compared, _cause(proto, mismatches))
