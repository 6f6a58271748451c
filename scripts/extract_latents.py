"""Encode an ImageFolder into VAE latents for faithful L2C router training (``data=latents``).

As L2C does: ADM centre crop to the image size, random horizontal flip, normalise to [-1, 1],
``vae.encode(x).latent_dist.sample() * 0.18215`` (a sample, not the mean), real class labels.
The VAE is a local diffusers directory (e.g. a copy of sd-vae-ft-ema); nothing is downloaded.
Interrupt-safe: shards already written are skipped on a rerun; the final file joins them.

    python scripts/extract_latents.py --images /data/imagenet/train --vae /ckpt/sd-vae-ft-ema \
        --out data/in1k_256_latents.pt --image-size 256 --limit 50000
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm


def center_crop_arr(img: Image.Image, size: int) -> Image.Image:
    """ADM centre crop: halve with BOX while large, resize with BICUBIC, crop the centre."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[y:y + size, x:x + size])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="ImageFolder root (class sub-folders)")
    ap.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from diffusers.models import AutoencoderKL
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    for p, what in [(args.images, "--images"), (args.vae, "--vae")]:
        if not Path(p).exists():
            raise SystemExit(f"{what} {p} does not exist")
    tf = transforms.Compose([transforms.Lambda(lambda im: center_crop_arr(im, args.image_size)),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.5] * 3)])
    ds = ImageFolder(args.images, transform=tf)
    n = min(len(ds), args.limit or len(ds))
    vae = AutoencoderKL.from_pretrained(args.vae).to(args.device).eval()
    out = Path(args.out)
    shard_dir = out.with_suffix(".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    order = torch.randperm(len(ds))[:n]
    for s0 in tqdm(range(0, n, args.shard_size), desc="shards"):
        path = shard_dir / f"{s0:09d}.pt"
        if path.exists():
            continue
        idx = order[s0:s0 + args.shard_size].tolist()
        lat, lab = [], []
        for b0 in tqdm(range(0, len(idx), args.batch_size), leave=False, desc="encode"):
            items = [ds[i] for i in idx[b0:b0 + args.batch_size]]
            x = torch.stack([im for im, _ in items]).to(args.device)
            with torch.no_grad():
                lat.append((vae.encode(x).latent_dist.sample() * 0.18215).cpu())
            lab.append(torch.tensor([y for _, y in items]))
        tmp = path.with_suffix(".tmp")
        torch.save({"latents": torch.cat(lat), "labels": torch.cat(lab)}, tmp)
        tmp.rename(path)
    shards = [torch.load(p, weights_only=True) for p in sorted(shard_dir.glob("*.pt"))]
    torch.save({"latents": torch.cat([s["latents"] for s in shards]), "labels": torch.cat([s["labels"] for s in shards]),
                "classes": ds.classes}, out)
    print(f"wrote {out}: {n} latents")


if __name__ == "__main__":
    main()
