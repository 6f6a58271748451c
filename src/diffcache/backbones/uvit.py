"""U-ViT (Bao et al., CVPR 2023) with a cache site on every residual branch.

Behaviour and ``state_dict`` keys follow ``baofff/U-ViT`` ``libs/uvit.py`` so the released ``nnet``
``.pth`` files (plain state dicts) load strictly:

* time and (optionally) label are *tokens*. The official forward prepends the time token to the patch
  tokens and then prepends the label token, so the sequence is ``[label, time, patch_0 .. patch_N-1]``
  (``extras = 2``; ``extras = 1``, time only, for unconditional models). ``pos_embed`` is a learned
  ``Parameter`` of shape (1, extras + N, D) covering those extra tokens too.
* pre-norm blocks without adaLN: ``x = x + attn(norm1(x))``; ``x = x + mlp(norm2(x))`` (exact GELU).
* long skips: the ``depth // 2`` in-blocks push their outputs; the out-blocks pop them and first apply
  ``skip_linear(cat[x, skip])``. The skip projection is never a cache site, so it is always recomputed
  (L2C, ``uvit_dynamic.py``), also when the block's attention / MLP branches are reused.
* ``norm`` -> ``decoder_pred`` -> drop the extra tokens -> unpatchify -> ``final_layer`` (3x3 conv when
  ``conv=True``; an identity, with no keys, when ``conv=False`` as in both U-ViT-H configs).

Cache-site layer index: in-blocks ``0 .. d-1``, mid-block ``d``, out-blocks ``d+1 .. 2d`` with
``d = depth // 2`` (29 layers for U-ViT-H/2, ``depth=28``). ``num_prefix_tokens = extras``.

Class-conditional ImageNet models use ``num_classes = 1001``: labels 0..999 plus the null class 1000
(``null_cond``), as the official classifier-free guidance does (``y = K`` with ``K = 1000``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import Branch, CachedBackbone, Linear, make_variants
from .layers import Attention, Mlp, PatchEmbed, sinusoid_dtype, timestep_embedding


class UViTBlock(nn.Module):
    """Parameters of one U-ViT block; the forward lives in :meth:`UViT._block` (it needs the sites)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # exact GELU (timm default)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None


def unpatchify(x: torch.Tensor, channels: int, patch_size: int) -> torch.Tensor:
    """(B, h*w, p*p*C) with (p1, p2, C) ordering -> (B, C, h*p, w*p)."""
    B, N, _ = x.shape
    h = w = int(round(N ** 0.5))
    x = x.reshape(B, h, w, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, channels, h * patch_size, w * patch_size)


class UViT(CachedBackbone):
    """U-ViT noise-prediction network (``forward(x, t, y) -> eps``)."""

    family = "uvit"
    cfg_layout = "two_pass"   # cond pass, then uncond pass
    guidance_off = 0.0        # c + s (c - u): s = 0 is the conditional model
    guidance_from_cond = True
    router_format = "uvit"
    checkpoint_suffix = ".pth"
    toca_preset = "uvit_dpm20"
    checkpoint_name = "U-ViT nnet"
    site_kinds = ("attn", "mlp")
    learn_sigma = False

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 2,
        in_chans: int = 4,
        embed_dim: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        num_classes: int = 1001,
        conv: bool = True,
        skip: bool = True,
        input_size: int | None = None,
        in_channels: int | None = None,
    ):
        super().__init__()
        # the names every family shares (backbone.overrides={input_size: 8}) win over upstream's img_size / in_chans
        img_size = img_size if input_size is None else int(input_size)
        in_chans = in_chans if in_channels is None else int(in_channels)
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if depth < 2:
            raise ValueError(f"U-ViT needs depth >= 2 (depth // 2 in- and out-blocks), got {depth}")
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           mlp_time_embed=mlp_time_embed, num_classes=num_classes, conv=conv, skip=skip)
        self.input_size = img_size
        self.patch_size = patch_size
        self.in_channels = self.out_channels = in_chans
        self.hidden_size = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.num_half = depth // 2
        self.depth = 2 * self.num_half + 1  # cacheable layers: in + mid + out
        self._embeddings(mlp_time_embed, (img_size // patch_size) ** 2)
        self.in_blocks = nn.ModuleList(
            [UViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(self.num_half)])
        self.mid_block = UViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList(
            [UViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, skip=skip) for _ in range(self.num_half)])

        self.norm = nn.LayerNorm(embed_dim)
        self.patch_dim = patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()
        self.initialize_weights()

    def _embeddings(self, mlp_time_embed: bool, num_patches: int) -> None:
        """Patch, time and label embeddings and the positions of the (time, label, patch) tokens."""
        dim = self.embed_dim
        self.patch_embed = PatchEmbed(self.patch_size, self.in_channels, dim)
        self.time_embed = (nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
                           if mlp_time_embed else nn.Identity())
        self.label_emb = nn.Embedding(self.num_classes, dim) if self.num_classes > 0 else None
        self.extras = self.num_prefix_tokens = 2 if self.num_classes > 0 else 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, dim))

    # ------------------------------------------------------------------ init (as the official code)
    def initialize_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ cost
    def fixed_linears(self) -> tuple[list[Linear], list[list[Linear]]]:
        """Skip linears of the out-blocks (T x 2C -> C); outside: patch embed, time MLP, decoder, 3x3 conv."""
        C, N, p, c_in = self.hidden_size, self.num_tokens, self.patch_size, self.in_channels
        T, d = N + self.num_prefix_tokens, self.depth // 2
        per_layer = [[Linear(T, 2 * C, C)] if layer > d and self.out_blocks[layer - d - 1].skip_linear is not None
                     else [] for layer in range(self.depth)]
        outside = [Linear(N, p * p * c_in, C), Linear(T, C, p * p * c_in)]
        if self.config["mlp_time_embed"]:
            outside += [Linear(1, C, 4 * C), Linear(1, 4 * C, C)]
        if self.config["conv"]:
            outside.append(Linear(self.input_size ** 2, 9 * c_in, c_in))
        return outside, per_layer

    # ------------------------------------------------------------------ conditioning
    @property
    def null_class(self) -> int:
        return self.num_classes - 1

    def null_cond(self, cond):
        """The null class (``num_classes - 1``, 1000 for ImageNet) in the shape of ``cond``; None if unconditional."""
        if self.label_emb is None:
            return None
        if cond is None:
            raise ValueError("class-conditional U-ViT: null_cond needs the label tensor to match its shape")
        return torch.full_like(torch.as_tensor(cond), self.null_class)

    # ------------------------------------------------------------------ forward
    def _block(self, layer: int, blk: UViTBlock, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if blk.skip_linear is not None:
            x = blk.skip_linear(torch.cat([x, skip], dim=-1))  # always recomputed, never a cache site
        x = x + self.site(layer, "attn", Branch(blk.attn, x, blk.norm1))
        x = x + self.site(layer, "mlp", Branch(blk.mlp, x, blk.norm2))
        return x

    def embed(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        """Latent, time, label -> the token sequence ``[label, time, patches] + pos_embed`` (B, extras+N, D)."""
        self.check_input(x)
        x = self.patch_embed(x)  # (B, N, D)
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        freq = timestep_embedding(t, self.embed_dim, dtype=sinusoid_dtype(x.dtype))
        time_token = self.time_embed(freq.to(x.dtype)).unsqueeze(1)
        tokens = [time_token, x]
        if self.label_emb is not None:
            if y is None:
                raise ValueError("class-conditional U-ViT needs labels y (use null_cond(y) for the unconditional pass)")
            tokens.insert(0, self.label_emb(torch.as_tensor(y, device=x.device).long()).unsqueeze(1))
        elif y is not None:
            raise ValueError("this U-ViT is unconditional (num_classes <= 0) but labels were given")
        return torch.cat(tokens, dim=1) + self.pos_embed

    def forward(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        """x: (B, C, H, W) latent; t: (B,) or scalar time input; y: (B,) labels (None if unconditional)."""
        x = self.embed(x, t, y)
        skips = []
        for i, blk in enumerate(self.in_blocks):
            x = self._block(i, blk, x)
            skips.append(x)
        x = self._block(self.num_half, self.mid_block, x)
        for j, blk in enumerate(self.out_blocks):
            x = self._block(self.num_half + 1 + j, blk, x, skips.pop())
        x = self.decoder_pred(self.norm(x))  # (B, extras+N, p*p*C)
        x = x[:, self.extras:, :]
        x = unpatchify(x, self.in_channels, self.patch_size)
        return self.final_layer(x)


# ---------------------------------------------------------------------------------------------- variants
# Published configurations (baofff/U-ViT configs/*.py). Latent ImageNet models are 4-channel, class-
# conditional with the null class (num_classes=1001); "U-ViT-H/2" at 512 is really patch 4 (H/4).
_CONFIGS: dict[str, dict[str, Any]] = {
    # imagenet256_uvit_huge.py: conv=False
    "U-ViT-H/2": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_heads=16,
                      mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=1001, conv=False),
    # imagenet512_uvit_huge.py: latent 64, patch 4, conv=False
    "U-ViT-H/4": dict(img_size=64, patch_size=4, in_chans=4, embed_dim=1152, depth=28, num_heads=16,
                      mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=1001, conv=False),
    # imagenet256_uvit.py (U-ViT-L/2): conv default True
    "U-ViT-L/2": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1024, depth=20, num_heads=16,
                      mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=1001, conv=True),
    # imagenet512_uvit_large.py (U-ViT-L/4)
    "U-ViT-L/4": dict(img_size=64, patch_size=4, in_chans=4, embed_dim=1024, depth=20, num_heads=16,
                      mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=1001, conv=True),
    # pixel-space models of the paper (not used by the caching papers; for completeness)
    "U-ViT-S/2-cifar10": dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8,
                              mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=-1),
    "U-ViT-S/4-celeba64": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=512, depth=12, num_heads=8,
                               mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=-1),
    "U-ViT-M/4-imagenet64": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=16, num_heads=12,
                                 mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=1000),
    "U-ViT-L/4-imagenet64": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=1024, depth=20, num_heads=16,
                                 mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=1000),
    # CPU tests and demos: 2 in-blocks, 1 mid, 2 out (5 cache layers); 10 classes + null class 10
    "tiny_uvit": dict(img_size=8, patch_size=2, in_chans=4, embed_dim=64, depth=4, num_heads=4,
                      mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=11, conv=True),
    # the offline demo teacher (assets/mnist_uvit.pth): 32x32 grey pixels, patch 4; 10 classes + null class 10
    "mnist_uvit": dict(img_size=32, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4,
                       mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=11, conv=True,
                       clip_denoised=True),
}
_ALIASES = {"U-ViT-H/2-512": "U-ViT-H/4", "U-ViT-L/2-512": "U-ViT-L/4"}


VARIANTS: dict[str, Callable[..., UViT]] = make_variants(UViT, _CONFIGS, _ALIASES)
