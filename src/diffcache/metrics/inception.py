"""The standard FID/IS Inception-v3 (torch-fidelity's port of the 2015-12-05 TF graph), from a LOCAL file.

torch-fidelity (and torchmetrics, which wraps it) downloads ``weights-inception-2015-12-05-6726825d.pth``
into ``torch.hub.get_dir()/checkpoints`` on first use. Here nothing downloads unless asked
(``download=True``): the weights come from an explicit path, else from that hub cache directory, and a
missing file is one FileNotFoundError saying where to put it.

Resize to 299x299: ``antialias=False`` (default) is torch-fidelity's TF1-exact bilinear resize, the one
the ADM evaluator's TF graph applies, so numbers are comparable with ADM / DiT / L2C tables.
``antialias=True`` is torchmetrics >= 1.9's default (torch bilinear with antialiasing); its docstring
says it differs from the original Inception v3, so it is opt-in here.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"
FEATURE_DIM, NUM_LOGITS = 2048, 1008


def default_weights_path() -> Path:
    """Where torch-fidelity's own download would put the weights: ``$TORCH_HOME/hub/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def find_weights(path: str | os.PathLike | None = None, download: bool = False) -> Path:
    """Resolve the Inception weights file: ``path`` (a file, or a folder holding ``WEIGHTS_NAME``), else the
    torch hub cache. Downloads (to that same place) only when ``download`` is true."""
    if path is not None:
        p = Path(path).expanduser()
        p = p / WEIGHTS_NAME if p.is_dir() else p
    else:
        p = default_weights_path()
    if p.is_file():
        return p
    if download:
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, str(p))
        return p
    raise FileNotFoundError(
        f"Inception weights not found at {p}: download {WEIGHTS_URL} and put it at {default_weights_path()} "
        f"(or give metrics.inception_weights=/path/to/{WEIGHTS_NAME}; metrics.download=true fetches it)")


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class InceptionV3(nn.Module):
    """uint8 (N, 3|1, H, W) images -> (pool_3 features (N, 2048), unbiased logits (N, 1008)), always in eval.

    The logits are ``pool_3 @ W`` without the bias, as in the original Inception Score code and
    torch-fidelity's ``logits_unbiased``. Grayscale inputs are repeated to 3 channels.
    """

    num_features = FEATURE_DIM
    num_logits = NUM_LOGITS

    def __init__(self, weights: str | os.PathLike | None = None, antialias: bool = False, download: bool = False):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = find_weights(weights, download)
        self.antialias = bool(antialias)
        # torchmetrics' subclass of torch-fidelity's FeatureExtractorInceptionV3 carries the resize switch;
        # with antialias=False it runs torch-fidelity's TF1-exact interpolation.
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(path), antialias=self.antialias)
        self.net.requires_grad_(False)
        self.identity = (f"torch-fidelity-inception-v3:{_sha256(path)[:16]}:"
                         f"{'antialias' if self.antialias else 'tf1-bilinear'}")

    def train(self, mode: bool = True) -> "InceptionV3":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"InceptionV3 expects uint8 (N, 3 or 1, H, W) images, got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        feats, logits = self.net._torch_fidelity_forward(x)
        return feats.reshape(x.shape[0], -1), logits.reshape(x.shape[0], -1)
