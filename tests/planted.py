"""A tiny backbone with planted cache sites, for tests that must prove a router *learns*.

``free`` branches return a constant (a fixed parameter, whatever the tokens or the step), so reusing their
output from the last full step is exact and costs nothing; every other branch is an MLP of the tokens, which
carry the time embedding, so reusing it changes the output. A router that learns must end with exactly the
free sites reused and the others computed, at every cache step; one that has not moved keeps its random init.
"""
from __future__ import annotations

import torch
from torch import nn

from diffcache.backbones.base import CachedBackbone
from diffcache.backbones.layers import Mlp, TimestepEmbedder

FREE = ((0, "attn"), (1, "mlp"), (2, "attn"))  # the planted free sites of the default model


class Const(nn.Module):
    """A branch whose output never depends on its input: caching it is exact."""

    def __init__(self, dim: int):
        super().__init__()
        self.value = nn.Parameter(torch.randn(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.value.expand_as(h)


class Planted(CachedBackbone):
    site_kinds = ("attn", "mlp")

    def __init__(self, free=FREE, depth: int = 3, hidden: int = 16, input_size: int = 4, in_channels: int = 1,
                 num_classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.depth, self.hidden_size, self.input_size, self.patch_size = depth, hidden, input_size, 1
        self.in_channels = self.out_channels = in_channels
        self.num_classes = self.null_class = num_classes
        self.num_heads, self.mlp_ratio = 1, 4.0  # for the MAC counter: attn : mlp = 1 : 2, as policy.costs()
        self.free = {(int(layer), str(kind)) for layer, kind in free}
        self.embed, self.t_embed = nn.Linear(in_channels, hidden), TimestepEmbedder(hidden)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)
        self.branches = nn.ModuleDict({f"{layer}_{kind}": Const(hidden) if (layer, kind) in self.free
                                       else Mlp(hidden, 2 * hidden) for layer in range(depth) for kind in self.site_kinds})
        self.out = nn.Linear(hidden, in_channels)

    def null_cond(self, y):
        return torch.full_like(y, self.null_class)

    def planted_compute(self) -> list[bool]:
        """The mask a learned router must reach at every cache step: True = compute (layer-major sites)."""
        return [(layer, kind) not in self.free for layer, kind in self.layout.sites()]

    def forward(self, x, t, y):
        B, C, S = x.shape[0], self.in_channels, self.input_size
        h = self.embed(x.flatten(2).transpose(1, 2)) + (self.t_embed(torch.as_tensor(t).expand(B)) + self.y_embed(y))[:, None]
        for layer in range(self.depth):
            for kind in self.site_kinds:
                h = h + self.site(layer, kind, self.branches[f"{layer}_{kind}"], h)
        return self.out(h).transpose(1, 2).reshape(B, C, S, S)
