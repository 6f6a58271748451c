"""Trajectory-level router training (``module.objective=trajectory``) and search-initialised routers.

L2C trains each router on its own step's error, a poor proxy for what a cached step does to the final
sample (on the MNIST DiT the ratio final / per-step error runs from ~0.3 at high noise to ~1e-6 at t=0). Here
the loss is the error of the *final sample* of the cached student trajectory against the teacher's, from the
same noise, with classifier-free guidance as sampling uses it, back-propagated through the whole cached chain
(:meth:`L2CPolicy.differentiable_cache` keeps the graph of what full evaluations store, so a router also learns
from how its step's error reaches later cache steps). The loss is divided by the fully-cached sampler's final
error (every cache site reused: FORA N=2) on a calibration set, so 1 means "as bad as caching everything".

The budget is a constraint, not a hand-tuned lambda: ``module.budget`` is a fraction of the whole sampler's
MACs (the search's unit), turned into the fraction of cache-step branch MACs kept (``policy.budget``'s unit);
every iteration routes around the logit threshold ``tau`` that keeps exactly that budget (the top sites), with a
straight-through estimator by default (the forward uses the hard top-k mask, exactly the inference schedule;
the backward ``sigmoid((logit - tau) / T)``'s gradient). What is learned is a ranking of sites at that budget.

``module.init=search`` starts the logits from the DP-searched mask at the same budget (``+margin`` computed,
``-margin`` reused; the search's calibration set is seeded ``seed + 1000``: the comparison's searched rows use
``compare.seed + 1000``, so the two masks agree only when the seeds do; on the MNIST DiT at 0.8 of the MACs the
two calibration sets gave DP masks 6 of 120 sites apart), so training starts where the additive proxy of the search ends and can only add what it misses
(interactions between steps and sites).

The straight-through gradient is not a descent direction of the hard mask: on the MNIST U-ViT (DPM-Solver-2)
400 updates from the searched mask at 0.8 of the MACs ended 6.7-12.4 dB *below* it (3 seeds). So by default
(``select_every``) the hard top-k mask is scored every ``select_every`` iterations, and at the start, on a
held-out seeded set (``select_samples`` noises, seed + 3000: neither the training pool nor the comparison's
samples), and the run ends on the best logits scored, the initial (searched) ones included.
"""
from __future__ import annotations

import math

import torch

from ..data.seeded import seeded_inputs
from ..denoiser import Denoiser
from ..metrics.cost import policy_cost
from ..policies.l2c import L2CPolicy
from ..sampling import advance, sample
from ..search import ScheduleSearch
from .objectives import budget_shift


def cache_budget(backbone, solver, policy, budget: float) -> float:
    """The fraction of cache-step branch MACs to keep (``policy.budget``) for ``budget`` of the sampler's MACs."""

    full = policy_cost(backbone, solver, None)["macs"]
    every = L2CPolicy(budget=0.0, cache_interval=policy.cache_interval, layout=backbone.layout, solver=solver)
    floor = policy_cost(backbone, solver, every)["macs"]  # every cache site reused
    kept = 1.0 - (1.0 - float(budget)) * full / (full - floor)
    if not 0.0 <= kept <= 1.0:
        raise ValueError(f"module.budget={budget} of the sampler's MACs is outside what this schedule reaches "
                         f"({floor / full:.4f} .. 1)")
    return kept


@torch.no_grad()
def fully_cached_error(backbone, solver, policy, guidance, num_samples: int = 8, seed: int = 0) -> float:
    """MSE of the fully-cached sampler's final samples against the teacher's, on a seeded set (the scale)."""

    device = next(backbone.parameters()).device
    noise, cond = seeded_inputs(backbone, range(num_samples), seed, device)
    every = L2CPolicy(budget=0.0, cache_interval=policy.cache_interval, layout=backbone.layout, solver=solver)
    full = sample(backbone, solver, None, noise, cond, guidance, generator=torch.Generator().manual_seed(seed))
    cached = sample(backbone, solver, every, noise, cond, guidance, generator=torch.Generator().manual_seed(seed))
    err = float((cached.float() - full.float()).pow(2).mean())
    return err if err > 0 else 1.0


@torch.no_grad()
def teacher_finals(backbone, solver, guidance, num_samples: int, seed: int, device) -> tuple:
    """(noise, cond, the uncached sampler's final samples) of a seeded set: the training pool, the held-out set."""
    noise, cond = seeded_inputs(backbone, range(num_samples), seed, device)
    return noise, cond, sample(backbone, solver, None, noise, cond, guidance)


def final_sample_loss(den, solver, policy, noise, cond, target, shift: float, temperature: float = 1.0,
                      straight_through: bool = True, generator=None) -> torch.Tensor:
    """MSE of the soft-routed student's final sample against ``target``, with the graph of the whole chain."""
    with policy.soft_threshold(shift, temperature, straight_through), policy.differentiable_cache():
        policy.reset()
        state = advance(den, solver, solver.init(noise), cond, generator=generator)
    return (solver.final(state).float() - target.float()).pow(2).mean()


TIE_GAP = 1e-2  # finish(): the least distance of a routed logit from logit(theta)


def logit_of(p: float) -> float:
    p = min(max(float(p), 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


@torch.no_grad()
def search_init(backbone, solver, policy, budget: float, guidance, num_samples: int = 16, seed: int = 0,
                margin: float = 1.0, centre: float = 0.0) -> dict:
    """Set the logits from the DP-searched reuse mask at ``budget`` (sampler MACs): ``centre + margin`` computed,
    ``centre - margin`` reused; returns the search summary."""

    device = str(next(backbone.parameters()).device)
    search = ScheduleSearch(budget=budget, method="dp", proxy="final", num_samples=num_samples, seed=seed,
                            guidance=guidance, device=device, progress=False, cache_interval=policy.cache_interval)
    result = search.run(backbone, solver)
    for row, r in zip(result.masks["dp"], result.table.routers):
        reuse = torch.as_tensor(row, dtype=torch.bool, device=policy.routers[r].device)
        policy.routers[r].copy_(torch.where(reuse, centre - float(margin), centre + float(margin)))
    return result.summary()


class TrajectoryObjective:
    """The ``trajectory`` objective's settings and state (``module.trajectory``): budget (sampler MACs),
    guidance (CFG scale as sampling uses it), straight_through, temperature, init (random | search),
    search_samples / margin (search init), scale_samples (the fully-cached error's calibration set),
    constraint: ``topk`` (route around the budget's threshold) | ``lagrange`` (route at theta, add
    ``mu x`` the soft MAC fraction kept, dual ascent ``mu *= exp(dual_lr (kept_hard - budget))``), pool: the
    teacher's final samples of this many seeded noises (seed + 2000) computed once and drawn from (0: fresh
    noise and a teacher run every iteration; deterministic solvers only, a pool ignores solver noise),
    select_every / select_samples (keep the best hard mask on a held-out set; 0: keep the last logits)."""

    def __init__(self, budget: float = 0.8, guidance: float | None = None, straight_through: bool = True,
                 temperature: float = 1.0, init: str = "random", search_samples: int = 16, margin: float = 1.0,
                 scale_samples: int = 8, constraint: str = "topk", dual_lr: float = 0.5, dual_init: float = 1.0,
                 pool: int = 64, select_every: int = 25, select_samples: int = 16):
        if init not in ("random", "search"):
            raise ValueError(f"module.trajectory.init must be 'random' or 'search', got {init!r}")
        if constraint not in ("topk", "lagrange"):
            raise ValueError(f"module.trajectory.constraint must be 'topk' or 'lagrange', got {constraint!r}")
        self.constraint, self.dual_lr, self.mu = constraint, float(dual_lr), float(dual_init)
        self.pool_size, self.pool = int(pool), None
        if not 0.0 < float(budget) <= 1.0:
            raise ValueError(f"module.trajectory.budget is a fraction of the sampler's MACs in (0, 1], got {budget}")
        self.budget, self.guidance, self.straight = float(budget), guidance, bool(straight_through)
        self.temperature, self.init, self.search_samples = float(temperature), init, int(search_samples)
        self.margin, self.scale_samples = float(margin), int(scale_samples)
        self.kept, self.scale, self.searched = None, 1.0, None
        if int(select_every) < 0 or (int(select_every) and int(select_samples) < 1):
            raise ValueError(f"module.trajectory.select_every must be >= 0 and select_samples >= 1, got "
                             f"{select_every} and {select_samples}")
        self.select_every, self.select_samples, self.held_out = int(select_every), int(select_samples), None
        self.best: dict | None = None  # {"err", "step", "logits"}: the best hard mask scored so far

    def setup(self, module, fresh: bool) -> None:
        """Budget in ``policy.budget`` units (the hard mask the convergence rule watches), the loss scale and,
        on a fresh run, the search initialisation."""

        bb, solver, policy = module.backbone, module.solver, module.policy
        self.kept = cache_budget(bb, solver, policy, self.budget)
        policy.budget = self.kept
        self.den = Denoiser(bb, self.guidance)
        self.scale = fully_cached_error(bb, solver, policy, self.guidance, self.scale_samples, seed=module.seed)
        if self.pool_size:  # the teacher's final samples of a fixed seeded pool, drawn from every iteration
            self.pool = teacher_finals(bb, solver, self.guidance, self.pool_size, module.seed + 2000, module.device)
        if fresh and self.init == "search":
            self.searched = search_init(bb, solver, policy, self.budget, self.guidance, self.search_samples,
                                        seed=module.seed + 1000, margin=self.margin,
                                        centre=logit_of(policy.theta) if self.constraint == "lagrange" else 0.0)
        if self.select_every:
            self.held_out = teacher_finals(bb, solver, self.guidance, self.select_samples, module.seed + 3000,
                                           module.device)
            if fresh or self.best is None:
                self.select(module)

    @torch.no_grad()
    def select(self, module) -> float:
        """Score the current hard top-k mask on the held-out set (final MSE / scale); keep it if best."""
        bb, solver, policy = module.backbone, module.solver, module.policy
        noise, cond, target = self.held_out  # sample() routes hard and restores the policy's mode
        out = sample(bb, solver, policy, noise, cond, self.guidance, generator=torch.Generator().manual_seed(0))
        err = float((out.float() - target.float()).pow(2).mean()) / self.scale
        if self.best is None or err < self.best["err"]:
            self.best = {"err": err, "step": int(module.global_step),
                         "logits": [p.detach().clone() for p in policy.routers]}
        return err

    def step(self, module, B: int, cond, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """One iteration: the teacher's final samples, then the student's under the budget's top-k routing."""

        bb, solver, policy = module.backbone, module.solver, module.policy
        logs = {}
        if self.select_every and module.global_step and module.global_step % self.select_every == 0:
            logs = {"train/held_out": self.select(module), "train/held_out_best": self.best["err"]}
        seed = int(torch.randint(2**31 - 1, (1,), generator=g))
        if self.pool is not None:
            idx = torch.randperm(self.pool_size, generator=g)[:B].to(module.device)
            noise, cond, target = self.pool
            noise, target = noise[idx], target[idx]
            cond = {k: v[idx] for k, v in cond.items()} if isinstance(cond, dict) else cond[idx]
        else:
            noise = torch.randn((B, bb.in_channels, bb.input_size, bb.input_size), generator=g).to(module.device)
            with torch.no_grad():
                target = sample(bb, solver, None, noise, cond, self.guidance, generator=torch.Generator().manual_seed(seed))
        lagrange = self.constraint == "lagrange"
        shift = logit_of(policy.theta) if lagrange else budget_shift(policy, self.kept)
        with policy.bound(bb, solver):
            mse = final_sample_loss(self.den, solver, policy, noise, cond, target, shift, self.temperature,
                                    self.straight, generator=torch.Generator().manual_seed(seed))
        loss = mse / self.scale
        logs.update({"train/mse_raw": float(mse.detach()), "train/tau": shift})
        if lagrange:  # mu * (soft MAC fraction kept); dual ascent on mu from the hard mask's
            soft, hard = self._kept(policy, shift)
            loss = loss + self.mu * soft
            self.mu *= math.exp(self.dual_lr * (float(hard) - self.kept))
            logs.update({"train/mu": self.mu, "train/kept_hard": float(hard)})
        return loss, logs

    def _kept(self, policy, shift: float) -> tuple[torch.Tensor, float]:
        """(soft, hard) fraction of the cache steps' branch MACs the routers keep."""
        rows = sorted(set(policy.schedule_for().used_routers()))
        costs = policy.costs().to(policy.routers[rows[0]])
        logits = torch.stack([policy.routers[r] for r in rows])
        soft = (torch.sigmoid((logits - shift) / self.temperature) * costs).sum() / (costs.sum() * len(rows))
        hard = ((logits.detach() > shift).to(costs) * costs).sum() / (costs.sum() * len(rows))
        return soft, float(hard)

    def state_dict(self) -> dict:
        """What a resumed run needs beyond the logits: the best scored mask and the dual variable."""
        return {"best": self.best, "mu": self.mu}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.best, self.mu = state.get("best"), float(state.get("mu", self.mu))

    @torch.no_grad()
    def finish(self, module) -> str:
        """Restore the best scored logits (scoring the last ones first), then shift the logits so the policy's
        theta rule gives the budget's top-k mask (a self-contained router): logit(theta) lands midway between
        the lowest kept and the highest dropped logit. Returns what was kept, for the log."""
        policy, note = module.policy, "the last logits"
        if self.held_out is not None:
            last = self.select(module)
            if self.best["step"] != module.global_step:
                for p, q in zip(policy.routers, self.best["logits"]):
                    p.copy_(q.to(p))
            note = (f"the best of the hard masks scored on {self.select_samples} held-out samples: iteration "
                    f"{self.best['step']} (final error {self.best['err']:.4g} of the fully-cached one; "
                    f"last {last:.4g})")
        masks = policy.inference_masks()  # policy.budget is set: the top-k
        kept = [float(policy.routers[r][j]) for r, m in masks.items() for j, c in enumerate(m) if c]
        dropped = [float(policy.routers[r][j]) for r, m in masks.items() for j, c in enumerate(m) if not c]
        lo, hi = max(dropped, default=min(kept, default=0.0) - 2.0), min(kept, default=max(dropped, default=0.0) + 2.0)
        t = logit_of(policy.theta)
        delta = t - (lo + hi) / 2
        for r, p in enumerate(policy.routers):
            p.add_(delta)
            if r in masks:  # logits tied across the boundary (e.g. at the clamp) are parted by TIE_GAP around
                keep = torch.as_tensor(masks[r], device=p.device)  # theta, so the theta rule keeps the budget
                p.copy_(torch.where(keep, p.clamp(min=t + TIE_GAP), p.clamp(max=t - TIE_GAP)))
        policy.budget = None
        return note
