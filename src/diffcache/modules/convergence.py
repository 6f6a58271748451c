"""How long router training runs: updates per router, a convergence rule, and the reach check.

Adam moves a logit by about ``lr`` per update whatever the gradient's size, so what decides whether a
router has learned is the number of optimiser updates *it* received, not the number of iterations: with
L2C's one drawn cache step per device batch, 400 iterations give each of 10 routers ~40 updates. The
official DiT DDIM-20 router got ~11.4k (8 ranks each draw a step: ``1 - (1 - 1/M)^8`` of the iterations).

:class:`RouterConvergence` (added by :meth:`RouterDistill.configure_callbacks`) counts the updates each
router actually receives (a router is updated iff it has a gradient at the optimiser step; unused ones have
``grad=None`` and AdamW skips them) and stops training when every used router has ``updates_per_router``,
or earlier by the convergence rule: every ``every`` iterations it compares the thresholded mask (the
inference rule) and ``beta = sigmoid(logit)`` with the previous check, and stops once the mask has not
changed, no ``beta`` is heading for the threshold fast enough to cross it within ``patience`` checks, and the
mean ``|delta beta|`` stayed below ``eps``, for ``patience`` checks in a row, and every router
has at least ``min_updates`` (by default what it takes to move a logit from the init's 3 sigma to theta, so
the rule cannot fire on logits that have not had time to move). ``beta`` rather than the logit: a logit
drifting away from theta under a consistent gradient sign keeps moving ~lr per update (Adam) while its
routing weight, and so the mask, no longer changes.
"""
from __future__ import annotations

import logging
import math

import lightning as L
import torch

from ..policies.l2c.schedule import make_schedule

log = logging.getLogger(__name__)

DRAWS = ("batch", "sample", "trajectory")
INIT_REACH = 3.0  # logits start N(0, 1): 3 sigma covers 99.7% of them


def logit_distance(theta: float) -> float:
    """Distance a logit may need to travel: from the init's 3 sigma to the threshold ``logit(theta)``."""
    theta = min(max(float(theta), 1e-6), 1 - 1e-6)
    return INIT_REACH + abs(math.log(theta / (1 - theta)))


def updates_per_iteration(draw: str, num_cache: int, batch_size: int, devices: int = 1) -> float:
    """Expected optimiser updates per router per iteration: ``trajectory`` trains every cache step; ``sample``
    covers ``min(B, M)`` distinct steps per rank (stratified); ``batch`` draws one step per rank (L2C)."""
    if draw == "trajectory":
        return 1.0
    hit = 1.0 / num_cache if draw == "batch" else min(1.0, batch_size / num_cache)  # one rank hits a router
    return 1.0 - (1.0 - hit) ** max(int(devices), 1)


def reach_need(module, theta: float) -> tuple[float, str]:
    """(how far a logit may need to travel, that path in words) for the module's objective and init: a
    router routed at theta starts N(0, 1) (3 sigma to logit(theta)); the final-sample objective cuts at its
    budget (top-k), so a decision flips when a logit crosses the cut: across the searched init's +-margin,
    or across the N(0, 1) init's +-3 sigma."""
    if module.get("objective") == "trajectory":
        traj = module.get("trajectory") or {}
        if traj.get("init") == "search":
            margin = float(traj.get("margin", 1.0))
            return 2 * margin, f"across the searched init's +-{margin:g} to the budget's cut"
        if traj.get("constraint", "topk") == "topk":
            return 2 * INIT_REACH, "across the N(0, 1) initial logits' +-3 sigma to the budget's cut"
    return logit_distance(theta), f"the N(0, 1) initial logits need from their 3 sigma to theta (logit({theta:g}))"


def reach_message(lr: float, updates: float, theta: float, need: tuple[float, str] | None = None) -> str | None:
    """Why ``lr x updates`` cannot decide the routers (None when it can); ``need``: :func:`reach_need`'s
    (distance, words), by default the theta-routed L2C's."""
    dist, path = need or reach_need({}, theta)
    if float(lr) * float(updates) >= dist:
        return None
    return (f"lr {lr:g} x {updates:.0f} updates per router = {lr * updates:.3g}: Adam moves a logit ~lr per update, "
            f"so a logit cannot travel the {dist:.2f} {path} and the mask stays the init's. Raise "
            f"module.updates_per_router (or trainer.max_steps) or module.optimizer.lr to at least "
            f"{dist / float(lr):.0f} updates / lr {dist / max(float(updates), 1.0):.3g}")


class RouterConvergence(L.Callback):
    """Stop router training at ``updates_per_router`` or by the convergence rule (see the module docstring)."""

    def __init__(self, updates_per_router: int | None = None, every: int | None = None, patience: int = 3,
                 eps: float = 1e-3, min_updates: int = 0) -> None:
        self.target = None if updates_per_router is None else int(updates_per_router)
        self.every, self.patience, self.eps = (None if not every else int(every)), int(patience), float(eps)
        self.min_updates = int(min_updates)
        self.counts: list[int] = []
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None
        self.streak, self.stopped_by, self.stop_step = 0, None, None

    # ------------------------------------------------------------------ counting
    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        routers = module.policy.routers
        if len(self.counts) != len(routers):
            self.counts = [0] * len(routers)
        for i, p in enumerate(routers):
            if p.grad is not None:
                self.counts[i] += 1

    def used_counts(self, module) -> list[int]:
        used = sorted(set(module.policy.schedule_for().used_routers()))
        return [self.counts[r] if r < len(self.counts) else 0 for r in used]

    # ------------------------------------------------------------------ stopping
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        counts = self.used_counts(module)
        least = min(counts) if counts else 0
        module.log("router/updates_min", float(least), on_step=True, batch_size=1)
        if self.target is not None and least >= self.target:
            return self._stop(trainer, "updates", f"every router has {self.target} updates")
        if self.every and trainer.global_step % self.every == 0:
            self._check(trainer, module, least)

    def _check(self, trainer, module, least: int) -> None:
        policy = module.policy
        used = sorted(set(policy.schedule_for().used_routers()))
        beta = torch.sigmoid(torch.stack([policy.routers[r].detach().float().cpu() for r in used]))
        masks = policy.inference_masks()
        mask = torch.tensor([masks[r] for r in used])
        if self.prev is not None:
            changed = int((mask != self.prev[0]).sum())
            step = beta - self.prev[1]
            moved = float(step.abs().mean())
            theta = policy.effective_theta()
            theta = policy.theta if theta is None else theta
            # a routing weight heading for the threshold at its current pace would flip the mask within `patience`
            # checks: not converged, however small the mean change (one site of many moves little on average)
            heading = int(((beta - theta) * (beta + self.patience * step - theta) < 0).sum())
            module.log_dict({"router/mask_changes": float(changed), "router/dbeta": moved,
                             "router/heading_to_flip": float(heading)}, on_step=True, batch_size=1)
            quiet = changed == 0 and heading == 0 and moved < self.eps and least >= self.min_updates
            self.streak = self.streak + 1 if quiet else 0
        self.prev = (mask, beta)
        if self.streak >= self.patience:
            self._stop(trainer, "converged", f"mask unchanged and mean |delta beta| < {self.eps:g} for "
                                              f"{self.patience} checks of {self.every} iterations")

    def _stop(self, trainer, why: str, text: str) -> None:
        if self.stopped_by is None:
            self.stopped_by, self.stop_step = why, trainer.global_step
            log.info("router training stops at iteration %d: %s", trainer.global_step, text)
        trainer.should_stop = True

    def report(self, module) -> dict:
        counts = self.used_counts(module) if self.counts else []
        return {"updates_per_router_min": min(counts, default=0), "updates_per_router_max": max(counts, default=0),
                "stopped_by": self.stopped_by or "max_steps", "stop_step": self.stop_step}

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"counts": list(self.counts), "streak": self.streak,
                "prev": None if self.prev is None else [t.tolist() for t in self.prev]}

    def load_state_dict(self, state: dict) -> None:
        self.counts, self.streak = list(state.get("counts", [])), int(state.get("streak", 0))
        prev = state.get("prev")
        self.prev = None if prev is None else (torch.tensor(prev[0], dtype=torch.bool), torch.tensor(prev[1]))


def recipe_reach(cfg) -> tuple[str | None, bool]:
    """(what is wrong with a train config's ``lr x updates per router``, or None; whether the length the recipe
    states as ``module.updates_per_router`` is what falls short, an error rather than the warning a
    ``trainer.max_steps`` cap below it gets)."""
    from hydra.utils import instantiate

    module, trainer = cfg.module, cfg.trainer
    lr = float(module.optimizer.lr)
    num_cache = len(make_schedule(instantiate(cfg.solver), int(cfg.policy.get("cache_interval", 2))).cache_evals())
    devices = trainer.get("devices", 1)
    draw = "trajectory" if module.get("objective") == "trajectory" else module.get("draw", "sample")
    per_iter = updates_per_iteration(draw, num_cache, int(cfg.data.batch_size),
                                     devices if isinstance(devices, int) and devices > 0 else 1)
    stated = float(module.get("updates_per_router") or math.inf)
    capped = int(trainer.max_steps) * per_iter if trainer.get("max_steps") and int(trainer.max_steps) > 0 else math.inf
    if min(stated, capped) == math.inf:
        return None, False
    theta = float(cfg.policy.theta)
    return reach_message(lr, min(stated, capped), theta, reach_need(module, theta)), stated <= capped
