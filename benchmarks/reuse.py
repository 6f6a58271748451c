"""CPU proxies for "a reused branch costs only its gate" (issue 21): what a fully reused evaluation costs.

``reused / full``: the median time of one DiT forward in which every branch is reused (FORA between two full
evaluations, the CFG batch of ``batch`` samples) over one fully computed forward, same model, same run. The
MAC counter's floor is the adaLN, embedding and final-layer share of a forward (``floor_macs``): a reused
evaluation cannot cost less than that and its gated adds.

``skippable share``: the share of a fully reused evaluation's op time (torch.profiler, self CPU time) spent
in ops that a reused branch should skip: its LayerNorm and modulation, the branch GEMMs (and their bias
copies), attention and GELU. The final layer's LayerNorm and GEMM are not a branch's and are left out (it
runs one LayerNorm; any more are a block's). The full forward's GEMM share is printed next to it (on the
GPU the issue measured 39%: the rest was elementwise work, which this proxy tracks on the CPU).
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from diffcache.metrics.cost import forward_cost
from diffcache.context import StepContext
from diffcache.policies.fora import FORAPolicy

from .common import markdown_table

GEMMS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
             "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
             "aten::_scaled_dot_product_cudnn_attention", "aten::softmax", "aten::_softmax")


def _inputs(model, batch: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, model.in_channels, model.input_size, model.input_size, generator=g).to(dtype)
    y = torch.randint(0, model.null_class, (2 * batch,), generator=g)
    return x, torch.full((2 * batch,), 500.0), y  # one CFG batch [cond; uncond] as the sampler runs it


def _skippable(ev, model) -> bool:
    """Whether a profiler event (name, input shapes) belongs to a block branch's own computation."""
    name, shapes = ev.key, ev.input_shapes
    C = model.hidden_size
    branch_widths = {C, 3 * C, int(C * model.mlp_ratio)}
    if name in ATTENTION or name == "aten::gelu":
        return True
    if name == "aten::addcmul":  # modulate (self = shift, (B, 1, C)); the gated residual add has (B, N, C)
        return bool(shapes) and len(shapes[0]) == 3 and shapes[0][1] == 1
    dims = [tuple(s) for s in shapes if len(s) == 2]
    if name == "aten::copy_":  # addmm's bias fill of a branch GEMM's (tokens, width) output
        return bool(dims) and dims[0][0] >= model.num_tokens and dims[0][1] in branch_widths
    if name in GEMMS:  # token GEMMs of the branches: (tokens, K) @ (K, width)
        return len(dims) >= 2 and dims[-2][0] >= model.num_tokens and dims[-1][1] in branch_widths
    return False


def profile_shares(model, forward) -> dict:
    """Self-CPU-time shares of one call of ``forward``: GEMMs, and ops a reused branch should skip."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        forward()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMMS)
    skip = sum(e.self_cpu_time_total for e in events if _skippable(e, model))
    norms = [e for e in events if e.key == "aten::native_layer_norm"]
    calls = sum(e.count for e in norms)
    if calls:  # every call but the final layer's is a block's
        skip += sum(e.self_cpu_time_total for e in norms) * (calls - 1) / calls
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:4]
    gated = sum(e.count for e in events if e.key == "aten::addcmul" and not _skippable(e, model))
    return {"gemm_share": gemm / total, "skippable_share": skip / total, "layer_norm_calls": calls,
            "gated_adds": gated,
            "top_ops": ", ".join(f"{e.key.replace('aten::', '')} {e.self_cpu_time_total / total:.0%}" for e in top)}


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reuse_row(model, batch: int, dtype: torch.dtype, repeats: int = 5) -> dict:
    """One row: full and fully reused forward times (interleaved rounds), their ratio, and the op shares."""
    model = model.to(dtype)
    x, t, y = _inputs(model, batch, dtype)
    E = repeats + 2  # FORA, interval E: evaluation 0 full, 1 .. E-2 reuse every branch, E-1 full
    pol = FORAPolicy(interval=E)
    ctx = dict(num_steps=E, num_evals=E, branch="all", cfg_layout=model.cfg_layout)
    full, reused = [], []
    with torch.no_grad(), pol.bound(model):
        pol.train(False)

        def run(nfe: int):
            pol.begin(StepContext(nfe=nfe, step=nfe, **ctx))
            return model(x, t, y)

        run(0)  # fills the cache, warms the thread pool
        run(1)
        for e in range(1, E - 1):  # interleaved: load drift hits both alike
            with pol.disabled():
                full.append(_median_s(lambda: model(x, t, y), 1))
            reused.append(_median_s(lambda e=e: run(e), 1))
        with pol.disabled():
            shares_full = profile_shares(model, lambda: model(x, t, y))
        shares_reused = profile_shares(model, lambda: run(1))
    B = 2 * batch
    none = {site: 0.0 for site in model.cache_sites()}  # every branch reused: what the MAC counter keeps
    floor = forward_cost(model, "l2c", batch=B, fractions=none) / forward_cost(model, "l2c", batch=B)
    f, r = statistics.median(full), statistics.median(reused)
    row = {"arch": getattr(model, "arch", type(model).__name__), "dtype": str(dtype).replace("torch.", ""),
           "batch": batch, "full_ms": round(1e3 * f, 2), "reused_ms": round(1e3 * r, 2),
           "reused_over_full": round(r / f, 4), "floor_macs": round(floor, 4),
           "gemm_share_full": round(shares_full["gemm_share"], 3),
           "skippable_share_full": round(shares_full["skippable_share"], 3),
           "skippable_share_reused": round(shares_reused["skippable_share"], 4),
           "layer_norm_calls_reused": shares_reused["layer_norm_calls"], "gated_adds_reused": shares_reused["gated_adds"],
           "top_ops_reused": shares_reused["top_ops"],
           "repeats": len(full)}
    print(json.dumps(row), flush=True)
    return row


def run(arch: str = "DiT-S/2", batch: int = 8, repeats: dict | None = None) -> list[dict]:
    """One row per dtype in ``repeats`` ({dtype: timing rounds}; default fp32 5, bf16 1)."""
    from .speed import load_model

    model = load_model(arch)
    repeats = repeats or {torch.float32: 5, torch.bfloat16: 1}
    return [reuse_row(model, batch, dt, n) for dt, n in repeats.items()]


COLUMNS = [("model", "arch"), ("dtype", "dtype"), ("batch (x2 CFG)", "batch"), ("full ms", "full_ms"),
           ("fully reused ms", "reused_ms"), ("reused / full", "reused_over_full"),
           ("MAC floor (adaLN, embed, final)", "floor_macs"), ("GEMM share, full", "gemm_share_full"),
           ("skippable share, full", "skippable_share_full"), ("skippable share, reused", "skippable_share_reused"),
           ("LayerNorm calls, reused", "layer_norm_calls_reused"), ("gated adds, reused", "gated_adds_reused"),
           ("top ops, reused", "top_ops_reused")]


def table(rows: list[dict]) -> str:
    return markdown_table(rows, COLUMNS)
