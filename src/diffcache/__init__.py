"""diffcache: learned and token-wise feature caching for diffusion transformers."""

__version__ = "0.1.0"
