"""ToCa (Zou et al., ICLR 2025): token-wise feature caching.

Behaviour follows the technical report ``shared/reference/toca.md`` (the public ToCa code at HEAD
``e84096f``); this is an independent implementation.

What a run does
    Every ``(evaluation, layer)`` is either *fresh* or *cached* (:func:`plan`). A fresh layer computes
    all its branches for all tokens, stores their **ungated** outputs (the backbone applies the current
    step's gate afterwards) and refreshes the token scores. A cached layer reuses the self-attention
    output for every token and recomputes the token-wise branches (MLP; PixArt also cross-attention)
    for the top-``k`` tokens only: their inputs are gathered, the module runs on them, the outputs are
    scattered into the cached tensor, and the whole tensor is returned.

Token scores (all (B, N) vectors; no attention map is ever stored)
    * s1 (DiT, U-ViT): column sums of the head-mean self-attention map of the layer's last fresh
      evaluation (``Attention.column_scores``, a query-chunked side pass run on fresh layers only),
      L2-normalised over tokens.
    * s2 (PixArt): cross-attention entropy per token (``CrossAttention.entropy``), refreshed on fresh
      layers and for the recomputed tokens of cached layers. With a one-batch CFG layout both halves
      share one score, ``normalize(1 + ln2 + (H_a + H_b) / 2)`` -- exactly what the reference's packed
      block-diagonal map gives -- so cond and uncond select the same tokens.
    * s3: staleness counter per (layer, branch): the score uses ``weight * counter / N`` (weight 0.25),
      then the counter does ``+= 1`` for all tokens and is zeroed for the recomputed ones.
    * s4: on ``g x g`` blocks of the image-token grid, each block's best token is multiplied by
      ``1 + bonus`` (DiT 0.6 / 2, PixArt 0.4 / 4); skipped when the grid is not divisible by ``g``.
    Top-k is per sample (argsort, descending), ``k = int(clamp(r, 0, 1) * N)``.

Ratio scheduler: ``r = r0 * lam_layer * lam_t * lam_type`` with
    ``lam_layer(l) = 1 + w_l - 2 w_l l / (depth - 1)`` (the reference hard-codes 27 = 28 - 1),
    ``lam_t(i) = 1 + w_t - 2 w_t i / T`` on the preset's *reference index* ``i`` (DiT counts down
    ``T-1 .. 0``, PixArt counts up ``0 .. T-1``), ``lam_type = 1 - (1 - m) w_m`` for the attention-like
    branch and ``1 + m w_m`` for the MLP. Self-attention is never partially recomputed.

Fresh cycle (per layer, the reference's "cal_type" logic)
    The first evaluation is fresh. Afterwards layer ``l`` is fresh iff ``i % interval == 0``; on a fresh
    evaluation layer 0 re-computes the interval ``round(N / (1 + a - 2 a i / T))`` (half to even; DiT
    ``a = 0.4``, PixArt ``a = -0.2`` i.e. ``0.8 + 0.4 i / T``), forced to 2 inside DiT's sensitive window
    ``[0.2 T, 0.4 T)``. With ``legacy_layer0_refresh=True`` (the reference, needed for its FLOP figures)
    layers 1.. are re-tested against the *new* interval, so some evaluations refresh layer 0 only (DiT
    DDIM-50 N=3: steps 45 and 32; PixArt N=3: step 4). With ``False`` the decision is made once per
    evaluation and every layer follows layer 0. With DiT presets ``fresh_ratio = 0`` is FORA (fixed
    interval N, no stretch, no window), as in the reference.

Counting (a choice): the planner counts *model evaluations* (``ctx.nfe``, ``T = num_evals``). For one
evaluation per step (DDIM, DDPM, DPM-Solver++) this is the reference's step index; for DPM-Solver-2
singlestep the midpoint evaluations are slots like any other.

``fresh_ratio >= 1`` (R = 0 %) is defined as "every layer fresh at every evaluation", i.e. the uncached
model (the reference would still reuse self-attention on its cycle's cached steps).

Presets
    ``dit_ddpm250`` (N=4, r0=0.07, ``ToCa-ddpm250``), ``dit_ddim50`` (N=3, r0=0.07, ``ToCa-ddim50``),
    ``pixart_r60/r70/r80/r90`` (N=3, r0=0.4/0.3/0.2/0.1, DPM-Solver++ 20) and ``uvit_dpm20`` (ours; no
    published ToCa for U-ViT): DiT-style scores s1 + s3 + s4 (0.6, 2x2), a fixed interval of 3
    evaluations counted up over the 20 DPM-Solver-2 evaluations (first evaluation fresh, no stretch,
    no window, so no layer-0-only quirk), r0 = 0.15 with no layer/time weighting (U-ViT's long skips
    make the layer index a poor proxy for sensitivity and there is no tuning data) and the DiT type
    weights (m 0.6, w_m 2.5): attention fully reused, MLP on int(0.375 N) image tokens. U-ViT's prefix
    tokens (label, time) are always recomputed in token-wise branches and never scored.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from .base import CachePolicy, StepContext

LN2 = math.log(2.0)


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
        if float(self.fresh_ratio) < 0:
            raise ValueError(f"fresh_ratio must be >= 0, got {self.fresh_ratio}")
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
FAMILY_DEFAULT_PRESET = {"dit": "dit_ddim50", "pixart": "pixart_r70", "uvit": "uvit_dpm20"}
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

    def ref_index(self, e: int) -> int:
        """The reference's loop index of evaluation ``e`` (DiT counts down, PixArt up)."""
        return self.num_evals - 1 - e if self.params.direction == "down" else e

    def is_full(self, e: int, layer: int) -> bool:
        return self.full[e][layer]

    def fully_refreshed(self) -> list[int]:
        """Evaluations (0-based nfe) where every layer is fresh."""
        return [e for e in range(self.num_evals) if all(self.full[e])]

    def layer0_only(self) -> list[int]:
        """Evaluations where layer 0 is fresh but some other layer is not (the legacy quirk)."""
        return [e for e in range(self.num_evals) if self.full[e][0] and not all(self.full[e])]

    def fully_refreshed_ref(self) -> set[int]:
        """:meth:`fully_refreshed` in the reference's step index."""
        return {self.ref_index(e) for e in self.fully_refreshed()}

    def layer0_only_ref(self) -> set[int]:
        return {self.ref_index(e) for e in self.layer0_only()}

    def k(self, e: int, layer: int, kind: str) -> int:
        """Image tokens computed by branch ``kind`` (all of them on a fresh layer)."""
        if self.full[e][layer]:
            return self.num_tokens
        return int(self.tokens.get((e, layer, kind), 0))

    def fraction(self, e: int, layer: int, kind: str, num_prefix_tokens: int = 0) -> float:
        """Fraction of *all* tokens (prefix included; prefix tokens of partial branches always computed)."""
        if self.full[e][layer]:
            return 1.0
        k = self.k(e, layer, kind)
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


# =============================================================================================== scores
def spatial_bonus(score: torch.Tensor, grid: tuple[int, int], block: int, bonus: float) -> torch.Tensor:
    """s4: multiply the best token of every ``block x block`` cell of the (rows, cols) grid by ``1 + bonus``.

    Returns ``score`` unchanged when ``bonus == 0``, ``block <= 1`` or the grid is not divisible.
    """
    rows, cols = grid
    B, N = score.shape
    if bonus == 0 or block <= 1 or rows * cols != N or rows % block or cols % block:
        return score
    g = block
    cells = score.reshape(B, rows // g, g, cols // g, g).permute(0, 1, 3, 2, 4).reshape(B, -1, g * g)
    best = cells.argmax(dim=-1, keepdim=True)
    factor = torch.ones_like(cells).scatter_(-1, best, 1.0 + bonus)
    cells = cells * factor
    return cells.reshape(B, rows // g, cols // g, g, g).permute(0, 1, 3, 2, 4).reshape(B, N)


def entropy_score(H: torch.Tensor, paired: bool) -> torch.Tensor:
    """s2 from per-token cross-attention entropies (B, N). ``paired``: the batch is two CFG halves that
    share one selection (``normalize(1 + ln2 + (H_a + H_b)/2)`` repeated over the halves)."""
    if paired and H.shape[0] % 2 == 0:
        a, b = H.chunk(2)
        s = F.normalize(1.0 + LN2 + 0.5 * (a + b), p=2, dim=1)
        return s.repeat(2, 1)
    return F.normalize(1.0 + H, p=2, dim=1)


def select_tokens(score: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample indices of the ``k`` highest scores (descending, stable)."""
    return torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _scatter(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return dst.scatter(1, idx.unsqueeze(-1).expand(-1, -1, dst.shape[-1]), src.to(dst.dtype))


# =============================================================================================== policy
@dataclass
class _Geometry:
    depth: int
    num_tokens: int              # image tokens
    num_prefix_tokens: int = 0
    site_kinds: tuple[str, ...] = ("attn", "mlp")
    token_grid: tuple[int, int] | None = None


def geometry_of(backbone) -> _Geometry:
    grid = getattr(backbone, "token_grid", None)
    n = int(getattr(backbone, "num_tokens"))
    return _Geometry(depth=int(backbone.depth), num_tokens=n,
                     num_prefix_tokens=int(getattr(backbone, "num_prefix_tokens", 0) or 0),
                     site_kinds=tuple(getattr(backbone, "site_kinds", ("attn", "mlp"))),
                     token_grid=None if grid is None else (int(grid[0]), int(grid[1])))


class ToCaPolicy(CachePolicy):
    """Token-wise caching (see the module docstring).

    ``ToCaPolicy(preset="dit_ddim50", fresh_threshold=None, fresh_ratio=None, legacy_layer0_refresh=None,
    **overrides)``; any :class:`ToCaParams` field can be overridden (None keeps the preset's value).
    ``preset=None`` picks the backbone family's default on :meth:`attach` (dit_ddim50 / pixart_r70 /
    uvit_dpm20).
    """

    name = "toca"

    def __init__(self, preset: str | None = "dit_ddim50", *, fresh_threshold: int | None = None,
                 fresh_ratio: float | None = None, legacy_layer0_refresh: bool | None = None,
                 **overrides: Any) -> None:
        super().__init__()
        self.preset = preset
        self._overrides = dict(overrides, fresh_threshold=fresh_threshold, fresh_ratio=fresh_ratio,
                               legacy_layer0_refresh=legacy_layer0_refresh)
        self.params: ToCaParams | None = None
        if preset is not None:
            self.params = preset_params(preset, **self._overrides)
        else:  # validate the option names now
            unknown = sorted(set(self._overrides) - set(_PARAM_NAMES))
            if unknown:
                raise TypeError(f"unknown ToCa options {unknown}; allowed: {sorted(_PARAM_NAMES)}")
        self.geometry: _Geometry | None = None
        self._plans: dict[int, ToCaSchedule] = {}
        self._needs_memo: dict[int, bool] = {}
        self._cache: dict[tuple[str, int, str], torch.Tensor] = {}
        self._score: dict[tuple[str, int], torch.Tensor] = {}     # s1 (normalised) or entropy H, (B, N_img)
        self._stale: dict[tuple[str, int, str], torch.Tensor] = {}  # s3 counters, (B, N_img) int
        self._stats = {"site_calls": 0, "fresh_site_calls": 0, "partial_site_calls": 0, "reused_site_calls": 0,
                       "tokens_computed": 0.0, "tokens_total": 0.0}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Mapping, backbone=None) -> "ToCaPolicy":
        """From a Hydra ``policy=toca`` group: ``preset``, ``fresh_threshold``, ``fresh_ratio``,
        ``legacy_layer0_refresh`` and any :class:`ToCaParams` field as an override."""
        c = dict(cfg or {})
        c.pop("name", None)
        preset = c.pop("preset", "dit_ddim50")
        if preset is None and backbone is not None:
            preset = FAMILY_DEFAULT_PRESET.get(getattr(backbone, "family", ""), None)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown ToCa preset {preset!r}; presets: {sorted(PRESETS)}")
        policy = cls(preset, **c)
        if backbone is not None:
            policy.attach(backbone)
        return policy

    def attach(self, backbone) -> "ToCaPolicy":
        if self.params is None:
            fam = getattr(backbone, "family", "")
            if fam not in FAMILY_DEFAULT_PRESET:
                raise ValueError(f"no default ToCa preset for backbone family {fam!r}; pass preset=")
            self.preset = FAMILY_DEFAULT_PRESET[fam]
            self.params = preset_params(self.preset, **self._overrides)
        self.set_geometry(geometry_of(backbone))
        return super().attach(backbone)

    def set_geometry(self, geometry: _Geometry | None = None, **kw: Any) -> "ToCaPolicy":
        """Layout without a backbone (cost counting from the planner alone): depth, num_tokens (image
        tokens), num_prefix_tokens, site_kinds, token_grid."""
        geo = geometry if geometry is not None else _Geometry(**kw)
        if self.params is None:
            raise ValueError("ToCaPolicy(preset=None) needs a backbone (attach) to pick its preset")
        p = self.params
        if p.score == "xattn" and "xattn" not in geo.site_kinds:
            raise ValueError(f"ToCa preset {self.preset!r} scores tokens by cross-attention entropy (s2), but the "
                             f"backbone has no cross-attention (site kinds {geo.site_kinds}); use a DiT/U-ViT preset")
        if p.score == "attn" and "attn" not in geo.site_kinds:
            raise ValueError(f"ToCa preset {self.preset!r} needs a self-attention site for s1")
        self.geometry = geo
        self._plans.clear()
        self._needs_memo.clear()
        return self

    # ------------------------------------------------------------------ planning
    def schedule(self, num_evals: int) -> ToCaSchedule:
        if self.geometry is None or self.params is None:
            raise ValueError("ToCaPolicy has no layout yet: attach a backbone or call set_geometry(...)")
        num_evals = int(num_evals)
        sched = self._plans.get(num_evals)
        if sched is None:
            g = self.geometry
            sched = plan(self.params, num_evals, g.depth, g.num_tokens, g.site_kinds)
            self._plans[num_evals] = sched
        return sched

    def compute_mask(self, num_evals: int) -> dict[tuple[int, int, str], float]:
        """Fraction of tokens (prefix included) each (nfe, layer, kind) computes, from the planner."""
        sched = self.schedule(num_evals)
        P = self.geometry.num_prefix_tokens
        return {(e, layer, kind): sched.fraction(e, layer, kind, P)
                for e in range(sched.num_evals) for layer in range(sched.depth) for kind in sched.site_kinds}

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self._cache.clear()
        self._score.clear()
        self._stale.clear()
        for k in self._stats:
            self._stats[k] = 0 if isinstance(self._stats[k], int) else 0.0

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor the policy keeps between evaluations (for memory accounting)."""
        return [*self._cache.values(), *self._score.values(), *self._stale.values()]

    def state_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors())

    # ------------------------------------------------------------------ the hook
    def _needs_scores(self, sched: ToCaSchedule) -> bool:
        """Whether any layer is ever cached in this plan (else the score side passes are skipped)."""
        memo = self._needs_memo.get(id(sched))
        if memo is None:
            memo = self._needs_memo[id(sched)] = any(not all(row) for row in sched.full)
        return memo

    def apply(self, layer: int, kind: str, module, h: torch.Tensor, *args: Any) -> torch.Tensor:
        ctx: StepContext = self.ctx
        if self.geometry is None:
            raise RuntimeError("ToCaPolicy.apply before attach(backbone)")
        sched = self.schedule(ctx.num_evals)
        if not 0 <= ctx.nfe < sched.num_evals:
            raise IndexError(f"nfe {ctx.nfe} outside the ToCa plan of {sched.num_evals} evaluations")
        key = (ctx.branch, layer, kind)
        P = self.geometry.num_prefix_tokens
        N_all = h.shape[1]
        self._stats["site_calls"] += 1
        self._stats["tokens_total"] += float(N_all)
        if sched.is_full(ctx.nfe, layer):
            return self._fresh(sched, ctx, layer, kind, module, h, args, P)
        cache = self._cache.get(key)
        if cache is None:
            raise RuntimeError(
                f"ToCa: no cached output for layer {layer} '{kind}' (branch {ctx.branch!r}) at nfe {ctx.nfe}; a run "
                f"must start at its first evaluation (sample() resets the policy and starts there)")
        if cache.shape[0] != h.shape[0]:
            raise RuntimeError(f"ToCa cache holds a batch of {cache.shape[0]} but this evaluation runs {h.shape[0]}")
        if kind not in self.params.partial_kinds:
            self._stats["reused_site_calls"] += 1
            return cache
        return self._partial(sched, ctx, layer, kind, module, h, args, P, cache)

    def _fresh(self, sched, ctx, layer, kind, module, h, args, P):
        out = module(h, *args)
        p = self.params
        branch = ctx.branch
        self._cache[(branch, layer, kind)] = out
        self._stats["fresh_site_calls"] += 1
        self._stats["tokens_computed"] += float(h.shape[1])
        if self._needs_scores(sched):
            if p.score == "attn" and kind == "attn" and hasattr(module, "column_scores"):
                with torch.no_grad():
                    cols = module.column_scores(h, p.column_chunk)[:, P:]
                self._score[(branch, layer)] = F.normalize(cols.float(), p=2, dim=1)
            elif p.score == "xattn" and kind == "xattn" and hasattr(module, "entropy"):
                with torch.no_grad():
                    H = module.entropy(h, *args)[:, P:]
                self._score[(branch, layer)] = H.float()
            if kind in p.partial_kinds:
                self._stale[(branch, layer, kind)] = torch.zeros(h.shape[0], h.shape[1] - P, dtype=torch.long,
                                                                 device=h.device)
        return out

    def _token_score(self, ctx, layer: int, kind: str, B: int, N: int, device) -> torch.Tensor:
        p = self.params
        base = self._score.get((ctx.branch, layer))
        if base is None:
            score = torch.zeros(B, N, dtype=torch.float32, device=device)
        elif p.score == "xattn":
            score = entropy_score(base, paired=ctx.cfg_layout is not None)
        else:
            score = base
        stale = self._stale.get((ctx.branch, layer, kind))
        if stale is not None and p.soft_fresh_weight:
            score = score + p.soft_fresh_weight * stale.float() / p.fresh_threshold
        grid = self.geometry.token_grid
        if grid is not None and p.bonus_ratio:
            score = spatial_bonus(score, grid, p.bonus_grid, p.bonus_ratio)
        return score

    def _partial(self, sched, ctx, layer, kind, module, h, args, P, cache):
        B, N_all, _ = h.shape
        N = N_all - P
        k = sched.k(ctx.nfe, layer, kind)
        key = (ctx.branch, layer, kind)
        score = self._token_score(ctx, layer, kind, B, N, h.device)
        idx = select_tokens(score, k)  # (B, k) image-token indices
        stale = self._stale.get(key)
        if stale is None:
            stale = torch.zeros(B, N, dtype=torch.long, device=h.device)
        stale = stale + 1
        if k:
            stale = stale.scatter(1, idx, 0)
        self._stale[key] = stale
        self._stats["partial_site_calls"] += 1
        if P:
            prefix = torch.arange(P, device=h.device).expand(B, P)
            idx_all = torch.cat([prefix, idx + P], dim=1)
        else:
            idx_all = idx
        if idx_all.shape[1] == 0:
            return cache
        h_sel = _gather(h, idx_all)
        out_sel = module(h_sel, *args)
        cache = _scatter(cache, idx_all, out_sel)
        self._cache[key] = cache
        self._stats["tokens_computed"] += float(idx_all.shape[1])
        if kind == "xattn" and self.params.score == "xattn" and k and hasattr(module, "entropy"):
            H = self._score.get((ctx.branch, layer))
            if H is not None:
                with torch.no_grad():
                    H_sel = module.entropy(_gather(h, idx + P) if P else h_sel, *args)
                self._score[(ctx.branch, layer)] = H.scatter(1, idx, H_sel.float())
        return cache

    # ------------------------------------------------------------------ reporting
    def summary(self, num_evals: int | None = None) -> dict[str, float]:
        """Plan figures (fresh fraction, mean computed token fraction) and runtime counters."""
        out: dict[str, float] = {}
        n = num_evals if num_evals is not None else (self.ctx.num_evals if self.ctx is not None else None)
        if n is None and self._plans:
            n = next(iter(self._plans))
        if n is not None and self.geometry is not None:
            sched = self.schedule(n)
            mask = self.compute_mask(n)
            cells = sched.num_evals * sched.depth
            out["fresh_layer_frac"] = sum(sum(r) for r in sched.full) / cells
            out["fresh_eval_frac"] = len(sched.fully_refreshed()) / sched.num_evals
            out["layer0_only_evals"] = float(len(sched.layer0_only()))
            out["mean_token_frac"] = sum(mask.values()) / max(len(mask), 1)
            for kind in sched.site_kinds:
                vals = [v for (e, l, k), v in mask.items() if k == kind]
                out[f"mean_token_frac_{kind}"] = sum(vals) / max(len(vals), 1)
        st = self._stats
        if st["site_calls"]:
            out["run_token_frac"] = st["tokens_computed"] / max(st["tokens_total"], 1.0)
            out["run_partial_site_frac"] = st["partial_site_calls"] / st["site_calls"]
        return out

    def extra_repr(self) -> str:
        p = self.params
        if p is None:
            return "preset=None (family default on attach)"
        return (f"preset={self.preset!r}, N={p.fresh_threshold}, r0={p.fresh_ratio}, "
                f"legacy_layer0_refresh={p.legacy_layer0_refresh}")


__all__ = ["PRESETS", "ToCaParams", "ToCaPolicy", "ToCaSchedule", "entropy_score", "plan", "preset_params",
           "ratio", "select_tokens", "spatial_bonus"]
