"""Benchmarks: speed ratios measured in one run (never asserted in tests).

    python benchmarks/run.py speed  [--arch DiT-S/2 --steps 50 --batch 1 8 --device cpu]
    python benchmarks/run.py train  [--arch DiT-XL/2 --batch 8 64 --device cuda --bf16]

``speed``: full sampler vs ToCa / FORA / L2C-like caching on the same random-weight backbone; prints
latency speedup next to the analytic FLOP speedup and their quotient ("ours vs ideal"); keys as in
evaluate.py (``speedup_*`` = full / cached, ``*_fraction`` = cached / full).
``train``: router-distillation iterations per second, samples/s, peak memory and MFU (model FLOPs
utilisation: the analytic FLOPs of 3 forwards + 1 input-gradient backward per iteration over the
device peak given by ``--peak-tflops``).
Real-size figures need a GPU; on CPU use a small arch (DiT-S/2) and read only the ratios.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffcache.backbones import load_backbone
from diffcache.metrics.cost import policy_cost
from diffcache.metrics.latency import measure
from diffcache.policies.fora import FORAPolicy
from diffcache.policies.toca import ToCaPolicy
from diffcache.sampling import sample
from diffcache.solvers import make_solver

POLICIES = {
    "toca": lambda: ToCaPolicy("dit_ddim50", fresh_threshold=3),
    "fora": lambda: FORAPolicy(interval=3),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def _dtype(args):
    return torch.bfloat16 if args.bf16 else torch.float32


def speed(args) -> list[dict]:
    dev = torch.device(args.device)
    model = load_backbone(args.arch, random_init=True).to(dev, _dtype(args))
    solver = make_solver("ddim", args.steps, schedule="linear")
    rows = []
    for bs in args.batch:
        noise = torch.randn(bs, model.in_channels, model.input_size, model.input_size, device=dev, dtype=_dtype(args))
        y = torch.randint(0, model.null_class, (bs,), device=dev)
        run = lambda pol: sample(model, solver, pol, noise, y, guidance=args.guidance)  # noqa: E731
        full = measure(lambda: run(None), repeats=args.repeats, warmup=1, device=dev)
        for name in args.policies:
            pol = POLICIES[name]().to(dev)
            lat = measure(lambda: run(pol), repeats=args.repeats, warmup=1, device=dev)
            cost = policy_cost(model, solver, pol, guidance=args.guidance)
            speedup = full["mean_s"] / lat["mean_s"]
            # the same names and meanings as evaluate.py: *_fraction = cached / full, speedup_* = full / cached
            row = {"arch": args.arch, "device": str(dev), "batch": bs, "steps": args.steps, "policy": name,
                   "latency_full_s": round(full["mean_s"], 4), "latency_cached_s": round(lat["mean_s"], 4),
                   "speedup_latency": round(speedup, 3), "flops_fraction": round(cost["flops_ratio"], 3),
                   "speedup_flops": round(cost["speedup_flops"], 3), "macs_fraction": round(cost["macs_ratio"], 3),
                   "speedup_macs": round(cost["speedup_macs"], 3),
                   "speedup_latency_over_flops": round(speedup / cost["speedup_flops"], 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def train(args) -> list[dict]:
    from diffcache.metrics.cost import forward_cost
    from diffcache.modules.router_distill import RouterDistill
    from diffcache.policies.l2c import L2CPolicy

    dev = torch.device(args.device)
    model = load_backbone(args.arch, random_init=True).to(dev)
    solver = make_solver("ddim", args.steps, schedule="linear")
    policy = L2CPolicy(solver=solver, layout=model.layout).to(dev)
    module = RouterDistill(model, solver, policy, lam=1e-6).to(dev)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if dev.type == "cuda"
                                     and k in torch.cuda.get_device_name(dev)), None)
    rows = []
    for bs in args.batch:
        shape = (bs, model.in_channels, model.input_size, model.input_size)
        batch = {"x0": torch.randn(shape, device=dev), "cond": torch.randint(0, model.null_class, (bs,), device=dev)}
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = module.training_step(batch, 0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        module.log_dict = lambda *a, **k: None  # outside a Trainer
        lat = measure(step, repeats=args.repeats, warmup=2, device=dev)
        flops = 4 * 2 * forward_cost(model, "l2c", batch=bs)  # 3 forwards + backward to inputs ~ 1 forward
        row = {"arch": args.arch, "batch": bs, "bf16": args.bf16, "it_per_s": round(1 / lat["mean_s"], 3),
               "samples_per_s": round(bs / lat["mean_s"], 2),
               "peak_mem_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
               "achieved_tflops": round(flops / lat["mean_s"] / 1e12, 2)}
        if peak:
            row["mfu"] = round(row["achieved_tflops"] / peak, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="speed", choices=["speed", "train"])
    p.add_argument("--arch", default="DiT-S/2")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, nargs="+", default=[2])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = speed(args) if args.what == "speed" else train(args)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
