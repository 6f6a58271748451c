"""The branch site: a reused branch costs only its gated add, ToCa normalises only the tokens it recomputes,
and the uncached DiT still computes the official block (checked against a hand-written float64 forward)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import bound_for_test, perturbed

from diffcache.backbones.base import Branch
from diffcache.context import StepContext
from diffcache.policies.fora import FORAPolicy
from diffcache.policies.toca import ToCaPolicy
from diffcache.solvers import make_solver


def official_dit(m, x, t, y):
    """facebookresearch/DiT ``models.py`` forward, written out with plain tensor ops (no site, no Branch)."""
    def ln(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    def mod(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    B, C = x.shape[0], m.hidden_size
    h = m.x_embedder.proj(x).flatten(2).transpose(1, 2) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder.embedding_table(y)
    H, D = m.num_heads, C // m.num_heads
    for blk in m.blocks:
        s1, sc1, g1, s2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
        a = mod(ln(h), s1, sc1)
        q, k, v = (a @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(B, -1, 3, H, D).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, dim=-1) @ v
        h = h + g1.unsqueeze(1) * blk.attn.proj(att.transpose(1, 2).reshape(B, -1, C))
        h = h + g2.unsqueeze(1) * blk.mlp(mod(ln(h), s2, sc2))
    s, sc = m.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    out = m.final_layer.linear(mod(ln(h), s, sc))
    p, co, g = m.patch_size, m.out_channels, m.input_size // m.patch_size
    return out.reshape(B, g, g, p, p, co).permute(0, 5, 1, 3, 2, 4).reshape(B, co, g * p, g * p)


def test_uncached_dit_is_the_official_block():
    """Fused adds (addcmul) only change the rounding of a product: float64 agrees to ~1e-12 relative."""
    m = perturbed("tiny_dit", 0, scale=0.05).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t, y = torch.tensor([999.0, 500.0, 3.0], dtype=torch.float64), torch.tensor([1, 7, 10])
    with torch.no_grad():
        ours, ref = m(x, t, y), official_dit(m, x, t, y)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


class Calls:
    """Forward hooks counting the tokens each LayerNorm / branch module sees."""

    def __init__(self, m):
        self.tokens: dict[str, list[int]] = {}
        for i, blk in enumerate(m.blocks):
            for name in ("norm1", "attn", "norm2", "mlp"):
                getattr(blk, name).register_forward_hook(self._hook(f"{i}.{name}"))

    def _hook(self, name):
        def hook(mod, args, out):
            self.tokens.setdefault(name, []).append(args[0].shape[1])
        return hook


def _eval(m, pol, nfe: int, num_evals: int, x, t, y):
    with pol.at(StepContext(nfe=nfe, step=nfe, num_steps=num_evals, num_evals=num_evals)):
        return m(x, t, y)


def test_reused_branch_computes_nothing_but_its_gate():
    m = perturbed("tiny_dit", 0, scale=0.05)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 500.0), torch.tensor([1, 2])
    pol = bound_for_test(FORAPolicy(interval=3), m)  # 6 evaluations: full at 0 and 3 (count-down 5, 2)
    calls = Calls(m)
    with torch.no_grad():
        _eval(m, pol, 0, 6, x, t, y)
        seen = sum(len(v) for v in calls.tokens.values())
        assert seen == 4 * m.depth
        _eval(m, pol, 1, 6, x, t, y)  # fully reused: no norm, no modulate, no module
    assert sum(len(v) for v in calls.tokens.values()) == seen


def test_toca_normalises_only_the_tokens_it_recomputes():
    m = perturbed("tiny_dit", 0, scale=0.05)
    solver = make_solver("ddim", 6, "linear")
    pol = bound_for_test(ToCaPolicy("dit_ddim50", fresh_threshold=3, fresh_ratio=0.25), m, solver)
    sched = pol.schedule(solver.num_evals)
    e = next(i for i in range(solver.num_evals) if not sched.is_full(i, 1))  # layer 1 cached there
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 500.0), torch.tensor([1, 2])
    calls = Calls(m)
    with torch.no_grad():
        for nfe in range(e + 1):
            calls.tokens.clear()
            _eval(m, pol, nfe, solver.num_evals, x, t, y)
    k = sched.k(e, 1, "mlp")
    assert 0 < k < m.num_tokens
    assert calls.tokens["1.norm2"] == calls.tokens["1.mlp"] == [k]  # gathered first, then normalised
    assert "1.norm1" not in calls.tokens and "1.attn" not in calls.tokens  # attention reused whole


def test_older_site_call_still_works():
    """``site(layer, kind, module, h, *args)`` (a user's backbone written before Branch) is the same call."""
    m = perturbed("tiny_dit", 0, scale=0.05)
    blk, h = m.blocks[0], torch.randn(2, 16, 64)
    with torch.no_grad():
        older = m.site(0, "mlp", blk.mlp, blk.norm2(h))
        newer = m.site(0, "mlp", Branch(blk.mlp, h, blk.norm2))
        assert torch.equal(older, newer) and torch.equal(newer, Branch(blk.mlp, h, blk.norm2)(None))


@pytest.mark.parametrize("arch", ["tiny_dit", "tiny_uvit", "tiny_pixart"])
def test_the_residual_stream_is_row_major_so_no_norm_copies_it(arch):
    """The patch embedder's tokens are a transposed view of its conv output; left so, every residual add
    keeps that layout and every LayerNorm copies its input back (issue 21's "layout copies")."""
    m = perturbed(arch, 0, scale=0.05)
    layouts = []
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.register_forward_pre_hook(lambda mod, args: layouts.append(args[0].is_contiguous()))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, m.in_channels, m.input_size, m.input_size, generator=g)
    with torch.no_grad():
        m(x, torch.full((2,), 500.0), m.random_cond(2, g))
    assert len(layouts) >= 2 * m.depth and all(layouts)
