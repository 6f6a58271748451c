"""Our DiT / PixArt weights -> a diffusers model directory (the inverse of ``convert_diffusers``).

Why: to run the same weights in diffusers (peer benchmarks, cache-dit, a diffusers pipeline). The
directory holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` and loads both with
``DiTTransformer2DModel.from_pretrained`` / ``PixArtTransformer2DModel.from_pretrained`` and with
``load_backbone(arch, ckpt=dir)``.

Numerics (DiT only): diffusers' DiT port embeds timesteps with a frequency shift of 1 (hard-coded) where
the official DiT uses 0; the block LayerNorm eps is written from our model (1e-6 official), so the only
difference a diffusers run of official weights shows is that shift. ``load_backbone`` of the directory
adopts diffusers' numerics, so ours -> dir -> ours is bit-equal in weights, and in outputs for a model
that already ran diffusers' numerics (``use_diffusers_numerics``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import dit, pixart
from .layers import sincos_pos_embed_2d

DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"


def _split(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [c.clone() for c in t.chunk(n, dim=0)]


def _pair(out: dict, sd: dict, theirs: str, ours: str) -> None:
    """Copy a Linear's weight and bias under diffusers' name."""
    for s in ("weight", "bias"):
        out[f"{theirs}.{s}"] = sd[f"{ours}.{s}"].clone()


def _fused(out: dict, sd: dict, ours: str, theirs: str, names: str) -> None:
    """Split our fused projection ``ours`` (qkv / kv) into diffusers' ``theirs``.to_q / to_k / to_v."""
    for s in ("weight", "bias"):
        for name, part in zip(names, _split(sd[f"{ours}.{s}"], len(names))):
            out[f"{theirs}.to_{name}.{s}"] = part


def _walk_blocks(sd: dict, family, depth: int, per_block) -> dict[str, torch.Tensor]:
    """The part both families share: ``family``'s top-level Linears, then per block what ``per_block`` adds,
    the fused self-attention qkv and ``family.DIFFUSERS_BLOCK_LINEARS``."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in family.DIFFUSERS_LINEARS:
        _pair(out, sd, theirs, ours)
    for i in range(depth):
        src, dst = f"blocks.{i}", f"transformer_blocks.{i}"
        per_block(out, i, src, dst)
        _fused(out, sd, f"{src}.attn.qkv", f"{dst}.attn1", "qkv")
        for ours, theirs in family.DIFFUSERS_BLOCK_LINEARS:
            _pair(out, sd, f"{dst}.{theirs}", f"{src}.{ours}")
    return out


def dit_to_diffusers(model) -> tuple[dict[str, torch.Tensor], dict]:
    """(diffusers ``DiTTransformer2DModel`` state dict, config) of our :class:`~diffcache.backbones.dit.DiT`."""
    sd, cfg = model.state_dict(), model.config
    heads, hidden = int(cfg["num_heads"]), int(cfg["hidden_size"])
    if float(cfg.get("mlp_ratio", 4.0)) != 4.0:
        raise ValueError(f"diffusers' DiT has a fixed MLP ratio of 4; this model has {cfg['mlp_ratio']}")
    grid = int(cfg["input_size"]) // int(cfg["patch_size"])
    if not torch.equal(sd["pos_embed"].float().cpu(), sincos_pos_embed_2d(hidden, grid, grid).unsqueeze(0)):
        raise ValueError("this DiT's pos_embed is not the fixed 2-D sin-cos table; diffusers recomputes that table "
                         "and cannot store another one")

    def per_block(out: dict, i: int, src: str, dst: str) -> None:
        for ours, theirs in dit.DIFFUSERS_EMBEDDERS:  # diffusers keeps a copy of the shared embedders per block
            _pair(out, sd, theirs.format(i=i), ours)
        out[dit.DIFFUSERS_CLASS_TABLE.format(i=i)] = sd["y_embedder.embedding_table.weight"].clone()

    out = _walk_blocks(sd, dit, int(cfg["depth"]), per_block)
    config = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": heads,
              "attention_head_dim": hidden // heads, "in_channels": int(cfg["in_channels"]),
              "out_channels": int(model.out_channels), "num_layers": int(cfg["depth"]),
              "sample_size": int(cfg["input_size"]), "patch_size": int(cfg["patch_size"]),
              "num_embeds_ada_norm": int(cfg["num_classes"]), "norm_type": "ada_norm_zero",
              "norm_eps": float(model.blocks[0].norm1.eps), "activation_fn": "gelu-approximate",
              "attention_bias": True, "norm_elementwise_affine": False, "dropout": 0.0, "upcast_attention": False}
    return out, config


def pixart_to_diffusers(model) -> tuple[dict[str, torch.Tensor], dict]:
    """(diffusers ``PixArtTransformer2DModel`` state dict, config) of our PixArt-alpha (256/512).

    The null caption is kept as ``caption_projection.y_embedding`` (older conversions did the same; our
    loader reads it back), unless it is the NaN placeholder of a model that came from diffusers.
    """
    sd, cfg = model.state_dict(), model.config
    heads, hidden = int(cfg["num_heads"]), int(cfg["hidden_size"])

    def per_block(out: dict, i: int, src: str, dst: str) -> None:
        out[f"{dst}.scale_shift_table"] = sd[f"{src}.scale_shift_table"].clone()
        _fused(out, sd, f"{src}.cross_attn.kv_linear", f"{dst}.attn2", "kv")

    out = _walk_blocks(sd, pixart, int(cfg["depth"]), per_block)
    _pair(out, sd, "proj_out", "final_layer.linear")
    out["scale_shift_table"] = sd["final_layer.scale_shift_table"].clone()
    null = sd.get("y_embedder.y_embedding")
    if null is not None and not torch.isnan(null).any():
        out["caption_projection.y_embedding"] = null.clone()
    config = {"_class_name": "PixArtTransformer2DModel", "num_attention_heads": heads,
              "attention_head_dim": hidden // heads, "in_channels": int(cfg["in_channels"]),
              "out_channels": int(model.out_channels), "num_layers": int(cfg["depth"]),
              "cross_attention_dim": hidden, "attention_bias": True, "sample_size": int(cfg["input_size"]),
              "patch_size": int(cfg["patch_size"]), "activation_fn": "gelu-approximate",
              "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
              "norm_eps": 1e-6, "caption_channels": int(cfg["caption_channels"]),
              "interpolation_scale": float(cfg["lewei_scale"]), "use_additional_conditions": False}
    return out, config


def to_diffusers(model) -> tuple[dict[str, torch.Tensor], dict]:
    """(diffusers state dict, config) of a DiT or PixArt backbone (the classes diffusers has a model for)."""
    if isinstance(model, dit.DiT):
        return dit_to_diffusers(model)
    if isinstance(model, pixart.PixArt):
        return pixart_to_diffusers(model)
    raise ValueError(f"diffusers export supports DiT and PixArt backbones, not {type(model).__name__}")


def save_diffusers(model, out_dir: str | Path) -> Path:
    """Write ``model`` as a diffusers model directory (``config.json`` + safetensors); returns the directory."""
    from safetensors.torch import save_file

    sd, config = to_diffusers(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / DIFFUSERS_FILE))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


__all__ = ["DIFFUSERS_FILE", "dit_to_diffusers", "pixart_to_diffusers", "save_diffusers", "to_diffusers"]
