"""Searched static schedules: the error table, a budget in MACs, a selection, an ordinary L2C router.

Budget convention (``budget_of``):
* ``"sampler"`` (default) -- ``budget`` is the fraction of the *whole sampler's* MACs (``policy_cost``,
  L2C convention, per image) the schedule may spend: its MACs end in ``(b * full - one branch, b * full]``.
  Full evaluations and the never-cached parts (embedders, adaLN) count too, so with the paper's
  alternating schedule ``b`` below ``1 - cacheable / full`` (about 0.5) cannot be met; a clear error says so.
* ``"cache_steps"`` -- the fraction of the cache evaluations' branch MACs that is kept, the unit of
  L2C's ``policy.budget``.

The output is an L2C router (logits +/-10 on the schedule's cache evaluations, +10 elsewhere, theta 0.5;
any theta in (4.5e-5, 0.99995) gives the same mask), so ``evaluate.py policy=l2c router_ckpt=...``, the
MAC counter and the benchmarks read it unchanged.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.seeded import seeded_inputs
from ..metrics.cost import forward_cost, policy_cost
from ..policies.l2c.policy import L2CPolicy
from ..policies.l2c.schedule import make_schedule
from . import select
from .table import BIG, PROXIES, ErrorTable, measure_error_table

BUDGETS_OF = ("sampler", "cache_steps")


def site_macs(backbone) -> np.ndarray:
    """MACs (L2C convention, one image, one forward) of every router entry, from the MAC counter itself."""
    full = forward_cost(backbone, "l2c")
    lay = backbone.layout
    return np.array([full - forward_cost(backbone, "l2c", fractions={(layer, kind): 0.0}) for layer, kind in lay.sites()])


def mask_logits(reuse: np.ndarray, routers: list[int], num_routers: int, big: float = BIG) -> list[torch.Tensor]:
    """Router logits: ``-big`` where a row reuses a site, ``+big`` everywhere else (unread routers too)."""
    reuse = np.asarray(reuse, dtype=bool)
    logits = [torch.full((reuse.shape[1],), float(big)) for _ in range(num_routers)]
    for row, r in zip(reuse, routers):
        logits[r][torch.from_numpy(row.copy())] = -float(big)
    return logits


def searched_policy(backbone, solver, reuse: np.ndarray, routers: list[int], cache_interval: int = 2) -> L2CPolicy:
    """The L2C policy that runs a searched reuse mask (theta 0.5)."""
    pol = L2CPolicy(theta=0.5, cache_interval=cache_interval, layout=backbone.layout, solver=solver,
                    router_format=backbone.router_format)
    with torch.no_grad():
        for p, t in zip(pol.routers, mask_logits(reuse, routers, pol.num_routers)):
            p.copy_(t)
    return pol


@dataclass
class SearchResult:
    table: ErrorTable
    masks: dict[str, np.ndarray]          # method -> reuse mask [rows, sites] (True = reuse)
    proxies: dict[str, float]             # method -> sum of the table over its mask
    method: str                           # the one the policy runs
    policy: L2CPolicy
    budget: float
    budget_of: str
    cost: dict[str, float]                # policy_cost of the chosen policy
    need_macs: float                      # MACs the budget asks to save
    times: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        c = self.cost
        return {"method": self.method, "budget": self.budget, "budget_of": self.budget_of, "proxy": self.table.proxy,
                "num_samples": self.table.num_samples, "macs_fraction": c["macs_ratio"],
                "flops_fraction": c["flops_ratio"], "speedup_macs": c["speedup_macs"], "macs": c["macs"],
                "macs_full": c["macs_full"], "need_macs_saved": self.need_macs,
                "proxy_value": self.proxies[self.method], **{f"proxy_{m}": v for m, v in self.proxies.items()},
                "reused_sites": int(self.masks[self.method].sum()), "cacheable_sites": int(self.masks[self.method].size),
                **{f"time_{k}_s": v for k, v in self.times.items()}}


class ScheduleSearch:
    """Search a static (cache evaluation x site) mask under a MAC budget (see the module docstring).

    budget: fraction of MACs (see ``budget_of``); method: "dp" (exact) | "greedy" (both are always
    computed and reported; this one drives the router); proxy: "final" | "step" (:mod:`.table`);
    num_samples (<= 64) / seed: the calibration set (``seeded_inputs``); batch_size: probes run in
    chunks of this many samples (the table is their sample-weighted mean); guidance: the CFG scale of
    the teacher trajectories (None = the backbone's off value); table: an ``error_table.json`` of an
    earlier run to select from without measuring again (a budget sweep measures once).
    """

    name = "search"

    def __init__(self, budget: float = 0.8, budget_of: str = "sampler", method: str = "dp", proxy: str = "final",
                 cache_interval: int = 2, num_samples: int = 16, batch_size: int | None = None, seed: int = 0,
                 guidance: float | None = None, device: str = "cpu", progress: bool = True,
                 table: str | None = None) -> None:
        if not 0.0 <= float(budget) <= 1.0:
            raise ValueError(f"searcher.budget is a fraction of MACs in [0, 1], got {budget}")
        if budget_of not in BUDGETS_OF:
            raise ValueError(f"searcher.budget_of must be one of {BUDGETS_OF}, got {budget_of!r}")
        if method not in select.METHODS:
            raise ValueError(f"searcher.method must be one of {tuple(select.METHODS)}, got {method!r}")
        if proxy not in PROXIES:
            raise ValueError(f"searcher.proxy must be one of {PROXIES}, got {proxy!r}")
        if not 1 <= int(num_samples) <= 64:
            raise ValueError(f"searcher.num_samples is the calibration set size, 1..64; got {num_samples}")
        self.budget, self.budget_of, self.method, self.proxy = float(budget), budget_of, method, proxy
        self.cache_interval, self.num_samples, self.seed = int(cache_interval), int(num_samples), int(seed)
        self.batch_size = int(batch_size) if batch_size else self.num_samples
        self.guidance = guidance
        self.device, self.progress = device, bool(progress)
        self.table_path = table
        self.partial: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ pieces
    def need(self, backbone, solver, rows: int) -> float:
        """MACs (per image, whole run) the budget asks to save; a clear error when it cannot be met."""
        costs = site_macs(backbone)
        cacheable = rows * float(costs.sum())
        if self.budget_of == "cache_steps":
            return (1.0 - self.budget) * cacheable
        full = policy_cost(backbone, solver)["macs"]
        need = (1.0 - self.budget) * full
        if need > cacheable * (1 + 1e-12):
            lo = 1.0 - cacheable / full
            raise ValueError(f"searcher.budget={self.budget} of the sampler's MACs is below what this schedule can reach "
                             f"({lo:.4f}: full evaluations and the uncacheable parts always run); raise the budget, use "
                             f"searcher.cache_interval > 2, or searcher.budget_of=cache_steps")
        return need

    def measure(self, backbone, solver) -> ErrorTable:
        """The error table on the seeded calibration set, in chunks of ``batch_size``; ``self.partial`` holds
        each chunk's entries as they are measured (what an interrupted search saves, :meth:`save_partial`)."""
        chunks = [range(s, min(s + self.batch_size, self.num_samples)) for s in range(0, self.num_samples, self.batch_size)]
        shape = (len(make_schedule(solver, self.cache_interval).cache_evals()), backbone.layout.num_sites)
        if self.partial is None or [tuple(p.shape) for p in self.partial] != [shape] * len(chunks):
            self.partial = [torch.full(shape, float("nan"), dtype=torch.float64) for _ in chunks]
        tables = []
        for idx, errors in zip(chunks, self.partial):
            noise, cond = seeded_inputs(backbone, idx, seed=self.seed, device=self.device)
            tables.append(measure_error_table(backbone, solver, noise, cond, self.guidance, proxy=self.proxy,
                                              cache_interval=self.cache_interval, progress=self.progress,
                                              errors=errors))
        sizes = [len(idx) for idx in chunks]
        t = tables[0]
        if len(tables) > 1:
            t.errors = sum(tb.errors * n for tb, n in zip(tables, sizes)) / sum(sizes)
            t.num_samples = sum(sizes)
        t.meta.update({"seed": self.seed, "guidance": self.guidance})
        return t

    def _setting(self) -> dict:
        return {"num_samples": self.num_samples, "batch_size": self.batch_size, "seed": self.seed, "proxy": self.proxy,
                "cache_interval": self.cache_interval, "guidance": self.guidance}

    def save_partial(self, path) -> tuple[int, int]:
        """Write the entries measured so far (``searcher.table=<path>`` continues); (measured, total)."""
        done = sum(int((~torch.isnan(p)).sum()) for p in self.partial or [])
        total = sum(p.numel() for p in self.partial or [])
        Path(path).write_text(json.dumps({"partial": True, **self._setting(),
                                          "chunks": [p.tolist() for p in self.partial or []]}))
        return done, total

    def load_table(self, path, backbone, solver) -> ErrorTable | None:
        """A table written by an earlier search (``error_table.json``), checked against this run's schedule;
        None for an interrupted search's ``error_table.partial.json`` (measuring continues from it)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"searcher.table={path}: no such error table (error_table.json of a search run)")
        if json.loads(Path(path).read_text()).get("partial"):
            return self._load_partial(path)
        t = ErrorTable.from_json(path)
        sched = make_schedule(solver, self.cache_interval)
        if t.cache_evals != sched.cache_evals() or t.sites != backbone.layout.labels():
            raise ValueError(f"searcher.table={path} was measured for cache evaluations {t.cache_evals} and sites "
                             f"{t.sites[:4]}..., not this solver / backbone; measure a new one (searcher.table=null)")
        return t

    def _load_partial(self, path) -> None:
        """An interrupted search's entries: measuring continues from them (None: the table is not complete)."""
        d = json.loads(Path(path).read_text())
        if {k: d.get(k) for k in self._setting()} != self._setting():
            raise ValueError(f"searcher.table={path} is a partial table of another calibration setting "
                             f"({ {k: d.get(k) for k in self._setting()} }); continue it with the same searcher settings")
        self.partial = [torch.tensor(c, dtype=torch.float64) for c in d["chunks"]]
        return None

    def select(self, table: ErrorTable, backbone, solver) -> tuple[dict[str, np.ndarray], dict[str, float], float]:
        costs = site_macs(backbone)
        need = self.need(backbone, solver, len(table.cache_evals))
        E = table.errors.numpy()
        masks = {m: fn(E, costs, need) for m, fn in select.METHODS.items()}
        return masks, {m: select.proxy_of(v, E) for m, v in masks.items()}, need

    # ------------------------------------------------------------------ the whole search
    def run(self, backbone, solver, table: ErrorTable | None = None) -> SearchResult:
        make_schedule(solver, self.cache_interval)  # fail early on a solver without an L2C schedule
        times = {}
        t0 = time.perf_counter()
        if table is None and self.table_path:
            table = self.load_table(self.table_path, backbone, solver)
        if table is None:
            backbone = backbone.to(self.device).eval()
            table = self.measure(backbone, solver)
        times["table"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        masks, proxies, need = self.select(table, backbone, solver)
        times["select"] = time.perf_counter() - t1
        policy = searched_policy(backbone, solver, masks[self.method], table.routers, self.cache_interval)
        with policy.bound(backbone, solver):  # set up for this run, so an export records what it was made for
            pass
        cost = policy_cost(backbone, solver, policy)
        expected = cost["macs_full"] - select.saved_of(masks[self.method], site_macs(backbone))
        if abs(cost["macs"] - expected) > 1e-6 * cost["macs_full"]:
            raise RuntimeError(f"MAC counter {cost['macs']} disagrees with the search's own count {expected}")
        times["total"] = time.perf_counter() - t0
        return SearchResult(table, masks, proxies, self.method, policy, self.budget, self.budget_of, cost, need, times)

    def router_args(self, solver) -> argparse.Namespace:
        """The ``args`` stored in a DiT-format router file written from a search."""
        return argparse.Namespace(num_sampling_steps=int(solver.num_steps), ste_threshold=None, theta=0.5,
                                  cache_interval=self.cache_interval, source="diffcache-search", method=self.method,
                                  budget=self.budget, budget_of=self.budget_of, proxy=self.proxy,
                                  num_samples=self.num_samples, seed=self.seed)
