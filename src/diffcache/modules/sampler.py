"""Sampling at scale: a fixed sample set split into shards, shards spread over ranks by Lightning.

Sample ``i`` always uses noise, conditioning and per-step solver noise seeded by ``i`` (:mod:`~diffcache.data.seeded`)
and shard ``s`` always holds samples ``s * shard_size .. (s+1) * shard_size - 1`` computed as ONE batch, so
the set (bit for bit) does not depend on the number of ranks or nodes. Each shard is written atomically
as soon as it is done (:class:`ShardWriter`, Lightning's ``BasePredictionWriter``, which the sampler brings
along through ``configure_callbacks``); a rerun skips the shards already on disk, so a killed evaluation
resumes and ends with the same set. :func:`gather` reads them back in index order.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from ..data.seeded import seeded_inputs, step_generators
from ..sampling import sample
from ..utils.atomic import write_atomically


def shard_path(root: Path, shard: int) -> Path:
    return Path(root) / f"shard_{shard:06d}.pt"


class _Shards(Dataset):
    def __init__(self, shards: list[int]):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> int:
        return self.shards[i]


class ShardWriter(BasePredictionWriter):
    """Writes each shard's prediction to ``out_dir/shard_*.pt`` as soon as its batch ends (atomic: a killed run
    never leaves a half-written shard); a shard done earlier predicts None and is left as it is."""

    def __init__(self, out_dir):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if prediction is None:
            return
        write_atomically(shard_path(self.out_dir, int(batch)), lambda tmp: torch.save(prediction, tmp))


class ShardedSampler(L.LightningModule):
    """``trainer.predict(ShardedSampler(...))`` writes ``out_dir/shard_*.pt`` ({"index", "samples", "cond"}).

    ``policy`` None samples the uncached model. ``decode`` (optional) maps samples to images in [-1, 1]
    (a VAE); images are stored as uint8 next to the raw samples when the output has 1 or 3 channels.
    """

    def __init__(self, backbone, solver, policy, out_dir, num_samples: int, shard_size: int = 16, seed: int = 0,
                 guidance: float | None = None, decode=None, progress: bool = False, inputs=None):
        super().__init__()
        if int(num_samples) < 1 or int(shard_size) < 1:
            raise ValueError(f"eval.num_samples and eval.batch_size must be >= 1, got {num_samples}, {shard_size}")
        object.__setattr__(self, "backbone", backbone)  # outside the module tree, as in router training
        self.policy = policy
        self.solver, self.out_dir = solver, Path(out_dir)
        self.num_samples, self.shard_size, self.seed = int(num_samples), int(shard_size), int(seed)
        self.guidance, self.decode, self.progress = guidance, decode, progress
        # inputs(indices, device) -> (noise, cond); default: seeded per index with random conditioning
        self.inputs = inputs or (lambda idx, device: seeded_inputs(backbone, idx, self.seed, device))

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def missing(self) -> list[int]:
        return [s for s in range(self.num_shards) if not shard_path(self.out_dir, s).is_file()]

    def predict_dataloader(self):
        return DataLoader(_Shards(self.missing() or [0]), batch_size=1, shuffle=False, collate_fn=lambda b: b[0])

    def configure_callbacks(self):
        return [ShardWriter(self.out_dir)]

    def on_predict_start(self) -> None:
        self.backbone.to(self.device)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @torch.no_grad()
    def predict_step(self, shard: int, batch_idx: int = 0):
        if shard_path(self.out_dir, shard).is_file():  # done by an earlier run (or by another rank's padded duplicate)
            return None
        idx = list(range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples)))
        noise, cond = self.inputs(idx, self.device)
        x = sample(self.backbone, self.solver, self.policy, noise, cond, self.guidance,
                   generator=step_generators(idx, self.seed),
                   progress=self.progress).float().cpu()
        blob = {"index": torch.tensor(idx), "samples": x, "cond": _cpu(cond)}
        images = self.decode(x.to(self.device)).cpu() if self.decode is not None else x
        if images.shape[1] in (1, 3):
            blob["images"] = (127.5 * images.clamp(-1, 1) + 128.0).clamp(0, 255).to(torch.uint8)
        return blob  # ShardWriter saves it


def _cpu(cond):
    return {k: v.cpu() for k, v in cond.items()} if isinstance(cond, dict) else cond.cpu()


def gather(out_dir, num_samples: int | None = None) -> dict[str, torch.Tensor]:
    """All shards of ``out_dir`` in index order: {"index", "samples", ("images"), "cond" (class labels)}."""
    files = sorted(Path(out_dir).glob("shard_*.pt"))
    if not files:
        raise FileNotFoundError(f"no sample shards in {out_dir}")
    parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    out = {k: torch.cat([p[k] for p in parts]) for k in ("index", "samples") + (("images",) if "images" in parts[0] else ())}
    if not isinstance(parts[0]["cond"], dict):
        out["cond"] = torch.cat([p["cond"] for p in parts])
    order = torch.argsort(out["index"])
    out = {k: v[order] for k, v in out.items()}
    if num_samples is not None and len(out["index"]) != num_samples:
        raise ValueError(f"{out_dir} holds {len(out['index'])} samples, expected {num_samples}: the run is "
                         f"incomplete; rerun the same command to finish it")
    return out


def set_hash(samples: torch.Tensor) -> str:
    """sha256 of a sample set's bytes (equal sets, equal hashes)."""
    return hashlib.sha256(samples.contiguous().numpy().tobytes()).hexdigest()
