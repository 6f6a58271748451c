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

from .mnist import load_mnist
from .seeded import sample_generator


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
        g = sample_generator(i, self.seed)
        x0 = torch.randn(self.shape, generator=g)
        cond = self.backbone.random_cond(1, g)
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
        if backbone.text_conditioned:
            self.cond = [{"y": y, "mask": m} for y, m in zip(blob["y"], blob["mask"])]
        else:
            if "labels" not in blob:
                raise ValueError(f"{path}: class-conditional backbone needs 'labels' in the latent file")
            self.cond = blob["labels"].long()
            n = int(backbone.null_class)  # real classes are 0 .. null_class - 1
            if len(self.cond) != len(self.latents):
                raise ValueError(f"{path}: {len(self.latents)} latents but {len(self.cond)} labels")
            if len(self.cond) and (int(self.cond.min()) < 0 or int(self.cond.max()) >= n):
                raise ValueError(f"{path}: labels span {int(self.cond.min())}..{int(self.cond.max())}, but the backbone "
                                 f"has classes 0..{n - 1}: the latent file was made for another dataset or backbone")

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int):
        return {"x0": self.latents[i], "cond": self.cond[i]}


class RouterData(L.LightningDataModule):
    """Batches for router training; the dataset is built once the backbone is known (:meth:`bind`).

    Subclasses (one per ``data=`` option, picked by the config's ``_target_``) implement :meth:`build`.
    """

    name = "data"

    def __init__(self, batch_size: int = 4, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                 val_samples: int = 0, val_batch_size: int | None = None):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.num_workers, self.shuffle, self.seed = int(batch_size), int(num_workers), shuffle, seed
        self.val_samples, self.val_batch_size = int(val_samples), int(val_batch_size or batch_size)
        self.dataset: Dataset | None = None

    def build(self, backbone) -> Dataset:
        raise NotImplementedError

    def bind(self, backbone) -> "RouterData":
        self.dataset = self.build(backbone)
        if len(self.dataset) < self.batch_size:
            raise ValueError(f"data={self.name} has {len(self.dataset)} samples, fewer than data.batch_size="
                             f"{self.batch_size} (batches drop the remainder, so training would see nothing)")
        return self

    def train_dataloader(self):
        if self.dataset is None:
            raise RuntimeError(f"{type(self).__name__}.bind(backbone) must run before training")
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True,
                          num_workers=self.num_workers, generator=g, persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        """Indices 0 .. val_samples-1 of the fixed validation set (noise and labels seeded per index)."""
        return DataLoader(IndexDataset(self.val_samples), batch_size=self.val_batch_size, shuffle=False)


class NoiseData(RouterData):
    """Image-free training: indices only; the module draws noise and labels from its seeded generator."""

    name = "noise"

    def __init__(self, num_batches: int = 1000, **kw):
        super().__init__(**{**kw, "shuffle": False})
        self.num_batches = int(num_batches)

    def build(self, backbone) -> Dataset:
        return IndexDataset(self.num_batches * self.batch_size)


class SyntheticData(RouterData):
    """Gaussian latents with random conditioning (tests, benchmarks)."""

    name = "synthetic"

    def __init__(self, num_samples: int = 256, **kw):
        super().__init__(**kw)
        self.num_samples = int(num_samples)

    def build(self, backbone) -> Dataset:
        return SyntheticLatents(backbone, self.num_samples, self.seed)


class LatentData(RouterData):
    """Faithful L2C: real VAE latents + labels from ``scripts/extract_latents.py``."""

    name = "latents"

    def __init__(self, path: str | None = None, **kw):
        super().__init__(**kw)
        if not path:
            raise ValueError("data=latents needs data.path=/path/to/latents.pt (made by scripts/extract_latents.py)")
        self.path = path

    def build(self, backbone) -> Dataset:
        return LatentFile(self.path, backbone)


class MNISTImages(Dataset):
    """The 4,000 train digits of the fixed split as ``{"x0": (1, 32, 32) in [-1, 1], "cond": label}``."""

    def __init__(self, backbone, split: str = "train"):
        expect = (backbone.in_channels, backbone.input_size, backbone.input_size)
        if expect != (1, 32, 32) or backbone.text_conditioned:
            raise ValueError(f"data=mnist holds 1x32x32 class-labelled digits, backbone "
                             f"{type(backbone).__name__} takes {expect}: use backbone=mnist_dit | mnist_uvit "
                             f"(or data=noise / data=latents for other backbones)")
        self.x, self.y = load_mnist(split)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"x0": self.x[i], "cond": self.y[i]}


class MNISTData(RouterData):
    """Faithful L2C on the offline demo: forward-diffused real MNIST digits (the pixels are the "latents")."""

    name = "mnist"

    def __init__(self, split: str = "train", **kw):
        super().__init__(**kw)
        self.split = split

    def build(self, backbone) -> Dataset:
        return MNISTImages(backbone, self.split)
