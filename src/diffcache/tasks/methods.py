"""The methods a comparison measures, one :class:`Method` record each in :data:`METHODS`.

A method turns the comparison's context (config, teacher, sampler, trained router) into candidates: a
:class:`~diffcache.utils.record.Row` template (what runs) with the solver and the policy to run it with (or a
``make`` that builds the policy when the row is measured, e.g. a search). Adding a baseline is one entry here;
its settings come from ``compare.<key>`` with the default given in the entry.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ..metrics.cost import policy_cost
from ..policies.fora import FORAPolicy
from ..policies.l2c import L2CPolicy
from ..policies.toca import ToCaPolicy
from ..search import ScheduleSearch
from ..utils.hashing import file_sha256
from ..utils.record import Row


@dataclass
class Candidate:
    """A row to measure: ``row`` (its template), ``solver``, ``policy`` (None: uncached) or ``make(backbone)``
    -> (policy, extra row fields); ``cache_key`` adds what the row depends on besides its identity (the
    router's sha256, a search's settings)."""

    row: Row
    solver: object
    policy: object = None
    make: Callable | None = None
    cache_key: str = ""
    trained: bool = False


@dataclass
class Context:
    cfg: object
    backbone: object
    solver: object
    router: object = None  # the trained router file (None: no trained rows)
    guidance: float | None = None
    variant: dict = field(default_factory=dict)
    router_policy: object = None  # or a router already in memory (the speed benchmark's random logits at a budget)

    @property
    def c(self):
        return self.cfg.compare

    def row(self, method: str, title: str, solver=None, **params) -> Row:
        s = solver or self.solver
        return Row(method=method, title=title, solver=s.name, nfe=s.num_evals, params=params,
                   seed=int(self.c.seed), num_samples=int(self.c.num_samples))

    def cached(self, method: str, title: str, policy, **params) -> Candidate:
        """A cache policy on the comparison's own sampler."""
        return Candidate(self.row(method, title, **params), self.solver, policy)

    def steps(self, n: int) -> Candidate | None:
        """The uncached sampler with ``n`` evaluations (None when the solver cannot take ``n``)."""
        try:
            s = instantiate(self.cfg.solver, num_steps=int(n))
        except (ValueError, InstantiationException):  # e.g. an odd NFE for DPM-Solver-2
            return None
        return Candidate(self.row("steps", f"{s.name.upper()}-{s.num_evals}", s), s)


@dataclass(frozen=True)
class Method:
    """``name`` is the rows' ``method`` field; ``candidates(ctx)`` lists its rows in the table's order."""

    name: str
    candidates: Callable[[Context], list[Candidate]]


def full(ctx: Context) -> list[Candidate]:
    s = ctx.solver
    return [Candidate(ctx.row("full", f"full {s.name.upper()}-{s.num_evals}"), s)]


def trained(ctx: Context) -> list[Candidate]:
    """L2C at its theta, or one row per budget of a budget-conditioned router (``module.objective=budget``)."""
    if ctx.router_policy is not None:
        return [Candidate(ctx.row("l2c", "L2C", θ=float(ctx.router_policy.theta)), ctx.solver, ctx.router_policy,
                          trained=True)]
    if ctx.router is None:
        return []
    theta, sha = float(ctx.cfg.policy.theta), file_sha256(ctx.router)
    budget = OmegaConf.select(ctx.cfg, "module.objective", default="l2c") == "budget"
    out = []
    for b in (ctx.c.get("router_budgets") or [0.2, 0.4, 0.6, 0.8]) if budget else [None]:
        kw = {} if b is None else {"budget": float(b)}
        params = {"b": float(b)} if budget else {"θ": theta}
        policy = L2CPolicy.from_official(ctx.router, solver=ctx.solver, theta=theta, **kw)
        cand = ctx.cached("budget" if budget else "l2c", "L2C budget-conditioned" if budget else "L2C", policy, **params)
        cand.row.variant, cand.cache_key, cand.trained = dict(ctx.variant), sha, True
        out.append(cand)
    return out


def equal_compute_steps(ctx: Context) -> int | None:
    """The fewest evaluations of the same solver whose full MACs reach the trained router's (its first row)."""
    rows = trained(ctx)
    if not rows:
        return None
    target = policy_cost(ctx.backbone, ctx.solver, rows[0].policy, guidance=ctx.guidance)["macs_cfg"]
    for n in range(1, ctx.solver.num_evals + 1):
        cand = ctx.steps(n)
        if cand is not None and policy_cost(ctx.backbone, cand.solver, None, guidance=ctx.guidance)["macs_cfg"] >= target:
            return cand.solver.num_evals
    return None


def steps(ctx: Context) -> list[Candidate]:
    """The uncached sampler at ``compare.steps`` and at the router's equal-compute step count."""
    few = equal_compute_steps(ctx)
    wanted = sorted({int(n) for n in ctx.c.get("steps") or []} | ({few} if few else set()))
    return [c for c in (ctx.steps(n) for n in wanted if n < ctx.solver.num_evals) if c is not None]


def fora(ctx: Context) -> list[Candidate]:
    return [ctx.cached("fora", "FORA", FORAPolicy(interval=int(k)), N=int(k)) for k in ctx.c.get("fora_intervals", [2, 3])]


def toca(ctx: Context) -> list[Candidate]:
    """ToCa with the backbone's preset, then with each of ``compare.toca_variants``' overrides."""
    preset = ctx.backbone.toca_preset
    if not ctx.c.get("toca", True) or not preset:
        return []
    short = {"fresh_threshold": "N", "fresh_ratio": "r"}
    return [ctx.cached("toca", "ToCa", ToCaPolicy(preset, **v), preset=preset,
                       **{short.get(k, k): float(val) for k, val in sorted(v.items())})
            for v in [{}, *[dict(o) for o in ctx.c.get("toca_variants") or []]]]


def search(ctx: Context) -> list[Candidate]:
    """Searched schedules (greedy / DP) at ``compare.search.budgets``; one error table, measured when the first
    row not in the cache needs it, serves every budget and method (its time is in each row's ``search_s``)."""

    s = ctx.c.get("search") or {}
    kw = dict(budget_of=s.get("budget_of", "sampler"), proxy=s.get("proxy", "final"),
              cache_interval=int(ctx.cfg.policy.cache_interval), num_samples=int(s.get("num_samples", 16)),
              seed=int(ctx.c.seed) + 1000, guidance=float(ctx.c.guidance), progress=False)
    state: dict = {}

    def make(backbone, method: str, budget: float):
        kw["device"] = next(backbone.parameters()).device.type
        if "table" not in state:
            t0 = time.perf_counter()
            state["table"] = ScheduleSearch(**kw).measure(backbone, ctx.solver)
            state["table_s"] = time.perf_counter() - t0
        res = ScheduleSearch(budget=budget, method=method, **kw).run(backbone, ctx.solver, table=state["table"])
        return res.policy, {"search_s": state["table_s"] + res.times["select"]}

    tag = ":".join(f"{k}={v}" for k, v in sorted(kw.items()) if k != "progress")
    out = []
    for b in s.get("budgets") or []:
        for m in s.get("methods") or ["greedy", "dp"]:
            cand = ctx.cached("search", "search", None, algo=m, b=float(b))
            cand.make, cand.cache_key = (lambda bb, m=m, b=float(b): make(bb, m, b)), tag
            out.append(cand)
    return out


METHODS: list[Method] = [Method("full", full), Method("trained", trained), Method("steps", steps),
                         Method("fora", fora), Method("toca", toca), Method("search", search)]


def candidates(ctx: Context) -> list[Candidate]:
    """Every method's candidates, in :data:`METHODS` order (the full sampler first)."""
    return [c for m in METHODS for c in m.candidates(ctx)]


def mark_equal_compute(rows: list[Row]) -> None:
    """Tag (in place) the uncached row with the fewest evaluations whose MACs reach the first trained row's as
    "fewer steps": recomputed from *this* run's rows, so a row reused from the cache never keeps another run's tag."""
    router = next((r for r in rows if r.method in ("l2c", "budget")), None)
    for r in rows:
        r.role = ""
    if router is None or router.gmacs is None:
        return
    ok = [r for r in rows if r.method == "steps" and r.gmacs is not None and r.gmacs >= router.gmacs * (1 - 1e-9)]
    if ok:
        min(ok, key=lambda r: r.nfe).role = "fewer steps"
