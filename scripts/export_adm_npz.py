"""Write sample shards (from evaluate.py) in the ADM evaluator's format: ``arr_0`` uint8 (N, H, W, C), plus
``labels`` for class-conditional runs. Then: ``python evaluator.py VIRTUAL_imagenet256_labeled.npz out.npz``
(openai/guided-diffusion, evaluations/) gives paper-comparable FID / sFID / IS / precision / recall.

    python scripts/export_adm_npz.py logs/evaluate/runs/<run>/<time>/shards/cached out.npz
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from diffcache.modules.sampler import gather


def export(shards: str, out: str) -> int:
    data = gather(shards)
    if "images" not in data:
        raise ValueError(f"{shards} holds {data['samples'].shape[1]}-channel latents, not images: evaluate with a "
                         f"decoder (backbone.vae=/path/to/AutoencoderKL) so the shards carry images")
    arrays = {"arr_0": data["images"].permute(0, 2, 3, 1).contiguous().numpy()}
    if "cond" in data:
        arrays["labels"] = data["cond"].numpy()
    np.savez(out, **arrays)
    return int(arrays["arr_0"].shape[0])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards")
    p.add_argument("out")
    a = p.parse_args(argv)
    try:
        n = export(a.shards, a.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {n} images to {a.out}")


if __name__ == "__main__":
    main()
