"""Building blocks shared by DiT, U-ViT and PixArt.

Parameter names follow timm / the official repositories (``qkv``, ``proj``, ``fc1``, ``fc2``,
``q_linear``, ``kv_linear``) so official checkpoints load strictly. Outputs always come from
``scaled_dot_product_attention``; the score helpers (``column_scores``, ``entropy``) are side passes
used by token-caching policies and never materialise more than one query chunk of the map.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift`` with per-sample (B, C) shift/scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000, freq_shift: int = 0,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding as in DiT/ADM: ``[cos(t f), sin(t f)]`` (cos first), ``f_k = P^(-k / (half - shift))``.

    ``freq_shift=1`` is diffusers' ``downscale_freq_shift`` as its DiT port uses it (a small deviation from
    the official DiT, reproduced only for weights loaded from diffusers directories). ``dtype``: float32 as
    upstream (for any model precision); callers pass :func:`sinusoid_dtype` so a float64 model stays float64.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / (half - freq_shift))
    args = t[:, None].to(dtype) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sinusoid_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """float32 (upstream) unless the model is wider: float64 for a float64 model, float32 for fp32/fp16/bf16."""
    return torch.promote_types(torch.float32, model_dtype)


def sincos_pos_embed_2d(dim: int, grid: int, base_size: int, scale: float = 1.0) -> torch.Tensor:
    """PixArt/MAE fixed 2-D sin-cos table (grid*grid, dim), float32, computed in float64.

    Positions are ``arange(grid) / (grid / base_size) / scale``. The first ``dim/2`` channels encode the
    column (w) coordinate, the last ``dim/2`` the row (h) coordinate; each half is ``[sin, cos]`` with
    frequencies ``10000 ** (-k / (dim/4))``. Tokens are row-major.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64) / (grid / base_size) / scale
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid) each

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        quarter = dim // 4
        omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """timm ``PatchEmbed`` layout (key ``proj``, strided conv with bias); tokens out as a contiguous (B, N, C).

    The conv's output read as tokens is a transposed view (strides (N·C, 1, N)); elementwise ops keep
    that layout, so the whole residual stream would inherit it and every LayerNorm would copy its input
    back to row-major. One copy here instead of two per block."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """256-d sinusoid (cos first) -> Linear -> SiLU -> Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = 0
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        wdtype = self.mlp[0].weight.dtype
        freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift,
                                  dtype=sinusoid_dtype(wdtype))
        freq = freq.to(wdtype)
        return self.mlp(freq)


class Mlp(nn.Module):
    """timm-compatible two-layer MLP (keys ``fc1``, ``fc2``); token-wise, so it runs on any token subset."""

    def __init__(self, dim: int, hidden: int, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention (timm layout: ``qkv`` packs (3, heads, head_dim))."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # each (B, H, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))

    def forward_with_column_scores(self, x: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x), column_scores(x))`` from one qkv projection (ToCa's fresh steps need both)."""
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        o = F.scaled_dot_product_attention(q, k, v)
        with torch.no_grad():
            scores = self._column_scores(q.detach(), k.detach(), chunk)
        return self.proj(o.transpose(1, 2).reshape(B, N, C)), scores

    @torch.no_grad()
    def column_scores(self, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """``sum_i mean_h softmax(q k^T / sqrt(d))[i, j]`` -> (B, N), how much attention each token receives.

        Query-chunked so peak memory is O(B·H·chunk·N), never the full N×N map (ToCa's s1 score); in the
        model's dtype (bf16 / fp16 matmuls on a half-precision model, softmax statistics as torch keeps them).
        """
        q, k, _ = self._qkv(x)
        return self._column_scores(q, k, chunk)

    def _column_scores(self, q: torch.Tensor, k: torch.Tensor, chunk: int) -> torch.Tensor:
        kt = k.transpose(-1, -2) * self.head_dim ** -0.5  # the scale folded into k once, not per chunk
        out = None
        for s in range(0, q.shape[2], chunk):
            part = torch.softmax(q[:, :, s:s + chunk] @ kt, dim=-1).sum(2)  # (B, H, N): column sums of the chunk
            out = part if out is None else out.add_(part)
        return out.mean(1)


class CrossAttention(nn.Module):
    """PixArt-style multi-head cross-attention (keys ``q_linear``, ``kv_linear``, ``proj``).

    Query-token-wise: running it on a subset of image tokens gives exactly those tokens' outputs.
    ``mask`` (B, L) marks valid text tokens; it replaces PixArt's packed block-diagonal mask.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def _qk_v(self, x: torch.Tensor, cond: torch.Tensor):
        B, N, C = x.shape
        L = cond.shape[1]
        q = self.q_linear(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(cond).reshape(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, kv[0], kv[1]

    @staticmethod
    def _bias(mask: torch.Tensor | None):
        return None if mask is None else mask[:, None, None, :].bool()

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qk_v(x, cond)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias(mask))
        return self.proj(o.transpose(1, 2).reshape(B, N, C))

    @torch.no_grad()
    def entropy(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Entropy (natural log, +1e-7 inside) of the head-averaged cross-attention row of each token -> (B, N)."""
        q, k, _ = self._qk_v(x, cond)
        logits = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5  # the model's dtype (no float32 detour)
        if mask is not None:
            logits = logits.masked_fill(~self._bias(mask), float("-inf"))
        p = torch.softmax(logits, dim=-1).mean(1)  # (B, N, L)
        return -(p * torch.log(p + 1e-7)).sum(-1)
