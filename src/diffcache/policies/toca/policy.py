"""The ToCa policy: per-layer per-branch caches, per-token scores, top-k partial recomputation."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...backbones.base import SiteLayout
from ...context import StepContext
from ..base import CachePolicy
from .plan import _PARAM_NAMES, ToCaParams, ToCaSchedule, plan, preset_params
from .scores import _scatter_, entropy_score, select_tokens, spatial_bonus


class ToCaPolicy(CachePolicy):
    """Token-wise caching (see the module docstring).

    ``ToCaPolicy(preset="dit_ddim50", fresh_threshold=None, fresh_ratio=None, legacy_layer0_refresh=None,
    **overrides)``; any :class:`ToCaParams` field can be overridden (None keeps the preset's value).
    ``preset=None`` takes the backbone's ``toca_preset`` when bound (DiT dit_ddim50, PixArt pixart_r70,
    U-ViT uvit_dpm20).
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
        else:  # validate the option names and values now (the preset is only known once bound)
            unknown = sorted(set(self._overrides) - set(_PARAM_NAMES))
            if unknown:
                raise TypeError(f"unknown ToCa options {unknown}; allowed: {sorted(_PARAM_NAMES)}")
            ToCaParams(**{k: v for k, v in self._overrides.items() if v is not None})
        self.geometry: SiteLayout | None = None
        self._plans: dict[int, ToCaSchedule] = {}
        self._needs_memo: dict[int, bool] = {}
        self._cache: dict[tuple[str, int, str], torch.Tensor] = {}
        self._score: dict[tuple[str, int], torch.Tensor] = {}     # s1 (normalised) or entropy H, (B, N_img)
        self._stale: dict[tuple[str, int, str], torch.Tensor] = {}  # s3 counters, (B, N_img) int
        self._prefix_idx: dict[tuple, torch.Tensor] = {}
        self._stats = {"site_calls": 0, "fresh_site_calls": 0, "partial_site_calls": 0, "reused_site_calls": 0,
                       "tokens_computed": 0.0, "tokens_total": 0.0}

    # ------------------------------------------------------------------ binding
    def setup(self, backbone, solver=None) -> None:
        if self.params is None:
            if backbone.toca_preset is None:
                raise ValueError(f"{type(backbone).__name__} names no default ToCa preset (toca_preset); pass "
                                 f"policy.preset=")
            self.preset = backbone.toca_preset
            self.params = preset_params(self.preset, **self._overrides)
        self.prepare(backbone.layout, solver)

    def prepare(self, layout: SiteLayout, solver=None) -> None:
        if self.geometry != layout:
            self.set_geometry(layout)

    def set_geometry(self, geometry: SiteLayout | None = None, **kw: Any) -> "ToCaPolicy":
        """The layout to plan for (also without a backbone, for cost counting from the planner alone)."""
        geo = geometry if geometry is not None else SiteLayout(**kw)
        if self.params is None:
            raise ValueError("ToCaPolicy(preset=None) needs a backbone (bound) to pick its preset")
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
            raise ValueError("ToCaPolicy has no layout yet: bind it to a backbone or call set_geometry(...)")
        num_evals = int(num_evals)
        sched = self._plans.get(num_evals)
        if sched is None:
            g = self.geometry
            sched = plan(self.params, num_evals, g.depth, g.num_tokens, g.site_kinds)
            self._plans[num_evals] = sched
        return sched

    def compute_mask(self, layout=None, solver=None) -> dict[tuple[int, int, str], float]:
        """Fraction of tokens (prefix included) each (nfe, layer, kind) computes, from the planner."""
        if layout is not None:
            self.prepare(layout)
        sched = self.schedule(solver.num_evals if hasattr(solver, "num_evals") else int(solver))
        P = self.geometry.num_prefix_tokens
        return {(e, layer, kind): sched.fraction(e, layer, kind, P)
                for e in range(sched.num_evals) for layer in range(sched.depth) for kind in sched.site_kinds}

    # ------------------------------------------------------------------ state
    def release(self) -> None:
        self._cache.clear()
        self._score.clear()
        self._stale.clear()

    def reset(self) -> None:
        self.release()
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

    def apply(self, layer: int, kind: str, branch) -> torch.Tensor:
        ctx: StepContext = self.ctx
        if self.geometry is None:
            raise RuntimeError("ToCaPolicy.apply outside a bound run")
        sched = self.schedule(ctx.num_evals)
        if not 0 <= ctx.nfe < sched.num_evals:
            raise IndexError(f"nfe {ctx.nfe} outside the ToCa plan of {sched.num_evals} evaluations")
        key = (ctx.branch, layer, kind)
        P = self.geometry.num_prefix_tokens
        B, N_all = branch.x.shape[:2]
        self._stats["site_calls"] += 1
        self._stats["tokens_total"] += float(N_all)
        if sched.is_full(ctx.nfe, layer):
            return self._fresh(sched, ctx, layer, kind, branch, P)
        cache = self._cache.get(key)
        if cache is None:
            raise RuntimeError(
                f"ToCa: no cached output for layer {layer} '{kind}' (branch {ctx.branch!r}) at nfe {ctx.nfe}; a run "
                f"must start at its first evaluation (sample() resets the policy and starts there)")
        if cache.shape[0] != B:
            raise RuntimeError(f"ToCa cache holds a batch of {cache.shape[0]} but this evaluation runs {B}")
        if kind not in self.params.partial_kinds:
            self._stats["reused_site_calls"] += 1
            return cache
        return self._partial(sched, ctx, layer, kind, branch, P, cache)

    def _fresh(self, sched, ctx, layer, kind, branch, P):
        h = branch.input()
        p, module = self.params, branch.module
        key = (ctx.branch, layer, kind)
        scored = self._needs_scores(sched)
        cols = None
        if scored and p.score == "attn" and kind == "attn" and hasattr(module, "forward_with_column_scores"):
            out, cols = module.forward_with_column_scores(h, p.column_chunk)  # one qkv projection for both
        else:
            out = branch.run(h)
            if scored and p.score == "attn" and kind == "attn" and hasattr(module, "column_scores"):
                with torch.no_grad():
                    cols = module.column_scores(h, p.column_chunk)
        if cols is not None:
            self._score[(ctx.branch, layer)] = F.normalize(cols[:, P:], p=2, dim=1)
        elif scored and p.score == "xattn" and kind == "xattn" and hasattr(module, "entropy"):
            with torch.no_grad():
                self._score[(ctx.branch, layer)] = module.entropy(h, *branch.args)[:, P:]
        # a private copy: later partial steps scatter into it in place, and ``out`` goes on into the block
        self._cache[key] = out.clone() if kind in p.partial_kinds else out
        self._stats["fresh_site_calls"] += 1
        self._stats["tokens_computed"] += float(h.shape[1])
        if scored and kind in p.partial_kinds:
            self._stale[key] = torch.zeros(h.shape[0], h.shape[1] - P, dtype=torch.long, device=h.device)
        return out

    def _token_score(self, ctx, layer: int, kind: str, B: int, N: int, device, dtype) -> torch.Tensor:
        p = self.params
        base = self._score.get((ctx.branch, layer))
        if base is None:
            score = torch.zeros(B, N, dtype=dtype, device=device)
        elif p.score == "xattn":
            score = entropy_score(base, paired=ctx.cfg_layout is not None)
        else:
            score = base
        stale = self._stale.get((ctx.branch, layer, kind))
        if stale is not None and p.soft_fresh_weight:
            score = score + (p.soft_fresh_weight / p.fresh_threshold) * stale.to(score.dtype)
        grid = self.geometry.token_grid
        if grid is not None and p.bonus_ratio:
            score = spatial_bonus(score, grid, p.bonus_grid, p.bonus_ratio)
        return score

    def _partial(self, sched, ctx, layer, kind, branch, P, cache):
        """Recompute the top-k tokens of a cached branch: only they are gathered, normalised, modulated and
        run; their outputs and stale counters are written into the cache in place."""
        B, N_all = branch.x.shape[:2]
        N = N_all - P
        k = sched.k(ctx.nfe, layer, kind)
        key = (ctx.branch, layer, kind)
        score = self._token_score(ctx, layer, kind, B, N, cache.device, cache.dtype)
        idx = select_tokens(score, k)  # (B, k) image-token indices
        stale = self._stale.get(key)
        if stale is None:
            stale = self._stale[key] = torch.zeros(B, N, dtype=torch.long, device=cache.device)
        stale.add_(1)
        if k:
            stale.scatter_(1, idx, 0)
        self._stats["partial_site_calls"] += 1
        idx_all = torch.cat([self._prefix(B, P, idx.device), idx + P], dim=1) if P else idx
        if idx_all.shape[1] == 0:
            return cache
        h_sel = branch.input(idx_all)
        out_sel = branch.run(h_sel)
        _scatter_(cache, idx_all, out_sel)
        self._stats["tokens_computed"] += float(idx_all.shape[1])
        if kind == "xattn" and self.params.score == "xattn" and k and hasattr(branch.module, "entropy"):
            H = self._score.get((ctx.branch, layer))
            if H is not None:
                with torch.no_grad():
                    H.scatter_(1, idx, branch.module.entropy(h_sel[:, P:], *branch.args).to(H.dtype))
        return cache

    def _prefix(self, B: int, P: int, device) -> torch.Tensor:
        """The prefix-token indices (0 .. P-1) per sample, made once per batch size and device."""
        key = (B, P, device)
        idx = self._prefix_idx.get(key)
        if idx is None:
            idx = self._prefix_idx[key] = torch.arange(P, device=device).expand(B, P)
        return idx

    # ------------------------------------------------------------------ reporting
    def summary(self, layout=None, solver=None) -> dict[str, float]:
        """Plan figures (fresh fraction, mean computed token fraction) and runtime counters."""
        out: dict[str, float] = {}
        if layout is not None:
            self.prepare(layout)
        n = getattr(solver, "num_evals", solver) if solver is not None else (
            self.ctx.num_evals if self.ctx is not None else None)
        if n is None and self._plans:
            n = next(iter(self._plans))
        if n is not None and self.geometry is not None:
            sched = self.schedule(n)
            mask = self.compute_mask(solver=n)
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
            return "preset=None (the backbone's toca_preset when bound)"
        return (f"preset={self.preset!r}, N={p.fresh_threshold}, r0={p.fresh_ratio}, "
                f"legacy_layer0_refresh={p.legacy_layer0_refresh}")
