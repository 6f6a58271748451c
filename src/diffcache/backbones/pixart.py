"""PixArt-α (Chen et al., ICLR 2024) with a cache site on every residual branch.

Behaviour and ``state_dict`` keys follow ``PixArt-alpha/PixArt-alpha`` ``diffusion/model/nets/PixArt.py``
and ``PixArt_blocks.py`` (the non-multi-scale model used at 256 and 512), so the released
``PixArt-XL-2-{256x256,512x512}.pth`` (``{"state_dict": ...}``) load strictly:

* ``x_embedder.proj`` patch embedding plus a fixed 2-D sin-cos ``pos_embed`` *buffer*. Official
  inference deletes the checkpoint's ``pos_embed`` and recomputes it for ``lewei_scale`` (1 at 256 and
  512); this model does the same on load (a state-dict pre-hook), so the stored value never matters.
* ``t_embedder.mlp.{0,2}`` (256-d sinusoid, cos first) -> ``t``; ``t_block`` = SiLU + Linear(D, 6D) ->
  ``t0`` (adaLN-single), shared by all blocks; each block adds its own ``scale_shift_table`` (6, D).
* ``y_embedder.y_proj.{fc1,fc2}``: Mlp(caption_channels -> D -> D, tanh GELU) on T5 features, and the
  learned null caption ``y_embedder.y_embedding`` (token_num x caption_channels, a persistent buffer).
* Block ``i``::

      x += gate_msa * site(i, "attn",  attn       on t2i_modulate(norm1(x), shift_msa, scale_msa))
      x +=            site(i, "xattn", cross_attn on x, y, mask)     # query = un-normalised x, no gate
      x += gate_mlp * site(i, "mlp",   mlp        on t2i_modulate(norm2(x), shift_mlp, scale_mlp))

  each branch handed to the site unevaluated (:class:`~.base.Branch`), each gated add one ``addcmul``.

* ``final_layer``: norm_final, ``t2i_modulate`` with ``scale_shift_table (2, D) + t`` (the embedding
  before ``t_block``), ``linear`` -> unpatchify to ``2 * in_channels`` channels (learned sigma).

Text conditioning is ``cond = {"y": (B, L, C) float, "mask": (B, L) bool/int or None}``. The official
model packs the valid tokens of the batch and runs block-diagonal attention; a per-sample (B, L) key mask
is the same computation. Unconditional pass (:meth:`PixArt.null_cond`): the official DPM-Solver CFG path
(``model_wrapper`` in ``diffusion/model/dpm_solver.py``) concatenates ``[null_y; y]`` but passes the
prompt's ``mask`` once; ``PixArt.forward`` then repeats it over the doubled batch. So the null caption is
attended under the *same* mask as its prompt: only its first ``len(prompt)`` tokens are seen.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .base import Branch, CachedBackbone, Linear, make_variants, residual
from .layers import Attention, CrossAttention, Mlp, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PixArt modulation with (B, 1, D) shift/scale (already broadcast over tokens)."""
    return x * (1 + scale) + shift


class CaptionProjection(nn.Module):
    """timm ``Mlp(in=C, hidden=D, out=D)`` with tanh GELU (keys ``fc1``, ``fc2``)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Caption projection plus the learned null caption ``y_embedding`` (a persistent buffer, as upstream)."""

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int = 120):
        super().__init__()
        self.y_proj = CaptionProjection(caption_channels, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels ** 0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class PixArtBlock(nn.Module):
    """Parameters of one PixArt block; the forward lives in :meth:`PixArt._block`."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate="tanh")
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


# (our key, diffusers PixArtTransformer2DModel key) of every plain linear, read in both directions
# (import: weights.py via PixArt.from_diffusers_state_dict; export: backbones/export.py)
DIFFUSERS_LINEARS = (("x_embedder.proj", "pos_embed.proj"),
                     ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
                     ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
                     ("t_block.1", "adaln_single.linear"),
                     ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
                     ("y_embedder.y_proj.fc2", "caption_projection.linear_2"))
DIFFUSERS_BLOCK_LINEARS = (("attn.proj", "attn1.to_out.0"), ("cross_attn.q_linear", "attn2.to_q"),
                           ("cross_attn.proj", "attn2.to_out.0"), ("mlp.fc1", "ff.net.0.proj"),
                           ("mlp.fc2", "ff.net.2"))


class PixArt(CachedBackbone):
    """PixArt-α text-to-image DiT (``forward(x, t, cond) -> [eps, v]``, 2 * in_channels channels)."""

    family = "pixart"
    cfg_layout = "uncond_cond"  # DPM-Solver model_wrapper: [null_y; y]
    toca_preset = "pixart_r70"
    text_conditioned = True
    checkpoint_name = "PixArt"
    site_kinds = ("attn", "xattn", "mlp")

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        caption_channels: int = 4096,
        token_num: int = 120,
        lewei_scale: float = 1.0,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           learn_sigma=learn_sigma, caption_channels=caption_channels, token_num=token_num,
                           lewei_scale=lewei_scale)
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.caption_channels = caption_channels
        self.token_num = token_num
        self.lewei_scale = lewei_scale
        self.base_size = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.register_buffer("pos_embed", self._fixed_pos_embed())
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, token_num)
        self.blocks = nn.ModuleList([PixArtBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = T2IFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        self._register_load_state_dict_pre_hook(self._fix_pos_embed_on_load)

    # ------------------------------------------------------------------ init (as the official code)
    def _fixed_pos_embed(self) -> torch.Tensor:
        grid = self.input_size // self.patch_size
        return sincos_pos_embed_2d(self.hidden_size, grid, self.base_size, self.lewei_scale).unsqueeze(0)

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.cross_attn.proj.weight)
            nn.init.zeros_(blk.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _fix_pos_embed_on_load(self, state_dict, prefix, *args, **kwargs) -> None:
        # pos_embed is a fixed function of (input_size, patch_size, lewei_scale); official inference drops
        # the stored copy and recomputes it, and diffusers never stores it. Keep the key for strict loading.
        state_dict[prefix + "pos_embed"] = self.pos_embed.detach().clone()

    # ------------------------------------------------------------------ checkpoints

    @staticmethod
    def _diffusers_get(config: Any, key: str, default=None):
        if isinstance(config, Mapping):
            return config.get(key, default)
        return getattr(config, key, default)

    @classmethod
    def diffusers_kwargs(cls, config: Any, token_num: int = 120) -> dict[str, Any]:
        """Our constructor kwargs for a diffusers ``PixArtTransformer2DModel`` config (dict or object)."""
        get = lambda k, d=None: cls._diffusers_get(config, k, d)  # noqa: E731
        if get("norm_type", "ada_norm_single") != "ada_norm_single":
            raise ValueError(f"only norm_type='ada_norm_single' (PixArt) is supported, got {get('norm_type')!r}")
        sample_size = int(get("sample_size", 128))
        extra = get("use_additional_conditions")
        if extra is None:
            extra = sample_size == 128  # diffusers' rule
        if extra:
            raise ValueError("diffusers PixArt with resolution/aspect-ratio embedders (PixArt-MS, 1024) is not supported; "
                             "use the 256/512 models (use_additional_conditions=False)")
        heads, head_dim = int(get("num_attention_heads", 16)), int(get("attention_head_dim", 72))
        in_ch = int(get("in_channels", 4))
        out_ch = get("out_channels", 8)  # diffusers default; None means in_channels
        out_ch = in_ch if out_ch is None else out_ch
        interp = get("interpolation_scale")
        interp = max(sample_size // 64, 1) if interp is None else interp
        if get("caption_channels") is None:
            raise ValueError("diffusers PixArt config has no caption_channels")
        if get("cross_attention_dim", heads * head_dim) != heads * head_dim:
            raise ValueError("cross_attention_dim must equal the hidden size for PixArt")
        return dict(input_size=sample_size, patch_size=int(get("patch_size", 2)), in_channels=in_ch,
                    hidden_size=heads * head_dim, depth=int(get("num_layers", 28)), num_heads=heads,
                    mlp_ratio=4.0, learn_sigma=int(out_ch) == 2 * in_ch, caption_channels=int(get("caption_channels")),
                    token_num=token_num, lewei_scale=float(interp))

    @classmethod
    def convert_diffusers(cls, state_dict: Mapping[str, torch.Tensor], config: Any = None,
                          token_num: int = 120) -> dict[str, torch.Tensor]:
        """A diffusers ``PixArtTransformer2DModel`` state dict -> ours (q/k/v -> ``qkv``, k/v -> ``kv_linear``).

        diffusers does not store the null caption (its pipeline encodes "" instead). If the state dict
        has no ``caption_projection.y_embedding`` (older conversions kept it), ``y_embedder.y_embedding``
        is filled with NaN and :meth:`PixArt.null_cond` refuses to run: pass the T5 embedding of the
        empty prompt as the unconditional cond. ``pos_embed`` is recomputed from ``config``.
        """
        sd = dict(state_dict)
        out: dict[str, torch.Tensor] = {}
        used: set[str] = set()

        def take(key: str) -> torch.Tensor:
            if key not in sd:
                raise KeyError(f"diffusers PixArt state dict lacks {key!r}")
            used.add(key)
            return sd[key]

        def pair(ours: str, theirs: str) -> None:
            for suffix in ("weight", "bias"):
                out[f"{ours}.{suffix}"] = take(f"{theirs}.{suffix}")

        for ours, theirs in DIFFUSERS_LINEARS:
            pair(ours, theirs)
        depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")), default=-1)
        if depth == 0:
            raise KeyError("diffusers PixArt state dict has no transformer_blocks.*")
        for i in range(depth):
            src, dst = f"transformer_blocks.{i}", f"blocks.{i}"
            out[f"{dst}.scale_shift_table"] = take(f"{src}.scale_shift_table")
            for suffix in ("weight", "bias"):
                out[f"{dst}.attn.qkv.{suffix}"] = torch.cat(
                    [take(f"{src}.attn1.to_{n}.{suffix}") for n in "qkv"], dim=0)
                out[f"{dst}.cross_attn.kv_linear.{suffix}"] = torch.cat(
                    [take(f"{src}.attn2.to_{n}.{suffix}") for n in "kv"], dim=0)
            for ours, theirs in DIFFUSERS_BLOCK_LINEARS:
                pair(f"{dst}.{ours}", f"{src}.{theirs}")
        pair("final_layer.linear", "proj_out")
        out["final_layer.scale_shift_table"] = take("scale_shift_table")

        has_null = "caption_projection.y_embedding" in sd
        if has_null:
            out["y_embedder.y_embedding"] = take("caption_projection.y_embedding")
        leftover = sorted(k for k in sd if k not in used)
        if leftover:
            raise KeyError(f"unexpected keys in diffusers PixArt state dict (not PixArt-α 256/512?): {leftover[:10]}")
        if not has_null:
            caption_channels = out["y_embedder.y_proj.fc1.weight"].shape[1]
            warnings.warn("diffusers PixArt checkpoint has no null caption (caption_projection.y_embedding); "
                          "null_cond() is unavailable: use the T5 embedding of the empty prompt instead",
                          stacklevel=2)
            out["y_embedder.y_embedding"] = torch.full((token_num, caption_channels), float("nan"))
        if config is not None:
            kw = cls.diffusers_kwargs(config, token_num=token_num)
            grid = kw["input_size"] // kw["patch_size"]
            out["pos_embed"] = sincos_pos_embed_2d(kw["hidden_size"], grid, grid, kw["lewei_scale"]).unsqueeze(0)
        return out

    # ------------------------------------------------------------------ cost
    def fixed_linears(self) -> tuple[list[Linear], list[list[Linear]]]:
        """adaLN-single: outside the blocks patch embed, t embedder + t_block (C -> 6C), caption MLP, final
        linear; nothing per layer."""
        C, N, p, L, Cc = self.hidden_size, self.num_tokens, self.patch_size, self.token_num, self.caption_channels
        outside = [Linear(N, p * p * self.in_channels, C), Linear(1, 256, C), Linear(1, C, C), Linear(1, C, 6 * C),
                   Linear(L, Cc, C), Linear(L, C, C), Linear(N, C, p * p * self.out_channels)]
        return outside, [[] for _ in range(self.depth)]

    # ------------------------------------------------------------------ conditioning
    def random_cond(self, batch: int, generator: torch.Generator):
        """Random T5-shaped caption embeddings with a full mask (tests and benchmarks; real runs use prompts)."""
        y = torch.randn(batch, self.token_num, self.caption_channels, generator=generator)
        return {"y": y, "mask": torch.ones(batch, self.token_num, dtype=torch.long)}

    def null_cond(self, cond):
        """The learned null caption with the prompt's mask (official DPM-Solver CFG convention)."""
        y = cond["y"] if isinstance(cond, Mapping) else cond
        B, L = y.shape[0], y.shape[-2]
        if L > self.token_num:
            raise ValueError(f"captions have {L} tokens but the null caption has only {self.token_num}")
        null = self.y_embedder.y_embedding
        if torch.isnan(null).any():
            raise RuntimeError("this PixArt checkpoint has no null caption (diffusers format); pass the T5 "
                               "embedding of the empty prompt as the unconditional cond instead of null_cond()")
        y_null = null[:L].to(device=y.device, dtype=y.dtype)
        y_null = y_null.expand(B, L, -1) if y.ndim == 3 else y_null.expand(B, 1, L, -1)
        mask = cond.get("mask") if isinstance(cond, Mapping) else None
        return {"y": y_null.clone(), "mask": None if mask is None else mask.clone()}

    @staticmethod
    def _prepare_text(cond, batch: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(cond, Mapping):
            y, mask = cond["y"], cond.get("mask")
        else:
            y, mask = cond, None
        if y.ndim == 4:  # official (B, 1, L, C)
            y = y.squeeze(1)
        if y.ndim != 3 or y.shape[0] != batch:
            raise ValueError(f"caption features must be (B={batch}, L, C), got {tuple(y.shape)}")
        if mask is not None:
            mask = torch.as_tensor(mask, device=device)
            while mask.ndim > 2:
                mask = mask.squeeze(1)
            if mask.shape[0] != batch:  # official: a prompt mask reused across a stacked CFG batch
                if batch % mask.shape[0]:
                    raise ValueError(f"mask batch {mask.shape[0]} does not divide caption batch {batch}")
                mask = mask.repeat(batch // mask.shape[0], 1)
            if mask.shape[1] != y.shape[1]:
                raise ValueError(f"mask covers {mask.shape[1]} tokens but captions have {y.shape[1]}")
            mask = mask != 0
        return y, mask

    # ------------------------------------------------------------------ forward
    def _block(self, i: int, blk: PixArtBlock, x, y, t0, mask):
        B = x.shape[0]
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = (
            blk.scale_shift_table[None] + t0.reshape(B, 6, -1)).chunk(6, dim=1)  # (B, 1, D) each
        x = residual(x, gate_msa, self.site(i, "attn", Branch(blk.attn, x, blk.norm1, shift_msa, scale_msa)))
        x = x + self.site(i, "xattn", Branch(blk.cross_attn, x, args=(y, mask)))
        x = residual(x, gate_mlp, self.site(i, "mlp", Branch(blk.mlp, x, blk.norm2, shift_mlp, scale_mlp)))
        return x

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.patch_size
        B, N, _ = x.shape
        h = w = self.input_size // p
        x = x.reshape(B, h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, c, h * p, w * p)

    def forward(self, x: torch.Tensor, t, cond) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) or scalar discrete time; cond: {"y": (B, L, C), "mask": (B, L) | None}."""
        self.check_input(x)
        B = x.shape[0]
        y, mask = self._prepare_text(cond, B, x.device)
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        t = self.t_embedder(t)  # (B, D)
        t0 = self.t_block(t)  # (B, 6D)
        y = self.y_embedder(y.to(x.dtype))  # (B, L, D)
        for i, blk in enumerate(self.blocks):
            x = self._block(i, blk, x, y, t0, mask)
        x = self.final_layer(x, t)  # (B, N, p*p*out)
        return self.unpatchify(x)


# ---------------------------------------------------------------------------------------------- variants
_CONFIGS: dict[str, dict[str, Any]] = {
    # PixArt_XL_2: depth 28, hidden 1152, patch 2, heads 16; lewei_scale 1 at 256 and 512
    "PixArt-XL/2": dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                        mlp_ratio=4.0, learn_sigma=True, caption_channels=4096, token_num=120, lewei_scale=1.0),
    "PixArt-XL/2-512": dict(input_size=64, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                            mlp_ratio=4.0, learn_sigma=True, caption_channels=4096, token_num=120, lewei_scale=1.0),
    "tiny_pixart": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                        mlp_ratio=4.0, learn_sigma=True, caption_channels=32, token_num=8, lewei_scale=1.0),
}


VARIANTS: dict[str, Callable[..., PixArt]] = make_variants(PixArt, _CONFIGS)
