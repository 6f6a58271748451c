"""Peers in the same run: our backbone forward vs diffusers' on the same weights, and cache-dit's DBCache.

The diffusers model is built with the same configuration, perturbed off its zero init, and written with
``save_pretrained``; ours loads that directory through the tested mapping (``load_backbone(ckpt=dir)``,
which also adopts diffusers' numerics), so both run identical weights and identical math. The row
reports the largest output difference next to the timing ratio ours / diffusers (< 1: ours faster).

cache-dit (``pip install cache-dit``): DBCache on a diffusers ``DiTPipeline`` (our weights exported with
:mod:`diffcache.backbones.export`, a random tiny VAE, DDIM) at a few residual-difference thresholds.
Its MACs come from the number of transformer blocks it actually ran (its own cache statistics are
read when present; otherwise we count block calls with forward hooks).
"""
from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path

import torch

from diffcache.backbones import load_backbone
from diffcache.metrics.cost import policy_cost
from diffcache.solvers import make_solver

from .common import markdown_table, measure

DIT_CONFIGS = {  # diffusers DiTTransformer2DModel kwargs of our variants
    "DiT-S/2": dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, patch_size=2),
    "DiT-B/2": dict(num_attention_heads=12, attention_head_dim=64, num_layers=12, patch_size=2),
    "DiT-XL/2": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, patch_size=2),
    "tiny_dit": dict(num_attention_heads=4, attention_head_dim=16, num_layers=2, patch_size=2),
}


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Move every weight off the zero init (zeroed adaLN / outputs would make any comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def diffusers_dit(arch: str, out_dir: Path, seed: int = 0):
    import diffusers

    size = 8 if arch.startswith("tiny") else 32
    classes = 10 if arch.startswith("tiny") else 1000
    torch.manual_seed(seed)
    ref = diffusers.DiTTransformer2DModel(in_channels=4, out_channels=8, sample_size=size,
                                          num_embeds_ada_norm=classes, **DIT_CONFIGS[arch]).eval()
    _perturb(ref, seed)
    with torch.no_grad():  # the hub conversion copies DiT's one shared embedder into every block
        sd = ref.state_dict()
        for k, v in sd.items():
            if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
                v.copy_(sd["transformer_blocks.0." + k.split(".", 2)[2]])
    ref.save_pretrained(out_dir)
    return ref


def _ratio_row(name, batch, ours_fn, theirs_fn, device, repeats, diff) -> dict:
    a = measure(ours_fn, repeats=repeats, warmup=1, device=device)
    b = measure(theirs_fn, repeats=repeats, warmup=1, device=device)
    # interleave a second pass so drift in machine load hits both sides
    a2 = measure(ours_fn, repeats=repeats, warmup=0, device=device)
    b2 = measure(theirs_fn, repeats=repeats, warmup=0, device=device)
    ours = min(a["median_s"], a2["median_s"])
    theirs = min(b["median_s"], b2["median_s"])
    return {"model": name, "batch": batch, "ours_ms": round(1e3 * ours, 2), "diffusers_ms": round(1e3 * theirs, 2),
            "ratio_ours_over_diffusers": round(ours / theirs, 3), "max_abs_diff": float(diff), "repeats": 2 * repeats}


def dit_forward(arch: str = "DiT-S/2", batches=(1, 8), device: str = "cpu", repeats: int = 5,
                dtype: torch.dtype = torch.float32) -> list[dict]:
    """Ours vs diffusers' DiT forward, same weights, both held in ``dtype`` (fp32 or bf16)."""
    dev = torch.device(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = diffusers_dit(arch, Path(tmp)).to(dev, dtype)
        ours = load_backbone(arch, ckpt=tmp).to(dev, dtype)
        name = arch if dtype == torch.float32 else f"{arch} {str(dtype).replace('torch.', '')}"
        for bs in batches:
            g = torch.Generator().manual_seed(bs)
            x = torch.randn(bs, 4, ours.input_size, ours.input_size, generator=g).to(dev, dtype)
            t = torch.randint(0, 1000, (bs,), generator=g).float().to(dev)
            y = torch.randint(0, ours.num_classes, (bs,), generator=g).to(dev)
            with torch.no_grad():
                diff = (ours(x, t, y).float() - ref(x, timestep=t, class_labels=y).sample.float()).abs().max().item()
                rows.append(_ratio_row(name, bs, lambda: ours(x, t, y),
                                       lambda: ref(x, timestep=t, class_labels=y).sample, dev, repeats, diff))
            print(rows[-1], flush=True)
    return rows


def pixart_forward(batches=(1, 8), device: str = "cpu", repeats: int = 5, depth: int = 12, heads: int = 6,
                   head_dim: int = 64, token_num: int = 120, caption_channels: int = 4096) -> list[dict]:
    """A PixArt-alpha-256 shaped model narrowed to DiT-S width (CPU-sized), same weights both sides."""
    import diffusers

    from diffcache.backbones.pixart import PixArt

    dev = torch.device(device)
    torch.manual_seed(0)
    ref = diffusers.PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=depth,
        cross_attention_dim=heads * head_dim, attention_bias=True, sample_size=32, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=caption_channels,
        use_additional_conditions=False).eval()
    _perturb(ref, 0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no null caption in a diffusers state dict: not needed here
        kw = PixArt.diffusers_kwargs(ref.config, token_num=token_num)
        ours = PixArt(**kw).eval()
        ours.load_state_dict(PixArt.convert_diffusers(ref.state_dict(), ref.config, token_num=token_num))
    ref, ours = ref.to(dev), ours.to(dev)
    name = f"PixArt-alpha d{depth} w{heads * head_dim}"
    rows = []
    for bs in batches:
        g = torch.Generator().manual_seed(bs)
        x = torch.randn(bs, 4, 32, 32, generator=g).to(dev)
        t = torch.randint(0, 1000, (bs,), generator=g).float().to(dev)
        c = {"y": torch.randn(bs, token_num, caption_channels, generator=g).to(dev),
             "mask": torch.ones(bs, token_num, dtype=torch.long, device=dev)}
        theirs = lambda: ref(x, encoder_hidden_states=c["y"], timestep=t, encoder_attention_mask=c["mask"],  # noqa: E731
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        with torch.no_grad():
            diff = (ours(x, t, c) - theirs()).abs().max().item()
            rows.append(_ratio_row(name, bs, lambda: ours(x, t, c), theirs, dev, repeats, diff))
        print(rows[-1], flush=True)
    return rows


# ============================================================================================ cache-dit
def _tiny_vae():
    import diffusers

    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                   down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                   layers_per_block=1, norm_num_groups=8, sample_size=32).eval()


def cache_dit(arch: str = "DiT-S/2", steps: int = 20, thresholds=(0.04, 0.08, 0.16), guidance: float = 1.5,
              device: str = "cpu", repeats: int = 1) -> dict:
    """DBCache (Fn=1, Bn=0, steps // 5 warm-up steps) on a diffusers DiTPipeline; or the exact error if it cannot run."""
    out: dict = {"arch": arch, "steps": steps, "guidance": guidance}
    try:
        import cache_dit
        import diffusers
        out["cache_dit_version"] = getattr(cache_dit, "__version__", "?")
    except Exception as e:  # not installed: say so, do not fail the benchmark
        out["status"] = f"cache-dit not importable: {type(e).__name__}: {e}"
        return out
    dev = torch.device(device)
    rows = []
    if arch.startswith("tiny"):  # diffusers' DiTPipeline hard-codes the null class as label 1000
        out["status"] = "not run: DiTPipeline needs 1000 classes (its CFG null label is 1000); tiny_dit has 10"
        return out
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ref = diffusers_dit(arch, Path(tmp)).to(dev)
            calls = [0]
            for blk in ref.transformer_blocks:
                blk.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
            sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                            beta_end=0.02, clip_sample=False)
            pipe = diffusers.DiTPipeline(transformer=ref, vae=_tiny_vae().to(dev), scheduler=sched,
                                         id2label={i: str(i) for i in range(ref.config.num_embeds_ada_norm)})
            pipe.set_progress_bar_config(disable=True)
            labels = list(range(1))
            full_macs = policy_cost(arch, make_solver("ddim", steps), None, guidance=guidance)["macs_cfg"]
            depth = ref.config.num_layers

            def run():
                calls[0] = 0
                g = torch.Generator().manual_seed(0)
                pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                     output_type="latent")
                return calls[0]

            for thr in (None, *thresholds):
                if thr is not None:
                    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
                        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=thr, max_warmup_steps=max(1, steps // 5)))
                run()  # warm-up
                t0 = time.perf_counter()
                for _ in range(repeats):
                    n_blocks = run()
                lat = (time.perf_counter() - t0) / repeats
                frac = n_blocks / (steps * depth)
                rows.append({"threshold": thr, "latency_s": round(lat, 3), "blocks_run": n_blocks,
                             "block_fraction": round(frac, 3), "ideal_speedup_blocks": round(1 / frac, 3),
                             "gmacs_per_image_est": round(full_macs * frac / 1e9, 2)})
                if thr is not None:
                    cache_dit.disable_cache(pipe)
                print(rows[-1], flush=True)
        base = rows[0]["latency_s"]
        for r in rows:
            r["speedup"] = round(base / r["latency_s"], 3)
            r["efficiency"] = round(r["speedup"] / r["ideal_speedup_blocks"], 3)
        out.update(status="ran", rows=rows)
    except Exception as e:
        out.update(status="failed", rows=rows, error=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc(limit=6)[-2000:])
        print("cache-dit failed:", out["error"], flush=True)
    return out


COLUMNS = [("model", "model"), ("batch", "batch"), ("ours ms", "ours_ms"), ("diffusers ms", "diffusers_ms"),
           ("ours / diffusers", "ratio_ours_over_diffusers"), ("max abs diff", "max_abs_diff")]
CACHE_DIT_COLUMNS = [("DBCache threshold", "threshold"), ("latency s", "latency_s"), ("speedup", "speedup"),
                     ("blocks run", "blocks_run"), ("ideal (blocks)", "ideal_speedup_blocks"),
                     ("efficiency", "efficiency"), ("GMACs / image (est.)", "gmacs_per_image_est")]


def table(rows: list[dict], cdit: dict | None = None) -> str:
    md = markdown_table(rows, COLUMNS)
    if cdit is not None:
        md += f"\n\ncache-dit {cdit.get('cache_dit_version', '')} DBCache on diffusers DiTPipeline " \
              f"({cdit['arch']}, DDIM-{cdit['steps']}, CFG {cdit['guidance']}): {cdit['status']}"
        if cdit.get("error"):
            md += f"\n\n    {cdit['error']}"
        if cdit.get("rows"):
            md += "\n\n" + markdown_table(cdit["rows"], CACHE_DIT_COLUMNS)
    return md
