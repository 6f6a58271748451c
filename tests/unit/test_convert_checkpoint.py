"""ours -> diffusers directory -> ours (scripts/convert_checkpoint.py, diffcache.backbones.export)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import perturbed

from diffcache.backbones import build_backbone, load_backbone
from diffcache.backbones.export import save_diffusers, to_diffusers
from diffcache.backbones.layers import sincos_pos_embed_2d

ROOT = Path(__file__).resolve().parents[2]


def tiny_dit(seed: int):
    """A perturbed tiny DiT whose pos_embed is the fixed sin-cos table again (as in every real checkpoint)."""
    m = perturbed("tiny_dit", seed=seed)
    m.pos_embed.data.copy_(sincos_pos_embed_2d(m.hidden_size, 4, 4).unsqueeze(0))
    return m


def dit_inputs(m, B: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, m.input_size, m.input_size, generator=g)
    return x, torch.tensor([999.0, 500.0, 3.0])[:B], torch.tensor([0, 9, 10])[:B]


def pixart_inputs(m, B: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, m.input_size, m.input_size, generator=g)
    y = torch.randn(B, m.token_num, m.caption_channels, generator=g)
    mask = torch.zeros(B, m.token_num, dtype=torch.long)
    mask[0, :3], mask[1, :8] = 1, 1
    return x, torch.tensor([999.0, 12.5])[:B], {"y": y, "mask": mask}


def test_dit_round_trip_bit_equal(tmp_path):
    import diffusers

    src = tiny_dit(3)
    src.use_diffusers_numerics({"norm_eps": 1e-6})  # the numerics a diffusers directory loads with
    save_diffusers(src, tmp_path)
    back = load_backbone("tiny_dit", ckpt=str(tmp_path))
    for k, v in src.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x, t, y = dit_inputs(src)
    ref = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        ours, theirs = src(x, t, y), ref(x, timestep=t, class_labels=y).sample
        assert ours.abs().max() > 0.1
        assert torch.equal(back(x, t, y), ours)
    # fp32: same math, different op order (split vs packed qkv) -> round-off only
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_official_numerics_weights_survive(tmp_path):
    src = tiny_dit(4)  # official eps 1e-6 and frequency shift 0
    save_diffusers(src, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["norm_eps"] == 1e-6
    back = load_backbone("tiny_dit", ckpt=str(tmp_path))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in src.state_dict().items())
    assert back.t_embedder.freq_shift == 1 and src.t_embedder.freq_shift == 0  # diffusers' port, documented


def test_pixart_round_trip_bit_equal(tmp_path):
    import diffusers

    src = perturbed("tiny_pixart", seed=5)
    save_diffusers(src, tmp_path)
    back = load_backbone("tiny_pixart", ckpt=str(tmp_path))
    for k, v in src.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k  # the null caption comes back too
    x, t, c = pixart_inputs(src)
    ref = diffusers.PixArtTransformer2DModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        ours = src(x, t, c)
        theirs = ref(x, encoder_hidden_states=c["y"], timestep=t, encoder_attention_mask=c["mask"],
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        assert ours.abs().max() > 0.1
        assert torch.equal(back(x, t, c), ours)
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_unsupported_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="supports DiT and PixArt"):
        to_diffusers(build_backbone("tiny_uvit"))
    with pytest.raises(ValueError, match="pos_embed is not the fixed"):
        to_diffusers(perturbed("tiny_dit", seed=1))


def test_cli_writes_a_loadable_directory(tmp_path):
    out = tmp_path / "dit"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"), "--arch", "tiny_dit",
                    "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "DiTTransformer2DModel" and cfg["num_layers"] == 2
    load_backbone("tiny_dit", ckpt=str(out))
