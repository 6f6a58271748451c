"""``evaluate(cfg)``: sample with a cache policy and report what it costs and what it changes.

Reported per run: analytic MACs / FLOPs (cache-aware) and the speedup over the uncached sampler,
wall-clock latency of the cached and the uncached sampler measured in the same run (median of
``eval.latency_repeats`` after a warm-up) and their ratio, and the error of the cached samples against
uncached samples from the *same* noise, conditioning and per-step solver noise (MSE and PSNR in
latent space): an honest fidelity measure that needs no Inception weights. A policy that caches nothing
has error 0, and every number reproduces (everything is seeded per sample index).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..backbones import from_config
from ..data.seeded import seeded_inputs, step_generators
from ..metrics.cost import policy_cost
from ..metrics.latency import measure
from ..modules.sampler import ShardedSampler, gather, set_hash
from ..sampling import compile_backbone, sample
from ..utils.build import build_loggers, build_policy, build_solver
from ..utils.console import setup_console
from ..utils.hashing import file_sha256
from ..utils.grids import class_labels, labelled_grid
from ..utils.record import QUALITY, Row, caption, provenance, save_rows, teacher_label, write_table
from .eval_io import Conditioning, decode, save_grid

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"eval.device={name} but no CUDA device is available here; use eval.device=cpu (or auto)")
    return torch.device(name)


def _batches(cfg, backbone, device, conditioning: Conditioning):
    """(noise, cond, step generators) seeded per sample index (:mod:`~diffcache.data.seeded`): results never
    depend on the batch size, and cached and full runs share their per-step solver noise (DDPM)."""
    n, bs = int(cfg.eval.num_samples), int(cfg.eval.batch_size)
    if n < 1 or bs < 1:
        raise ValueError(f"eval.num_samples and eval.batch_size must be >= 1, got {n} and {bs}")
    for start in range(0, n, bs):
        idx = range(start, min(start + bs, n))
        noise, cond = seeded_inputs(backbone, idx, cfg.seed, device, conditioning.batch)
        yield noise, cond, step_generators(idx, cfg.seed)


def _sharded(cfg, backbone, solver, policy, guidance, conditioning, out_dir):
    """The sample set through :class:`ShardedSampler` on ``cfg.trainer`` (DDP across ranks and nodes):
    resumable shards, identical for any number of ranks; None on ranks other than 0."""
    import lightning as L
    from hydra.utils import instantiate

    def inputs(idx, device):
        return seeded_inputs(backbone, idx, cfg.seed, device, conditioning.batch)

    vae, scale = cfg.backbone.get("vae"), float(cfg.backbone.get("vae_scale") or 0.18215)
    to_images = (lambda x: decode(x, vae, scale) * 2 - 1) if vae else None  # shards then carry uint8 images
    sampler = ShardedSampler(backbone, solver, policy, out_dir, int(cfg.eval.num_samples), int(cfg.eval.batch_size),
                             seed=int(cfg.seed), guidance=guidance, inputs=inputs, decode=to_images)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False,
                                     enable_model_summary=False, limit_val_batches=0)
    trainer.predict(sampler, return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    return gather(out_dir, int(cfg.eval.num_samples))["samples"]


def _quality(cfg, cached: torch.Tensor, full: torch.Tensor | None) -> dict:
    """FID / IS / precision-recall of the cached set (and PSNR to the uncached one) with ``metrics.quality``."""
    from hydra.utils import instantiate

    vae, scale = cfg.backbone.get("vae"), float(cfg.backbone.get("vae_scale") or 0.18215)
    if cached.shape[1] not in (1, 3) and not vae:
        raise ValueError(f"metrics={cfg.metrics.get('name', 'on')} needs images: the backbone samples "
                         f"{cached.shape[1]}-channel latents; set backbone.vae=/path/to/AutoencoderKL")
    quality = instantiate(cfg.metrics.quality)
    bs = int(cfg.eval.batch_size)
    for i in range(0, len(cached), bs):
        images = [None if x is None else decode(x[i:i + bs], vae, scale) * 2 - 1 for x in (cached, full)]
        quality.update(*images)
    return quality.compute()



def evaluate(cfg: DictConfig) -> dict:
    setup_console()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(str(cfg.eval.device))
    backbone = from_config(cfg.backbone).to(device).eval()
    solver = build_solver(cfg.solver)
    if cfg.eval.get("compile"):  # static schedules: one graph per distinct caching decision (+ the uncached one)
        compile_backbone(backbone, str(cfg.eval.compile), max_graphs=solver.num_evals + 2)
    router = cfg.get("router_ckpt")
    policy = build_policy(cfg.policy, router_ckpt=router).to(device)
    if policy.trainable and not router:
        raise ValueError("policy=l2c needs router_ckpt=/path/to/router.pt (written by train.py, or a released L2C "
                         "router); without it the routers would be random N(0,1) logits")
    guidance = float(cfg.eval.guidance)
    progress = bool(cfg.eval.progress)
    conditioning = Conditioning(backbone, cfg.eval.get("labels"), cfg.eval.get("prompts"))

    def run(pol):
        if cfg.eval.get("shards"):
            return _sharded(cfg, backbone, solver, pol, guidance, conditioning, out / "shards" / (
                "full" if pol is None else "cached"))
        return torch.cat([sample(backbone, solver, pol, noise, cond, guidance=guidance, progress=progress,
                                 generator=g).cpu() for noise, cond, g in _batches(cfg, backbone, device, conditioning)])

    cached = run(policy)
    full = run(None) if cfg.eval.compare_to_full and policy.name != "none" else None
    if cached is None:  # a non-zero rank of a sharded run: its shards are written, rank 0 reports
        return {}
    result: dict = {"run_name": cfg.run_name, "num_samples": int(cached.shape[0]), "guidance": guidance,
                    "num_evals": solver.num_evals, "seed": int(cfg.seed), "overrides": _task_overrides()}
    if router:
        result.update({"router": str(router), "router_sha256": file_sha256(router)})
    cost = policy_cost(backbone, solver, policy, guidance=guidance)
    result.update({k: v for k, v in cost.items() if k in ("macs", "macs_full", "flops", "flops_full", "cfg_factor")})
    result.update({"macs_fraction": cost["macs_ratio"], "speedup_macs": cost["speedup_macs"],
                   "flops_fraction": cost["flops_ratio"], "speedup_flops": cost["speedup_flops"]})
    result.update({k: v for k, v in policy.summary(backbone.layout, solver).items()})
    if full is not None:
        mse = (cached - full).pow(2).mean().item()
        peak = full.abs().max().item()
        result.update({"mse_vs_full": mse, "psnr_vs_full_db": 10 * math.log10(peak ** 2 / max(mse, 1e-30))})
    if cfg.get("metrics"):
        result.update(_quality(cfg, cached, full))
    if int(cfg.eval.latency_repeats) > 0:
        result.update(_latency(cfg, backbone, solver, policy, guidance, device, conditioning))
    if cfg.eval.save_grid:
        result["grid"] = str(_grids(cfg, out, cached, full, result, policy, backbone, conditioning))
    torch.save(cached, out / "samples.pt")
    result["samples_sha256"] = set_hash(cached)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    for lg in build_loggers(cfg.get("logger")):
        lg.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))}, step=0)
        lg.save()
    print(_report(cfg, solver, policy, result, cost, out))
    return result


def _report(cfg, solver, policy, result: dict, cost: dict, out: Path) -> str:
    """The run as a :class:`~diffcache.utils.record.Row` in ``results.json`` (what a sweep's frontier reads) and
    ``evaluation.{md,csv}``; returns the short summary the console shows (the JSON stays in ``summary.json``)."""
    from omegaconf import OmegaConf


    params = {k: v for k, v in (OmegaConf.to_container(cfg.policy, resolve=True) or {}).items()
              if not k.startswith("_") and isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    full = policy.name == "none"
    metrics = {k: float(result[k]) for k, _, _ in QUALITY if isinstance(result.get(k), (int, float))}
    metrics.update({"psnr": result["psnr_vs_full_db"], "mse": result["mse_vs_full"]} if "mse_vs_full" in result else {})
    prov = {**provenance(), "teacher": teacher_label(cfg.backbone), **({"router": result["router"]} if "router" in result else {})}
    row = Row(method="full" if full else policy.name, title=f"full {solver.name.upper()}-{solver.num_evals}" if full
              else policy.name, solver=solver.name, nfe=solver.num_evals, params={} if full else params,
              seed=int(cfg.seed), num_samples=int(result["num_samples"]), metrics=metrics,
              gmacs=cost["macs_cfg"] / 1e9, macs_fraction=float(cost["macs_ratio"]),
              latency_s=result.get("latency_cached_s"), speedup_latency=result.get("speedup_latency"), provenance=prov)
    save_rows([row], out)
    text = caption("evaluation", prov["teacher"], row.num_samples, row.seed, prov)
    md = write_table([row], out / "evaluation", text)
    return f"\n{md}\nsaved: {out / 'summary.json'} (every number), {out / 'results.json'}" + (
        f", {result['grid']}" if "grid" in result else "")


def _grids(cfg, out: Path, cached, full, result: dict, policy, backbone, conditioning, n: int = 8) -> Path:
    """``samples.png``: the first ``n`` samples, cached row above the uncached one, rows labelled (policy, MACs,
    PSNR), columns by class, captioned; ``samples_raw.png``: every sample as pixel-exact cached | full pairs."""
    vae, scale = cfg.backbone.get("vae"), float(cfg.backbone.get("vae_scale") or 0.18215)
    save_grid(cached, out / "samples_raw.png", full=full, vae=vae, scale=scale)
    n = min(n, cached.shape[0])
    _, cond = seeded_inputs(backbone, range(n), cfg.seed, "cpu", conditioning.batch)
    psnr = f", PSNR {result['psnr_vs_full_db']:.1f} dB" if full is not None and policy.name != "none" else ""
    rows = [decode(cached[:n], vae, scale)] + ([decode(full[:n], vae, scale)] if full is not None else [])
    name = "full (uncached)" if policy.name == "none" else policy.name
    labels = [f"{name}\n{result['macs_fraction']:.2f} MACs{psnr}", "full (uncached)\n1.00 MACs"]
    prov = {**provenance(), "teacher": teacher_label(cfg.backbone)}
    text = caption(f"evaluate.py policy={policy.name}, first {n} samples", prov["teacher"],
                   int(result["num_samples"]), int(cfg.seed), prov)
    return labelled_grid(rows, labels[:len(rows)], class_labels(cond, n), out / "samples.png", text)


def _latency(cfg, backbone, solver, policy, guidance: float, device, conditioning) -> dict:
    """Cached and uncached latency on the same first batch, same run: medians and their ratio."""
    noise, cond, _ = next(_batches(cfg, backbone, device, conditioning))
    idx = range(noise.shape[0])
    reps = int(cfg.eval.latency_repeats)
    res = {}
    for key, pol in (("cached", policy), ("full", None)):
        lat = measure(lambda: sample(backbone, solver, pol, noise, cond, guidance=guidance,
                                     generator=step_generators(idx, cfg.seed)), device=device, repeats=reps, warmup=1)
        res.update({f"latency_{key}_s": lat["median_s"], f"latency_{key}_min_s": lat["min_s"],
                    f"latency_{key}_max_s": lat["max_s"]})
    res["speedup_latency"] = res["latency_full_s"] / max(res["latency_cached_s"], 1e-12)
    res.update({"latency_batch": int(noise.shape[0]), "latency_repeats": reps})
    return res


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
