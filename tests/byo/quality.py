"""An injected quality extractor for tests: a small fixed random conv net (features + 10 logits) and
reference statistics from seeded random images, so FID / IS run with no Inception weights."""
import torch
from torch import nn

from diffcache.metrics.generative import FeaturesAndLogits, QualityMetrics
from diffcache.metrics.reference import reference_from_images


def tiny_quality(channels: int = 1, size: int = 8, name: str = "tiny", seed: int = 0) -> QualityMetrics:
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2))
    ext = FeaturesAndLogits(body, nn.Linear(32, 10), input_shape=(channels, size, size))
    g = torch.Generator().manual_seed(seed)
    real = torch.randint(0, 256, (64, channels, size, size), generator=g, dtype=torch.uint8)
    return QualityMetrics(ext, reference_from_images(real, ext), name=name, is_splits=1)
