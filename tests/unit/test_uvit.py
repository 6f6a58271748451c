"""U-ViT backbone: published sizes, official key names and token layout, cache-site plumbing, long skips."""
from __future__ import annotations

import pytest
import torch
from tiny_models import Recorder, bound_for_test, perturbed

from diffcache.backbones.uvit import VARIANTS, UViT
from diffcache.context import StepContext
from diffcache.policies.base import CachePolicy

CTX = StepContext(nfe=0, step=0, num_steps=1, num_evals=1)


def tiny(seed: int = 0, **kw) -> UViT:
    return perturbed("tiny_uvit", seed, **kw)  # every tensor off its init (LayerNorm 1/0, zero biases)


def inputs(m: UViT, B: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, m.in_channels, m.input_size, m.input_size, generator=g)
    t = torch.tensor([10.0, 873.5])[:B]
    y = torch.tensor([3, m.null_class])[:B]
    return x, t, y


def uvit_params(D, depth, patch, in_ch, tokens, num_classes, conv, mlp_ratio=4):
    """Closed-form parameter count of libs/uvit.py's UViT (qkv without bias, timm Mlp, LayerNorm affine)."""
    H = mlp_ratio * D
    block = 2 * D + 3 * D * D + (D * D + D) + 2 * D + (D * H + H) + (H * D + D)
    half = depth // 2
    n = (2 * half + 1) * block + half * (2 * D * D + D)  # blocks + skip_linear
    n += in_ch * patch * patch * D + D  # patch_embed.proj
    n += num_classes * D + (2 + tokens) * D  # label_emb + pos_embed (extras = 2)
    n += 2 * D + D * patch * patch * in_ch + patch * patch * in_ch  # norm + decoder_pred
    n += (in_ch * in_ch * 9 + in_ch) if conv else 0  # final_layer
    return n


class ReuseAll(CachePolicy):
    """Step 0 computes and stores every branch output; later steps reuse all of them."""

    def __init__(self):
        super().__init__()
        self.cache = {}

    def apply(self, layer, kind, branch):
        if self.ctx.step == 0:
            self.cache[layer, kind] = branch()
        return self.cache[layer, kind]


# ------------------------------------------------------------------------------------------- sizes
def test_uvit_h2_param_count_on_meta():
    with torch.device("meta"):
        h2 = VARIANTS["U-ViT-H/2"]()
        l2 = VARIANTS["U-ViT-L/2"]()
    n_h2 = sum(p.numel() for p in h2.parameters())
    assert n_h2 == uvit_params(1152, 28, 2, 4, 256, 1001, conv=False) == 500_832_016  # paper: 501M
    assert sum(p.numel() for p in l2.parameters()) == uvit_params(1024, 20, 2, 4, 256, 1001, conv=True)
    assert round(sum(p.numel() for p in l2.parameters()) / 1e6) == 287  # paper: 287M
    assert h2.depth == 29 and len(h2.in_blocks) == len(h2.out_blocks) == 14
    assert h2.num_prefix_tokens == 2 and h2.pos_embed.shape == (1, 258, 1152)
    assert list(h2.buffers()) == []


def test_published_configs():
    with torch.device("meta"):
        h4 = VARIANTS["U-ViT-H/4"]()
        assert VARIANTS["U-ViT-H/2-512"]().config == h4.config  # the 512 "huge" model is patch 4
    assert (h4.input_size, h4.patch_size, h4.num_tokens) == (64, 4, 256)
    with torch.device("meta"):
        s = VARIANTS["U-ViT-S/2-cifar10"]()
    assert s.num_prefix_tokens == 1 and s.label_emb is None and s.null_cond(None) is None


# ------------------------------------------------------------------------------------------- keys / layout
def test_official_key_names():
    with torch.device("meta"):
        keys = set(VARIANTS["U-ViT-H/2"]().state_dict())
    assert {"patch_embed.proj.weight", "patch_embed.proj.bias", "label_emb.weight", "pos_embed",
            "in_blocks.0.norm1.weight", "in_blocks.13.attn.qkv.weight", "in_blocks.0.attn.proj.bias",
            "mid_block.mlp.fc1.weight", "mid_block.mlp.fc2.bias", "mid_block.norm2.bias",
            "out_blocks.13.skip_linear.weight", "out_blocks.0.skip_linear.bias", "norm.weight",
            "decoder_pred.weight", "decoder_pred.bias"} <= keys
    assert not any(k.startswith(("time_embed", "final_layer")) for k in keys)  # mlp_time_embed=False, conv=False
    assert not any("qkv.bias" in k for k in keys) and not any(k.startswith("in_blocks.14") for k in keys)
    assert not any("skip_linear" in k for k in keys if not k.startswith("out_blocks"))
    tk = set(tiny(mlp_time_embed=True).state_dict())
    assert {"time_embed.0.weight", "time_embed.2.bias", "final_layer.weight", "final_layer.bias"} <= tk


def test_extra_tokens_label_then_time():
    m = tiny()
    x, t, y = inputs(m)
    tok = m.embed(x, t, y)
    assert tok.shape == (2, 2 + m.num_tokens, 64) and m.num_prefix_tokens == 2
    from diffcache.backbones.layers import timestep_embedding

    # libs/uvit.py prepends the time token, then the label token: [label, time, patches]
    torch.testing.assert_close(tok[:, 0], m.label_emb(y) + m.pos_embed[0, 0])
    torch.testing.assert_close(tok[:, 1], timestep_embedding(t, 64) + m.pos_embed[0, 1])
    rec = bound_for_test(Recorder(), m)
    rec.ctx = CTX
    with torch.no_grad():
        m(x, t, y)
    assert set(rec.shapes) == {(2, 2 + m.num_tokens, 64)}


def test_null_class_and_time_forms():
    m = tiny()
    x, t, y = inputs(m)
    assert m.null_class == 10 and m.null_cond(y).tolist() == [10, 10]
    with torch.device("meta"):
        h2 = VARIANTS["U-ViT-H/2"]()
    assert h2.null_cond(torch.tensor([1, 2])).tolist() == [1000, 1000]
    with torch.no_grad():
        a = m(x, torch.full((2,), 500.0), y)
        b = m(x, 500.0, y)
    assert torch.equal(a, b) and a.shape == x.shape


def test_wrong_input_is_a_clear_error():
    m = tiny()
    with pytest.raises(ValueError, match=r"expects latents of shape \(B, 4, 8, 8\)"):
        m(torch.randn(1, 4, 16, 16), torch.ones(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="needs labels"):
        m(torch.randn(1, 4, 8, 8), torch.ones(1), None)


# ------------------------------------------------------------------------------------------- cache sites
def test_passthrough_policy_is_bit_identical():
    m = tiny()
    x, t, y = inputs(m)
    with torch.no_grad():
        ref = m(x, t, y)
        pol = bound_for_test(CachePolicy(), m)
        pol.ctx = CTX
        out = m(x, t, y)
        with pol.disabled():
            off = m(x, t, y)
    assert torch.equal(ref, out) and torch.equal(ref, off)


def test_cache_sites_complete_and_ordered():
    m = tiny()
    rec = bound_for_test(Recorder(), m)
    rec.ctx = CTX
    with torch.no_grad():
        m(*inputs(m))
    expect = [(l, k) for l in range(5) for k in ("attn", "mlp")]  # in 0,1 | mid 2 | out 3,4
    assert rec.visited == m.cache_sites() == expect


def test_reused_branches_keep_long_skips_live():
    """All attn/mlp outputs reused from step 0; skip_linear(cat[x, skip]) still runs on the new input.
    In float64, so the independent re-computation agrees to round-off on any CPU."""
    m = tiny().double()
    x0, t, y = inputs(m, seed=1)
    x1 = inputs(m, seed=2)[0].double()
    x0, t = x0.double(), t.double()
    pol = bound_for_test(ReuseAll(), m)
    with torch.no_grad():
        with pol.at(StepContext(0, 0, 2, 2)):
            m(x0, t, y)
        with pol.at(StepContext(1, 1, 2, 2)):
            out = m(x1, t, y)
        # independent evaluation: constant branches, live embedding and skips
        c = pol.cache
        h = m.embed(x1, t, y)
        skips = []
        for i in range(2):
            h = h + c[i, "attn"] + c[i, "mlp"]
            skips.append(h)
        h = h + c[2, "attn"] + c[2, "mlp"]
        for j, blk in enumerate(m.out_blocks):
            h = blk.skip_linear(torch.cat([h, skips.pop()], -1)) + c[3 + j, "attn"] + c[3 + j, "mlp"]
        h = m.decoder_pred(m.norm(h))[:, 2:]  # drop label + time tokens
        p, C, s = 2, 4, 4
        img = h.reshape(2, s, s, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(2, C, s * p, s * p)
        expect = m.final_layer(img)
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-12)
    pol._test_binding.__exit__(None, None, None)
    with torch.no_grad():
        assert not torch.allclose(out, m(x1, t, y))  # reuse really changed the result


# ------------------------------------------------------------------------------------------- checkpoints
def test_official_nnet_pth_round_trip(tmp_path):
    src, dst = tiny(seed=0), tiny(seed=5)
    x, t, y = inputs(src)
    path = tmp_path / "nnet.pth"
    torch.save(src.state_dict(), path)  # official nnet.pth: a plain state dict
    sd = UViT.unwrap_checkpoint(torch.load(path, map_location="cpu"))
    dst.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.equal(src(x, t, y), dst(x, t, y))
    with pytest.raises(ValueError, match="not a U-ViT nnet checkpoint"):
        UViT.unwrap_checkpoint({"step": 3})


def test_loader_round_trip(tmp_path):
    from diffcache.backbones.weights import load_checkpoint as load

    src, dst = tiny(seed=0), tiny(seed=5)
    path = tmp_path / "nnet.pth"
    torch.save(src.state_dict(), path)
    load(dst, str(path))
    x, t, y = inputs(src)
    with torch.no_grad():
        assert torch.equal(src(x, t, y), dst(x, t, y))
