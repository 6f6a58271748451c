"""Benchmarks: ``python -m benchmarks cpu|gpu [--full] [--only speed peers train scaling]``.

``cpu`` (``make bench``): the cost of a fully reused DiT-S/2 evaluation (fp32, bf16) and the share of its time
in ops a reused branch should skip (``reuse``); DiT-S/2 random weights, DDIM-10 with CFG 1.5 (DDIM-20 and 50 with --full), batch 1
and 8 (32 with --full),
eager and torch.compile (inductor, batch 1; all batches with --full); the shipped MNIST teachers (DiT DDIM-20,
U-ViT DPM-Solver-2, batch 8, real weights) and cache-dit's DBCache on the MNIST DiT with MNIST-FID; peers (ours vs diffusers DiT and
PixArt forward, cache-dit DBCache); router-training throughput; scaling PNG. ``gpu`` (``make bench-gpu``):
DiT-XL/2 with the released routers, bf16 weights, batch 1/8/32, compile; peers in fp32 and bf16; training at
batch 8/64/256 (and compiled at 64) with MFU (``--smoke``: the same path on a tiny model, on any device). Everything lands in ``benchmarks/results/`` as JSON + Markdown (``summary.md`` collects it).
Figures are ratios measured in one run on whatever machine ran it; nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffcache.utils.record import provenance

from . import cache_dit_mnist, peers, reuse, scaling, speed, train
from .common import RESULTS, machine, save
from .profile import profile_low_efficiency

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("reuse", "speed", "mnist", "peers", "train", "scaling")


def cpu_set(args) -> dict:
    out, md, times = {}, [], {}
    batches = (1, 8, 32) if args.full else (1, 8)
    times["reuse"] = time.perf_counter()
    if "reuse" in args.only:  # the cost of a fully reused evaluation, fp32 and bf16 (proxies for the GPU goals)
        # bf16 on a CPU without bf16 units is emulated (several times slower than fp32): fewer rounds
        rows = reuse.run(args.arch, batch=8, repeats={torch.float32: max(3, args.repeats + 1),
                                                      torch.bfloat16: args.repeats if args.full else 1})
        out["reuse"] = {"rows": rows}
        save("reuse", out["reuse"], reuse.table(rows), args.out)
        md += ["## Fully reused evaluation", reuse.table(rows)]
    times["speed"] = time.perf_counter()
    if "speed" in args.only:
        rows = []
        for steps in ((20, 50) if args.full else (args.steps,)):
            rows += speed.run(args.arch, steps=steps, batches=batches, device="cpu", guidance=args.guidance,
                              repeats=args.repeats, compile_modes=() if args.no_compile else ("regional", "whole"),
                              compile_batches=batches if args.full else (1,),
                              whole_policies=("full", "l2c", "toca", "fora") if args.full else ("full", "l2c", "fora"),
                              regional_policies=("full", "l2c", "toca", "fora") if args.full else ("full", "l2c", "fora"),
                              search_samples=2 if args.full else 1)
        profs = profile_low_efficiency(rows, args.profile_below, args.out, args.guidance,
                                       max_profiles=3 if args.full else 2)
        out["speed"] = {"rows": rows, "profiles": profs}
        text = speed.table(rows)
        if profs:
            text += "\n\nProfiles (rows with efficiency < %.2f): " % args.profile_below + "; ".join(
                f"{p['label']}: {p['unaccounted_frac']:.0%} of wall time outside aten ops, top "
                + ", ".join(f"{o['op']} {o['share']:.0%}" for o in p["top_ops"][:3]) + f" ({p['file']})" for p in profs)
        save("speed", out["speed"], text, args.out)
        md += ["## Sampling speed", text]
    times["mnist"] = time.perf_counter()
    if "mnist" in args.only:  # the shipped teachers: every policy on real weights, then cache-dit with MNIST-FID
        rows = []
        for arch in ("mnist_dit", "mnist_uvit"):  # each at its configured CFG scale (conf/backbone/<arch>.yaml)
            scale = float(OmegaConf.load(ROOT / "conf" / "backbone" / f"{arch}.yaml").guidance)
            rows += speed.run(arch, steps=20, batches=(8,), device="cpu", guidance=scale,
                              repeats=args.repeats if args.full else 2, compile_modes=())
        cdit = cache_dit_mnist.run(num_samples=200 if args.full else 100)
        out["mnist"] = {"rows": rows, "cache_dit": cdit}
        text = speed.table(rows, arch_column=True) + "\n\n" + cache_dit_mnist.table(cdit)
        save("mnist", out["mnist"], text, args.out)
        md += ["## Shipped MNIST teachers", text]
    times["peers"] = time.perf_counter()
    if "peers" in args.only:
        rows = peers.dit_forward(args.arch, batches=(1, 8), repeats=args.repeats + 2)
        rows += peers.dit_forward(args.arch, batches=(1, 8) if args.full else (1,), repeats=args.repeats + 2,
                                  dtype=torch.bfloat16)
        rows += peers.pixart_forward(batches=(1, 8), repeats=args.repeats + 2)
        cdit = peers.cache_dit(args.arch, steps=20 if args.full else args.steps, guidance=args.guidance)
        out["peers"] = {"rows": rows, "cache_dit": cdit}
        text = peers.table(rows, cdit)
        save("peers", out["peers"], text, args.out)
        md += ["## Peers (same weights)", text]
    times["train"] = time.perf_counter()
    if "train" in args.only:
        cfgs = (("tiny_dit", 8, "fp32"), (args.arch, 8, "fp32"), (args.arch, 8, "bf16"), (args.arch, 8, "bf16", "sample"))
        cfgs += ((args.arch, 64, "bf16"),) if args.full else ()
        cfgs += ((args.arch, 8, "bf16", "batch", "inductor"),) if args.full and not args.no_compile else ()
        rows = train.run(cfgs, device="cpu", repeats=args.repeats, search_samples=16 if args.full else 8)
        out["train"] = rows
        save("train", {"rows": rows}, train.table(rows), args.out)
        md += ["## Router-training throughput", train.table(rows)]
    times["scaling"] = time.perf_counter()
    if "scaling" in args.only:
        rows = scaling.run(repeats=args.repeats)
        prov = provenance()
        png = scaling.plot(rows, args.out / "scaling.png", f"{args.command}; commit {prov['commit']}; {prov['machine']}; "
                                                           f"load average at start {args.load:.2f}")
        out["scaling"] = rows
        save("scaling", {"rows": rows, "png": png.name}, scaling.table(rows), args.out)
        md += ["## Scaling", scaling.table(rows)]
    ends = list(times.values())[1:] + [time.perf_counter()]
    return {"sections": out, "markdown": md,
            "section_s": {k: round(e - t, 1) for (k, t), e in zip(times.items(), ends) if k in out}}


def gpu_set(args) -> dict:
    """DiT-XL/2 in bf16 weights (float32 solver state), the released routers; ``--smoke``: the same code path on
    a tiny model, one small batch, no compile (the suite runs it on the CPU so it cannot silently break)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    smoke = args.smoke
    arch = "DiT-XL/2" if args.arch == "DiT-S/2" and not smoke else ("tiny_dit" if smoke else args.arch)
    steps, batches = ((4,), (2,)) if smoke else ((20, 50), (1, 8, 32))
    no_compile = args.no_compile or smoke
    out, md = {}, []
    if "speed" in args.only:
        rows = []
        for n in steps:
            rows += speed.run(arch, steps=n, batches=batches, device=dev.type, guidance=args.guidance,
                              repeats=1 if smoke else args.repeats,
                              compile_modes=() if no_compile else ("regional", "whole"),
                              compile_batches=(8,), whole_policies=("full", "l2c", "toca", "fora"), bf16=True,
                              search_samples=1 if smoke else 2)
        out["speed"] = {"rows": rows}
        save("speed_gpu", out["speed"], speed.table(rows), args.out)
        md += ["## Sampling speed (GPU, bf16)", speed.table(rows)]
    if "peers" in args.only:
        rep = 1 if smoke else args.repeats + 5
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            rows += peers.dit_forward(arch, batches=batches[:2], device=dev.type, repeats=rep, dtype=dtype)
        pix = dict(depth=1, heads=2, head_dim=16, token_num=8, caption_channels=32) if smoke else dict(
            depth=28, heads=16, head_dim=72)
        rows += peers.pixart_forward(batches=batches[:2], device=dev.type, repeats=rep, **pix)
        out["peers"] = {"rows": rows}
        save("peers_gpu", out["peers"], peers.table(rows), args.out)
        md += ["## Peers (GPU, fp32 and bf16)", peers.table(rows)]
    if "train" in args.only:
        cfgs = ((arch, 2, "bf16"),) if smoke else tuple((arch, b, "bf16") for b in (8, 64, 256)) + ((arch, 64, "bf16", "sample"),)
        cfgs += () if no_compile else ((arch, 64, "bf16", "batch", "inductor"),)  # one compiled row: compile takes minutes
        rows = train.run(cfgs, device=dev.type, repeats=1 if smoke else args.repeats, peak_tflops=args.peak_tflops,
                         search_samples=0 if smoke else 16)
        out["train"] = rows
        save("train_gpu", {"rows": rows}, train.table(rows), args.out)
        md += ["## Router-training throughput (GPU, bf16 weights)", train.table(rows)]
    return {"sections": out, "markdown": md}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("set", nargs="?", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--full", action="store_true", help="cpu: batch 32, DDIM-50 too, compile every batch and policy")
    p.add_argument("--only", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--arch", default="DiT-S/2")
    p.add_argument("--steps", type=int, default=10, help="cpu: DDIM steps of the quick set (--full: 20 and 50)")
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=2, help="timing rounds (batch >= 8: this minus 2, at least 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile-below", type=float, default=0.8, help="profile eager rows with efficiency below this")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true",
                   help="gpu: the GPU set's code path on a tiny model (any device; the test suite runs it on the CPU)")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    args.command, args.load = "python -m benchmarks " + " ".join(given or [args.set]), os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.set == "gpu" and not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench-gpu needs a CUDA device; none is visible (run `make bench` for the CPU set)")
    dev = torch.device("cuda" if args.set == "gpu" and torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    before = machine(dev)
    res = cpu_set(args) if args.set == "cpu" else gpu_set(args)
    after = machine(dev)
    wall = round(time.perf_counter() - t0, 1)
    meta = {"command": args.command, "wall_s": wall,
            "machine_start": before, "machine_end": after}
    name = "summary" if args.set == "cpu" else "summary_gpu"
    head = (f"Machine: {before['nproc']} cores, {before['cpu']}, torch {before['torch']}, "
            f"{before['torch_threads']} threads; load average (1/5/15 min) at start {before['loadavg_1_5_15']}, "
            f"at end {after['loadavg_1_5_15']}. Wall time {wall} s. Command: `{meta['command']}`.")
    args.out.mkdir(parents=True, exist_ok=True)
    meta_path = args.out / f"{name}.json"
    old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    took = res.get("section_s", {})
    runs = {**old.get("runs", {}), **{sec: {**meta, "section_s": took.get(sec), "head": head + (
        f" This section: {took[sec]} s." if sec in took else "")} for sec in res["sections"]}}
    meta_path.write_text(json.dumps({"runs": runs, **{k: v for k, v in old.items() if k != "runs"},
                                     **res["sections"]}, indent=2, default=str))
    # summary.md collects the latest run of every section (a run with --only replaces just its sections)
    suffix = "" if args.set == "cpu" else "_gpu"
    titles = {"reuse": "Fully reused evaluation", "speed": "Sampling speed", "mnist": "Shipped MNIST teachers", "peers": "Peers (same weights)", "train": "Router-training throughput",
              "scaling": "Scaling"}
    parts = [f"# Benchmarks ({args.set})"]
    for sec in SECTIONS:
        md_path = args.out / f"{sec}{suffix}.md"
        if md_path.exists() and sec in runs:
            extra = "![scaling](scaling.png)\n\n" if sec == "scaling" else ""
            parts.append(f"## {titles[sec]}\n\n{runs[sec]['head']}\n\n{extra}{md_path.read_text()}")
    (args.out / f"{name}.md").write_text("\n\n".join(parts))
    print(f"wrote {args.out / (name + '.md')} in {wall} s", flush=True)


if __name__ == "__main__":
    main()
