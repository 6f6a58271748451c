"""diffcache: learned and token-wise feature caching for diffusion transformers."""

__version__ = "0.1.0"

from .utils.resolvers import register as _register_resolvers  # noqa: E402

_register_resolvers()
