"""The backbone contract: every residual branch runs through a cache site.

A block writes ``x = x + gate * self.site(layer, "mlp", self.mlp, h)``. With no policy attached the
site is a plain call, so outputs are bit-identical to the uncached model. The policy is attached with
``object.__setattr__`` so it is *not* a registered submodule: backbone ``state_dict`` keys stay those
of the official checkpoints, and backbone parameters never mix with trainable policy parameters.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

SITE_KINDS = ("attn", "xattn", "mlp")


class CachedBackbone(nn.Module):
    """Base class for DiT, U-ViT and PixArt.

    Subclasses set ``family`` ("dit" | "uvit" | "pixart"), ``depth`` (number of cacheable layers),
    ``site_kinds`` (per-layer branch kinds, in execution order), ``in_channels``, ``out_channels``,
    ``learn_sigma``, ``input_size`` (latent side), ``patch_size``, ``num_prefix_tokens`` (tokens in
    front of the image tokens that a token cache must never drop: U-ViT's time/label tokens).
    """

    family: str = ""
    site_kinds: tuple[str, ...] = ("attn", "mlp")
    checkpoint_name: str = "backbone"
    checkpoint_keys: tuple[str, ...] = ("state_dict",)  # wrappers an official file may put the weights under
    num_prefix_tokens: int = 0
    learn_sigma: bool = False

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_policy", None)

    # ---------------------------------------------------------------- policy hook
    @property
    def policy(self):
        return self._policy

    def set_policy(self, policy) -> None:
        object.__setattr__(self, "_policy", policy)

    def site(self, layer: int, kind: str, module: Callable[..., torch.Tensor], h: torch.Tensor, *args: Any) -> torch.Tensor:
        """Run branch ``kind`` of ``layer`` on token input ``h`` (B, N, C); returns the *ungated* output."""
        policy = self._policy
        if policy is None:
            return module(h, *args)
        return policy.site(layer, kind, module, h, *args)

    @classmethod
    def unwrap_checkpoint(cls, obj: Any) -> dict[str, torch.Tensor]:
        """The weights inside an official file: the first of ``checkpoint_keys`` present, else ``obj`` itself."""
        for key in cls.checkpoint_keys:
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            wrapped = " or ".join(f"{{'{k}': ...}}" for k in cls.checkpoint_keys)
            raise ValueError(f"not a {cls.checkpoint_name} checkpoint (expected a state dict of tensors, or {wrapped}), "
                             f"got {keys}")
        return dict(obj)

    # ---------------------------------------------------------------- introspection
    def cache_sites(self) -> list[tuple[int, str]]:
        """Every ``(layer, kind)`` a forward visits, in execution order."""
        return [(layer, kind) for layer in range(self.depth) for kind in self.site_kinds]

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image-token grid (for spatial token scores)."""
        side = self.input_size // self.patch_size
        return side, side

    @property
    def num_tokens(self) -> int:
        r, c = self.token_grid
        return r * c

    # ---------------------------------------------------------------- conditioning
    def null_cond(self, cond):
        """The unconditional input matching ``cond`` (the null class, or PixArt's null caption)."""
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        """Fail with a clear message on a latent of the wrong shape."""
        expect = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(
                f"{type(self).__name__} expects latents of shape (B, {expect[0]}, {expect[1]}, {expect[2]}), "
                f"got {tuple(x.shape)}"
            )


def make_variants(cls, configs: dict[str, dict[str, Any]], aliases: dict[str, str] | None = None) -> dict[str, Callable]:
    """``{name: factory}`` for a family's size table; a factory's keyword overrides win over the table."""
    def factory(name: str):
        def build(**overrides):
            return cls(**{**configs[name], **overrides})

        build.__name__ = f"{cls.__name__.lower()}_" + name.replace("/", "_").replace("-", "_")
        build.__doc__ = f"{name}: {configs[name]}"
        return build

    table = {name: factory(name) for name in configs}
    table.update({alias: table[target] for alias, target in (aliases or {}).items()})
    return table


def cat_cond(conds: Sequence[Any]):
    """Concatenate conditioning along the batch: tensors, or dicts of tensors (PixArt text), or None."""
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: (None if first[k] is None else torch.cat([c[k] for c in conds])) for k in first}
    return torch.cat(list(conds))


def split_cond(cond, n: int):
    """Inverse of :func:`cat_cond` for ``n`` equal chunks."""
    if cond is None:
        return [None] * n
    if isinstance(cond, dict):
        parts = {k: (None if v is None else v.chunk(n)) for k, v in cond.items()}
        return [{k: (None if v is None else v[i]) for k, v in parts.items()} for i in range(n)]
    return list(cond.chunk(n))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
