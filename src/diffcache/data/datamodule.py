"""Data for router training and evaluation.

Every mode yields dict batches. ``noise`` yields only indices: the module draws the initial noise,
labels and cache step from a generator seeded by (seed, global step, rank), so a resumed run sees
exactly the batches an uninterrupted run would (Lightning does not fast-forward a plain DataLoader).
``synthetic`` and ``latents`` yield ``{"x0": latents, "cond": labels | {"y", "mask"}}``.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


def random_cond(backbone, batch: int, generator: torch.Generator):
    """Random conditioning of the right kind for ``backbone`` (class labels or text embeddings)."""
    if backbone.family == "pixart":
        L_, C = backbone.token_num, backbone.caption_channels
        y = torch.randn(batch, L_, C, generator=generator)
        mask = torch.ones(batch, L_, dtype=torch.long)
        return {"y": y, "mask": mask}
    return torch.randint(0, backbone.null_class, (batch,), generator=generator)  # real classes only


class IndexDataset(Dataset):
    def __init__(self, length: int):
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return {"index": torch.tensor(i)}


class SyntheticLatents(Dataset):
    """Gaussian latents with random conditioning, deterministic per index (tests, benchmarks)."""

    def __init__(self, backbone, num_samples: int, seed: int = 0):
        self.backbone, self.n, self.seed = backbone, int(num_samples), seed
        self.shape = (backbone.in_channels, backbone.input_size, backbone.input_size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        x0 = torch.randn(self.shape, generator=g)
        cond = random_cond(self.backbone, 1, g)
        cond = {k: v[0] for k, v in cond.items()} if isinstance(cond, dict) else cond[0]
        return {"x0": x0, "cond": cond}


class LatentFile(Dataset):
    """Latents from ``scripts/extract_latents.py``: {"latents", "labels"} or {"latents", "y", "mask"}."""

    def __init__(self, path: str | Path, backbone):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"data.path={path} does not exist. Create it with `python scripts/extract_latents.py "
                f"--images <ImageFolder root> --out {path}` (VAE latents x 0.18215 + labels)."
            )
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "latents" not in blob:
            raise ValueError(f"{path}: expected a dict with key 'latents' (and 'labels' or 'y'/'mask'), got "
                             f"{type(blob).__name__} with keys {list(blob)[:5] if isinstance(blob, dict) else '-'}")
        self.latents = blob["latents"].float()
        expect = (backbone.in_channels, backbone.input_size, backbone.input_size)
        if tuple(self.latents.shape[1:]) != expect:
            raise ValueError(f"{path}: latents have shape {tuple(self.latents.shape[1:])}, backbone expects {expect}")
        if backbone.family == "pixart":
            self.cond = [{"y": y, "mask": m} for y, m in zip(blob["y"], blob["mask"])]
        else:
            if "labels" not in blob:
                raise ValueError(f"{path}: class-conditional backbone needs 'labels' in the latent file")
            self.cond = blob["labels"].long()

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int):
        return {"x0": self.latents[i], "cond": self.cond[i]}


class CacheDataModule(L.LightningDataModule):
    def __init__(self, name: str, backbone, seed: int = 0, batch_size: int = 4, num_workers: int = 0,
                 shuffle: bool = True, num_batches: int = 1000, num_samples: int = 256, path: str | None = None):
        super().__init__()
        self.name, self.seed, self.batch_size, self.num_workers, self.shuffle = name, seed, batch_size, num_workers, shuffle
        if name == "noise":
            self.dataset = IndexDataset(num_batches * batch_size)
            self.shuffle = False
        elif name == "synthetic":
            self.dataset = SyntheticLatents(backbone, num_samples, seed)
        elif name == "latents":
            self.dataset = LatentFile(path, backbone)
        else:
            raise ValueError(f"unknown data mode {name!r}; choose noise | synthetic | latents")
        if len(self.dataset) < batch_size:
            raise ValueError(f"data={name} has {len(self.dataset)} samples, fewer than data.batch_size={batch_size} "
                             "(batches drop the remainder, so training would see nothing)")

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True,
                          num_workers=self.num_workers, generator=g, persistent_workers=self.num_workers > 0)


def build_datamodule(cfg, backbone, seed: int = 0) -> CacheDataModule:
    kw = {k: v for k, v in dict(cfg).items() if k != "name"}
    return CacheDataModule(cfg.name, backbone, seed=seed, **kw)
