"""A small ViT written the way timm writes it (tests/vit.py), compiled from PyTorch and from its ONNX export,
both targets: bit-exact between the reference executor, the fast executor and onnxruntime; the attention
is two IntMatMuls around an IntSoftmax over the last axis; the simulation predicts what the integer graph
does. Also nn.MultiheadAttention (and torchvision's ViT, whose ONNX export is sequence-first), the matmul
op on its own, and the refusals (masks, an op reading a seq-first tensor)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compile_model, random_inputs
from modern import assert_exact, pipeline
from torch import nn
from vit import PatchTransformer, TinyViT, TorchvisionViT

import qcompile
from qcompile.backends import fast, reference
from qcompile.backends.ort import run_onnx
from qcompile.ir import intops as ops
from qcompile.ir.meta import IntType
from qcompile.ir.verify import VerificationError, verify
from qcompile.report import pointwise_table

SHAPE = (1, 8, 8)


def _export(model: nn.Module, path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (random_inputs(1, shape=SHAPE),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}})
    return str(path)


def _count(cm: qcompile.CompiledModel, kind: type) -> int:
    return sum(isinstance(m, kind) for m in cm.integer_graph.modules())


@pytest.mark.parametrize("target", ["ort", "integer"])
@pytest.mark.parametrize("frontend", ["pytorch", "onnx"])
@pytest.mark.parametrize("variant", ["matmul-token", "sdpa-mean"])
def test_vit_block_compiles_bit_exactly(variant: str, frontend: str, target: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    fused, pool = variant.split("-")
    model = TinyViT(fused_attn=fused == "sdpa", pool=pool).eval()
    source: nn.Module | str = model if frontend == "pytorch" else _export(model, tmp_path / "vit.onnx")
    cm = compile_model(source, pipeline=pipeline(target), shape=SHAPE)
    counts = [_count(cm, k) for k in (ops.IntMatMul, ops.IntSoftmax, ops.IntLayerNorm, ops.IntConstCat)]
    assert counts == [2, 1, 3, 1]  # Q K^T and P V; one softmax; norm1, norm2, final norm; the class token
    softmax = next(m for m in cm.integer_graph.modules() if isinstance(m, ops.IntSoftmax))
    assert softmax.axis == 3  # the last axis of [N, heads, L, L]
    x = random_inputs(16, shape=SHAPE, seed=3)
    assert_exact(cm, x)
    agree = (cm.simulate(x).argmax(1) == cm(x).argmax(1)).float().mean().item()
    assert agree >= 0.9, f"simulation and integer graph agree on {agree:.0%} of the predictions"
    cos = F.cosine_similarity(model(x).flatten(), cm(x).flatten(), dim=0).item()
    assert cos > 0.9, f"integer vs float cosine {cos:.3f}"


def test_the_two_frontends_give_the_same_integers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = random_inputs(4, shape=SHAPE, seed=5)
    from_torch = compile_model(model, pipeline=pipeline("integer"), shape=SHAPE)
    from_onnx = compile_model(_export(model, tmp_path / "vit.onnx"), pipeline=pipeline("integer"), shape=SHAPE)
    assert torch.equal(from_torch(x), from_onnx(x))


@pytest.mark.parametrize("target", ["ort", "integer"])
def test_seq_first_attention_from_onnx_compiles_bit_exactly_at_any_batch(target: str, tmp_path: Path) -> None:
    """torchvision's ViT: the exporter writes nn.MultiheadAttention with the batch on axis 1 ([L, N, E],
    [L, N h, d]) and folded inside the tokens ([L N, E]); frontends/onnx_layout.py moves it first."""
    torch.manual_seed(0)
    model = TorchvisionViT().eval()
    from_onnx = compile_model(_export(model, tmp_path / "tv.onnx"), pipeline=pipeline(target), shape=SHAPE)
    counts = [_count(from_onnx, k) for k in (ops.IntMatMul, ops.IntSoftmax, ops.IntLayerNorm, ops.IntConstCat)]
    assert counts == [2, 1, 3, 1]
    from_torch = compile_model(model, pipeline=pipeline(target), shape=SHAPE)
    for batch in (3, 16):  # compiled at batch 2: the dynamic batch is kept
        x = random_inputs(batch, shape=SHAPE, seed=batch)
        assert_exact(from_onnx, x)
        assert torch.equal(from_onnx(x), from_torch(x))  # the same integers as nn.MultiheadAttention's rule
        cos = F.cosine_similarity(model(x).flatten(), from_onnx(x).flatten(), dim=0).item()
        assert cos > 0.9, f"integer vs float cosine {cos:.3f}"


class SeqFirstTokens(nn.Module):
    """Tokens [N, L, 16] through nn.MultiheadAttention on [L, N, E] (batch_first=False) or through
    nn.TransformerEncoderLayer(batch_first=True), then a class-token head."""

    def __init__(self, block: str) -> None:
        super().__init__()
        self.embed, self.head, self.block = nn.Linear(8, 16), nn.Linear(16, 3), block
        self.attn = nn.MultiheadAttention(16, 2)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.flatten(1, 2))
        if self.block == "encoder":
            return self.head(self.encoder(t)[:, 0])
        s = t.transpose(0, 1)
        out, _ = self.attn(s, s, s, need_weights=False)
        return self.head((out + s)[0])


@pytest.mark.parametrize("block", ["seq-first-mha", "encoder"])
def test_other_seq_first_exports_compile_bit_exactly(block: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SeqFirstTokens(block).eval()
    cm = compile_model(_export(model, tmp_path / "tokens.onnx"), pipeline=pipeline("integer"), shape=SHAPE)
    assert _count(cm, ops.IntMatMul) == 2 and _count(cm, ops.IntSoftmax) == 1
    x = random_inputs(5, shape=SHAPE, seed=4)
    assert_exact(cm, x)
    cos = F.cosine_similarity(model(x).flatten(), cm(x).flatten(), dim=0).item()
    assert cos > 0.9, f"integer vs float cosine {cos:.3f}"


class SeqFirstMean(nn.Module):
    """A mean over the tokens of a seq-first [L, N 2, 8] tensor: the batch is not on axis 0 there."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.flatten(1, 2)).transpose(0, 1)
        t = t.reshape(t.shape[0], t.shape[1] * 2, 8).mean(0)
        return self.head(t.reshape(x.shape[0], 16))


def test_an_op_reading_a_seq_first_tensor_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(qcompile.QCompileError) as info:
        compile_model(_export(SeqFirstMean().eval(), tmp_path / "mean.onnx"), shape=SHAPE)
    message = str(info.value)
    assert message.startswith("1 unsupported ONNX node(s): ReduceMean (/ReduceMean: batch on axis 1 (seq-first)")
    assert "\n" not in message and len(message) < 400


class TokenMixer(nn.Module):
    """Tokens [N, L, D] through nn.MultiheadAttention (batch_first self-attention) and a head."""

    def __init__(self, dim: int = 16, heads: int = 2, mask: bool = False) -> None:
        super().__init__()
        self.embed, self.attn = nn.Linear(8, dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head, self.mask = nn.Linear(dim, 3), mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.flatten(1, 2))  # [N, 8, 8] -> tokens [N, 8, 8] -> [N, 8, dim]
        if self.mask:
            out, _ = self.attn(t, t, t, attn_mask=t[0, :, :8] > 0)
        else:
            out, _ = self.attn(t, t, t, need_weights=False)
        return self.head(out + t)[:, 0]


@pytest.mark.parametrize("target", ["ort", "integer"])
def test_multihead_attention_compiles_bit_exactly(target: str) -> None:
    torch.manual_seed(0)
    cm = compile_model(TokenMixer().eval(), pipeline=pipeline(target), shape=SHAPE)
    assert _count(cm, ops.IntMatMul) == 2 and _count(cm, ops.IntSoftmax) == 1
    assert_exact(cm, random_inputs(8, shape=SHAPE, seed=2))


class MaskedSdpa(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.flatten(1, 2).reshape(-1, 1, 8, 8)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=q > 0).flatten(1)


@pytest.mark.parametrize("model", [MaskedSdpa(), TokenMixer(mask=True)], ids=["sdpa", "multihead"])
def test_attention_with_a_mask_is_refused_in_one_line(model: nn.Module) -> None:
    with pytest.raises(qcompile.QCompileError) as info:
        compile_model(model.eval(), shape=SHAPE)
    message = str(info.value)
    assert "mask" in message and "\n" not in message and len(message) < 400


def _matmul_op(target: str, inner: int, a: IntType, b: IntType) -> ops.IntMatMul:
    m, n = 1_518_500_250, 40  # M ~ 1.38e-3
    return ops.IntMatMul(m, n, inner=inner, inp=(a, b), out=IntType(8, True), lo=-127, hi=127,
                         fmult=m * 2.0**-n, target=target)


@pytest.mark.parametrize("target", ["ort", "integer"])
def test_int_matmul_kernels_agree_with_independent_math(target: str) -> None:
    rng = np.random.default_rng(0)
    a_t, b_t = IntType(8, False), IntType(8, True)
    a = rng.integers(0, 256, (2, 3, 5, 7))
    b = rng.integers(-127, 128, (2, 1, 7, 4))  # broadcast over the head axis
    op = _matmul_op(target, 7, a_t, b_t)
    acc = np.einsum("nhik,nxkj->nhij", a, b)
    if target == "integer":
        expected = np.clip((acc * int(op.mult) + (1 << 39)) >> 40, -127, 127)
    else:
        expected = np.clip(np.rint(acc.astype(np.float32) * np.float32(op.fmult)), -127, 127)
    got = reference.run_kernel(op, a, b)
    assert np.array_equal(got, expected)
    assert np.array_equal(fast.run_op(op, torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
                          .numpy(), expected)


def test_int_matmul_overflow_is_refused_by_the_verifier() -> None:
    import torch.fx as fx

    from qcompile.ir.meta import Stage, set_info, set_stage

    root = nn.Module()
    root.add_module("mm", _matmul_op("integer", 1 << 18, IntType(8, True), IntType(8, True)))
    g = fx.Graph()
    x, y = g.placeholder("a"), g.placeholder("b")
    node = g.call_module("mm", (x, y))
    set_info(node, itype=IntType(8, True), scale=1.0)
    g.output(node)
    gm = fx.GraphModule(root, g)
    set_stage(gm, Stage.INTEGER)
    with pytest.raises(VerificationError, match="overflow"):
        verify(gm)


def test_attention_macs_are_reported_apart() -> None:
    torch.manual_seed(0)
    cm = compile_model(TinyViT().eval(), shape=SHAPE)
    report = cm.report()
    # 2 heads, 5 tokens, head dim 8: Q K^T and P V each 2 * 5 * 5 * 8 = 400 MACs per sample
    assert report["totals"]["attention_macs"] == 800
    assert [c["attention_macs"] for c in report["pointwise"] if c["op"] == "MatMul"] == [400, 400]
    assert "attention MACs" in pointwise_table(report)


def test_onnx_runs_the_matmul_as_matmul_integer() -> None:
    torch.manual_seed(0)
    cm = compile_model(TinyViT().eval(), pipeline=pipeline("integer"), shape=SHAPE)
    graph = cm.to_onnx().graph
    weights = {t.name for t in graph.initializer}
    products = [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] not in weights]
    assert len(products) == 2  # Q K^T and P V: two run-time operands each
    x = random_inputs(2, shape=SHAPE, seed=9)
    (got,) = run_onnx(cm.to_onnx(), x.numpy())
    assert np.array_equal(got, cm.reference(x).numpy())


class BiasedAttention(nn.Module):
    """EfficientFormer's idioms: a layer scale read as ``gamma.view(1, -1, 1, 1)`` and attention biases
    gathered by a constant index buffer, ``biases[:, idxs]``, added to the scores."""

    def __init__(self, dim: int = 8, heads: int = 2, tokens: int = 16) -> None:
        super().__init__()
        self.conv, self.gamma = nn.Conv2d(1, dim, 3, padding=1), nn.Parameter(torch.rand(dim) + 0.5)
        self.qkv, self.heads, self.head = nn.Linear(dim, 3 * dim), heads, nn.Linear(dim, 3)
        self.scale = (dim // heads) ** -0.5
        self.biases = nn.Parameter(torch.randn(heads, 7) * 0.5)
        self.register_buffer("idxs", torch.randint(0, 7, (tokens, tokens)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.avg_pool2d(self.conv(x), 2)  # [N, dim, 4, 4]
        y = y * self.gamma.view(1, -1, 1, 1)
        t = y.flatten(2).transpose(1, 2)  # [N, 16, dim]
        B, N, C = t.shape
        q, k, v = self.qkv(t).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.biases[:, self.idxs]
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.head(out.mean(1))


@pytest.mark.parametrize("target", ["ort", "integer"])
def test_layer_scale_views_and_attention_biases_are_constants(target: str) -> None:
    torch.manual_seed(0)
    model = BiasedAttention().eval()
    cm = compile_model(model, pipeline=pipeline(target), shape=SHAPE)
    assert _count(cm, ops.IntMatMul) == 2 and _count(cm, ops.IntMul) == 0  # no product with a parameter
    x = random_inputs(8, shape=SHAPE, seed=4)
    assert_exact(cm, x)
    cos = F.cosine_similarity(model(x).flatten(), cm(x).flatten(), dim=0).item()
    assert cos > 0.9, f"integer vs float cosine {cos:.3f}"


@pytest.mark.parametrize("frontend", ["pytorch", "pytorch-export", "onnx"])
def test_batch_folded_into_patches_compiles_bit_exactly(frontend: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PatchTransformer(ceil=frontend == "pytorch-export").eval()  # torch.export: aten sdpa raised
    source: nn.Module | str = _export(model, tmp_path / "patches.onnx") if frontend == "onnx" else model
    cm = compile_model(source, pipeline=pipeline("ort"), shape=SHAPE)
    assert _count(cm, ops.IntMatMul) == 2 and _count(cm, ops.IntSoftmax) == 1
    x = random_inputs(5, shape=SHAPE, seed=6)  # another batch than the compiled one: the folds follow it
    assert_exact(cm, x)
    cos = F.cosine_similarity(model(x).flatten(), cm(x).flatten(), dim=0).item()
    assert cos > 0.9, f"integer vs float cosine {cos:.3f}"
