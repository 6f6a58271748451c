"""Half-precision backbones end to end: the solver state stays in its dtype, the model and its caches run
in the model's, and a bf16 sampler matches the float32 one within bf16 round-off.

Tolerances, from bf16's unit round-off u = 2^-8 (8 significant bits): one forward rounds every activation
about a dozen times per residual branch, with independent signs, so its relative RMS error is a few u; we
allow 4u. A sampler adds one forward's error per evaluation, again with independent signs (the DDIM update
is a contraction of bounded weights), so E evaluations allow 4u * sqrt(E). Each case also checks the bf16
run really ran in bf16 (its error is not zero) and, on the MNIST teacher, that the tolerance is tighter than
what caching itself changes (FORA vs the full sampler in float32), so the comparison is not vacuous.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from tiny_models import perturbed

from diffcache.backbones import load_backbone
from diffcache.denoiser import Denoiser
from diffcache.context import run_with
from diffcache.policies.fora import FORAPolicy
from diffcache.policies.l2c import L2CPolicy
from diffcache.policies.toca import ToCaPolicy
from diffcache.sampling import advance, sample
from diffcache.solvers import make_solver

U = 2.0 ** -8  # bf16 unit round-off
ASSETS = Path(__file__).resolve().parents[2] / "assets"
# ToCa picks its tokens by score; a score that rounds differently may pick another token, which is not
# round-off. The sampler test therefore ranks tokens by staleness only (score="none": the same choice in any
# dtype); the attention score itself is compared in bf16 and float32 in its own test below.
POLICIES = {"none": lambda: None, "l2c": lambda: L2CPolicy(init_seed=0, budget=0.8),
            "fora": lambda: FORAPolicy(interval=3),
            "toca": lambda: ToCaPolicy("dit_ddim50", fresh_threshold=3, score="none")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def models(name: str):
    if name == "tiny_dit":
        m = perturbed("tiny_dit", 0, scale=0.05)
    else:  # the shipped MNIST teacher, as evaluate.py samples it
        m = load_backbone("mnist_dit", ckpt=str(ASSETS / "mnist_dit.pt"))
        m.clip_denoised = True
    return m, copy.deepcopy(m).to(torch.bfloat16)


def inputs(m, B: int = 2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, m.in_channels, m.input_size, m.input_size, generator=g), torch.tensor([3, 7][:B])


@pytest.mark.parametrize("name", ["tiny_dit", "mnist_dit"])
def test_bf16_sampler_matches_float32_within_round_off(name):
    m32, m16 = models(name)
    x, y = inputs(m32)
    solver = make_solver("ddim", 6, "linear")
    with torch.no_grad():
        t = torch.full((2,), 500.0)
        err = rel(m16(x.bfloat16(), t, y), m32(x, t, y))
    assert 0 < err <= 4 * U, err
    tol = 4 * U * math.sqrt(solver.num_evals)
    if name == "mnist_dit":  # a real denoiser: what caching changes is well above the bf16 tolerance
        full32 = sample(m32, solver, None, x, y, guidance=1.5)
        assert rel(sample(m32, solver, FORAPolicy(interval=3), x, y, guidance=1.5), full32) > tol
    for policy, make in POLICIES.items():
        a = sample(m32, solver, make(), x, y, guidance=1.5)
        b = sample(m16, solver, make(), x, y, guidance=1.5)
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        assert 0 < rel(b, a) <= tol, (policy, rel(b, a), tol)


def test_attention_scores_run_in_bf16_and_match_float32():
    """ToCa's s1 column scores: the bf16 model scores in bf16 (no float32 matmul), within 4u of float32; the
    fused forward + scores gives exactly the separate calls' values."""
    m32, m16 = models("tiny_dit")
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 16, 64, generator=g)
    with torch.no_grad():
        s32 = m32.blocks[0].attn.column_scores(h, chunk=5)
        s16 = m16.blocks[0].attn.column_scores(h.bfloat16(), chunk=5)
        out, fused = m16.blocks[0].attn.forward_with_column_scores(h.bfloat16(), chunk=5)
        assert torch.equal(out, m16.blocks[0].attn(h.bfloat16())) and torch.equal(fused, s16)
    assert s16.dtype == torch.bfloat16 and 0 < rel(s16, s32) <= 4 * U
    # each query's softmax row sums to 1: the column scores of a sample add up to N (mean over heads)
    torch.testing.assert_close(s32.sum(1), torch.full((2,), 16.0), rtol=1e-5, atol=0)


def test_solver_state_keeps_its_dtype_and_caches_the_models():
    """float64 solver state around a bf16 model: the state stays float64, the caches are bf16."""
    _, m16 = models("tiny_dit")
    x, y = inputs(m16)
    solver = make_solver("ddim", 4, "linear")
    for policy in (FORAPolicy(interval=2), ToCaPolicy("dit_ddim50", fresh_threshold=2)):
        with torch.no_grad(), run_with(policy, m16, solver):
            state = advance(Denoiser(m16, 1.5), solver, solver.init(x.double()), y, stop=2)
            cached = [c for c in policy._cache.values() if c is not None]
            assert cached and all(c.dtype == torch.bfloat16 for c in cached)
        assert state.x.dtype == torch.float64


def test_bf16_router_training_step_keeps_activations_in_bf16():
    """Soft L2C routing (float32 logits) on a bf16 backbone: no float32 promotion inside the model, and the
    float32 routers get finite gradients through the bf16 mix."""
    _, m16 = models("tiny_dit")
    x, y = inputs(m16)
    solver = make_solver("ddim", 4, "linear")
    pol = L2CPolicy(init_seed=0, solver=solver, layout=m16.layout)
    den = Denoiser(m16)
    e = pol.trainable_evals(solver)[0]
    with pol.bound(m16, solver):
        pol.train(False)
        with torch.no_grad(), pol.recording():
            den.raw(x, pol.source_eval(e, solver), solver, y)
        pol.train(True)
        out = den.raw(x, e, solver, y)
    assert out.dtype == torch.float32
    out.pow(2).mean().backward()
    grads = [p.grad for p in pol.routers if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_backbone_dtype_option():
    from omegaconf import OmegaConf

    from diffcache.backbones import from_config

    node = {"_target_": "diffcache.backbones.build_backbone", "arch": "tiny_dit", "random_init": True}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32), (None, torch.float32)):
        bb = from_config(OmegaConf.create({**node, "dtype": name}))
        assert bb.dtype == dtype and all(p.dtype == dtype for p in bb.parameters())
    with pytest.raises(ValueError, match="backbone.dtype='int8'"):
        from_config(OmegaConf.create({**node, "dtype": "int8"}))
