"""PixArt-α backbone: published size, official / diffusers checkpoints, text masks, null caption, cache sites."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import Recorder, bound_for_test, perturbed

from diffcache.backbones.layers import sincos_pos_embed_2d
from diffcache.backbones.pixart import VARIANTS, PixArt
from diffcache.context import StepContext
from diffcache.policies.base import CachePolicy

CTX = StepContext(nfe=0, step=0, num_steps=1, num_evals=1)


def perturb(m, seed: int):
    """Random weights everywhere (the official init zeroes cross_attn.proj and the output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m


def tiny(seed: int = 0, **kw) -> PixArt:
    return perturbed("tiny_pixart", seed, **kw)


def inputs(m: PixArt, B: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, m.input_size, m.input_size, generator=g)
    t = torch.tensor([999.0, 12.5, 500.0])[:B]
    y = torch.randn(B, m.token_num, m.caption_channels, generator=g)
    mask = torch.zeros(B, m.token_num, dtype=torch.long)
    for i, n in enumerate([3, 8, 5][:B]):
        mask[i, :n] = 1
    return x, t, {"y": y, "mask": mask}


# ------------------------------------------------------------------------------------------- sizes / keys
def test_pixart_xl2_param_count_on_meta():
    with torch.device("meta"):
        m = VARIANTS["PixArt-XL/2"]()
    D, C, L = 1152, 4096, 28
    block = 3 * D * D + 3 * D + D * D + D + D * D + D + 2 * D * D + 2 * D + D * D + D + 8 * D * D + 5 * D + 6 * D
    expect = (L * block + 4 * 4 * D + D + 256 * D + D + D * D + D + D * 6 * D + 6 * D
              + C * D + D + D * D + D + D * 32 + 32 + 2 * D)
    n = sum(p.numel() for p in m.parameters())
    assert n == expect == 610_856_096  # paper: 0.6B; buffers (y_embedding, pos_embed) not counted
    bufs = dict(m.named_buffers())
    assert set(bufs) == {"pos_embed", "y_embedder.y_embedding"}
    assert bufs["y_embedder.y_embedding"].shape == (120, 4096) and bufs["pos_embed"].shape == (1, 256, 1152)
    assert {"pos_embed", "y_embedder.y_embedding"} <= set(m.state_dict())  # persistent, as upstream
    assert m.out_channels == 8 and m.cache_sites()[:3] == [(0, "attn"), (0, "xattn"), (0, "mlp")]


def test_param_count_matches_diffusers_model():
    import diffusers  # a dev dependency: the round trip must run in CI, never skip
    with torch.device("meta"):  # diffusers' PixArt-XL/2 at 256 (its defaults, 32x32 latent, T5 4096)
        ref = diffusers.PixArtTransformer2DModel(sample_size=32, caption_channels=4096)
        ours = VARIANTS["PixArt-XL/2"]()
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in ours.parameters()) == 610_856_096


def test_official_key_names():
    keys = set(VARIANTS["tiny_pixart"]().state_dict())
    linears = ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1", "y_embedder.y_proj.fc1",
               "y_embedder.y_proj.fc2", "final_layer.linear"]
    expect = {f"{k}.{s}" for k in linears for s in ("weight", "bias")}
    expect |= {"y_embedder.y_embedding", "pos_embed", "final_layer.scale_shift_table"}
    for i in range(2):
        for k in ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                  "mlp.fc1", "mlp.fc2"):
            expect |= {f"blocks.{i}.{k}.weight", f"blocks.{i}.{k}.bias"}
        expect.add(f"blocks.{i}.scale_shift_table")
    assert keys == expect


def test_pos_embed_matches_diffusers_sincos():
    import diffusers.models.embeddings as emb
    for dim, grid in [(64, 4), (1152, 16)]:
        ref = emb.get_2d_sincos_pos_embed(dim, grid, base_size=grid, interpolation_scale=1.0, output_type="pt")
        torch.testing.assert_close(sincos_pos_embed_2d(dim, grid, grid, 1.0), ref.float(), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- cache sites
def test_passthrough_policy_is_bit_identical():
    m = tiny()
    x, t, c = inputs(m)
    with torch.no_grad():
        ref = m(x, t, c)
        pol = bound_for_test(CachePolicy(), m)
        pol.ctx = CTX
        out = m(x, t, c)
    assert ref.abs().max() > 0 and torch.equal(ref, out) and out.shape == (2, 8, 8, 8)


def test_cache_sites_complete_and_ordered():
    m = tiny()
    rec = bound_for_test(Recorder(), m)
    rec.ctx = CTX
    with torch.no_grad():
        m(*inputs(m))
    assert rec.visited == m.cache_sites() == [(l, k) for l in range(2) for k in ("attn", "xattn", "mlp")]


# ------------------------------------------------------------------------------------------- text conditioning
def _f64(m, x, t, c):
    """float64 copies: equalities between differently batched computations then hold to ~1e-13, far
    below any real difference, on every CPU (float32 kernels reorder sums differently per ISA)."""
    return m.double(), x.double(), t.double(), {"y": c["y"].double(), "mask": c["mask"]}


def test_masked_text_tokens_do_not_matter_and_mask_equals_packing():
    m, x, t, c = _f64(tiny(), *inputs(tiny()))
    junk = c["y"].clone()
    junk[c["mask"] == 0] = 1e3 * torch.randn(int((c["mask"] == 0).sum()), m.caption_channels, dtype=torch.float64)
    with torch.no_grad():
        a = m(x, t, c)
        b = m(x, t, {"y": junk, "mask": c["mask"]})
        assert torch.equal(a, b)
        # upstream packs only the valid tokens of each caption: same as running each prompt unpadded
        for i, n in enumerate([3, 8]):
            solo = m(x[i:i + 1], t[i:i + 1], {"y": c["y"][i:i + 1, :n], "mask": None})
            torch.testing.assert_close(a[i:i + 1], solo, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(a, m(x, t, {"y": c["y"], "mask": None}))


def test_official_tensor_layouts_and_mask_repeat():
    m = tiny()
    x, t, c = inputs(m)
    with torch.no_grad():
        ref = m(x, t, c)
        off = m(x, t, {"y": c["y"][:, None], "mask": c["mask"][:, None, None]})  # (B,1,L,C), (B,1,1,L)
        assert torch.equal(ref, off)
        # PixArt.forward repeats a prompt mask over a stacked [uncond; cond] batch
        y2 = torch.cat([c["y"][:1], c["y"][:1]])
        both = m(torch.cat([x[:1], x[:1]]), t[:1].repeat(2), {"y": y2, "mask": c["mask"][:1]})
        assert torch.equal(both[0], both[1])


def test_null_cond_uses_y_embedding_with_prompt_mask():
    m = tiny()
    m, x, t, c = _f64(m, *inputs(m))
    u = m.null_cond(c)
    assert torch.equal(u["y"][1], m.y_embedder.y_embedding) and torch.equal(u["mask"], c["mask"])
    short = m.null_cond({"y": c["y"][:, :5], "mask": c["mask"][:, :5]})
    assert torch.equal(short["y"][0], m.y_embedder.y_embedding[:5])
    with torch.no_grad():
        stacked = m(torch.cat([x, x]), t.repeat(2), {k: torch.cat([u[k], c[k]]) for k in ("y", "mask")})
        torch.testing.assert_close(stacked[:2], m(x, t, u), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stacked[2:], m(x, t, c), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="null caption has only 8"):
        m.null_cond({"y": torch.randn(1, 9, 32, dtype=torch.float64), "mask": None})


def test_wrong_shapes_are_clear_errors():
    m = tiny()
    x, t, c = inputs(m)
    with pytest.raises(ValueError, match=r"expects latents of shape \(B, 4, 8, 8\)"):
        m(torch.randn(2, 4, 16, 16), t, c)
    with pytest.raises(ValueError, match="caption features must be"):
        m(x, t, {"y": c["y"][0], "mask": None})
    with pytest.raises(ValueError, match="mask covers 7 tokens"):
        m(x, t, {"y": c["y"], "mask": c["mask"][:, :7]})


# ------------------------------------------------------------------------------------------- checkpoints
def test_official_pth_round_trip(tmp_path):
    src, dst = tiny(seed=0), tiny(seed=7)
    x, t, c = inputs(src)
    path = tmp_path / "PixArt-XL-2-256x256.pth"
    sd = src.state_dict()
    sd["pos_embed"] = torch.randn_like(sd["pos_embed"])  # upstream inference ignores the stored copy
    torch.save({"state_dict": sd}, path)
    loaded = PixArt.unwrap_checkpoint(torch.load(path, map_location="cpu"))
    dst.load_state_dict(loaded, strict=True)
    assert torch.equal(dst.y_embedder.y_embedding, src.y_embedder.y_embedding)
    assert torch.equal(dst.pos_embed, src.pos_embed)
    with torch.no_grad():
        assert torch.equal(src(x, t, c), dst(x, t, c))
    with pytest.raises(ValueError, match="not a PixArt checkpoint"):
        PixArt.unwrap_checkpoint({"state_dict": {"a": 1}})


def test_loader_round_trip(tmp_path):
    from diffcache.backbones.weights import load_checkpoint as load

    src, dst = tiny(seed=0), tiny(seed=7)
    path = tmp_path / "pixart.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    load(dst, str(path))
    x, t, c = inputs(src)
    with torch.no_grad():
        assert torch.equal(src(x, t, c), dst(x, t, c))


def _tiny_diffusers(tmp_path):
    import diffusers  # a dev dependency: the round trip must run in CI, never skip
    torch.manual_seed(0)
    ref = diffusers.PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=64, attention_bias=True, sample_size=8, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=32).eval()
    perturb(ref, 3)
    ref.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    return ref, sd, config


def test_diffusers_round_trip(tmp_path):
    ref, sd, config = _tiny_diffusers(tmp_path)
    kw = PixArt.diffusers_kwargs(config, token_num=8)
    assert kw == VARIANTS["tiny_pixart"]().config
    with pytest.warns(UserWarning, match="no null caption"):
        ours_sd = PixArt.convert_diffusers(sd, config, token_num=8)
    ours = PixArt(**kw).eval()
    ours.load_state_dict(ours_sd, strict=True)
    x, t, c = inputs(ours)
    with torch.no_grad():
        expect = ref(x, encoder_hidden_states=c["y"], timestep=t, encoder_attention_mask=c["mask"],
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        got = ours(x, t, c)
    assert (got - expect).abs().max().item() <= 1e-5
    assert expect.abs().max() > 0.1
    with pytest.raises(RuntimeError, match="no null caption"):
        ours.null_cond(c)
    # an older conversion that kept the null caption brings it along
    y_null = torch.randn(8, 32)
    with_null = PixArt.convert_diffusers({**sd, "caption_projection.y_embedding": y_null}, config, token_num=8)
    assert torch.equal(with_null["y_embedder.y_embedding"], y_null)
    with pytest.raises(KeyError, match="unexpected keys"):
        PixArt.convert_diffusers({**sd, "adaln_single.emb.resolution_embedder.linear_1.weight": y_null}, config)


def test_diffusers_multiscale_config_rejected():
    with pytest.raises(ValueError, match="PixArt-MS"):
        PixArt.diffusers_kwargs({"sample_size": 128, "caption_channels": 4096})
    with torch.device("meta"):
        xl512 = VARIANTS["PixArt-XL/2-512"]()
    # diffusers defaults are PixArt-XL/2 (16 heads x 72, 28 layers, 8 output channels)
    assert PixArt.diffusers_kwargs({"sample_size": 64, "caption_channels": 4096}) == xl512.config
