"""Sample quality: FID / IS (torchmetrics) with an injectable extractor, precision/recall, teacher PSNR/MSE.

One ``QualityMetrics`` module takes generated images in [-1, 1], quantises them to uint8 exactly as DiT's
``sample_ddp.py`` saves them (``clamp(127.5 x + 128, 0, 255)`` truncated), runs the extractor ONCE per
batch and feeds its outputs to torchmetrics' ``FrechetInceptionDistance`` (features) and
``InceptionScore`` (logits), both given a pass-through ``feature`` module. Every state is a torchmetrics
state, so ``compute()`` syncs across DDP ranks (sums for FID/PSNR, gathers for IS/precision-recall).

Extractor contract: ``forward(uint8 (N, C, H, W)) -> features`` or ``(features, logits)``, with
``num_features`` (and ``num_logits`` for IS) attributes. ``InceptionV3`` (the standard one) fulfils it;
``FeaturesAndLogits(body, head)`` adapts any classifier. Metric keys carry the extractor: ``fid``/``is``
only for the standard Inception, ``<name>_fid``/``<name>_is`` (e.g. ``mnist_fid``) for anything else.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from .fidelity import TeacherFidelity
from .frechet import frechet_distance, stats_from_sums
from .inception import InceptionV3
from .manifold import ManifoldPrecisionRecall
from .reference import ReferenceStats, load_reference


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255], as DiT's sampler writes PNGs/npz; uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [-1, 1] or uint8, got {images.dtype}")
    return (127.5 * images.detach().float() + 128.0).clamp(0, 255).to(torch.uint8)


def _signed(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images


class FeaturesAndLogits(nn.Module):
    """Adapts a classifier ``head(body(x))`` to the extractor contract: features = flattened body output.

    ``input``: what ``body`` expects, made from the uint8 images: ``signed`` ([-1, 1] float), ``unit``
    ([0, 1]) or ``uint8``. ``input_shape`` (C, H, W) probes the sizes once. Always in eval mode.
    """

    def __init__(self, body: nn.Module, head: nn.Module | None, input_shape: tuple[int, int, int],
                 input: str = "signed"):
        super().__init__()
        if input not in ("signed", "unit", "uint8"):
            raise ValueError(f"input must be signed | unit | uint8, got {input!r}")
        self.body, self.head, self.input = body, head, input
        self.requires_grad_(False)
        self.eval()
        dev = next((t.device for t in [*self.parameters(), *self.buffers()]), torch.device("cpu"))
        with torch.no_grad():
            out = self(torch.zeros(2, *input_shape, dtype=torch.uint8, device=dev))
        self.num_features = int(out[0].shape[1])
        self.num_logits = int(out[1].shape[1]) if head is not None else None

    def train(self, mode: bool = True) -> "FeaturesAndLogits":
        return super().train(False)

    def forward(self, x: torch.Tensor):
        if self.input != "uint8":
            x = x.float() / 255.0
            x = x * 2 - 1 if self.input == "signed" else x
        f = self.body(x).flatten(1)
        return f if self.head is None else (f, self.head(f))


class _PassThrough(nn.Module):
    """The ``feature`` module handed to torchmetrics: features are computed once, outside."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FrechetDistance(FrechetInceptionDistance):
    """torchmetrics' FID on precomputed features; against fixed reference (mu, sigma) when given.

    States (sum f, sum f f^T, N; float64, reduced by sum) are torchmetrics'; the distance is our
    float64 symmetric-eigenvalue ``frechet_distance``, against the reference or the real-side states.
    """

    def __init__(self, num_features: int, reference: ReferenceStats | None = None, **kwargs):
        super().__init__(feature=_PassThrough(num_features), reset_real_features=False, normalize=False, **kwargs)
        self.has_reference = reference is not None
        if reference is not None:
            if reference.mu.shape != (num_features,):
                raise ValueError(f"reference statistics {reference.source} have dimension {reference.mu.shape[0]}, "
                                 f"the extractor gives {num_features}: use the extractor they were computed with")
            # Plain CPU attributes, not buffers: DDP would broadcast buffers on every forward.
            self.ref_mu, self.ref_sigma = reference.mu.double().cpu(), reference.sigma.double().cpu()

    def compute(self) -> torch.Tensor:
        fake = stats_from_sums(self.fake_features_sum, self.fake_features_cov_sum, int(self.fake_features_num_samples))
        if self.has_reference:
            real = (self.ref_mu, self.ref_sigma)
        else:
            real = stats_from_sums(self.real_features_sum, self.real_features_cov_sum,
                                   int(self.real_features_num_samples))
        return torch.tensor(frechet_distance(*real, *fake), dtype=torch.float64)


class QualityMetrics(nn.Module):
    """FID / IS / precision-recall of generated images, and PSNR/MSE to the teacher on the same noise.

    ``update(images, teacher=None)`` with float images in [-1, 1] (or uint8); ``compute() -> dict[str,
    float]`` (synced over DDP ranks, identical on every rank; every rank must have called ``update``, with
    a teacher on all or none, or the collectives mismatch); ``reset()``. The extractor is frozen, loaded
    from its own file and kept out of ``state_dict()``/``parameters()``/``buffers()`` (checkpoints,
    optimisers and DDP's buffer broadcast never see it), but moves with ``.to(device)``.
    """

    def __init__(self, extractor: nn.Module, reference: ReferenceStats | None = None, name: str | None = None,
                 inception_score: bool = True, is_splits: int = 10, precision_recall: bool = True, k: int = 3,
                 teacher_fidelity: bool = True, is_seed: int = 0):
        super().__init__()
        if not isinstance(getattr(extractor, "num_features", None), int):
            raise ValueError(f"extractor {type(extractor).__name__} needs an int num_features attribute (and "
                             f"num_logits for IS): wrap it in FeaturesAndLogits(body, head, input_shape)")
        standard = isinstance(extractor, InceptionV3)
        if name is None:
            if not standard:
                raise ValueError("name the extractor (e.g. name='mnist' -> keys mnist_fid, mnist_is): plain "
                                 "'fid'/'is' are kept for the standard Inception")
            name = "inception"
        if name == "inception" and not standard:
            raise ValueError("name='inception' is reserved for diffcache.metrics.inception.InceptionV3")
        self.prefix = "" if standard else f"{name}_"
        object.__setattr__(self, "extractor", extractor.eval().requires_grad_(False))  # not a submodule
        self.fid = FrechetDistance(extractor.num_features, reference) if reference is not None else None
        num_logits = getattr(extractor, "num_logits", None)
        if inception_score and not num_logits:
            raise ValueError(f"inception_score=True needs an extractor with logits (num_logits); "
                             f"{type(extractor).__name__} has none: pass inception_score=False")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.inception_score = InceptionScore(feature=nn.Identity(), splits=is_splits) if inception_score else None
        self.is_seed = int(is_seed)
        use_pr = precision_recall and reference is not None and reference.features is not None
        if precision_recall and reference is not None and reference.features is None:
            warnings.warn(f"reference {reference.source} has only mu/sigma: precision/recall need its images "
                          f"(arr_0 or a folder), skipped")
        self.precision_recall = ManifoldPrecisionRecall(reference.features, k) if use_pr else None
        self.teacher_fidelity = TeacherFidelity() if teacher_fidelity else None

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.extractor._apply(fn, *args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return next((t.device for t in [*self.extractor.parameters(), *self.extractor.buffers()]),
                    torch.device("cpu"))

    @torch.no_grad()
    def update(self, images: torch.Tensor, teacher: torch.Tensor | None = None) -> None:
        x = to_uint8(images).to(self.device)
        with torch.autocast(x.device.type, enabled=False):
            out = self.extractor(x)
        feats, logits = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        feats = feats.float()
        if self.fid is not None:
            self.fid.update(feats, real=False)
        if self.inception_score is not None:
            self.inception_score.update(logits.double())
        if self.precision_recall is not None:
            self.precision_recall.update(feats)
        if teacher is not None and self.teacher_fidelity is not None:
            self.teacher_fidelity.update(_signed(images).to(x.device), _signed(teacher).to(x.device))

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        p = self.prefix
        if self.fid is not None and self.fid.update_called:
            out[f"{p}fid"] = float(self.fid.compute())
        if self.inception_score is not None and self.inception_score.update_called:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                torch.manual_seed(self.is_seed)  # IS shuffles before splitting: fixed, training RNG untouched
                warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # std of one split
                mean, std = self.inception_score.compute()
            out[f"{p}is"] = float(mean)
            if self.inception_score.splits > 1:
                out[f"{p}is_std"] = float(std)
        if self.precision_recall is not None and self.precision_recall.update_called:
            out.update({f"{p}{k}": float(v) for k, v in self.precision_recall.compute().items()})
        if self.teacher_fidelity is not None and self.teacher_fidelity.update_called:
            out.update({k: float(v) for k, v in self.teacher_fidelity.compute().items()})
        return out

    def reset(self) -> None:
        for m in (self.fid, self.inception_score, self.precision_recall, self.teacher_fidelity):
            if m is not None:
                m.reset()


def build_quality_metrics(extractor: str | nn.Module = "inception", reference: str | os.PathLike | None = None,
                          inception_weights: str | os.PathLike | None = None, antialias: bool = False,
                          download: bool = False, name: str | None = None, cache_dir: str | os.PathLike | None = None,
                          channels: int = 3, reference_batch_size: int = 100, device: str | torch.device = "cpu",
                          **kwargs) -> QualityMetrics:
    """Config entry point: ``extractor="inception"`` (local weights; ``antialias=False`` = TF-exact resize,
    ADM-comparable) or an ``nn.Module``; ``reference`` = ADM ``.npz`` or image folder (cached statistics)."""
    if isinstance(extractor, str):
        if extractor != "inception":
            raise ValueError(f"extractor must be 'inception' or an nn.Module, got {extractor!r}")
        extractor = InceptionV3(inception_weights, antialias=antialias, download=download)
    extractor = extractor.to(device)
    ref = None
    if reference is not None:
        ref = load_reference(reference, extractor, cache_dir=cache_dir, batch_size=reference_batch_size,
                             channels=channels, need_features=kwargs.get("precision_recall", True))
    return QualityMetrics(extractor, ref, name=name, **kwargs).to(device)
