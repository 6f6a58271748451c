"""Learning-to-Cache (Ma et al., NeurIPS 2024): learned, static, per-(cache step x branch) layer caching.

A run alternates *full* evaluations, which compute every branch and refresh the cache, with *cache*
evaluations, where each residual branch (attention, cross-attention, MLP) either computes or reuses its
pre-gate output from the last full evaluation. The choice comes from one router per cache step: a
vector of logits, one per cache site, with ``beta = sigmoid(logit)``.

Router layout (entry ``j`` of a router)
    ``j = K * layer + kind_index`` with ``K = len(backbone.site_kinds)`` and kinds in the backbone's
    execution order. DiT and U-ViT have ``("attn", "mlp")``: entry ``2l`` is attention and ``2l+1`` the
    MLP of layer ``l`` (the official layout; U-ViT layers are in-blocks, mid-block, out-blocks). PixArt,
    which no published L2C covers, has ``("attn", "xattn", "mlp")``: ``3l``, ``3l+1``, ``3l+2``.

Routers
    One ``nn.Parameter`` per router index in an ``nn.ParameterList`` (``routers.{i}``), so routers that a
    batch does not use keep ``grad is None`` and AdamW skips them (no momentum drift). There is one
    router per model evaluation, as in the official files: N for DiT DDIM-N (only cache steps are read),
    NFE for U-ViT DPM-Solver-2 (routers 1 .. NFE/2-1 are read). Init N(0, 1); optional clamp after each
    optimiser step (:meth:`clamp_`; DiT [-5, 5], U-ViT none).

Modes (``policy.mode``)
    ``"infer"``: hard. On a cache evaluation a site computes iff ``sigmoid(logit) > theta`` (the
    *code's* rule; the paper's Alg. 2 states it inverted) -- or by a compute ``budget`` -- and otherwise
    returns the cached pre-gate output. ``"train"``: soft, ``beta * fresh + (1 - beta) * cached``.
    ``"record"``: always compute and store (the no-grad full step of router training). In every mode
    full evaluations compute and refresh the cache; the backbone applies the current gate afterwards.
    ``policy.disabled()`` (base class) is the teacher: a pure pass-through that neither reads nor writes.
    Caches are kept per ``ctx.branch`` (U-ViT's separate cond/uncond passes); one-batch CFG keeps its
    halves apart through the batch rows.

Schedules (:class:`L2CSchedule`, built from a solver, a registry name such as ``"ddim20"`` / ``"dpm20"``,
or ``(kind, num_steps)``)
    * one evaluation per step (DDIM, DDPM, DPM-Solver++ multistep): alternating. Step 0 is full, steps
      1, 3, 5, ... are cache steps, router index = respaced index ``N-1-step`` (the official DiT reads
      even respaced indices 0 .. N-2). Needs even N. ``cache_interval=k > 2`` (beyond the paper): step
      ``s`` is full iff ``s % k == 0`` and the ``k-1`` steps after it reuse that full step.
    * two evaluations per step (DPM-Solver-2 singlestep): *shifted*. The first evaluation of each step
      but the first reuses the previous step's midpoint: cache NFEs 3, 5, 7, ... (1-based); router index
      for evaluation ``2j`` is ``j``. The midpoint is never cached (it feeds the solver's derivative).

Compute budget (beyond the paper; ``budget=``)
    The fraction of branch MACs that cache evaluations keep. :func:`budget_masks` ranks the learned
    logits and keeps the top sites globally (one theta for all steps) or per step (top-k in each
    router), so no magic theta is needed. MAC weights per kind default to attn 1 : mlp 2 (DiT-style
    4ND^2 vs 8ND^2, attention-score matmuls not counted, as in the paper) and xattn 1 (2ND^2 + 2LD^2,
    exact when the text length L equals the token count N; PixArt-alpha-256 with L=120 is ~0.73).
"""
from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import CachePolicy, StepContext
from .l2c_ckpt import OfficialRouters, RouterCheckpointError, load_official, optimizer_state, save_official

MODES = ("infer", "train", "record")
DEFAULT_SITE_COST = {"attn": 1.0, "xattn": 1.0, "mlp": 2.0}

# Solver families. "alternating": one evaluation per step; "shifted": DPM-Solver-2 singlestep (two).
ALTERNATING_KINDS = ("ddim", "ddpm", "dpmpp", "dpmpp2m", "dpmpp_2m", "dpm++", "dpmsolver++", "dpm_solver_pp",
                     "dpmpp_multistep")
SHIFTED_KINDS = ("dpm", "dpm2", "dpmsolver", "dpm_solver", "dpm_solver2", "dpmsolver2", "dpm_solver2_singlestep",
                 "dpm_solver_singlestep")


# =============================================================================================== schedule
@dataclass(frozen=True)
class L2CSchedule:
    """Which evaluations are cache evaluations, which router each reads, and where its cache comes from.

    router[e]: router index read by evaluation ``e`` (0-based NFE), None for a full evaluation.
    source[e]: the full evaluation whose branch outputs cache evaluation ``e`` reuses (None if full).
    """

    kind: str  # "alternating" | "shifted"
    num_steps: int
    num_evals: int
    cache_interval: int
    router: tuple[int | None, ...]
    source: tuple[int | None, ...]

    @property
    def num_routers(self) -> int:
        """Routers stored, as the official files do: one per evaluation."""
        return self.num_evals

    def is_cache(self, nfe: int) -> bool:
        return self.router[nfe] is not None

    def cache_evals(self) -> list[int]:
        """Cache evaluations in sampling order (0-based NFE)."""
        return [e for e, r in enumerate(self.router) if r is not None]

    def used_routers(self) -> list[int]:
        """Router indices read at inference, in sampling order."""
        return [r for r in self.router if r is not None]


def alternating_schedule(num_steps: int, cache_interval: int = 2) -> L2CSchedule:
    """One evaluation per step (DDIM, DDPM, DPM-Solver++ multistep)."""
    num_steps, k = int(num_steps), int(cache_interval)
    if k < 2:
        raise ValueError(f"cache_interval must be >= 2 (one full step, then interval-1 cache steps), got {k}")
    if num_steps < 2:
        raise ValueError(f"an L2C schedule needs at least 2 steps, got {num_steps}")
    if k == 2 and num_steps % 2:
        raise ValueError(
            f"the alternating L2C schedule needs an even number of steps, got {num_steps}: steps alternate "
            f"full/cache from a full first step, and the official routers use the even respaced indices "
            f"0, 2, ..., N-2 as cache steps, so the last step (t=0) must be a cache step. Use {num_steps - 1} or "
            f"{num_steps + 1} steps.")
    router, source = [], []
    for s in range(num_steps):
        if s % k == 0:
            router.append(None)
            source.append(None)
        else:
            router.append(num_steps - 1 - s)
            source.append(s - s % k)
    return L2CSchedule("alternating", num_steps, num_steps, k, tuple(router), tuple(source))


def shifted_schedule(num_steps: int, cache_interval: int = 2) -> L2CSchedule:
    """DPM-Solver-2 singlestep (``num_steps`` steps, 2 evaluations each): cache at 1-based NFE 3, 5, 7, ..."""
    num_steps = int(num_steps)
    if int(cache_interval) != 2:
        raise ValueError(
            f"cache_interval={cache_interval} is only defined for one-evaluation-per-step solvers (DDIM, DDPM, "
            f"DPM-Solver++): with DPM-Solver-2 singlestep every step start already reuses the previous midpoint, "
            f"and a midpoint must never be cached (it feeds the solver's derivative)")
    if num_steps < 2:
        raise ValueError(f"the shifted L2C schedule needs at least 2 solver steps (NFE >= 4), got {num_steps}")
    router, source = [], []
    for e in range(2 * num_steps):
        j = e // 2
        if e % 2 == 0 and j >= 1:
            router.append(j)
            source.append(e - 1)
        else:
            router.append(None)
            source.append(None)
    return L2CSchedule("shifted", num_steps, 2 * num_steps, 2, tuple(router), tuple(source))


def _family(kind: str) -> str | None:
    k = str(kind).lower().replace("-", "_")
    if k in ALTERNATING_KINDS:
        return "alternating"
    if k in SHIFTED_KINDS:
        return "shifted"
    return None


def schedule_from_counts(num_steps: int, num_evals: int, cache_interval: int = 2) -> L2CSchedule:
    """The schedule implied by evaluations per step (1: alternating, 2: shifted)."""
    if num_evals == num_steps:
        return alternating_schedule(num_steps, cache_interval)
    if num_evals == 2 * num_steps:
        return shifted_schedule(num_steps, cache_interval)
    raise ValueError(f"unknown solver family: {num_evals} evaluations over {num_steps} steps; L2C schedules exist "
                     f"for one evaluation per step (DDIM, DDPM, DPM-Solver++) and DPM-Solver-2 singlestep (two)")


def make_schedule(spec: Any, cache_interval: int = 2) -> L2CSchedule:
    """An :class:`L2CSchedule` from a solver, a registry name (``"ddim20"``, ``"dpm20"`` = NFE 20,
    ``"dpmpp20"``), ``(kind, num_steps)`` with ``num_steps`` *solver steps* (``("dpm", 10)`` = NFE 20), or
    a schedule (returned as is)."""
    if isinstance(spec, L2CSchedule):
        return spec
    if isinstance(spec, str):
        m = re.fullmatch(r"([A-Za-z_+\-]+?)_?(\d+)", spec.strip())
        fam = _family(m.group(1)) if m else None
        if fam is None:
            raise ValueError(f"unknown solver family in {spec!r}; known: {ALTERNATING_KINDS + SHIFTED_KINDS} "
                             f"followed by the NFE, e.g. 'ddim20', 'dpm20'")
        n = int(m.group(2))
        if fam == "shifted":
            if n % 2:
                raise ValueError(f"{spec!r}: DPM-Solver-2 singlestep needs an even NFE, got {n}")
            return shifted_schedule(n // 2, cache_interval)
        return alternating_schedule(n, cache_interval)
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        kind, n = spec
        fam = _family(kind)
        if fam is None:
            raise ValueError(f"unknown solver family {kind!r}; known: {ALTERNATING_KINDS + SHIFTED_KINDS}")
        return (shifted_schedule if fam == "shifted" else alternating_schedule)(int(n), cache_interval)
    if hasattr(spec, "num_evals") and hasattr(spec, "num_steps"):
        return _schedule_from_solver(spec, cache_interval)
    raise TypeError(f"cannot build an L2C schedule from {type(spec).__name__}: pass a solver, a registry name "
                    f"like 'ddim20', or (kind, num_steps)")


def _schedule_from_solver(solver: Any, cache_interval: int) -> L2CSchedule:
    n_s, n_e = int(solver.num_steps), int(solver.num_evals)
    name = next((getattr(solver, a) for a in ("kind", "family", "name") if isinstance(getattr(solver, a, None), str)),
                type(solver).__name__)
    if n_e == n_s:
        fam = "alternating"
    elif n_e == 2 * n_s:
        fam = "shifted"
    else:
        fam = None
    if fam is not None and hasattr(solver, "step_of"):
        per = n_e // n_s
        if any(int(solver.step_of(e)) != e // per for e in range(n_e)):
            fam = None
    if fam is None:
        raise ValueError(f"unknown solver family for solver {name!r}: {n_e} evaluations over {n_s} steps; L2C "
                         f"schedules exist for one evaluation per step (DDIM, DDPM, DPM-Solver++ multistep) and "
                         f"DPM-Solver-2 singlestep (two per step)")
    named = _family(re.sub(r"_?\d+$", "", name))
    if named is not None and named != fam:
        raise ValueError(f"solver {name!r} looks {named} by name but has {n_e} evaluations over {n_s} steps")
    return (shifted_schedule if fam == "shifted" else alternating_schedule)(n_s, cache_interval)


# =============================================================================================== budget
def site_costs(site_kinds: Sequence[str], depth: int, site_cost: Mapping[str, float] | None = None) -> torch.Tensor:
    """MAC weight of every router entry (float64, ``depth * len(site_kinds)``), layer-major."""
    cost = {**DEFAULT_SITE_COST, **dict(site_cost or {})}
    missing = [k for k in site_kinds if k not in cost]
    if missing:
        raise ValueError(f"no MAC weight for site kinds {missing}; pass site_cost={{kind: weight}}")
    return torch.tensor([float(cost[k]) for k in site_kinds] * int(depth), dtype=torch.float64)


def _keep_top(logits: torch.Tensor, costs: torch.Tensor, budget: float) -> torch.Tensor:
    """Boolean keep-mask of the highest logits whose cost first reaches ``budget * total``."""
    flat, c = logits.reshape(-1).double(), costs.reshape(-1).double()
    order = torch.sort(flat, descending=True, stable=True).indices
    cum = torch.cumsum(c[order], 0)
    total = float(cum[-1]) if cum.numel() else 0.0
    target = budget * total
    tol = 1e-12 * max(total, 1.0)
    k = 0 if target <= tol else min(int((cum < target - tol).sum()) + 1, flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(logits.shape)


def budget_masks(logits: Sequence[torch.Tensor] | torch.Tensor, routers: Sequence[int], costs: torch.Tensor,
                 budget: float, per_step: bool = False) -> tuple[float | None, dict[int, torch.Tensor]]:
    """Choose what cache evaluations compute so they keep ``budget`` (0..1) of their branch MACs.

    logits: all routers (list of [S] or [R, S]); routers: the router indices the schedule reads; costs:
    [S] MAC weight per entry (:func:`site_costs`, or ones for a site count). Sites are ranked by logit
    (monotone in beta, and free of fp32 sigmoid saturation), highest first, and kept until the kept cost
    reaches the target (never below it). ``per_step=False``: one ranking over all cache steps (a global
    theta); ``per_step=True``: top-k within each router.

    Returns ``(theta, masks)``: ``masks[r]`` is a bool [S] tensor, True = compute. ``theta`` (global mode)
    is ``sigmoid`` of the best dropped logit, so the inference rule ``sigmoid > theta`` gives the same mask
    unless scores tie at the boundary (0.0 when everything is kept; None in per-step mode).
    """
    if not 0.0 <= float(budget) <= 1.0:
        raise ValueError(f"budget is the fraction of cache-step branch MACs to keep, in [0, 1]; got {budget}")
    routers = list(routers)
    if not routers:
        return (0.0 if not per_step else None), {}
    L = torch.stack([torch.as_tensor(logits[r]).detach().cpu().double().reshape(-1) for r in routers])
    costs = torch.as_tensor(costs, dtype=torch.float64).reshape(-1)
    if costs.numel() != L.shape[1]:
        raise ValueError(f"costs has {costs.numel()} entries, routers have {L.shape[1]}")
    if per_step:
        keep = torch.stack([_keep_top(L[i], costs, budget) for i in range(len(routers))])
        theta = None
    else:
        keep = _keep_top(L, costs.expand_as(L), budget)
        dropped = L[~keep]
        theta = 0.0 if dropped.numel() == 0 else float(torch.sigmoid(dropped.max()))
    return theta, {r: keep[i].clone() for i, r in enumerate(routers)}


def theta_for_budget(logits, routers, costs, budget: float) -> float:
    """The global theta of :func:`budget_masks`."""
    return budget_masks(logits, routers, costs, budget, per_step=False)[0]


# =============================================================================================== policy
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

    num_routers: routers to create (default: the schedule's ``num_evals``). depth / site_kinds: cache
    layout; taken from the backbone on :meth:`attach` when not given (routers are then created there).
    schedule: anything :func:`make_schedule` accepts; otherwise inferred from the first StepContext.
    theta: inference threshold. clamp: ``c`` (-> [-c, c]), ``(lo, hi)`` or None. cache_interval: 2 =
    the paper. budget / budget_mode ("global" | "per_step") / budget_unit ("macs" | "sites") /
    site_cost: compute budget instead of theta. mode: "infer" | "train" | "record". init_seed: seed of
    the N(0, 1) init (None: global RNG). lam: the L1 weight, only recorded (the loss lives in the
    LightningModule) and written into exported DiT ``args.l1``.
    """

    name = "l2c"

    def __init__(self, num_routers: int | None = None, *, depth: int | None = None,
                 site_kinds: Sequence[str] | None = None, schedule: Any = None, theta: float = 0.1,
                 clamp: float | tuple[float, float] | None = None, cache_interval: int = 2,
                 budget: float | None = None, budget_mode: str = "global", budget_unit: str = "macs",
                 site_cost: Mapping[str, float] | None = None, mode: str = "infer", init_seed: int | None = None,
                 lam: float | None = None, official_format: str | None = None) -> None:
        super().__init__()
        if budget_mode not in ("global", "per_step"):
            raise ValueError(f"budget_mode must be 'global' or 'per_step', got {budget_mode!r}")
        if budget_unit not in ("macs", "sites"):
            raise ValueError(f"budget_unit must be 'macs' or 'sites', got {budget_unit!r}")
        if budget is not None and not 0.0 <= float(budget) <= 1.0:
            raise ValueError(f"budget is the fraction of cache-step branch MACs to keep, in [0, 1]; got {budget}")
        self.cache_interval = int(cache_interval)
        self.schedule: L2CSchedule | None = None if schedule is None else make_schedule(schedule, self.cache_interval)
        self.theta = float(theta)
        self.clamp = _as_clamp(clamp)
        self.budget = None if budget is None else float(budget)
        self.budget_mode, self.budget_unit = budget_mode, budget_unit
        self.site_cost = dict(site_cost or {})
        self.lam = lam
        self.init_seed = init_seed
        self.official_format = official_format
        self.site_kinds: tuple[str, ...] = tuple(site_kinds) if site_kinds is not None else ("attn", "mlp")
        self.depth = depth
        self.routers = nn.ParameterList()
        self._mode = "infer"
        self.mode = mode
        self._cache: dict[tuple[str, int, str], torch.Tensor] = {}
        self._active: int | None = None
        self._flags: list[bool] | None = None
        self._store: list[bool] | None = None  # infer, full evaluation: which sites a later cache step reuses
        self._mask_memo: tuple[Any, dict[int, list[bool]]] | None = None
        self._official: OfficialRouters | None = None  # opt/args/archive of an imported file
        self._official_fp: Any = None
        if num_routers is None and self.schedule is not None:
            num_routers = self.schedule.num_routers
        if depth is not None and num_routers is not None:
            self._build(int(num_routers), int(depth) * len(self.site_kinds))

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
        return int(self.routers[0].numel()) if len(self.routers) else (
            self.depth * len(self.site_kinds) if self.depth is not None else 0)

    def site_index(self, layer: int, kind: str) -> int:
        return layer * len(self.site_kinds) + self.site_kinds.index(kind)

    def site_labels(self) -> list[str]:
        n = self.num_sites // len(self.site_kinds)
        return [f"{layer}.{kind}" for layer in range(n) for kind in self.site_kinds]

    @classmethod
    def from_config(cls, cfg: Mapping, backbone=None, solver=None, ckpt: str | os.PathLike | None = None) -> "L2CPolicy":
        """Build from a Hydra ``policy=l2c`` group (``name`` already removed); loads ``ckpt`` if given."""
        c = dict(cfg)
        c.pop("name", None)
        ckpt = ckpt or c.pop("ckpt", None) or c.pop("router_ckpt", None)
        weights_only = bool(c.pop("weights_only", True))
        allowed = {"theta", "clamp", "cache_interval", "budget", "budget_mode", "budget_unit", "site_cost", "mode",
                   "init_seed", "lam", "official_format", "site_kinds", "depth", "num_routers", "schedule"}
        unknown = sorted(set(c) - allowed)
        if unknown:
            raise TypeError(f"unknown policy=l2c options {unknown}; allowed: {sorted(allowed)}")
        if solver is not None and c.get("schedule") is None:
            c["schedule"] = make_schedule(solver, int(c.get("cache_interval", 2)))
        if ckpt:
            return cls.from_official(ckpt, backbone=backbone, weights_only=weights_only, **c)
        policy = cls(**c)
        if backbone is not None:
            policy.attach(backbone)
        return policy

    def attach(self, backbone) -> "L2CPolicy":
        """Bind to ``backbone``; creates the routers (if needed) or checks their length against it."""
        kinds = tuple(getattr(backbone, "site_kinds", self.site_kinds))
        depth = int(backbone.depth)
        expected = depth * len(kinds)
        name = type(backbone).__name__
        if len(self.routers):
            if self.num_sites != expected:
                raise ValueError(
                    f"router length {self.num_sites} does not match {name}: depth {depth} x {len(kinds)} kinds "
                    f"{kinds} = {expected} cache sites (a DiT-XL/2 router has 56 entries, a U-ViT-H/2 router 58; "
                    f"routers trained for one backbone cannot drive another)")
        else:
            n = self.schedule.num_routers if self.schedule is not None else None
            if n is None:
                raise ValueError("L2CPolicy.attach: the number of routers is unknown; pass num_routers= or "
                                 "schedule= (a solver, or a name like 'ddim20') so the routers exist before the "
                                 "optimiser is built")
            self._build(n, expected)
        self.site_kinds, self.depth = kinds, depth
        if self.official_format is None:
            self.official_format = "uvit" if getattr(backbone, "family", "") == "uvit" else "dit"
        return super().attach(backbone)

    # ------------------------------------------------------------------ schedule
    def set_schedule(self, spec: Any) -> L2CSchedule:
        sched = make_schedule(spec, self.cache_interval)
        self._check_schedule(sched)
        self.schedule = sched
        return sched

    def _check_schedule(self, sched: L2CSchedule) -> None:
        if len(self.routers) and sched.num_routers != self.num_routers:
            raise ValueError(
                f"the routers were made for {self.num_routers} evaluations but the solver runs "
                f"{sched.num_evals} ({sched.kind}, {sched.num_steps} steps): routers are per step, so sample "
                f"with the step count they were trained for")

    def _schedule_for(self, spec: Any = None) -> L2CSchedule:
        if spec is not None:
            sched = make_schedule(spec, self.cache_interval)
            self._check_schedule(sched)
            return sched
        if self.schedule is None:
            raise ValueError("the L2C schedule is unknown: pass schedule= (a solver or e.g. 'ddim20'), call "
                             "set_schedule(solver), or run one sampling step first")
        return self.schedule

    def trainable_evals(self, solver: Any = None) -> list[int]:
        """Cache evaluations (0-based NFE, sampling order): where router training draws its student step."""
        return self._schedule_for(solver).cache_evals()

    def router_index(self, nfe: int, solver: Any = None) -> int | None:
        return self._schedule_for(solver).router[nfe]

    def source_eval(self, nfe: int, solver: Any = None) -> int | None:
        """The full evaluation whose outputs cache evaluation ``nfe`` reuses (what to record in training)."""
        return self._schedule_for(solver).source[nfe]

    # ------------------------------------------------------------------ modes
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"L2C mode must be one of {MODES}, got {value!r}")
        self._mode = value
        self._flags = None
        self._store = None

    def reset(self) -> None:
        self._cache = {}
        self._active = None
        self._flags = None
        self._store = None

    def begin(self, ctx: StepContext) -> None:
        super().begin(ctx)
        sched = self.schedule
        if sched is None:
            sched = schedule_from_counts(ctx.num_steps, ctx.num_evals, self.cache_interval)
            self._check_schedule(sched)
            self.schedule = sched
        elif sched.num_evals != ctx.num_evals or sched.num_steps != ctx.num_steps:
            raise ValueError(f"StepContext reports {ctx.num_evals} evaluations over {ctx.num_steps} steps but the "
                             f"L2C schedule has {sched.num_evals} over {sched.num_steps}; call set_schedule(solver)")
        if not 0 <= ctx.nfe < sched.num_evals:
            raise IndexError(f"nfe {ctx.nfe} outside the schedule's {sched.num_evals} evaluations")
        self._active = sched.router[ctx.nfe]
        if self._active is not None and self._active >= self.num_routers:
            raise IndexError(f"router {self._active} needed but only {self.num_routers} exist")
        self._flags = None
        self._store = None
        if self._active is None and self._mode == "infer":
            # only keep what the cache evaluations fed by this one will reuse (memory; outputs unchanged)
            masks = self.inference_masks()
            store = [False] * self.num_sites
            for e in range(ctx.nfe + 1, sched.num_evals):
                if sched.source[e] == ctx.nfe:
                    store = [a or not b for a, b in zip(store, masks[sched.router[e]])]
            self._store = store

    # ------------------------------------------------------------------ the hook
    def apply(self, layer: int, kind: str, module, h: torch.Tensor, *args: Any) -> torch.Tensor:
        key = (self.ctx.branch, layer, kind)
        r = self._active
        j = self.site_index(layer, kind)
        if r is None or self._mode == "record":  # full evaluation (or recording): compute, refresh
            out = module(h, *args)
            if self._store is None or self._store[j]:
                self._cache[key] = out.detach()
            return out
        if self._mode == "infer":
            if self._flags is None:
                self._flags = self.inference_masks()[r]
            if self._flags[j]:
                return module(h, *args)
            return self._cached(key, h)
        cached = self._cached(key, h)  # train: soft mix of pre-gate outputs
        beta = torch.sigmoid(self.routers[r][j])
        return beta * module(h, *args) + (1 - beta) * cached

    def _cached(self, key, h: torch.Tensor) -> torch.Tensor:
        out = self._cache.get(key)
        if out is None:
            raise RuntimeError(
                f"L2C cache miss at nfe {self.ctx.nfe} for branch={key[0]!r}, layer {key[1]}, {key[2]}: a cache "
                f"evaluation needs the outputs of its full evaluation "
                f"(nfe {self.schedule.source[self.ctx.nfe] if self.schedule else '?'}) from the same run and "
                f"CFG branch; run that evaluation (mode 'record' in training) first")
        if out.shape[0] != h.shape[0]:
            raise RuntimeError(f"L2C cache holds a batch of {out.shape[0]} but this evaluation runs {h.shape[0]}")
        return out

    # ------------------------------------------------------------------ masks
    def _fingerprint(self) -> tuple:
        return (self.theta, self.budget, self.budget_mode, self.budget_unit, tuple(sorted(self.site_cost.items())),
                self.schedule, tuple((id(p), p._version) for p in self.routers))

    def costs(self) -> torch.Tensor:
        """MAC weight per router entry (ones for ``budget_unit='sites'``)."""
        if self.budget_unit == "sites":
            return torch.ones(self.num_sites, dtype=torch.float64)
        return site_costs(self.site_kinds, self.num_sites // len(self.site_kinds), self.site_cost)

    def inference_masks(self, theta: float | None = None) -> dict[int, list[bool]]:
        """``{router: [compute?] * num_sites}`` for every router the schedule reads (theta rule or budget).

        An explicit ``theta`` always uses the theta rule, for sensitivity sweeps.
        """
        if theta is None:
            fp = self._fingerprint()
            if self._mask_memo is not None and self._mask_memo[0] == fp:
                return self._mask_memo[1]
        with torch.no_grad():
            if theta is None and self.budget is not None:
                routers = sorted(set(self._schedule_for().used_routers()))
                _, m = budget_masks([p.detach() for p in self.routers], routers, self.costs(), self.budget,
                                    per_step=self.budget_mode == "per_step")
                masks = {r: v.tolist() for r, v in m.items()}
            else:
                th = self.theta if theta is None else float(theta)
                routers = range(self.num_routers) if self.schedule is None else sorted(set(self.schedule.used_routers()))
                masks = {r: (torch.sigmoid(self.routers[r].detach()) > th).tolist() for r in routers}
        if theta is None:
            self._mask_memo = (fp, masks)
        return masks

    def compute_mask(self, num_evals: int) -> dict[tuple[int, int, str], float]:
        """1.0 computed / 0.0 reused per (nfe, layer, kind) at inference (for the MAC counter)."""
        sched = self._schedule_for()
        if num_evals != sched.num_evals:
            raise ValueError(f"compute_mask({num_evals}) but the L2C schedule has {sched.num_evals} evaluations")
        masks = self.inference_masks()
        depth = self.num_sites // len(self.site_kinds)
        out = {}
        for e in range(num_evals):
            r = sched.router[e]
            for layer in range(depth):
                for kind in self.site_kinds:
                    out[(e, layer, kind)] = 1.0 if r is None or masks[r][self.site_index(layer, kind)] else 0.0
        return out

    # ------------------------------------------------------------------ training helpers
    def sum_beta(self, nfe: int | None = None) -> torch.Tensor:
        """``sum_j sigmoid(logit_j)`` of the router read at ``nfe`` (default: the current evaluation)."""
        r = self._active if nfe is None else self._schedule_for().router[nfe]
        if r is None:
            where = "the current evaluation" if nfe is None else f"nfe {nfe}"
            raise ValueError(f"{where} is a full evaluation: it reads no router, so there is no L1 term")
        return torch.sigmoid(self.routers[r]).sum()

    l1 = sum_beta

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp every logit into the configured range in place (DiT: after each optimiser step)."""
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
        sched = self._schedule_for(solver)
        rows = sched.cache_evals()
        all_b = self.betas()
        labels = [f"nfe {e + 1} (r{sched.router[e]})" for e in rows]
        return all_b[[sched.router[e] for e in rows]], labels

    def cache_stats(self, theta: float | None = None, solver: Any = None) -> dict[str, Any]:
        """Cached sites over the schedule's cache evaluations: total, per kind, per cache evaluation."""
        sched = self._schedule_for(solver)
        masks = self.inference_masks(theta)
        per_eval = {}
        per_kind = {k: 0 for k in self.site_kinds}
        K = len(self.site_kinds)
        for e in sched.cache_evals():
            m = masks[sched.router[e]]
            per_eval[e] = sum(1 for x in m if not x)
            for j, x in enumerate(m):
                if not x:
                    per_kind[self.site_kinds[j % K]] += 1
        n = len(per_eval)
        return {"cached": sum(per_eval.values()), "cacheable": n * self.num_sites, "per_kind": per_kind,
                "per_eval": per_eval}

    def summary(self) -> dict[str, float]:
        """Flat floats for loggers: cached / cacheable at the current theta (or budget), per kind, MACs kept."""
        sched = self._schedule_for()
        st = self.cache_stats()
        masks = self.inference_masks()
        costs = site_costs(self.site_kinds, self.num_sites // len(self.site_kinds), self.site_cost)
        kept = sum(float(costs[torch.tensor(masks[sched.router[e]])].sum()) for e in sched.cache_evals())
        total = float(costs.sum()) * len(sched.cache_evals())
        used = sorted(set(sched.used_routers()))
        out = {"cached": float(st["cached"]), "cacheable": float(st["cacheable"]),
               "cached_frac": st["cached"] / max(st["cacheable"], 1),
               "cache_step_macs_kept": kept / total if total else 1.0,
               "mean_beta": float(self.betas()[used].mean()) if used else 0.0}
        out.update({f"cached_{k}": float(v) for k, v in st["per_kind"].items()})
        return out

    # ------------------------------------------------------------------ official checkpoints
    @classmethod
    def from_official(cls, path: str | os.PathLike, *, backbone=None, weights_only: bool = True,
                      **kwargs: Any) -> "L2CPolicy":
        """A policy holding the routers of an official DiT ``.pt`` / U-ViT ``.pth`` file (bit-exact)."""
        off = load_official(path, weights_only=weights_only)
        kwargs.setdefault("official_format", off.fmt)
        kwargs.pop("num_routers", None)
        depth = kwargs.pop("depth", None)
        policy = cls(**kwargs)
        policy.depth = depth
        K = len(policy.site_kinds)
        if off.num_sites % K:
            raise RouterCheckpointError(f"{path}: router length {off.num_sites} is not a multiple of "
                                        f"{K} site kinds {policy.site_kinds}")
        if policy.depth is not None and policy.depth * K != off.num_sites:
            raise RouterCheckpointError(f"{path}: router length {off.num_sites} != depth {policy.depth} x {K}")
        policy._build(off.num_routers, off.num_sites, init=off.logits)
        policy._remember_official(off)
        if policy.schedule is not None:
            policy._check_schedule(policy.schedule)
        if backbone is not None:
            policy.attach(backbone)
        return policy

    def _remember_official(self, off: OfficialRouters) -> None:
        self._official = OfficialRouters([], off.fmt, opt=off.opt, args=off.args, archive_name=off.archive_name)
        self._official_fp = tuple((id(p), p._version) for p in self.routers)

    def load_official(self, path: str | os.PathLike, *, weights_only: bool = True) -> "L2CPolicy":
        """Copy an official file's logits into the existing routers (count and length must match)."""
        off = load_official(path, weights_only=weights_only)
        if len(self.routers) and (off.num_routers, off.num_sites) != (self.num_routers, self.num_sites):
            raise RouterCheckpointError(
                f"{path}: {off.num_routers} routers of length {off.num_sites}, but this policy has "
                f"{self.num_routers} of length {self.num_sites}")
        if not len(self.routers):
            self._build(off.num_routers, off.num_sites, init=off.logits)
        else:
            with torch.no_grad():
                for p, t in zip(self.routers, off.logits):
                    p.copy_(t)
        self._remember_official(off)
        return self

    def to_official(self, path: str | os.PathLike, fmt: str | None = None, *, optimizer: torch.optim.Optimizer | None = None,
                    args: argparse.Namespace | Mapping | None = None, archive_name: str | None = None) -> Path:
        """Write the routers in the official format (``fmt`` "dit" | "uvit"; default: the imported file's, else
        the backbone family's). DiT ``opt``: from ``optimizer`` if given (built on ``policy.parameters()``),
        else the imported file's if the routers are unchanged since import, else an empty AdamW state.
        ``args``: given, else imported, else a Namespace describing this policy. A path without a suffix
        gets ``.pt`` (DiT) or ``.pth`` (U-ViT)."""
        fmt = fmt or self.official_format or "dit"
        path = Path(path)
        if not path.suffix:
            path = path.with_suffix(".pth" if fmt == "uvit" else ".pt")
        off = self._official
        unchanged = off is not None and self._official_fp == tuple((id(p), p._version) for p in self.routers)
        opt = None
        if optimizer is not None:
            opt = optimizer_state(optimizer, list(self.routers))
        elif unchanged and off.opt is not None:
            opt = off.opt
        if args is None:
            args = off.args if off is not None and off.args is not None else argparse.Namespace(
                num_sampling_steps=self.schedule.num_steps if self.schedule else self.num_routers,
                l1=self.lam, ste_threshold=None, clamp=self.clamp, theta=self.theta,
                cache_interval=self.cache_interval, source="diffcache")
        if archive_name is None and off is not None:
            archive_name = off.archive_name
        return save_official(path, [p.detach() for p in self.routers], fmt, opt=opt, args=args,
                             archive_name=archive_name)

    export_official = to_official
