"""Learning-to-Cache (Ma et al., NeurIPS 2024): learned, static, per-(cache step x branch) layer caching.

A run alternates *full* evaluations, which compute every branch and refresh the cache, with *cache*
evaluations (:mod:`.schedule`), where each residual branch (attention, cross-attention, MLP) either
computes or reuses its pre-gate output from the last full evaluation. The choice comes from one
router per cache step: a vector of logits, one per cache site, with ``beta = sigmoid(logit)``.

Router layout: entry ``j = K * layer + kind_index`` (:class:`~diffcache.backbones.base.SiteLayout`),
kinds in execution order. DiT and U-ViT have ``("attn", "mlp")`` (the official layout; U-ViT layers
are in-blocks, mid-block, out-blocks); PixArt, which no published L2C covers, ``("attn", "xattn", "mlp")``.

Routers: one ``nn.Parameter`` per router index in an ``nn.ParameterList`` (``routers.{i}``), so routers
that a batch does not use keep ``grad is None`` and AdamW skips them (no momentum drift). One router per
model evaluation, as in the official files: N for DiT DDIM-N (only cache steps are read), NFE for U-ViT
DPM-Solver-2. Init N(0, 1); optional clamp after each optimiser step (:meth:`clamp_`; DiT [-5, 5]).

Routing follows scoped state only:
    * eval mode (``policy.eval()``, ``sample()``, :meth:`inference`): hard. On a cache evaluation a site
      computes iff ``sigmoid(logit) > theta`` (the *code's* rule; the paper's Alg. 2 states it inverted)
      -- or by a compute ``budget`` (:mod:`.budget`) -- and otherwise returns the cached output;
    * train mode: soft, ``beta * fresh + (1 - beta) * cached``;
    * :meth:`recording`: always compute and store (the no-grad full step of router training);
    * :meth:`disabled`: the teacher, a pure pass-through.
    Full evaluations always compute and refresh the cache; the backbone applies the current gate
    afterwards. Caches are kept per ``ctx.branch`` (U-ViT's separate cond/uncond passes); one-batch CFG
    keeps its halves apart through the batch rows.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...backbones.base import SiteLayout
from ...context import StepContext
from ..base import CachePolicy
from . import checkpoint as ckpt
from . import provenance, report
from .budget import budget_masks, site_costs
from .decision import decide, lay_out, run_site
from .schedule import L2CSchedule, make_schedule


def _as_clamp(clamp) -> tuple[float, float] | None:
    if clamp is None or clamp is False:
        return None
    if isinstance(clamp, (int, float)):
        c = abs(float(clamp))
        return (-c, c)
    lo, hi = clamp
    if float(lo) > float(hi):
        raise ValueError(f"clamp range ({lo}, {hi}) is empty")
    return float(lo), float(hi)


class L2CPolicy(CachePolicy):
    """Learning-to-Cache routers and the cache they drive (see the module docstring).

    theta: inference threshold in [0, 1]. clamp: ``c`` (-> [-c, c]), ``(lo, hi)`` or None. cache_interval:
    2 = the paper. budget / budget_mode ("global" | "per_step") / budget_unit ("macs" | "sites") /
    site_cost: a compute budget instead of theta. init_seed: seed of the N(0, 1) init (None: global RNG).
    lam: the L1 weight, only recorded (the loss lives in the LightningModule) and exported in DiT ``args``.
    layout + solver (or depth / site_kinds / num_routers / schedule): create the routers now, so an
    optimiser can be built before the first run; otherwise :meth:`prepare` creates them on first binding.
    router_format: official file layout on export ("dit" | "uvit"; default: the backbone's).
    allow_mismatch: run an imported router on a solver / interval / backbone other than the one it records
    (:mod:`.provenance`), with a warning instead of an error.
    """

    name = "l2c"
    trainable = True

    def __init__(self, *, theta: float = 0.1, clamp: float | tuple[float, float] | None = None,
                 cache_interval: int = 2, budget: float | None = None, budget_mode: str = "global",
                 budget_unit: str = "macs", site_cost: Mapping[str, float] | None = None,
                 init_seed: int | None = None, lam: float | None = None, router_format: str | None = None,
                 layout: SiteLayout | None = None, solver: Any = None, schedule: Any = None,
                 num_routers: int | None = None, depth: int | None = None,
                 site_kinds: Sequence[str] | None = None, allow_mismatch: bool = False) -> None:
        super().__init__()
        if budget_mode not in ("global", "per_step"):
            raise ValueError(f"budget_mode must be 'global' or 'per_step', got {budget_mode!r}")
        if budget_unit not in ("macs", "sites"):
            raise ValueError(f"budget_unit must be 'macs' or 'sites', got {budget_unit!r}")
        if budget is not None and not 0.0 <= float(budget) <= 1.0:
            raise ValueError(f"policy.budget is the fraction of cache-step branch MACs to keep, in [0, 1]; got {budget}")
        if not 0.0 <= float(theta) <= 1.0:
            raise ValueError(f"policy.theta is a threshold on sigmoid(logit), in [0, 1]; got {theta}")
        if lam is not None and not (math.isfinite(float(lam)) and float(lam) >= 0.0):
            raise ValueError(f"policy.lam (the L1 weight) must be a finite number >= 0; got {lam}")
        self.cache_interval = int(cache_interval)
        sched_spec = schedule if schedule is not None else solver
        self.schedule: L2CSchedule | None = None if sched_spec is None else make_schedule(sched_spec, self.cache_interval)
        self.theta = float(theta)
        self.clamp = _as_clamp(clamp)
        self.budget = None if budget is None else float(budget)
        self.budget_mode, self.budget_unit, self.site_cost = budget_mode, budget_unit, dict(site_cost or {})
        self.lam, self.init_seed, self.router_format = lam, init_seed, router_format
        self.allow_mismatch = bool(allow_mismatch)
        self.run_record: dict | None = None  # the run this policy is set up for (recorded on export)
        self._checked: tuple | None = None
        if layout is None and depth is not None:
            layout = SiteLayout(depth=int(depth), site_kinds=tuple(site_kinds or ("attn", "mlp")))
        self.layout: SiteLayout | None = layout
        self.routers = nn.ParameterList()
        self._cache: dict[tuple[str, int, str], torch.Tensor] = {}
        self._active: int | None = None
        self._beta: torch.Tensor | None = None  # soft routing: sigmoid of the active router (begin)
        self._store: list[bool] | None = None  # hard full evaluation: which sites a later cache step reuses
        self._run_masks: dict[int, list[bool]] | None = None  # hard masks of the current run
        self._only: frozenset[int] | None = None  # caching_only(): cache evaluations allowed to cache
        self._soft = (0.0, 1.0, False)  # soft_threshold(): beta = sigmoid((logit - shift) / temperature), STE
        self._graph = False  # differentiable_cache(): the cache keeps the autograd graph
        self.decision: tuple[int, ...] | None = None  # hard evaluations: REUSE / COMPUTE / STORE per site
        self.imported: ckpt.OfficialRouters | None = None  # opt / args / archive of an imported file
        if num_routers is None and self.schedule is not None:
            num_routers = self.schedule.num_routers
        if layout is not None and num_routers is not None:
            self._build(int(num_routers), layout.num_sites)
        self.train(False)  # hard routing, like a loaded model; RouterDistill switches it to train mode

    # ------------------------------------------------------------------ construction
    def _build(self, num_routers: int, num_sites: int, init: Sequence[torch.Tensor] | None = None) -> None:
        if init is None:
            g = None if self.init_seed is None else torch.Generator().manual_seed(int(self.init_seed))
            init = [torch.randn(num_sites, generator=g) for _ in range(num_routers)]
        self.routers = nn.ParameterList([nn.Parameter(t.detach().clone().float()) for t in init])

    @property
    def num_routers(self) -> int:
        return len(self.routers)

    @property
    def num_sites(self) -> int:
        if len(self.routers):
            return int(self.routers[0].numel())
        return self.layout.num_sites if self.layout is not None else 0

    @property
    def site_kinds(self) -> tuple[str, ...]:
        return self.layout.site_kinds if self.layout is not None else ("attn", "mlp")

    def site_index(self, layer: int, kind: str) -> int:
        return layer * len(self.site_kinds) + self.site_kinds.index(kind)

    def site_labels(self) -> list[str]:
        n = self.num_sites // len(self.site_kinds)
        return [f"{layer}.{kind}" for layer in range(n) for kind in self.site_kinds]

    def prepare(self, layout: SiteLayout, solver: Any = None) -> None:
        """Fix the layout and schedule of a run; create the routers or check they fit (clear errors)."""
        if solver is not None:
            sched = make_schedule(solver, self.cache_interval)
            self._check_schedule(sched)
            self.schedule = sched
        if len(self.routers):
            self._check_layout(layout)
        else:
            if self.schedule is None:
                raise ValueError("L2CPolicy: the number of routers is unknown; pass solver= (or schedule=) so the "
                                 "routers exist before the optimiser is built")
            self._build(self.schedule.num_routers, layout.num_sites)
        self.layout = layout

    def setup(self, backbone, solver=None) -> None:
        if self.router_format is None:
            self.router_format = backbone.router_format
        self.prepare(backbone.layout, solver)
        self.run_record = provenance.run_record(backbone, solver, self)
        key = tuple(sorted(self.run_record.items()))
        if self.imported is not None and self._checked != key:  # a router from a file: made for this run?
            provenance.check(self.imported.record, self.run_record, self.imported.extra.get("path", "router"),
                             self.allow_mismatch)
            self._checked = key

    def _check_layout(self, layout: SiteLayout) -> None:
        if self.num_sites != layout.num_sites:
            raise ValueError(f"router length {self.num_sites} does not match the backbone: depth {layout.depth} x "
                             f"{len(layout.site_kinds)} kinds {layout.site_kinds} = {layout.num_sites} cache sites (a "
                             f"DiT-XL/2 router has 56 entries, a U-ViT-H/2 router 58; routers trained for one "
                             f"backbone cannot drive another)")

    def _check_schedule(self, sched: L2CSchedule) -> None:
        if len(self.routers) and sched.num_routers != self.num_routers:
            raise ValueError(f"the routers were made for {self.num_routers} evaluations but the solver runs "
                             f"{sched.num_evals} ({sched.kind}, {sched.num_steps} steps): routers are per step, so "
                             f"sample with the step count they were trained for")

    def schedule_for(self, solver: Any = None) -> L2CSchedule:
        if solver is not None:
            sched = make_schedule(solver, self.cache_interval)
            self._check_schedule(sched)
            return sched
        if self.schedule is None:
            raise ValueError("the L2C schedule is unknown: pass solver= (or schedule=) or run the policy once")
        return self.schedule

    def trainable_evals(self, solver: Any = None) -> list[int]:
        """Cache evaluations (0-based NFE, sampling order): where router training draws its student step."""
        return self.schedule_for(solver).cache_evals()

    # ------------------------------------------------------------------ run state
    def reset(self) -> None:
        self._cache.clear()  # the same dict across runs: a compiled forward's guards stay valid
        self._active, self._store, self._run_masks, self.decision, self._beta = None, None, None, None, None

    def begin(self, ctx: StepContext) -> None:
        super().begin(ctx)
        sched = self.schedule_for()
        if sched.num_evals != ctx.num_evals or sched.num_steps != ctx.num_steps:
            raise ValueError(f"StepContext reports {ctx.num_evals} evaluations over {ctx.num_steps} steps but the "
                             f"L2C schedule has {sched.num_evals} over {sched.num_steps}")
        if not 0 <= ctx.nfe < sched.num_evals:
            raise IndexError(f"nfe {ctx.nfe} outside the schedule's {sched.num_evals} evaluations")
        self._active = sched.router[ctx.nfe]
        if self._only is not None and ctx.nfe not in self._only:
            self._active = None  # caching switched off here: a full evaluation
        if self._active is not None and self._active >= self.num_routers:
            raise IndexError(f"router {self._active} needed but only {self.num_routers} exist")
        self._store = None
        if self._active is None and self._hard():
            # only keep what the cache evaluations fed by this one will reuse (memory; outputs unchanged)
            masks = self._masks()
            store = [False] * self.num_sites
            for e in sched.consumers(ctx.nfe):
                store = [a or not b for a, b in zip(store, masks[sched.router[e]])]
            self._store = store
        self.decision, self._beta = None, None
        if self._active is not None and not self._hard():  # soft routing reads this vector, never the router index,
            shift, temp, straight = self._soft  # so a compiled student is one graph for every cache step
            b = torch.sigmoid((self.routers[self._active] - shift) / temp)
            self._beta = (b > 0.5).to(b) + b - b.detach() if straight else b  # straight-through: hard forward
        if self._hard():  # the site reads only this (:mod:`.decision`): one compiled graph per distinct one
            full = self._active is None
            self.decision = decide(full, self._store, None if full else self._masks()[self._active], self.num_sites)
            lay_out(self._cache, ctx.branch, self.num_sites // len(self.site_kinds), self.site_kinds)

    def caching_only(self, evals):
        """Inside the block only the cache evaluations in ``evals`` cache; the others compute everything
        (HarmoniCa's image-error proxy switches caching on one step at a time)."""
        return self._scoped("_only", frozenset(int(e) for e in evals))

    def soft_threshold(self, shift: float, temperature: float = 1.0, straight_through: bool = False):
        """Soft routing with ``beta = sigmoid((logit - shift) / temperature)`` inside the block (budget training);
        ``straight_through``: the forward uses the hard decision ``logit > shift``, the backward beta's gradient."""
        return self._scoped("_soft", (float(shift), float(temperature), bool(straight_through)))

    def differentiable_cache(self):
        """Inside the block full evaluations store their outputs with their graph, so a loss at the end of a
        trajectory reaches earlier routers through what later cache steps reuse (trajectory-level training)."""
        return self._scoped("_graph", True)

    def _hard(self) -> bool:
        return not self.training and not self._recording

    def _masks(self) -> dict[int, list[bool]]:
        """The hard masks of this run, computed once per run (routers do not change inside a run)."""
        if self._run_masks is None:
            self._run_masks = self.inference_masks()
        return self._run_masks

    # ------------------------------------------------------------------ the hook
    def apply(self, layer: int, kind: str, branch) -> torch.Tensor:
        key = (self.ctx.branch, layer, kind)
        j = self.site_index(layer, kind)
        if self._hard() and self.decision is not None:  # decided in begin(); a reused branch is never evaluated
            return run_site(self.decision[j], self._cache, key, branch, self._graph, self._cached)
        if self._beta is None or self._recording:  # full evaluation (or recording): compute, refresh
            out = branch()
            if self._store is None or self._store[j]:
                self._cache[key] = out if self._graph else out.detach()
            return out
        if self._hard():  # begun in train mode, then switched to hard routing
            return branch() if self._masks()[self._active][j] else self._cached(key, branch.x)
        cached = self._cached(key, branch.x)  # train: soft mix of pre-gate outputs
        beta = self._beta[j].to(cached.dtype)  # a float32 router must not promote a bf16 / fp16 model's activations
        return beta * branch() + (1 - beta) * cached

    def _cached(self, key, h: torch.Tensor) -> torch.Tensor:
        out = self._cache.get(key)
        if out is None:
            src = self.schedule.source[self.ctx.nfe] if self.schedule else "?"
            raise RuntimeError(
                f"L2C cache miss at nfe {self.ctx.nfe} for branch={key[0]!r}, layer {key[1]}, {key[2]}: a cache "
                f"evaluation needs the outputs of its full evaluation (nfe {src}) from the same run and CFG "
                f"branch; run that evaluation (under policy.recording() in training) first")
        if out.shape[0] != h.shape[0]:
            raise RuntimeError(f"L2C cache holds a batch of {out.shape[0]} but this evaluation runs {h.shape[0]}")
        return out

    # ------------------------------------------------------------------ masks
    def costs(self) -> torch.Tensor:
        """MAC weight per router entry (ones for ``budget_unit='sites'``)."""
        if self.budget_unit == "sites":
            return torch.ones(self.num_sites, dtype=torch.float64)
        return site_costs(self.site_kinds, self.num_sites // len(self.site_kinds), self.site_cost)

    def inference_masks(self, theta: float | None = None, schedule: L2CSchedule | None = None) -> dict[int, list[bool]]:
        """``{router: [compute?] * num_sites}`` for every router the schedule (default: the run's) reads, by the
        theta rule or the budget. An explicit ``theta`` always uses the theta rule, for sensitivity sweeps."""
        schedule = schedule or self.schedule
        with torch.no_grad():
            if theta is None and self.budget is not None:
                routers = sorted(set((schedule or self.schedule_for()).used_routers()))
                _, m = budget_masks([p.detach() for p in self.routers], routers, self.costs(), self.budget,
                                    per_step=self.budget_mode == "per_step")
                return {r: v.tolist() for r, v in m.items()}
            th = self.theta if theta is None else float(theta)
            routers = range(self.num_routers) if schedule is None else sorted(set(schedule.used_routers()))
            return {r: (torch.sigmoid(self.routers[r].detach()) > th).tolist() for r in routers}

    def effective_theta(self) -> float | None:
        """The theta in force: ``policy.theta``, or the one a global budget chose (None for per-step budgets)."""
        if self.budget is None:
            return self.theta
        if self.budget_mode == "per_step":
            return None
        routers = sorted(set(self.schedule_for().used_routers()))
        return budget_masks([p.detach() for p in self.routers], routers, self.costs(), self.budget)[0]

    def compute_mask(self, layout=None, solver=None) -> dict[tuple[int, int, str], float]:
        """1.0 computed / 0.0 reused per (nfe, layer, kind) at inference (MAC counter); re-binds nothing."""
        solver = solver if hasattr(solver, "num_evals") else None  # an int count carries no schedule
        if not len(self.routers):  # nothing to keep yet: build the routers a run would start from
            if layout is None:
                raise ValueError("L2CPolicy has no routers yet: load or train them, or pass the layout")
            self.prepare(layout, solver)
        elif layout is not None:
            self._check_layout(layout)
        sched = self.schedule_for(solver)
        masks = self.inference_masks(schedule=sched)
        depth = self.num_sites // len(self.site_kinds)
        return {(e, layer, kind): 1.0 if sched.router[e] is None or masks[sched.router[e]][self.site_index(layer, kind)]
                else 0.0 for e in range(sched.num_evals) for layer in range(depth) for kind in self.site_kinds}

    # ------------------------------------------------------------------ training helpers
    def sum_beta(self, nfe: int | None = None) -> torch.Tensor:
        """``sum_j sigmoid(logit_j)`` of the router read at ``nfe`` (default: the current evaluation)."""
        r = self._active if nfe is None else self.schedule_for().router[nfe]
        if r is None:
            where = "the current evaluation" if nfe is None else f"nfe {nfe}"
            raise ValueError(f"{where} is a full evaluation: it reads no router, so there is no L1 term")
        return torch.sigmoid(self.routers[r]).sum()

    l1 = sum_beta

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp every logit into the configured range in place (DiT: after each optimiser step)."""
        self._run_masks = None
        if self.clamp is None:
            return
        lo, hi = self.clamp
        for p in self.routers:
            p.clamp_(lo, hi)

    # ------------------------------------------------------------------ reporting
    def betas(self, router: int | None = None) -> torch.Tensor:
        """sigmoid(logits), detached: [num_sites] for one router, [num_routers, num_sites] for all."""
        with torch.no_grad():
            if router is not None:
                return torch.sigmoid(self.routers[router].detach()).cpu()
            return torch.sigmoid(torch.stack([p.detach() for p in self.routers])).cpu()

    def beta_table(self, solver: Any = None) -> tuple[torch.Tensor, list[str]]:
        """(cache steps x sites) betas in sampling order, with row labels, for the heatmap."""
        sched = self.schedule_for(solver)
        rows = sched.cache_evals()
        labels = [f"nfe {e + 1} (r{sched.router[e]})" for e in rows]
        return self.betas()[[sched.router[e] for e in rows]], labels

    def cache_stats(self, theta: float | None = None, solver: Any = None) -> dict[str, Any]:
        """Cached sites over the schedule's cache evaluations: total, per kind, per cache evaluation."""
        return report.cache_stats(self, theta, solver)

    def summary(self, layout=None, solver=None) -> dict[str, float]:
        """Flat floats for loggers: cached / cacheable at theta (or budget), per kind, MACs kept, theta used."""
        return report.summary(self, solver)

    # ------------------------------------------------------------------ official checkpoints
    @classmethod
    def from_official(cls, path, *, weights_only: bool = True, **kwargs: Any) -> "L2CPolicy":
        """A policy holding the routers of an official DiT ``.pt`` / U-ViT ``.pth`` file (bit-exact)."""
        return ckpt.policy_from_file(cls, path, weights_only=weights_only, **kwargs)

    def load_official(self, path, *, weights_only: bool = True) -> "L2CPolicy":
        """Copy an official file's logits into the routers (count and length must match); the run it was
        made for is checked against each run this policy is bound to (:mod:`.provenance`)."""
        ckpt.load_into(self, path, weights_only=weights_only)
        self._checked, self._run_masks = None, None
        return self

    def to_official(self, path, fmt: str | None = None, **kw: Any):
        """Write the routers in the official format (see :func:`.checkpoint.export_policy`; NaN/inf refused)."""
        return ckpt.export_policy(self, path, fmt, **kw)

    export_official = to_official
