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
the ``meta`` device, no memory), or a plain mapping of the attributes.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CONVENTIONS = ("l2c", "toca")


# =============================================================================================== geometry
@dataclass(frozen=True)
class BackboneSpec:
    family: str
    depth: int                      # cache layers (U-ViT: in + mid + out)
    hidden_size: int
    num_heads: int
    mlp_ratio: float
    num_tokens: int                 # image tokens
    num_prefix_tokens: int = 0
    site_kinds: tuple[str, ...] = ("attn", "mlp")
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 4
    input_size: int = 32
    text_len: int = 0               # PixArt caption tokens L
    caption_channels: int = 0
    num_skip: int = 0               # U-ViT skip linears (out-blocks)
    mlp_time_embed: bool = False    # U-ViT
    conv: bool = False              # U-ViT final 3x3 conv
    freq_dim: int = 256             # DiT / PixArt timestep frequency embedding

    @property
    def tokens(self) -> int:
        return self.num_tokens + self.num_prefix_tokens


def _from_variant(name: str):
    import torch

    from ..backbones import build_backbone

    with torch.device("meta"):
        return build_backbone(name)


def backbone_spec(backbone: Any, text_len: int | None = None) -> BackboneSpec:
    """A :class:`BackboneSpec` from a backbone, a variant name ("DiT-XL/2") or a mapping of attributes."""
    if isinstance(backbone, BackboneSpec):
        spec = backbone
        if text_len is not None:
            spec = BackboneSpec(**{**spec.__dict__, "text_len": int(text_len)})
        return spec
    if isinstance(backbone, str):
        backbone = _from_variant(backbone)
    if isinstance(backbone, Mapping):
        get = lambda k, d=None: backbone.get(k, d)  # noqa: E731
    else:
        get = lambda k, d=None: getattr(backbone, k, d)  # noqa: E731
    cfg = get("config", None) or {}
    family = str(get("family"))
    depth = int(get("depth"))
    D = int(get("hidden_size") or get("embed_dim"))
    patch = int(get("patch_size", 2))
    input_size = int(get("input_size", 32) or 32)
    n = get("num_tokens", None)
    if n is None:
        n = (input_size // patch) ** 2
    kinds = tuple(get("site_kinds", ("attn", "xattn", "mlp") if family == "pixart" else ("attn", "mlp")))
    L = text_len if text_len is not None else int(get("token_num", 0) or get("text_len", 0) or 0)
    if family == "pixart" and "xattn" in kinds and L <= 0:
        raise ValueError("PixArt cost needs the caption length: backbone.token_num or text_len=")
    num_skip = 0
    if family == "uvit":
        num_skip = int(get("num_skip", depth // 2) if isinstance(backbone, Mapping) else (
            sum(1 for b in backbone.out_blocks if b.skip_linear is not None) if hasattr(backbone, "out_blocks")
            else depth // 2))
    return BackboneSpec(
        family=family, depth=depth, hidden_size=D, num_heads=int(get("num_heads")),
        mlp_ratio=float(get("mlp_ratio", 4.0)), num_tokens=int(n),
        num_prefix_tokens=int(get("num_prefix_tokens", 0) or 0), site_kinds=kinds, patch_size=patch,
        in_channels=int(get("in_channels", 4)), out_channels=int(get("out_channels", get("in_channels", 4))),
        input_size=input_size, text_len=int(L), caption_channels=int(get("caption_channels", 0) or 0),
        num_skip=num_skip,
        mlp_time_embed=bool(get("mlp_time_embed", cfg.get("mlp_time_embed", False) if isinstance(cfg, Mapping) else False)),
        conv=bool(get("conv", cfg.get("conv", False) if isinstance(cfg, Mapping) else False)),
    )


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


def _layer_fixed(s: BackboneSpec, layer: int, convention: str, B: int) -> float:
    """Per-layer cost paid on every forward regardless of caching."""
    T, C = s.tokens, s.hidden_size
    out = 0.0
    skip = s.family == "uvit" and layer > s.depth // 2 and (layer - s.depth // 2) <= s.num_skip
    if convention == "l2c":
        if s.family == "dit":
            out += B * 6 * C * C
        if skip:
            out += B * T * 2 * C * C
    else:
        out += B * 2 * T * C  # LayerNorms
        if s.family == "dit":
            out += B * C + B * 6 * C * C
        if skip:
            out += B * 2 * T * 2 * C * C
    return out


def _outside(s: BackboneSpec, convention: str, B: int) -> float:
    """Per-forward MACs outside the blocks (l2c convention only; ToCa's counter excludes them)."""
    if convention != "l2c":
        return 0.0
    C, N, T, p = s.hidden_size, s.num_tokens, s.tokens, s.patch_size
    patch = N * p * p * s.in_channels * C
    if s.family == "dit":
        return B * (patch + s.freq_dim * C + C * C + 2 * C * C + N * C * p * p * s.out_channels)
    if s.family == "uvit":
        t = (C * 4 * C + 4 * C * C) if s.mlp_time_embed else 0
        conv = s.input_size * s.input_size * 9 * s.in_channels * s.in_channels if s.conv else 0
        return B * (patch + t + T * C * p * p * s.in_channels + conv)
    if s.family == "pixart":
        L, Cc = s.text_len, s.caption_channels
        return B * (patch + s.freq_dim * C + C * C + 6 * C * C + L * (Cc * C + C * C) + N * C * p * p * s.out_channels)
    raise ValueError(f"unknown backbone family {s.family!r}")


def forward_cost(backbone: Any, convention: str = "l2c", batch: int = 1,
                 fractions: Mapping[tuple[int, str], float] | None = None, text_len: int | None = None) -> float:
    """MACs ("l2c") or FLOPs ("toca") of one forward of ``batch`` samples; ``fractions[(layer, kind)]`` is
    the computed fraction of each cache site (missing = 1)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    s = backbone_spec(backbone, text_len)
    fr = fractions or {}
    total = _outside(s, convention, batch)
    for layer in range(s.depth):
        total += _layer_fixed(s, layer, convention, batch)
        for kind in s.site_kinds:
            total += _branch_cost(s, kind, float(fr.get((layer, kind), 1.0)), convention, batch)
    return float(total)


# =============================================================================================== a run
def _prepare_policy(policy: Any, spec: BackboneSpec, solver: Any, backbone: Any) -> None:
    if policy is None:
        return
    if getattr(policy, "geometry", "absent") is None and hasattr(policy, "set_geometry"):
        if hasattr(backbone, "depth") and not isinstance(backbone, (Mapping, BackboneSpec, str)):
            from ..policies.toca import geometry_of

            policy.set_geometry(geometry_of(backbone))
        else:
            side = int(round(spec.num_tokens ** 0.5))
            policy.set_geometry(depth=spec.depth, num_tokens=spec.num_tokens, num_prefix_tokens=spec.num_prefix_tokens,
                                site_kinds=spec.site_kinds,
                                token_grid=(side, side) if side * side == spec.num_tokens else None)
    if getattr(policy, "schedule", "absent") is None and hasattr(policy, "set_schedule") and solver is not None \
            and not isinstance(solver, int):
        policy.set_schedule(solver)


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
    _prepare_policy(policy, spec, solver, backbone)
    mask = None if policy is None else policy.compute_mask(num_evals)
    from ..solvers.denoiser import guidance_active

    cfg = 2 if guidance_active(spec.family, guidance) else 1
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
