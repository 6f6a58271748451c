"""cache-dit's DBCache on the shipped MNIST DiT, with MNIST-FID, next to our policies on the same noise.

The teacher (``assets/mnist_dit.pt``) is exported to a diffusers ``DiTTransformer2DModel`` directory
(:func:`diffcache.backbones.export.save_diffusers`) and sampled by diffusers' own ``DiTPipeline`` with
cache-dit's ``enable_cache`` at a few residual-difference thresholds. Three adaptations, none inside cache-dit:

* ``DiTPipeline`` hard-codes the CFG null label as 1000 (ImageNet); a forward pre-hook on the transformer maps
  it to this model's null class (10).
* diffusers' DiT embeds timesteps with a frequency shift of 1, the teacher was trained with DiT's 0: each
  block's ``time_proj.downscale_freq_shift`` is set to 0.
* The model samples pixels, not VAE latents: the pipeline's VAE is an identity decoder (scaling factor 1).
* DDIM with ADM's ``clip_denoised`` (x0 clipped to [-1, 1] *and* eps re-derived: ``use_clipped_model_output``)
  and final alpha 1. diffusers' DDIM always steps from t to t - 1000 / N, which DiT's default respacing
  (999, 946, 894, ...) is not, so every row of this table, ours too, samples the chain both can run: the DDIM
  paper's ``ddimN`` spacing (950, 900, ..., 0; diffusers' ``leading``).

Noise: ``randn_tensor`` with one generator per sample, seeded as :func:`diffcache.data.seeded.seeded_inputs`
seeds ours, so diffusers' uncached run starts from exactly our noise; it then equals ours up to float round-off
(``tests/unit/test_cache_dit_adapter.py``), and every cached row is scored against our uncached run. MACs of a
DBCache row are estimated from the transformer blocks it ran (forward hooks): ``full x blocks run / blocks``.
"""
from __future__ import annotations

import functools
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"


class IdentityVAE(torch.nn.Module):
    """What ``DiTPipeline`` decodes through: pixels are already the model's space."""

    class _Config(dict):
        __getattr__ = dict.get

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(1))  # a device / dtype for the pipeline to read
        self.config = self._Config(scaling_factor=1.0)

    @property
    def device(self) -> torch.device:  # what diffusers' ModelMixin provides and the pipeline reads
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def decode(self, z):
        from types import SimpleNamespace

        return SimpleNamespace(sample=z)


def pipeline(model_dir: Path, null_class: int):
    """diffusers' ``DiTPipeline`` on an exported teacher directory, adapted as the module docstring says;
    returns (pipeline, a one-element list counting transformer-block calls)."""
    import diffusers

    ref = diffusers.DiTTransformer2DModel.from_pretrained(str(model_dir)).eval()
    ref.register_forward_pre_hook(  # DiTPipeline's hard-coded ImageNet null label -> this model's null class
        lambda mod, args, kw: (args, {**kw, "class_labels": torch.where(kw["class_labels"] == 1000, null_class,
                                                                         kw["class_labels"])}), with_kwargs=True)
    calls = [0]
    for blk in ref.transformer_blocks:
        blk.norm1.emb.time_proj.downscale_freq_shift = 0  # the teacher was trained with DiT's shift 0, not 1
        blk.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                    timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True, clip_sample=True,
                                    clip_sample_range=1.0)
    sched.step = functools.partial(sched.step, use_clipped_model_output=True)  # ADM's clip: eps re-derived
    pipe = diffusers.DiTPipeline(transformer=ref, vae=IdentityVAE(), scheduler=sched,
                                 id2label={i: str(i) for i in range(null_class)})
    pipe.set_progress_bar_config(disable=True)
    return pipe, calls


def run(num_samples: int = 200, batch: int = 50, steps: int = 20, guidance: float = 1.5, seed: int = 0,
        thresholds=(0.04, 0.08, 0.16, 0.24), fora=(2, 3)) -> dict:
    """Rows ``{"method", "mnist_fid", "mnist_is", "psnr", "macs_fraction", "latency_s", ...}``, ours and cache-dit's."""
    from diffcache.backbones.export import save_diffusers
    from diffcache.data.seeded import sample_generator, seeded_inputs
    from diffcache.metrics.cost import policy_cost
    from diffcache.metrics.mnist import build_mnist_metrics
    from diffcache.policies.fora import FORAPolicy
    from diffcache.sampling import sample
    from diffcache.solvers.ddim import DDIM

    out: dict = {"teacher": "assets/mnist_dit.pt", "steps": steps, "guidance": guidance, "num_samples": num_samples,
                 "seed": seed, "rows": []}
    from .speed import load_model

    bb = load_model("mnist_dit")  # the shipped weights, x0 clipping on
    solver = DDIM(steps, schedule="linear", spacing=f"ddim{steps}")  # the chain diffusers' DDIM can run too
    full_macs = policy_cost(bb, solver, None, guidance=guidance)["macs_cfg"]
    metrics = build_mnist_metrics(ASSETS / "mnist_classifier.pt", "heldout", is_splits=1, precision_recall=False)
    batches = [range(s, min(s + batch, num_samples)) for s in range(0, num_samples, batch)]
    inputs = [seeded_inputs(bb, idx, seed) for idx in batches]

    def score(name: str, xs: list[torch.Tensor], times: list[float], macs: float, teacher, **extra) -> dict:
        metrics.reset()
        for x, ref in zip(xs, teacher or xs):
            metrics.update(x.clamp(-1, 1), ref.clamp(-1, 1))
        row = {"method": name, **{k: round(float(v), 4) for k, v in metrics.compute().items()},
               "macs_fraction": round(macs / full_macs, 4), "latency_s": round(statistics.median(times), 3), **extra}
        print(row, flush=True)
        out["rows"].append(row)
        return row

    def ours(policy):
        xs, ts = [], []
        for noise, cond in inputs:
            t0 = time.perf_counter()
            xs.append(sample(bb, solver, policy, noise, cond, guidance))
            ts.append(time.perf_counter() - t0)
        return xs, ts

    teacher, ts = ours(None)
    score(f"ours: full DDIM-{steps}", teacher, ts, full_macs, teacher)
    for n in fora:
        pol = FORAPolicy(interval=n)
        xs, ts = ours(pol)
        score(f"ours: FORA N={n}", xs, ts, policy_cost(bb, solver, pol, guidance=guidance)["macs_cfg"], teacher)
    try:
        import cache_dit

        out["cache_dit_version"] = getattr(cache_dit, "__version__", "?")
    except Exception as e:  # not installed: say so, do not fail the benchmark
        out["status"] = f"cache-dit not importable: {type(e).__name__}: {e}"
        return out
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pipe, calls = pipeline(save_diffusers(bb, Path(tmp) / "mnist_dit"), bb.null_class)
            depth = len(pipe.transformer.transformer_blocks)
            for thr in (None, *thresholds):
                if thr is not None:
                    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
                        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=thr,
                        max_warmup_steps=max(1, steps // 5)))
                xs, ts, blocks = [], [], []
                for (noise, cond), idx in zip(inputs, batches):
                    gens = [sample_generator(i, seed) for i in idx]  # seeded_inputs' noise, drawn by the pipeline
                    calls[0] = 0
                    t0 = time.perf_counter()
                    img = pipe(class_labels=cond.tolist(), num_inference_steps=steps, guidance_scale=guidance,
                               generator=gens, output_type="pt").images
                    ts.append(time.perf_counter() - t0)
                    xs.append(img * 2 - 1)  # the pipeline returns (x / 2 + 0.5).clamp(0, 1)
                    blocks.append(calls[0])  # block calls of one run (the CFG pair shares one batched forward)
                frac = statistics.fmean(blocks) / (steps * depth)
                name = "cache-dit: diffusers DiTPipeline, no cache" if thr is None else f"cache-dit: DBCache F1B0 rdt={thr:g}"
                score(name, xs, ts, full_macs * frac, teacher, blocks_run_fraction=round(frac, 4))
                if thr is not None:
                    cache_dit.disable_cache(pipe)
        out["status"] = "ran"
    except Exception as e:
        out.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6)[-2000:])
        print("cache-dit failed:", out["error"], flush=True)
    return out


COLUMNS = [("method", "method"), ("MNIST-FID", "mnist_fid"), ("MNIST-IS", "mnist_is"), ("PSNR to our full (dB)", "psnr"),
           ("MACs (fraction)", "macs_fraction"), ("latency s (batch)", "latency_s")]


def table(res: dict) -> str:
    from .common import markdown_table

    md = (f"cache-dit {res.get('cache_dit_version', '')} on the shipped MNIST DiT ({res['teacher']}), DDIM-{res['steps']}, "
          f"(ddim{res['steps']} spacing), CFG {res['guidance']}, {res['num_samples']} samples (seed {res['seed']}), same noise: {res.get('status')}")
    if res.get("error"):
        md += f"\n\n    {res['error']}"
    return md + "\n\n" + markdown_table(res["rows"], COLUMNS)
