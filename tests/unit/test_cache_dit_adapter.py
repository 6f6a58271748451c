"""The cache-dit benchmark's adaptation of diffusers' DiTPipeline to the shipped MNIST DiT (benchmarks/cache_dit_mnist):
uncached, it must sample exactly what our DDIM sampler samples from the same noise, or its cached rows would
measure an implementation gap instead of caching."""
from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.cache_dit_mnist import pipeline
from diffcache.backbones import load_backbone
from diffcache.backbones.export import save_diffusers
from diffcache.data.seeded import seeded_inputs
from diffcache.sampling import sample
from diffcache.solvers.ddim import DDIM

ROOT = Path(__file__).resolve().parents[2]


def test_uncached_dit_pipeline_on_the_exported_teacher_equals_our_ddim(tmp_path):
    bb = load_backbone("mnist_dit", ckpt=str(ROOT / "assets" / "mnist_dit.pt"))
    bb.clip_denoised = True
    noise, cond = seeded_inputs(bb, range(4), seed=3)
    ours = sample(bb, DDIM(10, spacing="ddim10"), None, noise, cond, 1.5)
    pipe, calls = pipeline(save_diffusers(bb, tmp_path / "dit"), bb.null_class)
    gens = [torch.Generator().manual_seed(3 * 7919 + i) for i in range(4)]  # seeded_inputs' generators
    theirs = pipe(class_labels=cond.tolist(), num_inference_steps=10, guidance_scale=1.5, generator=gens,
                  output_type="pt").images * 2 - 1
    assert calls[0] == 10 * bb.depth  # one batched (CFG) forward per step, every block
    assert ours.abs().max() > 0.5 and ours.std() > 0.3  # a real teacher's digits, not a constant
    # the pipeline returns (x / 2 + 0.5).clamp(0, 1): compare in its range; float32 round-off over 10 steps
    torch.testing.assert_close(theirs, ours.clamp(-1, 1), rtol=0, atol=2e-4)
