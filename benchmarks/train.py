"""Router-training throughput: one router-distillation step (``RouterDistill.training_step`` + backward +
AdamW on the routers), samples/s, peak memory and MFU.

The step is the faithful one (random latents stand in for x0): a recorded full evaluation, the teacher and
the soft student (3 forwards, CFG-free) plus the backward through the student to the routers (about one
forward of activation gradients: the backbone is frozen, so no weight gradients). MFU = those analytic
FLOPs (2 x MACs of 4 forwards) per second over the device peak (``--peak-tflops`` or the table below;
on CPU no peak is assumed and MFU is left out).
"""
from __future__ import annotations

import json
import time

import torch

from diffcache.backbones import load_backbone
from diffcache.metrics.cost import forward_cost
from diffcache.policies.l2c import L2CPolicy
from diffcache.solvers import make_solver

from .common import markdown_table, peak_memory
from diffcache.metrics.latency import measure

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def device_peak(dev: torch.device, override: float | None = None) -> float | None:
    if override:
        return float(override)
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def step_fn(arch: str, batch: int, dev: torch.device, steps: int = 20, bf16: bool = False, **overrides):
    """(backbone, one training step as a closure); ``overrides`` go to the backbone factory (input_size, depth)."""
    from diffcache.modules.router_distill import RouterDistill

    model = load_backbone(arch, random_init=True, **overrides).to(dev)
    solver = make_solver("ddim", steps, schedule="linear")
    policy = L2CPolicy(solver=solver, layout=model.layout, init_seed=0, clamp=5.0).to(dev)
    module = RouterDistill(model, solver, policy, lam=1e-6, draw="batch").to(dev)  # L2C: one cache step per batch
    module.log = module.log_dict = lambda *a, **k: None  # outside a Trainer
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    shape = (batch, model.in_channels, model.input_size, model.input_size)
    data = {"x0": torch.randn(shape, generator=g).to(dev),
            "cond": torch.randint(0, model.null_class, (batch,), generator=g).to(dev)}

    def step():
        module.on_train_batch_start(data, 0)  # as Lightning calls it: soft routing (train mode) for the step
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module.training_step(data, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        policy.clamp_()
        return loss

    return model, step


def run(configs=(("tiny_dit", 8), ("DiT-S/2", 2), ("DiT-S/2", 8)), device: str = "cpu", bf16: bool = False,
        repeats: int = 3, peak_tflops: float | None = None, search_samples: int = 16) -> list[dict]:
    dev = torch.device(device)
    peak = device_peak(dev, peak_tflops)
    rows = []
    for arch, bs in configs:
        model, step = step_fn(arch, bs, dev, bf16=bf16)
        lat = measure(step, repeats=repeats, warmup=1, device=dev)
        _, mem = peak_memory(step, dev)
        flops = 2 * 4 * forward_cost(model, "l2c", batch=bs)
        row = {"arch": arch, "batch": bs, "device": str(dev), "bf16": bf16,
               "step_s": round(lat["median_s"], 4), "min_s": round(lat["min_s"], 4), "max_s": round(lat["max_s"], 4),
               "samples_per_s": round(bs / lat["median_s"], 2), "peak_mib": round(mem, 1),
               "achieved_tflops": round(flops / lat["median_s"] / 1e12, 4),
               "mfu": round(flops / lat["median_s"] / 1e12 / peak, 3) if peak else None}
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


COLUMNS = [("arch", "arch"), ("batch", "batch"), ("bf16", "bf16"), ("step s, median", "step_s"),
           ("samples/s", "samples_per_s"), ("peak MiB", "peak_mib"), ("TFLOP/s", "achieved_tflops"),
           ("MFU", "mfu"), ("status", "status")]


def table(rows: list[dict]) -> str:
    return markdown_table(rows, COLUMNS)
