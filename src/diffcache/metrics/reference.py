"""Reference statistics for FID (and real features for precision/recall), computed once, cached on disk.

Sources: an ADM-style ``.npz`` (``mu``/``sigma`` and/or ``arr_0`` uint8 NHWC images, as in OpenAI's
reference batches) or a folder of images. As in the ADM evaluator, stored ``mu``/``sigma`` are used for
FID (only with the TF-exact Inception they were made with) and features of ``arr_0`` serve precision /
recall. Anything computed is cached under ``cache_dir`` in a file named by the sha256 of the source's
bytes (every image file's relative name and bytes for a folder) and the extractor's identity, so a
changed file or a different extractor (or resize mode) misses the cache.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..utils.atomic import write_atomically
from .frechet import feature_stats

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
TF_INCEPTION_SUFFIX = ":tf1-bilinear"  # the identity of the extractor ADM's stored mu/sigma match


@dataclass
class ReferenceStats:
    mu: torch.Tensor  # (D,) float64
    sigma: torch.Tensor  # (D, D) float64
    features: torch.Tensor | None = None  # (N, D) float32, for precision/recall; None if only mu/sigma exist
    source: str = ""
    cache_file: str | None = None  # where computed statistics were cached (None: taken from the .npz as is)


def default_cache_dir() -> Path:
    root = os.environ.get("DIFFCACHE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "diffcache"
    return Path(root).expanduser() / "reference_stats"


def extractor_identity(extractor: nn.Module) -> str:
    """``extractor.identity`` if set (InceptionV3: weights hash + resize mode), else class + weights hash."""
    ident = getattr(extractor, "identity", None)
    if ident:
        return str(ident)
    h = hashlib.sha256(type(extractor).__qualname__.encode())
    for k, v in sorted(extractor.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(extractor).__qualname__}:{h.hexdigest()[:16]}"


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under reference folder {folder}")
    return files


def content_hash(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else _image_files(path)
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


@torch.no_grad()
def extract_features(batches: Iterable[torch.Tensor], extractor: nn.Module) -> torch.Tensor:
    """Run uint8 (N, C, H, W) batches through ``extractor`` (fp32, no autocast); the features, on CPU."""
    dev = next((t.device for t in [*extractor.parameters(), *extractor.buffers()]), torch.device("cpu"))
    out = []
    for x in batches:
        with torch.autocast(dev.type, enabled=False):
            y = extractor(x.to(dev))
        out.append((y[0] if isinstance(y, (tuple, list)) else y).float().cpu())
    if not out:
        raise ValueError("no reference images to extract features from")
    return torch.cat(out)


def reference_from_images(images: torch.Tensor | Iterable[torch.Tensor], extractor: nn.Module,
                          batch_size: int = 100, source: str = "images") -> ReferenceStats:
    """Reference statistics from uint8 (N, C, H, W) images (a tensor or an iterable of batches)."""
    if torch.is_tensor(images):
        images = images.split(batch_size)
    feats = extract_features(images, extractor)
    mu, sigma = feature_stats(feats)
    return ReferenceStats(mu, sigma, feats, source)


def _npz_batches(arr: np.ndarray, batch_size: int, channels: int):
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"arr_0 must be uint8 (N, H, W, C) images, got {arr.dtype} {arr.shape}")
    for i in range(0, arr.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(arr[i:i + batch_size])).permute(0, 3, 1, 2)
        yield x[:, :1] if channels == 1 and x.shape[1] == 3 else x


def _folder_batches(files: list[Path], batch_size: int, channels: int):
    from PIL import Image

    size = None
    for i in range(0, len(files), batch_size):
        arrs = []
        for f in files[i:i + batch_size]:
            with Image.open(f) as im:
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"))
            if size is None:
                size = a.shape
            elif a.shape != size:
                raise ValueError(f"reference image {f} is {a.shape[:2]}, the first one is {size[:2]}: "
                                 f"resize them alike")
            arrs.append(a.reshape(a.shape[0], a.shape[1], -1))
        yield torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


def load_reference(path: str | os.PathLike, extractor: nn.Module, cache_dir: str | os.PathLike | None = None,
                   batch_size: int = 100, channels: int = 3, need_features: bool = True) -> ReferenceStats:
    """Reference statistics for ``extractor`` from an ADM ``.npz`` or a folder of images (cached on disk)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"reference not found: {p} (give metrics.reference=an ADM .npz with mu/sigma or "
                                f"arr_0 images, or a folder of images)")
    if p.is_file() and p.suffix != ".npz":
        raise ValueError(f"reference file {p} is not an .npz; give an ADM .npz or a folder of images")
    ident = extractor_identity(extractor)
    stored, has_images = None, p.is_dir()
    if p.is_file():
        with np.load(p, allow_pickle=False) as z:
            has_images = "arr_0" in z.files
            if {"mu", "sigma"} <= set(z.files) and ident.endswith(TF_INCEPTION_SUFFIX):
                stored = torch.from_numpy(z["mu"]).double(), torch.from_numpy(z["sigma"]).double()
    if stored is not None and not (need_features and has_images):
        return ReferenceStats(*stored, None, str(p))
    if not has_images:
        raise ValueError(f"reference {p} has no arr_0 images, and its mu/sigma (if any: TF-Inception pool_3) do "
                         f"not fit extractor {ident}: give images (arr_0 or a folder) for this extractor")
    key = hashlib.sha256(f"{content_hash(p)}|{ident}|c{channels}".encode()).hexdigest()[:32]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cache / f"{key}.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as c:
            feats = torch.from_numpy(c["features"])
            mu, sigma = torch.from_numpy(c["mu"]), torch.from_numpy(c["sigma"])
    else:
        if p.is_dir():
            feats = extract_features(_folder_batches(_image_files(p), batch_size, channels), extractor)
        else:
            with np.load(p, allow_pickle=False) as z:
                feats = extract_features(_npz_batches(z["arr_0"], batch_size, channels), extractor)
        mu, sigma = feature_stats(feats)
        write_atomically(cached, lambda tmp: np.savez(tmp, mu=mu.numpy(), sigma=sigma.numpy(), features=feats.numpy(),
                                                      extractor=np.array(ident), source=np.array(str(p))), ".npz")
    if stored is not None:  # as ADM: FID against the stored statistics, precision/recall on arr_0's features
        mu, sigma = stored
    return ReferenceStats(mu.double(), sigma.double(), feats.float(), str(p), str(cached))
