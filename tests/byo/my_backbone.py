"""A user's own backbone, defined outside src/: pre-norm transformer blocks on patch tokens, class-
conditioned through the time embedding. It trains and evaluates an L2C router with no edit in src/."""
import torch
from torch import nn

from diffcache.backbones.base import Branch, CachedBackbone
from diffcache.backbones.layers import Attention, Mlp, PatchEmbed, TimestepEmbedder


class TinyMixer(CachedBackbone):
    site_kinds = ("attn", "mlp")        # branch kinds per layer, in execution order
    guidance_off = 1.0                  # u + s (c - u) on all channels, one [cond; uncond] batch (defaults)

    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4,
                 num_classes=10):
        super().__init__()
        self.input_size, self.patch_size, self.in_channels, self.out_channels = input_size, patch_size, in_channels, in_channels
        self.hidden_size, self.depth, self.num_heads, self.mlp_ratio = hidden_size, depth, num_heads, 4.0
        self.num_classes, self.null_class = num_classes, num_classes
        self.embed, self.t_embed = PatchEmbed(patch_size, in_channels, hidden_size), TimestepEmbedder(hidden_size)
        self.y_embed = nn.Embedding(num_classes + 1, hidden_size)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(n1=nn.LayerNorm(hidden_size), attn=Attention(hidden_size, num_heads),
                                                       n2=nn.LayerNorm(hidden_size), mlp=Mlp(hidden_size, 4 * hidden_size)))
                                    for _ in range(depth))
        self.out = nn.Linear(hidden_size, patch_size * patch_size * in_channels)

    def null_cond(self, y):
        return torch.full_like(y, self.null_class)

    def forward(self, x, t, y):
        B, p, s = x.shape[0], self.patch_size, self.input_size // self.patch_size
        h = self.embed(x) + (self.t_embed(torch.as_tensor(t, device=x.device).expand(B)) + self.y_embed(y))[:, None]
        for i, blk in enumerate(self.blocks):  # every residual branch goes through a cache site
            h = h + self.site(i, "attn", Branch(blk["attn"], h, blk["n1"]))  # evaluated only if not reused
            h = h + self.site(i, "mlp", Branch(blk["mlp"], h, blk["n2"]))
        h = self.out(h).reshape(B, s, s, p, p, self.in_channels)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(B, self.in_channels, s * p, s * p)
