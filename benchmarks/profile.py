"""Why a row is slow: a ``torch.profiler`` summary of one sampling run (top ops by self time, and the
share of wall time no aten op accounts for -- Python, policy dispatch, the solver, allocator)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from diffcache.sampling import sample


def profile_run(model, solver, policy, noise, y, guidance, out: Path, label: str, top: int = 12) -> dict:
    dev = noise.device
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sample(model, solver, policy, noise, y, guidance=guidance)  # warm
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        sample(model, solver, policy, noise, y, guidance=guidance)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t0
    ev = prof.key_averages()
    # aten ops only (top-level names), self time so nothing is counted twice
    aten = [e for e in ev if e.key.startswith("aten::")]
    op_s = sum(e.self_cpu_time_total for e in aten) / 1e6
    rows = sorted(aten, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    summary = {"label": label, "wall_s": round(wall, 4), "aten_self_s": round(op_s, 4),
               "unaccounted_frac": round(max(0.0, 1 - op_s / wall), 3),
               "top_ops": [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
                            "share": round(e.self_cpu_time_total / 1e6 / wall, 3)} for e in rows]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {label}\nwall {wall:.3f} s, aten self {op_s:.3f} s, unaccounted "
                   f"{summary['unaccounted_frac']:.1%} (Python, policy and solver dispatch)\n\n"
                   + ev.table(sort_by="self_cpu_time_total", row_limit=25))
    return summary


def profile_low_efficiency(speed_rows: list[dict], threshold: float, out_dir: Path, guidance: float,
                           routers=None, max_profiles: int = 3) -> list[dict]:
    """Profile the eager rows whose efficiency is below ``threshold`` (smallest batch first), and the full run."""
    from diffcache.backbones import load_backbone

    from .common import seeded_inputs
    from .speed import candidates

    low = [r for r in speed_rows if r.get("mode") == "eager" and r.get("efficiency") is not None
           and r["efficiency"] < threshold and r["policy"] != "full"]
    low = sorted(low, key=lambda r: (r["batch"], r["efficiency"]))[:max_profiles]
    if not low:
        return []
    out = []
    arch = low[0]["arch"]
    model = load_backbone(arch, random_init=True)
    steps = max(r["steps"] for r in speed_rows if r.get("policy") == "full")
    cands = {c["policy"]: c for c in candidates(arch, steps, routers, model)}
    for r in [dict(low[0], policy="full", efficiency=None)] + low:  # the uncached run: the baseline profile
        c = cands.get(r["policy"])
        if c is None:
            continue
        noise, y = seeded_inputs(model, r["batch"], torch.device("cpu"), torch.float32)
        label = f"{arch} {r['policy']} batch {r['batch']} DDIM-{c['solver'].num_steps}"
        name = f"profile_{r['policy']}_b{r['batch']}.txt"
        s = profile_run(model, c["solver"], c["make"](), noise, y, guidance, out_dir / name, label)
        s["file"] = name
        s["efficiency"] = r.get("efficiency")
        out.append(s)
        print(label, {k: v for k, v in s.items() if k != "top_ops"}, flush=True)
    return out
