"""Convert our DiT / PixArt checkpoint into a diffusers model directory (the inverse of the loader's mapping).

    python scripts/convert_checkpoint.py --arch DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --out dit-xl-2-diffusers
    python scripts/convert_checkpoint.py --arch tiny_dit --out /tmp/tiny --check   # random weights, compared

The directory (``config.json`` + ``diffusion_pytorch_model.safetensors``) loads with
``DiTTransformer2DModel.from_pretrained(dir)`` (or ``PixArtTransformer2DModel``) and with
``load_backbone(arch, ckpt=dir)``. ``--check`` reloads it both ways and prints the largest output
differences. diffusers' DiT embeds timesteps with a frequency shift of 1 where the official DiT uses 0,
so official weights run in diffusers differ by that shift (see ``diffcache.backbones.export``).
"""
from __future__ import annotations

import argparse
import json

import torch

from diffcache.backbones import load_backbone
from diffcache.backbones.export import save_diffusers


def _inputs(model, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.tensor([10.0, 700.0])[:batch]
    if model.family == "pixart":
        cond = {"y": torch.randn(batch, model.token_num, model.caption_channels, generator=g),
                "mask": torch.ones(batch, model.token_num, dtype=torch.long)}
    else:
        cond = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, cond


def check(arch: str, model, out) -> dict:
    """Largest |difference| of ours (diffusers numerics) vs ours reloaded and vs diffusers on the directory."""
    import diffusers

    x, t, cond = _inputs(model)
    back = load_backbone(arch, ckpt=str(out))
    if model.family == "dit":
        model.use_diffusers_numerics(json.loads((out / "config.json").read_text()))
        ref = diffusers.DiTTransformer2DModel.from_pretrained(str(out)).eval()
        theirs = lambda: ref(x, timestep=t, class_labels=cond).sample  # noqa: E731
    else:
        ref = diffusers.PixArtTransformer2DModel.from_pretrained(str(out)).eval()
        theirs = lambda: ref(x, encoder_hidden_states=cond["y"], timestep=t,  # noqa: E731
                             encoder_attention_mask=cond["mask"],
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    with torch.no_grad():
        ours = model(x, t, cond)
        return {"max_abs_diff_reloaded": float((back(x, t, cond) - ours).abs().max()),
                "max_abs_diff_diffusers": float((theirs() - ours).abs().max()),
                "max_abs_output": float(ours.abs().max())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, help="our variant name, e.g. DiT-XL/2, PixArt-XL/2, tiny_dit")
    p.add_argument("--ckpt", default=None, help="our / official checkpoint (omit only with --random-init or tiny)")
    p.add_argument("--out", required=True, help="the diffusers model directory to write")
    p.add_argument("--random-init", action="store_true", help="export random weights (tests, benchmarks)")
    p.add_argument("--check", action="store_true", help="reload with diffusers and ours and print the differences")
    args = p.parse_args(argv)
    model = load_backbone(args.arch, ckpt=args.ckpt, random_init=args.random_init)
    out = save_diffusers(model, args.out)
    print(f"wrote {out}")
    if args.check:
        print(json.dumps(check(args.arch, model, out)))


if __name__ == "__main__":
    main()
