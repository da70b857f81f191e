"""Run exported models in onnxruntime (CPU) and compare them with the reference executor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx as fx

from qcompile.backends.reference import run_reference


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

    @property
    def ok(self) -> bool:
        return self.mismatches == 0


def verify(gm: fx.GraphModule, model: onnx.ModelProto | bytes, inputs: torch.Tensor, batch: int = 256) -> VerifyResult:
    """Run both on ``inputs`` (in batches) and count output elements that are not bit-identical."""
    sess = session(model)
    mismatches = compared = 0
    for start in range(0, len(inputs), batch):
        x = inputs[start : start + batch]
        ref = run_reference(gm, x)
        refs = [ref] if isinstance(ref, torch.Tensor) else list(torch.utils._pytree.tree_leaves(ref))
        got = run_onnx(sess, x.numpy())
        for r, g in zip(refs, got, strict=True):
            r_np = r.numpy()
            mismatches += int(np.sum(r_np.view(np.uint32) != g.astype(np.float32).view(np.uint32)))
            compared += r_np.size
    return VerifyResult(mismatches, compared)
