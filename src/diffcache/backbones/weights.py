"""Loading official and diffusers-format weights into our backbones, strictly and with clear errors.

Accepted sources for ``backbone.ckpt``:
* an official file: DiT ``.pt`` (plain state dict, or a training checkpoint's ``ema``), U-ViT ``nnet``
  ``.pth`` (plain state dict), PixArt-alpha ``.pth`` (``{"state_dict": ...}``), or ``.safetensors``;
* a diffusers model directory (``config.json`` + ``diffusion_pytorch_model.safetensors``) of a
  ``DiTTransformer2DModel`` or ``PixArtTransformer2DModel``; keys are mapped onto ours.

Every failure names the file and says what is wrong (missing / unexpected keys, shape mismatches,
an unreadable or truncated file) instead of surfacing a stack trace from inside torch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

WHERE_TO_GET = {
    "dit": "DiT-XL-2-256x256.pt / DiT-XL-2-512x512.pt from https://dl.fbaipublicfiles.com/DiT/models/ "
           "(facebookresearch/DiT), or a diffusers directory such as facebook/DiT-XL-2-256/transformer",
    "uvit": "imagenet256_uvit_huge.pth (or another nnet .pth) from the baofff/U-ViT README",
    "pixart": "PixArt-XL-2-256x256.pth / PixArt-XL-2-512x512.pth from huggingface.co/PixArt-alpha/PixArt-alpha, "
              "or a diffusers directory such as PixArt-alpha/PixArt-XL-2-512x512/transformer",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the chosen backbone."""


def _read_file(path: Path) -> Any:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e} "
                              "(is the file complete and a torch/safetensors checkpoint?)") from None


def _read_diffusers_dir(path: Path, family: str) -> tuple[dict[str, torch.Tensor], dict]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is a directory but has no config.json (expected a diffusers model directory)")
    config = json.loads(cfg_path.read_text())
    cls = config.get("_class_name", "")
    expect = {"dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel"}.get(family)
    if expect is None:
        raise CheckpointError(f"{path}: diffusers directories are supported for DiT and PixArt, not {family}")
    if cls and cls != expect:
        raise CheckpointError(f"{path} holds a diffusers {cls}, but backbone family {family!r} needs {expect}")
    files = sorted(path.glob("diffusion_pytorch_model*.safetensors")) or sorted(path.glob("diffusion_pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{path} has no diffusion_pytorch_model*.safetensors / .bin weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        part = _read_file(f)
        if not isinstance(part, dict):
            raise CheckpointError(f"{f} does not hold a state dict")
        sd.update(part)
    return sd, config


def read_state_dict(model, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, converted to ``model``'s key layout (not yet loaded)."""
    path = Path(path).expanduser()
    if not path.exists() and str(getattr(model, "arch", "")).startswith("mnist"):
        raise FileNotFoundError(f"checkpoint not found: {path}. The MNIST teachers ship in the repository's "
                                f"assets/ (git checkout assets/), or retrain them with `make teachers`")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}. Get {WHERE_TO_GET.get(model.family, 'the weights')} "
                                "and pass backbone.ckpt=/path/to/it")
    if path.is_dir():
        sd, config = _read_diffusers_dir(path, model.family)
        try:
            if model.family == "dit":
                model.use_diffusers_numerics(config)
                return type(model).convert_diffusers(sd, config)
            return type(model).convert_diffusers(sd, config, token_num=model.token_num)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    obj = _read_file(path)
    try:
        sd = type(model).unwrap_checkpoint(obj)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _describe(keys: list[str], n: int = 8) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_checkpoint(model, path: str | Path) -> None:
    """Load ``path`` into ``model`` strictly; raise :class:`CheckpointError` naming what does not fit."""
    sd = read_state_dict(model, path)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"checkpoint {path} does not fit backbone {type(model).__name__} "
                 f"({getattr(model, 'arch', '')} {getattr(model, 'config', '')})"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches ({len(wrong)}): {_describe(wrong, 4)} (a different model size or resolution?)")
        raise CheckpointError("\n  ".join(parts))
    model.load_state_dict(sd, strict=True)
