"""The per-(cache evaluation, site) error table a schedule search optimises, measured on the teacher.

The L2C schedule (:func:`~diffcache.policies.l2c.schedule.make_schedule`) fixes which evaluations are
cache evaluations and which full evaluation each reuses; the search only picks the sites. Entry
``E[i, j]`` is the error caused by reusing *exactly* site ``j`` at cache evaluation ``i`` and computing
everything else, starting from the teacher's own trajectory (the uncached sampler on the calibration
noise). It is measured with an ordinary L2C policy whose routers compute everywhere except that one
site, so the probe runs the same code path as the final router.

Proxies (``proxy=``):
* ``"final"`` (default) -- MSE of the *final sample* against the teacher's final sample. It counts
  how the solver carries a local error to the end (errors at noisy steps are partly washed out, late
  ones are not), which is what the schedule is judged by; costs ``N - source`` evaluations per entry.
* ``"step"`` -- MSE of the next solver state (the sample after that evaluation's update) against the
  teacher's. Two evaluations per entry, cheaper, but blind to how errors propagate.
Both sum over sites as if the errors were independent; that additivity is the proxy's approximation.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..denoiser import Denoiser
from ..policies.l2c.policy import L2CPolicy
from ..policies.l2c.schedule import L2CSchedule, make_schedule
from ..sampling import advance

PROXIES = ("final", "step")
BIG = 10.0  # |logit| of a decided site: sigmoid(10) = 0.99995, sigmoid(-10) = 4.5e-5, any theta in between works


@dataclass
class ErrorTable:
    """errors[i][j]: proxy error of reusing site j alone at cache evaluation ``cache_evals[i]``."""

    errors: torch.Tensor              # float64 [len(cache_evals), num_sites]
    cache_evals: list[int]            # 0-based NFE of each row
    routers: list[int]                # L2C router index of each row
    sites: list[str]                  # "layer.kind" per column (router entry order)
    proxy: str
    num_samples: int
    meta: dict = field(default_factory=dict)

    def to_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({
            "proxy": self.proxy, "num_samples": self.num_samples, "cache_evals": self.cache_evals,
            "routers": self.routers, "sites": self.sites, "errors": self.errors.tolist(), **self.meta}, indent=1))
        return path

    @classmethod
    def from_json(cls, path) -> "ErrorTable":
        d = json.loads(Path(path).read_text())
        meta = {k: v for k, v in d.items() if k not in ("proxy", "num_samples", "cache_evals", "routers", "sites", "errors")}
        return cls(torch.tensor(d["errors"], dtype=torch.float64), d["cache_evals"], d["routers"], d["sites"],
                   d["proxy"], d["num_samples"], meta)

    def to_csv(self, path) -> Path:
        path = Path(path)
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["nfe", "router", *self.sites])
            for e, r, row in zip(self.cache_evals, self.routers, self.errors.tolist()):
                w.writerow([e, r, *[f"{v:.6e}" for v in row]])
        return path


def probe_policy(backbone, solver, cache_interval: int = 2) -> L2CPolicy:
    """An L2C policy that computes every site (all logits +BIG); probes flip one logit at a time."""
    pol = L2CPolicy(theta=0.5, cache_interval=cache_interval, layout=backbone.layout, solver=solver,
                    router_format=backbone.router_format)
    with torch.no_grad():
        for p in pol.routers:
            p.fill_(BIG)
    return pol


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


@torch.no_grad()
def teacher_states(backbone, solver, noise, cond, guidance=None, uncond=None) -> list:
    """The uncached trajectory: ``states[nfe]`` is the solver state before evaluation ``nfe`` (``states[-1]`` the end)."""
    den = Denoiser(backbone, guidance, uncond=uncond)
    states = [solver.init(noise)]
    for nfe in range(solver.num_evals):
        states.append(advance(den, solver, states[-1], cond, stop=nfe + 1))
    return states


def entry_cost(sched: L2CSchedule, nfe: int, proxy: str) -> int:
    """Model evaluations one table entry of cache evaluation ``nfe`` runs (the progress bar's unit: entries of
    early rows cost up to ``N`` evaluations with the final proxy, late ones a few)."""
    src = sched.source[nfe]
    return (nfe + 1 - src) if proxy == "step" else (sched.num_evals - src)


@torch.no_grad()
def measure_error_table(backbone, solver, noise: torch.Tensor, cond, guidance: float | None = None, *,
                        proxy: str = "final", cache_interval: int = 2, uncond=None,
                        progress: bool = True, errors: torch.Tensor | None = None) -> ErrorTable:
    """The error table on the calibration inputs ``(noise, cond)`` (see the module docstring). ``errors``: a
    ``[rows, sites]`` tensor filled in place, NaN where still to measure (an interrupted search's partial
    table continues where it stopped; on Ctrl-C it holds what was measured)."""
    if proxy not in PROXIES:
        raise ValueError(f"search proxy must be one of {PROXIES}, got {proxy!r}")
    if backbone.policy is not None:
        raise RuntimeError("the backbone is bound to another policy; measure the table on an unbound backbone")
    sched: L2CSchedule = make_schedule(solver, cache_interval)
    den = Denoiser(backbone, guidance, uncond=uncond)
    pol = probe_policy(backbone, solver, cache_interval).to(noise.device)
    rows = sched.cache_evals()
    S = pol.num_sites
    E = torch.full((len(rows), S), float("nan"), dtype=torch.float64) if errors is None else errors
    todo = [(i, j) for i in range(len(rows)) for j in range(S) if torch.isnan(E[i, j])]
    if todo:
        states = teacher_states(backbone, solver, noise, cond, guidance, uncond)
        final_ref = solver.final(states[-1])
    bar = tqdm(total=sum(entry_cost(sched, rows[i], proxy) for i, _ in todo), unit="eval", dynamic_ncols=True,
               desc=f"error table ({proxy}, {len(todo)} of {E.numel()} entries)", disable=not progress or not todo)
    try:
        for i, j in todo:
            e = rows[i]
            r, src = sched.router[e], sched.source[e]
            pol.routers[r][j] = -BIG
            with pol.bound(backbone, solver), pol.inference():
                st = advance(den, solver, states[src], cond, stop=e + 1 if proxy == "step" else None)
            pol.routers[r][j] = BIG
            E[i, j] = _mse(st.x, states[e + 1].x) if proxy == "step" else _mse(solver.final(st), final_ref)
            bar.update(entry_cost(sched, e, proxy))
    finally:  # Ctrl-C: the bar ends before the message that says what was kept
        bar.close()
    return ErrorTable(E, rows, [sched.router[e] for e in rows], pol.site_labels(), proxy, int(noise.shape[0]),
                      {"num_evals": sched.num_evals, "num_steps": sched.num_steps, "cache_interval": sched.cache_interval,
                       "schedule": sched.kind})
