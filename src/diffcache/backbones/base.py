"""The backbone contract: every residual branch runs through a cache site.

A block hands the site its whole branch, unevaluated, and adds the gated result in one fused op::

    x = residual(x, gate, self.site(layer, "mlp", Branch(blk.mlp, x, blk.norm2, shift, scale)))

so a policy that reuses the branch skips its input computation too (LayerNorm, modulate): a reused
branch costs only its gated add. A token cache evaluates the branch on a token subset
(``branch(idx)``: gather, then norm and modulate only those tokens). With no policy bound the site is
``branch()``, so outputs are bit-identical to the uncached model. The older call
``self.site(layer, kind, module, h, *args)`` (input computed by the block) still works. A policy is bound only for
the duration of a run (``with policy.bound(backbone, solver):``); it is stored with
``object.__setattr__`` so it is *not* a registered submodule: backbone ``state_dict`` keys stay those
of the official checkpoints, and backbone parameters never mix with trainable policy parameters.

Everything a solver loop, a cache policy or the cost counter must know about a family lives on the
class as named conventions (CFG batch layout, guided channels, the no-guidance value, random
conditioning, the cache-site :class:`SiteLayout`), so no code outside ``backbones/`` asks for a
family by name. A user's own backbone subclasses :class:`CachedBackbone` and sets the same attributes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn


class Branch:
    """One residual branch, not yet evaluated: tokens ``x`` -> ``norm`` -> modulate -> ``module(h, *args)``.

    ``branch()`` computes it on every token, ``branch(idx)`` on the tokens ``idx`` (B, k) only (per-token
    norm and modulation commute with a gather); :meth:`input` and :meth:`run` split the two halves for
    policies that also score the input (ToCa). ``shift`` / ``scale``: (B, 1, C) adaLN modulation or None.
    """

    __slots__ = ("module", "x", "norm", "shift", "scale", "args")

    def __init__(self, module: Callable[..., torch.Tensor], x: torch.Tensor, norm: Callable | None = None,
                 shift: torch.Tensor | None = None, scale: torch.Tensor | None = None, args: tuple = ()):
        self.module, self.x, self.norm, self.shift, self.scale, self.args = module, x, norm, shift, scale, args

    def input(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The module's input on all tokens, or on the tokens ``idx`` (B, k)."""
        h = self.x if idx is None else self.x.gather(1, idx.unsqueeze(-1).expand(-1, -1, self.x.shape[-1]))
        if self.norm is not None:
            h = self.norm(h)
        if self.scale is not None:
            h = modulate_tokens(h, self.shift, self.scale)
        return h

    def run(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h, *self.args)

    def __call__(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(self.input(idx))


def as_branch(branch, inputs: tuple) -> Branch:
    """A :class:`Branch`, or the older ``(module, h, *args)`` call (input already computed) wrapped as one."""
    if isinstance(branch, Branch):
        return branch
    if not inputs:
        raise TypeError("site(layer, kind, branch) takes a Branch, or a module followed by its input tensor")
    return Branch(branch, inputs[0], args=tuple(inputs[1:]))


def modulate_tokens(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN ``h * (1 + scale) + shift`` with (B, 1, C) shift / scale, as one fused kernel over the tokens."""
    return torch.addcmul(shift, h, 1 + scale)


def residual(x: torch.Tensor, gate: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``x + gate * out`` as one fused op (``addcmul``); ``x + out`` without a gate.

    The full-size ``out`` goes first among the factors, the broadcast (B, 1, C) ``gate`` second: the same
    product (multiplication commutes exactly), but the CPU kernel runs it about 1.5x faster that way."""
    return x + out if gate is None else torch.addcmul(x, out, gate)


@dataclass(frozen=True)
class Linear:
    """A linear map outside the cache sites: ``rows`` vectors of ``fan_in`` -> ``fan_out`` features per sample.

    ``silu``: a SiLU on its input first (adaLN modulation), which counters that count activations include."""

    rows: int
    fan_in: int
    fan_out: int
    silu: bool = False

    @property
    def macs(self) -> int:
        return self.rows * self.fan_in * self.fan_out


@dataclass(frozen=True)
class SiteLayout:
    """The cache-site layout every policy and the cost counter read (one object, one source).

    depth: cacheable layers; site_kinds: branch kinds per layer in execution order; num_tokens: image
    tokens; num_prefix_tokens: tokens in front of them that a token cache never drops (U-ViT's time /
    label tokens); token_grid: (rows, cols) of the image tokens, None when they form no grid.
    """

    depth: int
    site_kinds: tuple[str, ...] = ("attn", "mlp")
    num_tokens: int = 0
    num_prefix_tokens: int = 0
    token_grid: tuple[int, int] | None = None

    @property
    def num_sites(self) -> int:
        return self.depth * len(self.site_kinds)

    def index(self, layer: int, kind: str) -> int:
        """Layer-major site index ``K * layer + kind_index`` (the official L2C router layout)."""
        return layer * len(self.site_kinds) + self.site_kinds.index(kind)

    def sites(self) -> list[tuple[int, str]]:
        return [(layer, kind) for layer in range(self.depth) for kind in self.site_kinds]

    def labels(self) -> list[str]:
        return [f"{layer}.{kind}" for layer, kind in self.sites()]


class CachedBackbone(nn.Module):
    """Base class for DiT, U-ViT and PixArt.

    Subclasses set ``family`` ("dit" | "uvit" | "pixart"), ``depth`` (number of cacheable layers),
    ``site_kinds`` (per-layer branch kinds, in execution order), ``in_channels``, ``out_channels``,
    ``learn_sigma``, ``input_size`` (latent side), ``patch_size``, ``num_prefix_tokens`` (tokens in
    front of the image tokens that a token cache must never drop: U-ViT's time/label tokens).
    """

    family: str = ""
    site_kinds: tuple[str, ...] = ("attn", "mlp")
    # ---- conventions read by the denoiser, the policies and the cost counter
    cfg_layout: str = "cond_uncond"       # one batch [cond; uncond] | [uncond; cond] | two separate passes
    guided_channels: int | None = None    # guidance on the first n output channels only (None: all)
    guidance_off: float = 1.0             # the guidance scale that means "no unconditional pass"
    guidance_from_cond: bool = False      # c + s (c - u) (U-ViT) instead of u + s (c - u)
    router_format: str = "dit"            # official L2C router file layout ("dit" .pt | "uvit" .pth)
    toca_preset: str | None = None        # ToCa preset that policy=toca picks for this family
    text_conditioned: bool = False        # cond is {"y": text embeddings, "mask"} rather than class labels
    clip_denoised: bool = False           # clip the x0 prediction to [-1, 1] (ADM's pixel-space sampling);
                                          # set by the variant's table entry (pixel-space MNIST teachers)
    checkpoint_name: str = "backbone"
    checkpoint_suffix: str = ".pt"       # official weight files: DiT .pt, U-ViT nnet .pth
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

    @contextlib.contextmanager
    def bind(self, policy) -> Iterator[Any]:
        """Route every cache site through ``policy`` inside the block (runs do not nest)."""
        if self._policy is not None:
            raise RuntimeError(f"{type(self).__name__} is already bound to {type(self._policy).__name__}: a run "
                               f"binds one policy at a time (finish the other run first)")
        object.__setattr__(self, "_policy", policy)
        try:
            yield policy
        finally:
            object.__setattr__(self, "_policy", None)

    def site(self, layer: int, kind: str, branch: Branch | Callable[..., torch.Tensor], *inputs: Any) -> torch.Tensor:
        """Branch ``kind`` of ``layer``: its *ungated* output (B, N, C), computed or from the bound policy's cache.

        ``branch``: a :class:`Branch`; or a module followed by its input ``h`` and extra arguments (the
        older call, which computes the input before the site even when the branch is reused)."""
        branch = as_branch(branch, inputs)
        policy = self._policy
        if policy is None:
            return branch()
        return policy.site(layer, kind, branch)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (of its first floating parameter): model inputs are cast to it."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

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
    @property
    def layout(self) -> SiteLayout:
        gridded = hasattr(self, "input_size") and hasattr(self, "patch_size")  # a user's backbone may have no grid
        return SiteLayout(depth=int(self.depth), site_kinds=tuple(self.site_kinds),
                          num_tokens=int(self.num_tokens) if gridded else 0,
                          num_prefix_tokens=int(self.num_prefix_tokens or 0), token_grid=self.token_grid if gridded else None)

    def cache_sites(self) -> list[tuple[int, str]]:
        """Every ``(layer, kind)`` a forward visits, in execution order."""
        return self.layout.sites()

    def fixed_linears(self) -> tuple[list[Linear], list[list[Linear]]]:
        """The linear maps no cache saves, per sample: (outside the blocks, [per layer]); shapes only; the
        cost counter (:mod:`diffcache.metrics.cost`) applies each convention. Families list their own
        (embedders, adaLN, skip linears, final layers)."""
        return [], [[] for _ in range(int(self.depth))]

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image-token grid (for spatial token scores)."""
        side = self.input_size // self.patch_size
        return side, side

    @property
    def num_tokens(self) -> int:
        r, c = self.token_grid
        return r * c

    # ---------------------------------------------------------------- conditioning and guidance
    def null_cond(self, cond):
        """The unconditional input matching ``cond`` (the null class, or PixArt's null caption)."""
        raise NotImplementedError

    def random_cond(self, batch: int, generator: torch.Generator):
        """Random conditioning of the right kind: uniform real class labels (the DiT evaluation convention)."""
        return torch.randint(0, int(self.null_class), (batch,), generator=generator)

    def guidance_active(self, guidance: float | None) -> bool:
        """Whether ``guidance`` asks for an unconditional pass under this family's convention."""
        return guidance is not None and float(guidance) != float(self.guidance_off)

    def guide(self, c: torch.Tensor, u: torch.Tensor, s: float) -> torch.Tensor:
        """Guided eps (``in_channels``) from the cond / uncond outputs, with this family's formula."""
        C = self.in_channels
        c, u = c[:, :C], u[:, :C]
        n = C if self.guided_channels is None else min(int(self.guided_channels), C)
        base = c[:, :n] if self.guidance_from_cond else u[:, :n]
        guided = base + s * (c[:, :n] - u[:, :n])
        return guided if n == C else torch.cat([guided, c[:, n:]], dim=1)

    def check_input(self, x: torch.Tensor) -> None:
        """Fail with a clear message on a latent of the wrong shape."""
        expect = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(
                f"{type(self).__name__} expects latents of shape (B, {expect[0]}, {expect[1]}, {expect[2]}), "
                f"got {tuple(x.shape)}"
            )


def make_variants(cls, configs: dict[str, dict[str, Any]], aliases: dict[str, str] | None = None) -> dict[str, Callable]:
    """``{name: factory}`` for a family's size table; a factory's keyword overrides win over the table.

    A table entry may set the variant's sampling convention ``clip_denoised`` (not a constructor argument)."""
    def factory(name: str):
        def build(**overrides):
            kwargs = {**configs[name], **overrides}
            clip = bool(kwargs.pop("clip_denoised", False))
            model = cls(**kwargs)
            model.clip_denoised = clip
            return model

        build.__name__ = f"{cls.__name__.lower()}_" + name.replace("/", "_").replace("-", "_")
        build.__doc__ = f"{name}: {configs[name]}"
        build.family = cls.family  # where its weights come from, without building it
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


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
