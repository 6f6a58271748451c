"""ToCa's pure planner: presets, the ratio scheduler and the fresh cycle (no tensors).

Shared by :class:`~diffcache.policies.toca.ToCaPolicy` and the MAC counter. See the package docstring.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any


# =============================================================================================== params
@dataclass(frozen=True)
class ToCaParams:
    """Everything the planner and the scores need (a preset, plus overrides)."""

    fresh_threshold: int = 3            # N: base interval between fresh evaluations
    fresh_ratio: float = 0.07           # r0 = 1 - R
    direction: str = "down"             # reference index: "down" (DiT, T-1..0) or "up" (PixArt, 0..T-1)
    w_t: float = 0.0                    # lam_t = 1 + w_t - 2 w_t i / T
    w_l: float = 0.0                    # lam_layer = 1 + w_l - 2 w_l l / (depth - 1)
    module_time_share: float = 0.6      # m
    module_weight: float = 0.0          # w_m
    attention_like: str = "attn"        # the branch that gets 1 - (1 - m) w_m
    partial_kinds: tuple[str, ...] = ("mlp",)  # branches recomputed on top-k tokens on cached layers
    interval_stretch: float = 0.0       # a: interval = round(N / (1 + a - 2 a i / T))
    sensitive_window: tuple[float, float] | None = None  # fractions of T on the reference index -> interval 2
    legacy_layer0_refresh: bool = True
    zero_ratio_is_fora: bool = False    # fresh_ratio == 0 -> fixed interval N, no window (DiT reference)
    warmup: int = 1                     # leading fresh evaluations
    soft_fresh_weight: float = 0.25     # lambda_3
    score: str = "attn"                 # "attn" (s1) | "xattn" (s2) | "none" (s3 + s4 only)
    bonus_ratio: float = 0.0
    bonus_grid: int = 2
    column_chunk: int = 256             # query chunk of the s1 side pass

    def __post_init__(self) -> None:
        if int(self.fresh_threshold) < 1:
            raise ValueError(f"fresh_threshold must be >= 1, got {self.fresh_threshold}")
        if not 0.0 <= float(self.fresh_ratio) <= 1.0:
            raise ValueError(f"policy.fresh_ratio is the fraction of tokens recomputed on cached steps, in [0, 1]; "
                             f"got {self.fresh_ratio}")
        if self.direction not in ("down", "up"):
            raise ValueError(f"direction must be 'down' or 'up', got {self.direction!r}")
        if self.score not in ("attn", "xattn", "none"):
            raise ValueError(f"score must be 'attn', 'xattn' or 'none', got {self.score!r}")
        if int(self.warmup) < 1:
            raise ValueError(f"warmup must be >= 1 (the first evaluation fills the cache), got {self.warmup}")
        if "attn" in self.partial_kinds:
            raise ValueError("self-attention is never partially recomputed by ToCa; remove 'attn' from partial_kinds")


_DIT = dict(direction="down", module_time_share=0.6, module_weight=2.5, attention_like="attn",
            partial_kinds=("mlp",), interval_stretch=0.4, zero_ratio_is_fora=True, score="attn",
            bonus_ratio=0.6, bonus_grid=2, soft_fresh_weight=0.25, legacy_layer0_refresh=True)
_PIXART = dict(direction="up", w_t=0.9, w_l=0.6, module_time_share=0.6, module_weight=1.0, attention_like="xattn",
               partial_kinds=("xattn", "mlp"), interval_stretch=-0.2, sensitive_window=None, score="xattn",
               bonus_ratio=0.4, bonus_grid=4, soft_fresh_weight=0.25, fresh_threshold=3,
               legacy_layer0_refresh=True)

PRESETS: dict[str, dict[str, Any]] = {
    # ToCa-ddpm250: --fresh-threshold 4 --fresh-ratio 0.07 (R = 93 %)
    "dit_ddpm250": dict(_DIT, fresh_threshold=4, fresh_ratio=0.07, w_t=0.4, w_l=0.8, sensitive_window=(0.2, 0.4)),
    # ToCa-ddim50: --fresh-threshold 3 --fresh-ratio 0.07 --ddim-sample
    "dit_ddim50": dict(_DIT, fresh_threshold=3, fresh_ratio=0.07, w_t=2.0, w_l=-0.2, sensitive_window=(0.2, 0.4)),
    # PixArt-alpha, DPM-Solver++ 20 steps, N=3, R = 60/70/80/90 %
    "pixart_r60": dict(_PIXART, fresh_ratio=0.4),
    "pixart_r70": dict(_PIXART, fresh_ratio=0.3),
    "pixart_r80": dict(_PIXART, fresh_ratio=0.2),
    "pixart_r90": dict(_PIXART, fresh_ratio=0.1),
    # ours (see the module docstring): U-ViT, DPM-Solver-2, 20 evaluations
    "uvit_dpm20": dict(direction="up", fresh_threshold=3, fresh_ratio=0.15, w_t=0.0, w_l=0.0, module_time_share=0.6,
                       module_weight=2.5, attention_like="attn", partial_kinds=("mlp",), interval_stretch=0.0,
                       sensitive_window=None, zero_ratio_is_fora=False, score="attn", bonus_ratio=0.6,
                       bonus_grid=2, soft_fresh_weight=0.25, legacy_layer0_refresh=True),
}
_PARAM_NAMES = tuple(f.name for f in fields(ToCaParams))


def preset_params(preset: str, **overrides: Any) -> ToCaParams:
    """The :class:`ToCaParams` of a named preset; ``None`` overrides keep the preset's value."""
    if preset not in PRESETS:
        raise ValueError(f"unknown ToCa preset {preset!r}; presets: {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(_PARAM_NAMES))
    if unknown:
        raise TypeError(f"unknown ToCa options {unknown}; allowed: {sorted(_PARAM_NAMES)}")
    vals = dict(PRESETS[preset])
    vals.update({k: v for k, v in overrides.items() if v is not None})
    if vals.get("sensitive_window") is not None:
        vals["sensitive_window"] = tuple(float(x) for x in vals["sensitive_window"])
    vals["partial_kinds"] = tuple(vals.get("partial_kinds", ()))
    vals["fresh_threshold"] = int(vals["fresh_threshold"])
    vals["fresh_ratio"] = float(vals["fresh_ratio"])
    vals["legacy_layer0_refresh"] = bool(vals["legacy_layer0_refresh"])
    return ToCaParams(**vals)


# =============================================================================================== planner
@dataclass(frozen=True)
class ToCaSchedule:
    """The static plan of a run: which (evaluation, layer) is fresh, and how many image tokens each
    partially recomputed branch computes on cached layers.

    full[e][l]: layer ``l`` is fresh at evaluation ``e`` (0-based, sampling order).
    tokens[(e, l, kind)]: image tokens computed at a cached layer (absent for fresh layers; 0 = reused).
    intervals[e]: the interval in force after evaluation ``e``.
    """

    params: ToCaParams
    num_evals: int
    depth: int
    num_tokens: int
    site_kinds: tuple[str, ...]
    full: tuple[tuple[bool, ...], ...]
    tokens: Mapping[tuple[int, int, str], int]
    intervals: tuple[int, ...]
    ratios: Mapping[tuple[int, int, str], float] = field(default_factory=dict)

    def ref_index(self, nfe: int) -> int:
        """The reference's loop index of evaluation ``nfe`` (DiT counts down, PixArt up)."""
        return self.num_evals - 1 - nfe if self.params.direction == "down" else nfe

    def is_full(self, nfe: int, layer: int) -> bool:
        return self.full[nfe][layer]

    def fully_refreshed(self) -> list[int]:
        """Evaluations (0-based nfe) where every layer is fresh."""
        return [nfe for nfe in range(self.num_evals) if all(self.full[nfe])]

    def layer0_only(self) -> list[int]:
        """Evaluations where layer 0 is fresh but some other layer is not (the legacy quirk)."""
        return [nfe for nfe in range(self.num_evals) if self.full[nfe][0] and not all(self.full[nfe])]

    def fully_refreshed_ref(self) -> set[int]:
        """:meth:`fully_refreshed` in the reference's step index."""
        return {self.ref_index(nfe) for nfe in self.fully_refreshed()}

    def layer0_only_ref(self) -> set[int]:
        return {self.ref_index(nfe) for nfe in self.layer0_only()}

    def k(self, nfe: int, layer: int, kind: str) -> int:
        """Image tokens computed by branch ``kind`` (all of them on a fresh layer)."""
        if self.full[nfe][layer]:
            return self.num_tokens
        return int(self.tokens.get((nfe, layer, kind), 0))

    def fraction(self, nfe: int, layer: int, kind: str, num_prefix_tokens: int = 0) -> float:
        """Fraction of *all* tokens (prefix included; prefix tokens of partial branches always computed)."""
        if self.full[nfe][layer]:
            return 1.0
        k = self.k(nfe, layer, kind)
        if kind not in self.params.partial_kinds:
            return 0.0
        return (k + num_prefix_tokens) / (self.num_tokens + num_prefix_tokens)


def _round_half_even(x: float) -> int:
    return int(round(x))  # Python rounds half to even, as torch.round


def _interval(p: ToCaParams, i: int, T: int) -> int:
    N = p.fresh_threshold
    if p.zero_ratio_is_fora and p.fresh_ratio == 0:
        return N
    if p.sensitive_window is not None:
        lo, hi = p.sensitive_window
        if lo * T <= i < hi * T:
            return 2
    a = p.interval_stretch
    x = 1.0 + a - 2.0 * a * i / T
    if x <= 0:
        return N
    return max(1, _round_half_even(N / x))


def ratio(p: ToCaParams, e_ref: int, T: int, layer: int, depth: int, kind: str) -> float:
    """Unclamped ``r0 * lam_layer * lam_t * lam_type`` (0 for branches that are never partial)."""
    if kind not in p.partial_kinds:
        return 0.0
    m, wm = p.module_time_share, p.module_weight
    lam_type = 1.0 - (1.0 - m) * wm if kind == p.attention_like else 1.0 + m * wm
    span = max(depth - 1, 1)  # the reference's hard-coded 27 for 28 layers
    lam_l = 1.0 + p.w_l - 2.0 * p.w_l * layer / span
    lam_t = 1.0 + p.w_t - 2.0 * p.w_t * e_ref / T
    return p.fresh_ratio * lam_l * lam_t * lam_type


def plan(params: ToCaParams, num_evals: int, depth: int, num_tokens: int,
         site_kinds: Sequence[str] = ("attn", "mlp")) -> ToCaSchedule:
    """The fresh/cached pattern and the token counts of a run (pure; no tensors)."""
    p, E, depth, N = params, int(num_evals), int(depth), int(num_tokens)
    kinds = tuple(site_kinds)
    if E < 1 or depth < 1 or N < 1:
        raise ValueError(f"plan needs num_evals, depth, num_tokens >= 1; got {E}, {depth}, {N}")
    full_rows, tokens, ratios, intervals = [], {}, {}, []
    all_fresh = p.fresh_ratio >= 1.0
    cal = p.fresh_threshold
    for e in range(E):
        i = E - 1 - e if p.direction == "down" else e
        if all_fresh:
            row = [True] * depth
        else:
            first = e < p.warmup
            full0 = first or i % cal == 0
            if full0:
                cal = _interval(p, i, E)
            full_rest = (first or i % cal == 0) if p.legacy_layer0_refresh else full0
            row = [full0] + [full_rest] * (depth - 1)
        intervals.append(cal)
        full_rows.append(tuple(row))
        for layer in range(depth):
            if row[layer]:
                continue
            for kind in kinds:
                r = ratio(p, i, E, layer, depth, kind)
                ratios[(e, layer, kind)] = r
                tokens[(e, layer, kind)] = int(min(max(r, 0.0), 1.0) * N)
    return ToCaSchedule(p, E, depth, N, kinds, tuple(full_rows), tokens, tuple(intervals), ratios)
