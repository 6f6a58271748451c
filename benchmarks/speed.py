"""Sampling speed: full vs L2C, ToCa, FORA and fewer-step DDIM on one backbone, one noise, one run.

Each row: latency median (min-max) after warm-up, measured speedup over the full sampler, the ideal
speedup from the MAC counter (``policy_cost``, l2c convention, CFG included on both sides), their
ratio ("efficiency") and the peak memory of one run. ``compile`` rows (see :class:`Compiled`) run
inductor on the whole forward or on the attention / MLP modules; graph breaks come from
``torch._dynamo.explain`` on a forward at a full and at a cache evaluation, recompiles are the
whole-forward graphs dynamo captures over a run beyond one forward's (tracing only, no codegen).

L2C: on DiT-XL/2 the released DDIM-20 / DDIM-50 routers (``--routers``); on other DiTs (their router
length differs) random logits with a compute budget equal to the fraction of branch MACs the released
router of that step count keeps on its cache evaluations, so the schedule costs what the real one does.
The rows come from the comparison's method records (``diffcache.tasks.methods.METHODS``, see
:func:`candidates`): ``search`` is a schedule searched on the benchmarked model at the L2C row's MACs (DP,
next-state error of a few calibration samples; the note gives the search time). The shipped MNIST teachers (``mnist_dit``: DDIM,
``mnist_uvit``: DPM-Solver-2) run with their real weights; other archs with random weights.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffcache.backbones import load_backbone
from diffcache.metrics.cost import policy_cost
from diffcache.context import StepContext
from diffcache.policies.l2c import L2CPolicy
from diffcache.sampling import compile_backbone, sample, uncompile_backbone
from diffcache.tasks.methods import Context
from diffcache.tasks.methods import candidates as method_candidates

from .common import markdown_table, peak_memory, seeded_inputs

ROUTERS = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "l2c_routers"


def official_router(routers: Path | None, steps: int) -> Path | None:
    if routers is None:
        return None
    path = Path(routers) / f"DiT_DDIM{steps}_router.pt"
    return path if path.is_file() else None


def released_budget(path: Path) -> float:
    """Fraction of branch MACs the released router keeps on its cache evaluations (theta = 0.1)."""
    pol = L2CPolicy.from_official(path)
    masks = pol.inference_masks()
    w = torch.tensor([1.0, 2.0] * (pol.num_sites // 2), dtype=torch.float64)  # attn 1 : mlp 2 (DiT MACs)
    kept = [float((torch.tensor(m, dtype=torch.float64) * w).sum() / w.sum()) for m in masks.values()]
    return sum(kept) / len(kept)


ASSETS = Path(__file__).resolve().parents[1] / "assets"
TEACHERS = {"mnist_dit": "mnist_dit.pt", "mnist_uvit": "mnist_uvit.pth"}  # shipped, trained by the project


def load_model(arch: str):
    """The shipped MNIST teacher (its real weights; the variant clips x0) or ``arch`` with random weights."""
    if arch in TEACHERS:
        return load_backbone(arch, ckpt=str(ASSETS / TEACHERS[arch]))
    return load_backbone(arch, random_init=True)


def solver_config(model, steps: int) -> dict:
    """DDIM for DiTs (the L2C DiT setting), DPM-Solver-2 with ``steps`` NFE for U-ViT (U-ViT's sampler); as a
    config node, so the comparison's "fewer steps" rows instantiate the same solver with other step counts."""
    if model.family == "uvit":
        return {"_target_": "diffcache.solvers.make_solver", "algorithm": "dpm_solver2", "num_steps": steps,
                "schedule": "linear", "prediction": "x0", "time_input": "scaled"}
    return {"_target_": "diffcache.solvers.make_solver", "algorithm": "ddim", "num_steps": steps, "schedule": "linear"}


def make_family_solver(model, steps: int):
    return instantiate(solver_config(model, steps))


def l2c_policy(arch: str, steps: int, routers: Path | None) -> tuple[L2CPolicy, str]:
    path = official_router(routers, steps)
    if path is not None and arch == "DiT-XL/2":
        return L2CPolicy.from_official(path), f"released {path.name}"
    path = path or official_router(routers, 20)  # other step counts: the DDIM-20 router's compute share
    budget = released_budget(path) if path is not None else 0.75
    src = f"budget {budget:.3f} (as {path.name})" if path is not None else f"budget {budget} (no released router)"
    return L2CPolicy(init_seed=0, budget=budget), "random logits, " + src


def candidates(arch: str, steps: int, routers: Path | None, model=None, search_samples: int = 2,
               guidance: float = 1.5) -> list[dict]:
    """(policy label, solver, policy factory, note) for every row, from the comparison's method records
    (:data:`diffcache.tasks.methods.METHODS`, the full sampler first), so a method added there is timed here
    too. The settings: FORA N=3; ToCa's preset (and N=3 on DiTs); the fewest steps whose MACs reach the L2C
    row's ("fewer steps"); a DP search at the L2C row's MAC fraction of the whole sampler on the next-state
    error of ``search_samples`` calibration samples (its time in the note)."""
    model = model if model is not None else load_model(arch)
    solver = make_family_solver(model, steps)
    l2c, l2c_note = l2c_policy(arch, steps, routers)
    frac = 1 / policy_cost(model, solver, l2c, guidance=guidance)["speedup_macs"]
    cfg = OmegaConf.create({
        "solver": solver_config(model, steps), "policy": {"theta": float(l2c.theta), "cache_interval": int(l2c.cache_interval)},
        "compare": {"seed": 0, "num_samples": 0, "guidance": guidance, "steps": [], "fora_intervals": [3],
                    "toca": True, "toca_variants": [{"fresh_threshold": 3}] if model.family == "dit" else [],
                    "search": {"budgets": [min(1.0, frac)], "methods": ["dp"], "proxy": "step",
                               "num_samples": search_samples}}})
    ctx = Context(cfg, model, solver, router_policy=l2c, guidance=guidance)
    rows = []
    for cand in method_candidates(ctx):
        r = cand.row
        label = f"{r.solver}{r.nfe}" if r.method == "steps" else r.method
        note = l2c_note if r.method == "l2c" else r.label
        if r.method == "steps":
            note += ": the fewest steps with the L2C row's MACs"
        make = (lambda c=cand: c.policy) if cand.make is None else _Timed(cand, model, note)
        rows.append(dict(policy=label, solver=cand.solver, make=make, note=make.note if cand.make else note))
    return rows


class _Timed:
    """``make()`` for a row built when measured (a search): the policy, built once; :meth:`note` adds its
    build time once it is known."""

    def __init__(self, cand, model, note: str):
        self.cand, self.model, self.base = cand, model, note
        self.policy, self.build_s = None, None

    def __call__(self):
        if self.build_s is None:
            t0 = time.perf_counter()
            self.policy, _ = self.cand.make(self.model)
            self.build_s = time.perf_counter() - t0
        return self.policy

    def note(self) -> str:
        return self.base if self.build_s is None else f"{self.base}; searched in {self.build_s:.1f} s"


# ============================================================================================ compile
def _graph_breaks(model, policy, solver, noise, y, guidance) -> dict:
    """Graph breaks of one forward at a full and at a cache evaluation (explain, backend-free)."""
    B = noise.shape[0]
    x = (torch.cat([noise, noise]) if guidance is not None else noise).to(model.dtype)
    yy = torch.cat([y, torch.full_like(y, model.null_class)]) if guidance is not None else y
    t = torch.full((x.shape[0],), 500.0, device=noise.device)
    reasons, graphs = [], 0
    evals = [0, 1] if policy is not None else [0]
    ctx = dict(step=0, num_steps=solver.num_steps, num_evals=solver.num_evals,
               branch="all", cfg_layout=model.cfg_layout)
    import contextlib

    binding = policy.bound(model, solver) if policy is not None else contextlib.nullcontext()
    with torch.no_grad(), binding:
        for nfe in evals:
            if policy is not None:
                policy.train(False)
                policy.begin(StepContext(nfe=nfe, **ctx))
                # FORA / L2C need a full evaluation in the cache before a cache evaluation
                if nfe:
                    policy.begin(StepContext(nfe=0, **ctx))
                    model(x, t, yy)
                    policy.begin(StepContext(nfe=nfe, **ctx))
            torch._dynamo.reset()
            ex = torch._dynamo.explain(model)(x, t, yy)
            graphs = max(graphs, ex.graph_count)
            for b in ex.break_reasons:
                where = b.user_stack[-1] if b.user_stack else None
                loc = f"{Path(where.filename).name}:{where.lineno}" if where is not None else "?"
                reasons.append(f"{loc}: {b.reason}"[:200])
    del B
    return {"graph_breaks": len(reasons), "break_reasons": sorted(set(reasons)), "graphs_per_forward": graphs}


def _warm(model, noise, y) -> None:
    """One uncached forward at the run's CFG batch: thread pools and allocator warm, at a fraction of a run."""
    with torch.no_grad():
        x = torch.cat([noise, noise]).to(model.dtype)  # a direct call: the input in the model's dtype
        model(x, torch.full((x.shape[0],), 500.0, device=x.device), torch.cat([y, y]))


class Compiled:
    """Compile the backbone for a block of rows; dynamo's caches and counters reset on entry and exit.

    ``whole``: ``model.compile(backend)``, the whole forward including the cache sites (one graph per
    distinct caching decision). ``regional``: inductor on every attention and MLP module only (all
    blocks share their code, so a handful of graphs); the caching decisions stay in Python.
    """

    def __init__(self, model, backend: str, recompile_limit: int, regional: bool = False):
        self.model, self.backend, self.limit, self.regional = model, backend, recompile_limit, regional
        self.parts = [m for blk in model.blocks for m in (blk.attn, blk.mlp)] if regional else [model]

    def __enter__(self):
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        self._prev = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = self.limit
        if self.regional:
            for m in self.parts:
                m.compile(backend=self.backend)
        else:  # exactly what eval.compile does
            compile_backbone(self.model, self.backend, self.limit)
        return self

    def graphs(self) -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"].get("unique_graphs", 0))

    def __exit__(self, *exc):
        for m in self.parts:
            uncompile_backbone(m)
        torch._dynamo.config.recompile_limit = self._prev
        torch._dynamo.reset()


def count_graphs(model, fn, limit: int) -> int:
    """Graphs dynamo captures over one whole-forward run (backend ``eager``: tracing only, no codegen)."""
    with Compiled(model, "eager", limit) as comp:
        fn()
        return comp.graphs()


# ============================================================================================ rows
def _interleaved(entries: list[dict], dev: torch.device, reps: int) -> None:
    """Time every entry ``reps`` times in round-robin order (a shared machine's load drifts; drift then hits
    every policy alike), storing median / min / max seconds and the peak memory per entry."""
    for e in entries:
        e["times"], e["mems"] = [], []
    for _ in range(reps):
        for e in entries:
            t0 = time.perf_counter()
            _, mem = peak_memory(e["fn"], dev)
            e["times"].append(time.perf_counter() - t0)
            e["mems"].append(mem)


def _finish(e: dict, full_s: float, full_macs: float) -> dict:
    row, ts = e["row"], e["times"]
    med = statistics.median(ts)
    speed, ideal = full_s / med, full_macs / e["cost"]["macs_cfg"]
    row.update({"latency_s": f"{med:.3f} ({min(ts):.3f}-{max(ts):.3f})", "median_s": round(med, 4),
                "min_s": round(min(ts), 4), "max_s": round(max(ts), 4), "repeats": len(ts),
                "speedup": round(speed, 3), "ideal_speedup": round(ideal, 3), "efficiency": round(speed / ideal, 3),
                "peak_mib": round(max(e["mems"]), 1), "gmacs_per_image": round(e["cost"]["macs_cfg"] / 1e9, 2),
                # evaluate.py's names: speedup_* = full / cached, *_fraction = cached / full
                "speedup_latency": round(speed, 3), "speedup_macs": round(ideal, 3),
                "macs_fraction": round(1 / ideal, 4)})
    print(json.dumps({k: v for k, v in row.items() if k != "break_reasons"}), flush=True)
    return row


def run(arch: str = "DiT-S/2", steps: int = 20, batches=(1, 8), device: str = "cpu", guidance: float = 1.5,
        repeats: int = 3, compile_modes=("regional", "whole"), compile_batches=(1,),
        whole_policies=("full",), regional_policies=("full", "l2c", "toca", "fora"), routers: Path | None = ROUTERS,
        bf16: bool = False, policies: tuple[str, ...] | None = None, search_samples: int = 2) -> list[dict]:
    """Rows of the speed table, policies timed in interleaved rounds. ``compile_modes``: "regional" (one
    compile shared by every policy in ``regional_policies``) and "whole" (the policies in ``whole_policies``,
    each compiled on its own: inductor on the whole forward compiles one graph per caching decision, minutes
    each on a CPU). Compiled rows also count graph breaks and whole-forward graphs with dynamo alone."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = load_model(arch).to(dev, dtype)
    cands = [c for c in candidates(arch, steps, routers, model, search_samples)
             if policies is None or c["policy"] in policies or c["policy"] == "full"
             or (c["policy"].startswith("ddim") and "ddim" in policies)]
    rows: list[dict] = []
    for bs in batches:
        # the solver state stays float32 whatever the model's dtype: sample() casts the model input to it
        noise, y = seeded_inputs(model, bs, dev, torch.float32)
        full_macs = policy_cost(model, cands[0]["solver"], None, guidance=guidance)["macs_cfg"]
        reps = repeats if bs < 8 else max(1, repeats - 2)  # a batch-8 DiT-S/2 run is ~30 s on 2 CPU cores
        for mode in ["eager"] + [f"compile:{m}" for m in compile_modes]:
            if mode != "eager" and bs not in compile_batches:
                continue
            allowed = {"compile:whole": whole_policies, "compile:regional": regional_policies}.get(mode)
            entries = []
            for c in cands:
                if allowed is not None and c["policy"] not in allowed:
                    continue
                pol = c["make"]()
                row = {"arch": arch, "device": str(dev), "dtype": str(dtype).replace("torch.", ""), "batch": bs,
                       "steps": c["solver"].num_steps, "policy": c["policy"], "mode": mode,
                       "note": c["note"]() if callable(c["note"]) else c["note"]}
                pol = pol.to(dev) if pol is not None else None
                fn = (lambda s=c["solver"], p=pol: sample(model, s, p, noise, y, guidance=guidance))
                entries.append({"row": row, "fn": fn, "pol": pol, "solver": c["solver"],
                                "cost": policy_cost(model, c["solver"], pol, guidance=guidance)})
            if mode != "eager":
                for e in entries:  # dynamo alone: breaks and whole-forward graphs (before any compile)
                    limit = max(8, 2 * e["solver"].num_evals + 4)
                    e["row"].update(_graph_breaks(model, e["pol"], e["solver"], noise, y, guidance))
                    e["row"]["whole_graphs"] = count_graphs(model, e["fn"], limit)
                    e["row"]["recompiles"] = max(0, e["row"]["whole_graphs"] - e["row"]["graphs_per_forward"])
            if mode == "compile:whole":  # one compile per policy: time each on its own
                for e in entries:
                    limit = max(8, 2 * e["solver"].num_evals + 4)
                    with Compiled(model, "inductor", limit) as comp:
                        t0 = time.perf_counter()
                        e["fn"]()
                        e["row"]["compile_s"] = round(time.perf_counter() - t0, 2)
                        _interleaved([e], dev, reps)
                        e["row"]["graphs_compiled"] = comp.graphs()
            elif mode == "compile:regional":
                with Compiled(model, "inductor", 64, regional=True) as comp:
                    for e in entries:  # first call compiles (ToCa's token subsets add dynamic-shape graphs)
                        t0 = time.perf_counter()
                        e["fn"]()
                        e["row"]["compile_s"] = round(time.perf_counter() - t0, 2)
                    _interleaved(entries, dev, reps)
                    for e in entries:
                        e["row"]["graphs_compiled"] = comp.graphs()
            else:
                _warm(model, noise, y)
                _interleaved(entries, dev, reps)
            full = next((e for e in entries if e["row"]["policy"] == "full"), None)
            full_s = statistics.median(full["times"]) if full else float("nan")
            rows += [_finish(e, full_s, full_macs) for e in entries]
    return rows


COLUMNS = [("batch", "batch"), ("mode", "mode"), ("policy", "policy"), ("steps", "steps"),
           ("latency s, median (min-max)", "latency_s"), ("speedup", "speedup"), ("ideal (MACs)", "ideal_speedup"),
           ("efficiency", "efficiency"), ("peak MiB", "peak_mib"), ("graph breaks", "graph_breaks"),
           ("whole-forward recompiles", "recompiles"), ("graphs compiled", "graphs_compiled"),
           ("compile s", "compile_s"), ("note", "note")]


def table(rows: list[dict], arch_column: bool = False) -> str:
    return markdown_table(rows, ([("model", "arch")] if arch_column else []) + COLUMNS)
