"""A small vision transformer written the way timm writes it (no timm dependency): patch embedding conv +
flatten + transpose, class token, position embedding, pre-norm blocks with timm's Attention (qkv Linear,
reshape/permute/unbind, q @ k^T * scale or scaled_dot_product_attention, softmax, @ v) and Mlp (GELU),
final LayerNorm, class-token or mean pooling, linear head; and one written the way torchvision writes it
(``TorchvisionViT``: nn.MultiheadAttention(batch_first=True), which the TorchScript exporter writes in a
sequence-first layout)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """timm.models.vision_transformer.Attention (q_norm/k_norm Identity, dropout 0)."""

    def __init__(self, dim: int, num_heads: int = 2, fused_attn: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, fused_attn: bool) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads, fused_attn)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(chans, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # NCHW -> NLC


class TinyViT(nn.Module):
    def __init__(self, img: int = 8, patch: int = 4, chans: int = 1, dim: int = 16, depth: int = 1,
                 num_heads: int = 2, classes: int = 3, fused_attn: bool = False, pool: str = "token") -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch, chans, dim)
        tokens = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.2)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, fused_attn) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        x = x[:, 0] if self.pool == "token" else x.mean(dim=1)
        return self.head(x)


class PatchTransformer(nn.Module):
    """timm's MobileVitBlock unfold/fold: [B, C, H, W] -> [B * P, N, C] tokens (P pixels per patch, N patches),
    a transformer block on them (the batch folded into the token batch), and the fold back, then a head."""

    def __init__(self, dim: int = 8, patch: int = 2, fused_attn: bool = True, ceil: bool = False) -> None:
        super().__init__()
        self.conv, self.patch, self.ceil = nn.Conv2d(1, dim, 3, padding=1), patch, ceil
        self.block, self.norm = Block(dim, 2, fused_attn), nn.LayerNorm(dim)
        self.proj, self.head = nn.Conv2d(dim, dim, 1), nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        B, C, H, W = x.shape
        ph = pw = self.patch
        if self.ceil:  # timm's padding check branches on the shape: torch.fx cannot trace it, torch.export can
            nh, nw = math.ceil(H / ph), math.ceil(W / pw)
            if nh * ph != H or nw * pw != W:
                x = F.interpolate(x, size=(nh * ph, nw * pw), mode="bilinear", align_corners=False)
        else:
            nh, nw = H // ph, W // pw
        x = x.reshape(B * C * nh, ph, nw, pw).transpose(1, 2)
        x = x.reshape(B, C, nh * nw, ph * pw).transpose(1, 3).reshape(B * ph * pw, nh * nw, -1)
        x = self.norm(self.block(x))
        x = x.contiguous().view(B, ph * pw, nh * nw, -1)
        x = x.transpose(1, 3).reshape(B * C * nh, nw, ph, pw)
        x = x.transpose(1, 2).reshape(B, C, nh * ph, nw * pw)
        return self.head(self.proj(x).mean((2, 3)))


class MLPBlock(nn.Sequential):
    """torchvision.models.vision_transformer.MLPBlock (dropout 0)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))


class EncoderBlock(nn.Module):
    """torchvision.models.vision_transformer.EncoderBlock: pre-norm nn.MultiheadAttention and MLPBlock."""

    def __init__(self, num_heads: int, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, num_heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class TorchvisionViT(nn.Module):
    """torchvision.models.VisionTransformer in small: conv_proj, reshape/permute to tokens, class token,
    position embedding, encoder blocks, final LayerNorm, class-token head."""

    def __init__(self, img: int = 8, patch: int = 4, chans: int = 1, dim: int = 16, num_heads: int = 2,
                 depth: int = 1, classes: int = 3) -> None:
        super().__init__()
        self.patch, self.dim = patch, dim
        self.conv_proj = nn.Conv2d(chans, dim, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embedding = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.2)
        self.layers = nn.Sequential(*[EncoderBlock(num_heads, dim, 2 * dim) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        x = self.conv_proj(x).reshape(n, self.dim, (h // self.patch) * (w // self.patch)).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.ln(self.layers(x + self.pos_embedding))
        return self.head(x[:, 0])
