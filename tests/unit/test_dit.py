"""DiT backbone: sizes, cache sites, official and diffusers weights, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import Recorder, bound_for_test, perturbed

from diffcache.backbones import CheckpointError, build_backbone, count_parameters, load_backbone
from diffcache.backbones.dit import DiT
from diffcache.backbones.weights import load_checkpoint
from diffcache.context import StepContext


def tiny(seed: int = 0) -> DiT:
    return perturbed("tiny_dit", seed, scale=0.05)


def inputs(m: DiT, B: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, m.input_size, m.input_size, generator=g)
    t = torch.tensor([999.0, 500.0, 3.0])[:B]
    y = torch.tensor([1, 7, m.null_class])[:B]
    return x, t, y


@pytest.mark.parametrize("arch,expect,tol", [("DiT-XL/2", 675.1e6, 0.05e6), ("DiT-S/2", 33.0e6, 0.05e6),
                                             ("U-ViT-H/2", 501e6, 0.5e6), ("PixArt-XL/2", 611e6, 0.5e6)])
def test_parameter_counts(arch, expect, tol):
    """The published sizes (DiT paper table; U-ViT and PixArt-alpha papers), counted on the meta device."""
    with torch.device("meta"):
        m = build_backbone(arch)
    assert abs(count_parameters(m) - expect) <= tol, count_parameters(m)


def test_all_paper_variants_exist():
    for size, (depth, hidden) in {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152)}.items():
        for p in (2, 4, 8):
            with torch.device("meta"):
                m = build_backbone(f"DiT-{size}/{p}")
            assert (m.depth, m.hidden_size, m.patch_size, m.num_tokens) == (depth, hidden, p, (32 // p) ** 2)


def test_passthrough_site_is_bit_identical_and_sites_complete():
    m = tiny()
    x, t, y = inputs(m)
    with torch.no_grad():
        plain = m(x, t, y)
        pol = bound_for_test(Recorder(), m)
        pol.begin(StepContext(nfe=0, step=0, num_steps=1, num_evals=1))
        cached = m(x, t, y)
    assert torch.equal(plain, cached)
    assert pol.visited == m.cache_sites() == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
    assert plain.shape == (3, 8, 8, 8)


def test_official_round_trip(tmp_path):
    src, dst = tiny(0), tiny(5)
    x, t, y = inputs(src)
    torch.save(src.state_dict(), tmp_path / "dit.pt")  # official format: a plain state dict
    load_checkpoint(dst, tmp_path / "dit.pt")
    torch.save({"model": {}, "ema": src.state_dict(), "opt": {}}, tmp_path / "train.pt")  # DiT train.py checkpoint
    dst2 = load_backbone("tiny_dit", ckpt=str(tmp_path / "train.pt"))
    with torch.no_grad():
        assert torch.equal(src(x, t, y), dst(x, t, y))
        assert torch.equal(src(x, t, y), dst2(x, t, y))


def _tiny_diffusers(tmp_path):
    import diffusers  # a dev dependency: the round trip must run in CI, never skip
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # the hub conversion copies DiT's one shared embedder into every block
        for k, v in ref.state_dict().items():
            if k.startswith("transformer_blocks.1.norm1.emb."):
                v.copy_(ref.state_dict()[k.replace("blocks.1", "blocks.0")])
    ref.save_pretrained(tmp_path)
    return ref


def test_diffusers_round_trip(tmp_path):
    ref = _tiny_diffusers(tmp_path)
    ours = load_backbone("tiny_dit", ckpt=str(tmp_path))
    x, t, y = inputs(ours)
    with torch.no_grad():
        expect = ref(x, timestep=t, class_labels=y).sample
        got = ours(x, t, y)
    assert expect.abs().max() > 0.1
    assert (got - expect).abs().max().item() <= 1e-5


def test_diffusers_per_block_embedders_rejected(tmp_path):
    ref = _tiny_diffusers(tmp_path)
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    ref.save_pretrained(tmp_path / "bad")
    with pytest.raises(CheckpointError, match="per-block embedders"):
        load_backbone("tiny_dit", ckpt=str(tmp_path / "bad"))


def test_bad_checkpoints_give_clear_errors(tmp_path):
    m = tiny()
    with pytest.raises(FileNotFoundError, match="nope.pt.*backbone.ckpt="):
        load_checkpoint(m, tmp_path / "nope.pt")
    sd = m.state_dict()
    del sd["blocks.1.mlp.fc2.weight"]
    sd["blocks.9.attn.qkv.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(m, tmp_path / "wrong.pt")
    msg = str(e.value)
    assert "wrong.pt" in msg and "missing keys (1): blocks.1.mlp.fc2.weight" in msg
    assert "unexpected keys (1): blocks.9.attn.qkv.weight" in msg
    torch.save(tiny().state_dict(), tmp_path / "ok.pt")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*trunc.pt"):
        load_checkpoint(m, tmp_path / "trunc.pt")
    big = build_backbone("tiny_dit", hidden_size=128, num_heads=4)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(big, tmp_path / "ok.pt")
    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "cfgdir" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "cfgdir" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="UNet2DModel"):
        load_checkpoint(m, tmp_path / "cfgdir")


def test_real_backbone_refuses_random_weights():
    with pytest.raises(ValueError, match=r"backbone.ckpt=.*dl.fbaipublicfiles.com"):
        load_backbone("DiT-XL/2")
    with pytest.raises(ValueError, match="unknown backbone arch 'DiT-XXL/2'"):
        load_backbone("DiT-XXL/2")


def test_wrong_input_shapes():
    m = tiny()
    x, t, y = inputs(m)
    with pytest.raises(ValueError, match=r"expects latents of shape \(B, 4, 8, 8\), got \(3, 4, 16, 16\)"):
        m(torch.randn(3, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="labels must lie in"):
        m(x, t, torch.tensor([1, 2, 11]))
