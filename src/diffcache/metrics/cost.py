"""Analytic, cache-aware compute counter for DiT, U-ViT and PixArt.

Two conventions (both per forward, proportional to the batch):

``"l2c"`` -- MACs of linear (and patch-embedding conv) layers only, as pytorch-OpCounter counts them in
    Learning-to-Cache (attention-score matmuls and softmax not counted). Per layer with T tokens
    (U-ViT: image + prefix tokens), width D, MLP ratio r, text length L:
    self-attention ``4 T D^2``; MLP ``2 r T D^2`` (8 T D^2 for r = 4); cross-attention ``2 T D^2 + 2 L D^2``;
    DiT adaLN ``6 D^2``; U-ViT out-block skip linear ``2 T D^2``. Outside the blocks: patch embedding,
    timestep / caption embedders, PixArt's ``t_block``, final layers (DiT adaLN + linear, U-ViT
    ``decoder_pred`` and 3x3 conv, PixArt linear). DiT-XL/2-256: 114.4 GMAC; U-ViT-H/2-256: 128.8 GMAC.

``"toca"`` -- FLOPs as ToCa's DiT counter (toca.md §4.1), per layer only (embedders and final layer
    excluded): attention ``6BTC^2 + BTC + 2BT^2C + 5BHT^2 + 2BT^2C + 2BTC^2``; LayerNorms ``2BTC``;
    DiT adaLN ``BC + 6BC^2``; MLP ``4BnC(rC) + 6Bn(rC)`` with n the computed tokens. Extensions (no
    reference counter exists): PixArt cross-attention ``2BnC^2 + BnC + 4BnLC + 5BHnL + 2BnC^2`` plus the
    key/value projection ``4BLC^2`` whenever the branch runs; U-ViT skip linear ``4BTC^2``.
    DiT-XL/2 DDIM-50 with CFG (B = 2): 23.735 TFLOPs.

Caching: ``fractions[(layer, kind)]`` (one forward) or ``policy.compute_mask(num_evals)`` (a run) give the
fraction of a branch's tokens that is computed. 0 costs nothing; ``f`` costs ``f`` of the token-wise
parts (all of a self-attention branch -- partial self-attention is not something any policy here does,
so this is only a linear interpolation between its 0 and 1 endpoints); a cross-attention branch that
runs at all pays its full key/value projection. Per-forward parts outside the cache sites (adaLN,
LayerNorms, U-ViT skip linears, embedders) are always paid.

``policy_cost`` works from the planner alone: pass a backbone instance, a variant name (instantiated on
the ``meta`` device, no memory), or a mapping of constructor arguments with ``family``. The costs that
differ between families (adaLN, skip linears, embedders) are the shapes each class lists in ``fixed_linears``;
the conventions above are applied here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..backbones import build_backbone, from_mapping
from ..backbones.base import Linear, SiteLayout

CONVENTIONS = ("l2c", "toca")


# =============================================================================================== geometry
@dataclass(frozen=True)
class BackboneSpec:
    """What the counter needs, read once from a backbone: its :class:`SiteLayout`, widths, and the
    family's fixed (never cached) costs from ``backbone.fixed_linears`` (per sample)."""

    layout: SiteLayout
    hidden_size: int
    num_heads: int
    mlp_ratio: float
    text_len: int = 0                                  # cross-attention keys L (PixArt caption tokens)
    outside: tuple[float, float] = (0.0, 0.0)          # (l2c MACs, toca FLOPs) outside the blocks
    layer_fixed: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())
    guidance_off: float = 1.0

    @property
    def depth(self) -> int:
        return self.layout.depth

    @property
    def site_kinds(self) -> tuple[str, ...]:
        return self.layout.site_kinds

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def tokens(self) -> int:
        return self.layout.num_tokens + self.layout.num_prefix_tokens


def _instance(backbone: Any):
    """A backbone from a variant name or a mapping of constructor arguments (on the meta device)."""
    import torch

    with torch.device("meta"):
        return build_backbone(backbone) if isinstance(backbone, str) else from_mapping(backbone)


def backbone_spec(backbone: Any, text_len: int | None = None) -> BackboneSpec:
    """A :class:`BackboneSpec` from a backbone, a variant name ("DiT-XL/2") or a mapping with ``family``."""
    if isinstance(backbone, BackboneSpec):
        return backbone if text_len is None else replace(backbone, text_len=int(text_len))
    if isinstance(backbone, (str, Mapping)):
        backbone = _instance(backbone)
    layout = backbone.layout
    L = int(text_len if text_len is not None else getattr(backbone, "token_num", 0) or 0)
    if "xattn" in layout.site_kinds and L <= 0:
        raise ValueError("the cost of a cross-attention backbone needs the caption length: backbone.token_num or "
                         "text_len=")
    outside, per_layer = backbone.fixed_linears()
    norms = 2.0 * (layout.num_tokens + layout.num_prefix_tokens) * int(backbone.hidden_size)  # toca: LayerNorms
    return BackboneSpec(layout=layout, hidden_size=int(backbone.hidden_size), num_heads=int(backbone.num_heads),
                        mlp_ratio=float(backbone.mlp_ratio), text_len=L,
                        outside=(float(sum(lin.macs for lin in outside)), 0.0),  # toca: embedders excluded
                        layer_fixed=(tuple(float(sum(lin.macs for lin in layer)) for layer in per_layer),
                                     tuple(norms + sum(map(_toca_flops, layer)) for layer in per_layer)),
                        guidance_off=float(backbone.guidance_off))


def _toca_flops(lin: Linear) -> float:
    """ToCa's counter: adaLN ``BC + 6BC^2`` (SiLU, then one FLOP per MAC); any other linear two per MAC."""
    return float(lin.fan_in + lin.macs) if lin.silu else 2.0 * lin.macs


# =============================================================================================== per branch
def _branch_cost(s: BackboneSpec, kind: str, f: float, convention: str, B: int) -> float:
    if f <= 0:
        return 0.0
    T, C, H, r, L = s.tokens, s.hidden_size, s.num_heads, s.mlp_ratio, s.text_len
    hid = int(C * r)
    if convention == "l2c":
        if kind == "attn":
            return f * B * 4 * T * C * C
        if kind == "mlp":
            return f * B * 2 * T * C * hid
        if kind == "xattn":
            return f * B * 2 * T * C * C + B * 2 * L * C * C
    else:
        if kind == "attn":
            return f * B * (6 * T * C * C + T * C + 2 * T * T * C + 5 * H * T * T + 2 * T * T * C + 2 * T * C * C)
        if kind == "mlp":
            return f * B * (2 * (2 * T * C * hid) + 6 * T * hid)
        if kind == "xattn":
            tokenwise = 2 * T * C * C + T * C + 2 * T * L * C + 5 * H * T * L + 2 * T * L * C + 2 * T * C * C
            return f * B * tokenwise + B * 4 * L * C * C
    raise ValueError(f"no cost model for site kind {kind!r}")


def forward_cost(backbone: Any, convention: str = "l2c", batch: int = 1,
                 fractions: Mapping[tuple[int, str], float] | None = None, text_len: int | None = None) -> float:
    """MACs ("l2c") or FLOPs ("toca") of one forward of ``batch`` samples; ``fractions[(layer, kind)]`` is
    the computed fraction of each cache site (missing = 1)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    s = backbone_spec(backbone, text_len)
    fr = fractions or {}
    c = CONVENTIONS.index(convention)
    total = batch * s.outside[c]
    for layer in range(s.depth):
        total += batch * s.layer_fixed[c][layer]
        for kind in s.site_kinds:
            total += _branch_cost(s, kind, float(fr.get((layer, kind), 1.0)), convention, batch)
    return float(total)


# =============================================================================================== a run
def run_cost(spec: BackboneSpec, num_evals: int, mask: Mapping[tuple[int, int, str], float] | None,
             convention: str, batch: int = 1) -> float:
    if mask is None:
        return num_evals * forward_cost(spec, convention, batch)
    per_eval: dict[int, dict[tuple[int, str], float]] = {e: {} for e in range(num_evals)}
    for (e, layer, kind), v in mask.items():
        if e in per_eval:
            per_eval[e][(layer, kind)] = v
    return sum(forward_cost(spec, convention, batch, per_eval[e]) for e in range(num_evals))


def policy_cost(backbone: Any, solver: Any, policy: Any = None, guidance: float | None = None,
                convention: str = "l2c", text_len: int | None = None) -> dict[str, float]:
    """Cost of a whole sampling run under ``policy`` (None = compute everything).

    ``solver``: a solver (``num_evals``) or an int number of evaluations. Returns per image (no CFG
    doubling) ``macs_full``, ``macs``, ``macs_ratio`` (l2c convention), ``flops_full``, ``flops``,
    ``flops_ratio`` (toca convention), ``speedup_macs`` / ``speedup_flops``; the ``*_cfg`` keys are
    multiplied by ``cfg_factor`` (2 when ``guidance`` asks for an unconditional pass: DiT/PixArt batch
    of 2, U-ViT two passes); ``cost``, ``cost_full``, ``ratio`` repeat the chosen ``convention``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    spec = backbone_spec(backbone, text_len)
    num_evals = int(solver) if isinstance(solver, int) else int(solver.num_evals)
    mask = None if policy is None else policy.compute_mask(spec.layout, solver)
    cfg = 2 if guidance is not None and float(guidance) != spec.guidance_off else 1
    out: dict[str, float] = {"num_evals": float(num_evals), "cfg_factor": float(cfg)}
    for conv, unit in (("l2c", "macs"), ("toca", "flops")):
        full = run_cost(spec, num_evals, None, conv)
        cached = full if mask is None else run_cost(spec, num_evals, mask, conv)
        out[f"{unit}_full"] = full
        out[unit] = cached
        out[f"{unit}_ratio"] = cached / full
        out[f"speedup_{unit}"] = full / cached if cached else float("inf")
        out[f"{unit}_full_cfg"] = cfg * full
        out[f"{unit}_cfg"] = cfg * cached
    unit = "macs" if convention == "l2c" else "flops"
    out["cost"], out["cost_full"], out["ratio"] = out[unit], out[f"{unit}_full"], out[f"{unit}_ratio"]
    return out


__all__ = ["BackboneSpec", "CONVENTIONS", "backbone_spec", "forward_cost", "policy_cost", "run_cost"]
