"""DiT (Peebles & Xie, ICCV 2023) with a cache site on every residual branch.

Parameter names follow ``facebookresearch/DiT`` ``models.py`` so the released ``DiT-XL-2-*.pt`` files
(plain state dicts) load strictly: ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``,
``y_embedder.embedding_table`` (num_classes + 1 rows: the last is the null class used by CFG),
``pos_embed`` (fixed 2-D sin-cos, stored), ``blocks.i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
adaLN_modulation.1}``, ``final_layer.{linear, adaLN_modulation.1}``.

adaLN-Zero: each block regresses (shift, scale, gate) for both branches from ``c = t_emb + y_emb``;
the block hands each site its branch (norm1 -> modulate -> attn) unevaluated, the site returns the
*ungated* output (what both L2C and ToCa cache) and the block adds it under the current step's gate in
one fused ``addcmul``. With ``learn_sigma`` the output has 2·C channels (eps, variance).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .base import Branch, CachedBackbone, Linear, make_variants, residual
from .layers import Attention, Mlp, PatchEmbed, TimestepEmbedder, modulate, sincos_pos_embed_2d


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row for the null class (label dropout is the caller's job)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# (our key, diffusers DiTTransformer2DModel key) of every plain linear, read in both directions (import:
# DiT.convert_diffusers; export: backbones/export.py). diffusers copies the shared embedders into every block
# (``{i}``: the block); the import reads block 0's copy, the export writes one per block.
DIFFUSERS_LINEARS = (("x_embedder.proj", "pos_embed.proj"), ("final_layer.adaLN_modulation.1", "proj_out_1"),
                     ("final_layer.linear", "proj_out_2"))
DIFFUSERS_EMBEDDERS = (("t_embedder.mlp.0", "transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1"),
                       ("t_embedder.mlp.2", "transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_2"))
DIFFUSERS_CLASS_TABLE = "transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"
DIFFUSERS_BLOCK_LINEARS = (("adaLN_modulation.1", "norm1.linear"), ("attn.proj", "attn1.to_out.0"),
                           ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"))


class DiT(CachedBackbone):
    """Class-conditional DiT: ``forward(x, t, y) -> (B, out_channels, H, W)``."""

    family = "dit"
    guided_channels = 3  # forward_with_cfg guides the first 3 channels only (a legacy quirk, kept)
    toca_preset = "dit_ddim50"
    checkpoint_name = "DiT"
    checkpoint_keys = ("ema", "model")  # DiT train.py checkpoints hold ema and model
    site_kinds = ("attn", "mlp")

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 learn_sigma: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, learn_sigma=learn_sigma)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size, self.depth, self.num_heads, self.mlp_ratio = hidden_size, depth, num_heads, mlp_ratio
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        grid = input_size // patch_size
        # a frozen Parameter, as the official model (its state dict stores it)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init (xavier linears, zeroed adaLN and output): a random model is a valid, slow one."""
        if self.pos_embed.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.hidden_size, grid, grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    # ------------------------------------------------------------------ cost
    def fixed_linears(self) -> tuple[list[Linear], list[list[Linear]]]:
        """adaLN per layer (C -> 6C after SiLU); outside: patch embed, t embedder (256 -> C -> C), final adaLN
        (C -> 2C) and linear."""
        C, N, p = self.hidden_size, self.num_tokens, self.patch_size
        outside = [Linear(N, p * p * self.in_channels, C), Linear(1, 256, C), Linear(1, C, C), Linear(1, C, 2 * C),
                   Linear(N, C, p * p * self.out_channels)]
        return outside, [[Linear(1, C, 6 * C, silu=True)] for _ in range(self.depth)]

    # ------------------------------------------------------------------ conditioning
    @property
    def null_class(self) -> int:
        return self.num_classes

    def null_cond(self, cond):
        if cond is None:
            raise ValueError("DiT is class-conditional: null_cond needs the label tensor to match its shape")
        return torch.full_like(torch.as_tensor(cond), self.null_class)

    # ------------------------------------------------------------------ forward
    def _block(self, i: int, blk: DiTBlock, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # (B, 1, C) each: broadcast over tokens inside the fused kernels, no per-branch unsqueeze copies
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        x = residual(x, gate_msa, self.site(i, "attn", Branch(blk.attn, x, blk.norm1, shift_msa, scale_msa)))
        x = residual(x, gate_mlp, self.site(i, "mlp", Branch(blk.mlp, x, blk.norm2, shift_mlp, scale_mlp)))
        return x

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.patch_size
        h = w = int(math.isqrt(x.shape[1]))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t, y) -> torch.Tensor:
        """x: (B, C, H, W) latent; t: (B,) or scalar timestep in [0, 1000); y: (B,) labels (null = num_classes)."""
        self.check_input(x)
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        y = torch.as_tensor(y, device=x.device).long()
        if y.shape != (B,):
            raise ValueError(f"DiT expects labels of shape ({B},), got {tuple(y.shape)}")
        # a host read of the labels; skipped while torch.compile traces (it would split the graph in two)
        if not torch.compiler.is_compiling() and ((y < 0).any() or (y > self.num_classes).any()):
            raise ValueError(f"DiT labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class)")
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for i, blk in enumerate(self.blocks):
            x = self._block(i, blk, x, c)
        return self.unpatchify(self.final_layer(x, c))  # (B, out_channels, H, W)

    # ------------------------------------------------------------------ diffusers format
    @staticmethod
    def diffusers_kwargs(config: dict) -> dict[str, Any]:
        """Our constructor kwargs for a diffusers ``DiTTransformer2DModel`` config.json."""
        heads, head_dim = int(config.get("num_attention_heads", 16)), int(config.get("attention_head_dim", 72))
        if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
            raise ValueError(f"only norm_type='ada_norm_zero' (DiT) is supported, got {config.get('norm_type')!r}")
        in_ch = int(config.get("in_channels", 4))
        out_ch = config.get("out_channels") or in_ch
        return dict(input_size=int(config.get("sample_size", 32)), patch_size=int(config.get("patch_size", 2)),
                    in_channels=in_ch, hidden_size=heads * head_dim, depth=int(config.get("num_layers", 28)),
                    num_heads=heads, mlp_ratio=4.0, num_classes=int(config.get("num_embeds_ada_norm", 1000)),
                    learn_sigma=int(out_ch) == 2 * in_ch)

    def use_diffusers_numerics(self, config: dict) -> None:
        """Match the diffusers port's two numeric conventions (LayerNorm eps, timestep frequency shift).

        diffusers' DiT embeds timesteps with ``downscale_freq_shift=1`` and its configs default to
        ``norm_eps=1e-5``; the official DiT uses a shift of 0 and eps 1e-6. Weights loaded from a diffusers
        directory run as diffusers runs them, so outputs match the model they came from.
        """
        eps = float(config.get("norm_eps", 1e-5))  # blocks only: diffusers' norm_out keeps 1e-6
        for blk in self.blocks:
            blk.norm1.eps = blk.norm2.eps = eps
        self.t_embedder.freq_shift = 1

    @staticmethod
    def convert_diffusers(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """diffusers ``DiTTransformer2DModel`` state dict -> ours.

        diffusers keeps a per-block copy of the timestep/label embedder (``norm1.emb``); DiT shares one,
        so block 0's copy becomes ours and the others must match it. diffusers does not store
        ``pos_embed``; it is recomputed. The final adaLN is ``proj_out_1`` with (shift, scale) order.
        """
        sd = dict(sd)
        used: set[str] = set()

        def take(key: str) -> torch.Tensor:
            if key not in sd:
                raise KeyError(f"diffusers DiT state dict lacks {key!r}")
            used.add(key)
            return sd[key]

        out: dict[str, torch.Tensor] = {}

        def pair(ours: str, theirs: str) -> None:
            for s in ("weight", "bias"):
                out[f"{ours}.{s}"] = take(f"{theirs}.{s}")

        kw = DiT.diffusers_kwargs(config)
        for ours, theirs in DIFFUSERS_LINEARS + DIFFUSERS_EMBEDDERS:
            pair(ours, theirs.format(i=0))
        out["y_embedder.embedding_table.weight"] = take(DIFFUSERS_CLASS_TABLE.format(i=0))
        for i in range(kw["depth"]):
            src, dst = f"transformer_blocks.{i}", f"blocks.{i}"
            if i:  # the shared embedders, duplicated per block in diffusers
                for k in [k for k in sd if k.startswith(f"{src}.norm1.emb.")]:
                    if not torch.equal(take(k), sd[k.replace(src, "transformer_blocks.0", 1)]):
                        raise ValueError(f"{k} differs from block 0: this checkpoint has per-block embedders, "
                                         "which DiT does not")
            for s in ("weight", "bias"):
                out[f"{dst}.attn.qkv.{s}"] = torch.cat([take(f"{src}.attn1.to_{n}.{s}") for n in "qkv"])
            for ours, theirs in DIFFUSERS_BLOCK_LINEARS:
                pair(f"{dst}.{ours}", f"{src}.{theirs}")
        leftover = sorted(k for k in sd if k not in used)
        if leftover:
            raise KeyError(f"unexpected keys in diffusers DiT state dict: {leftover[:10]}")
        grid = kw["input_size"] // kw["patch_size"]
        out["pos_embed"] = sincos_pos_embed_2d(kw["hidden_size"], grid, grid).unsqueeze(0)
        return out


# ---------------------------------------------------------------------------------------------- variants
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
_CONFIGS: dict[str, dict[str, Any]] = {
    f"DiT-{s}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
    for s, (d, h, n) in _SIZES.items() for p in (2, 4, 8)
}
# CPU tests and demos: 8x8 latents, 16 tokens, 10 classes (+ null class 10)
_CONFIGS["tiny_dit"] = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
# the offline demo teacher (assets/mnist_dit.pt): 32x32 grey pixels, patch 4 -> 64 tokens, learned sigma
_CONFIGS["mnist_dit"] = dict(input_size=32, patch_size=4, in_channels=1, hidden_size=128, depth=6, num_heads=4,
                             num_classes=10, learn_sigma=True, clip_denoised=True)


VARIANTS: dict[str, Callable[..., DiT]] = make_variants(DiT, _CONFIGS)
