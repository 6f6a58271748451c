"""Router-training throughput: one router-distillation step (``RouterDistill.training_step`` + backward +
AdamW on the routers), samples/s, peak memory and MFU.

The step is the faithful one (random latents stand in for x0): a recorded full evaluation, the teacher and
the soft student (3 forwards, CFG-free) plus the backward through the student to the routers (about one
forward of activation gradients: the backbone is frozen, so no weight gradients). That is the least an L2C
step can evaluate: the teacher and the cache both need a full evaluation, the student is the one trained.
Variants: the backbone held in ``fp32`` or ``bf16`` (``backbone.dtype``: weights stored in bf16, no autocast
copies), eager or compiled (``module.compile``: the same :func:`~diffcache.sampling.compile_backbone`), and
the cache-step draw (``batch``: L2C's one per batch, 3 forwards at the full batch; ``sample``: the default
recipe's one per sample, 3 forwards per distinct step drawn, each on its share of the batch).

MFU = those analytic FLOPs (2 x MACs of 4 forwards) per second over a peak: the card's dense bf16 spec on a
GPU (``--peak-tflops`` or the table below), and on a CPU the rate this machine reaches on a large dense
matmul in the row's dtype, measured in the same run (so the CPU figure reads "share of what this CPU's
GEMMs can do", not a spec).
"""
from __future__ import annotations

import json
import time

import torch

from diffcache.backbones import load_backbone
from diffcache.metrics.cost import forward_cost
from diffcache.policies.l2c import L2CPolicy
from diffcache.sampling import compile_backbone
from diffcache.solvers import make_solver

from .common import markdown_table, peak_memory
from diffcache.metrics.latency import measure

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def device_peak(dev: torch.device, dtype: torch.dtype, override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from)."""
    if override:
        return float(override), "--peak-tflops"
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        return next(((v, f"{k} dense bf16 spec") for k, v in PEAK_TFLOPS.items() if k in name), (None, "unknown card"))
    return matmul_rate(dev, dtype), f"measured {str(dtype).replace('torch.', '')} matmul"


def matmul_rate(dev: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """TFLOP/s of an n x n x n matmul in ``dtype`` on ``dev`` (best of ``repeats``): the CPU's reachable peak."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dev, dtype) for _ in range(2))
    best = measure(lambda: a @ b, repeats=repeats, warmup=1, device=dev)["min_s"]
    return 2 * n ** 3 / best / 1e12


def step_fn(arch: str, batch: int, dev: torch.device, steps: int = 20, dtype: str = "fp32", compile: str | None = None,
            draw: str = "batch", **overrides):
    """(backbone, one training step as a closure); ``overrides`` go to the backbone factory (input_size, depth)."""
    from diffcache.modules.router_distill import RouterDistill

    model = load_backbone(arch, random_init=True, dtype=dtype, **overrides).to(dev)
    solver = make_solver("ddim", steps, schedule="linear")
    policy = L2CPolicy(solver=solver, layout=model.layout, init_seed=0, clamp=5.0).to(dev)
    module = RouterDistill(model, solver, policy, lam=1e-6, draw=draw).to(dev)
    module.log = module.log_dict = lambda *a, **k: None  # outside a Trainer
    if compile:  # what module.compile does in on_fit_start
        compile_backbone(model, compile, max_graphs=solver.num_evals + 4)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    shape = (batch, model.in_channels, model.input_size, model.input_size)
    data = {"x0": torch.randn(shape, generator=g).to(dev),
            "cond": torch.randint(0, model.null_class, (batch,), generator=g).to(dev)}

    def step():
        module.on_train_batch_start(data, 0)  # as Lightning calls it: soft routing (train mode) for the step
        loss = module.training_step(data, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        policy.clamp_()
        return loss

    return model, step


def run(configs=(("tiny_dit", 8, "fp32"), ("DiT-S/2", 8, "fp32"), ("DiT-S/2", 8, "bf16"), ("DiT-S/2", 8, "bf16", "sample")),
        device: str = "cpu", repeats: int = 3, peak_tflops: float | None = None, search_samples: int = 16) -> list[dict]:
    """One row per config ``(arch, batch, dtype[, draw[, compile backend]])`` (draw ``batch`` and eager unless given)."""
    dev = torch.device(device)
    rows = []
    for arch, bs, dtype, *rest in configs:
        draw = rest[0] if rest else "batch"
        backend = rest[1] if len(rest) > 1 else None
        t0 = time.perf_counter()
        model, step = step_fn(arch, bs, dev, dtype=dtype, compile=backend, draw=draw)
        step()  # compiles here when compiled
        first_s = time.perf_counter() - t0
        lat = measure(step, repeats=repeats, warmup=1, device=dev)
        _, mem = peak_memory(step, dev)
        peak, source = device_peak(dev, DTYPES[dtype], peak_tflops)
        tflops = 2 * 4 * forward_cost(model, "l2c", batch=bs) / lat["median_s"] / 1e12
        row = {"arch": arch, "batch": bs, "device": str(dev), "dtype": dtype, "mode": backend or "eager",
               "draw": draw, "bf16": dtype == "bf16", "first_step_s": round(first_s, 2),
               "step_s": round(lat["median_s"], 4), "min_s": round(lat["min_s"], 4), "max_s": round(lat["max_s"], 4),
               "samples_per_s": round(bs / lat["median_s"], 2), "peak_mib": round(mem, 1),
               "achieved_tflops": round(tflops, 4), "peak_tflops": round(peak, 2) if peak else None,
               "peak_source": source, "mfu": round(tflops / peak, 3) if peak else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, step
    if search_samples:
        rows.append(search_run(num_samples=search_samples, device=str(dev)))
    return rows


def search_run(arch: str = "mnist_dit", steps: int = 20, num_samples: int = 16, device: str = "cpu") -> dict:
    """Wall time of one schedule search as ``search.py`` runs it by default (error table on ``num_samples``
    calibration trajectories, final-sample proxy, greedy + DP at budget 0.8) on the shipped MNIST DiT, DDIM-20."""
    from diffcache.search import ScheduleSearch

    from .speed import load_model

    model = load_model(arch).to(device)
    t0 = time.perf_counter()
    res = ScheduleSearch(budget=0.8, num_samples=num_samples, progress=False, device=device).run(
        model, make_solver("ddim", steps, schedule="linear"))
    wall = time.perf_counter() - t0
    t = res.table
    row = {"arch": f"search ({arch}, DDIM-{steps})", "batch": num_samples, "device": device, "wall_s": round(wall, 2),
           "status": f"error table {len(t.cache_evals)} cache evals x {len(t.sites)} sites, {num_samples} samples, "
                     f"final proxy: {wall:.1f} s (table {res.times['table']:.1f} s, selection {res.times['select']:.3f} s)"}
    print(json.dumps(row), flush=True)
    return row


COLUMNS = [("arch", "arch"), ("batch", "batch"), ("weights", "dtype"), ("mode", "mode"), ("draw", "draw"),
           ("first step s (compile)", "first_step_s"), ("step s, median", "step_s"), ("samples/s", "samples_per_s"),
           ("peak MiB", "peak_mib"), ("TFLOP/s", "achieved_tflops"), ("peak TFLOP/s", "peak_tflops"),
           ("peak from", "peak_source"), ("MFU", "mfu"), ("status", "status")]


def table(rows: list[dict]) -> str:
    return markdown_table(rows, COLUMNS)
