"""Backbone registry: ``load_backbone("DiT-XL/2", ckpt=...)`` builds a variant by name and loads its weights;
:func:`from_config` does the same for a ``backbone`` config node."""
from __future__ import annotations

from typing import Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .base import CachedBackbone, count_parameters
from .weights import WHERE_TO_GET, CheckpointError, load_checkpoint

REGISTRY: dict[str, Callable[..., CachedBackbone]] = {}
# keys of a backbone config node that are settings of the run, not constructor arguments
# variants that are test / demo models: they may run on random weights
DEMO_PREFIXES = ("tiny", "mnist")
RUN_KEYS = ("name", "ckpt", "random_init", "overrides", "guidance", "schedule", "time_input", "vae", "vae_scale",
            "clip_denoised", "dtype")
# backbone.dtype: the weights' compute dtype (the solver state stays float32; see the denoiser)
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
          "float16": "float16", "fp64": "float64", "float64": "float64"}


def model_dtype(name) -> torch.dtype:
    """``backbone.dtype`` -> a torch dtype (None: float32)."""
    key = "fp32" if name is None else str(name).lower()
    if key not in DTYPES:
        raise ValueError(f"backbone.dtype={name!r} is not one of fp32, bf16, fp16 (or float32 / bfloat16 / float16)")
    return getattr(torch, DTYPES[key])


def register(name: str):
    def deco(factory):
        REGISTRY[name] = factory
        return factory
    return deco


def _populate() -> None:
    if REGISTRY:
        return
    from . import dit, pixart, uvit

    for mod in (dit, uvit, pixart):
        for name, factory in mod.VARIANTS.items():
            register(name)(factory)


def available() -> list[str]:
    _populate()
    return sorted(REGISTRY)


def build_backbone(arch: str, **overrides) -> CachedBackbone:
    """A randomly initialised backbone of variant ``arch`` (e.g. "DiT-XL/2", "U-ViT-H/2", "tiny_pixart")."""
    _populate()
    if arch not in REGISTRY:
        raise ValueError(f"unknown backbone arch {arch!r}; choose one of: {', '.join(available())}")
    model = REGISTRY[arch](**overrides)
    model.arch = arch
    return model


def family_class(family: str) -> type[CachedBackbone]:
    """The backbone class of a family name ("dit" | "uvit" | "pixart")."""
    from .dit import DiT
    from .pixart import PixArt
    from .uvit import UViT

    classes = {c.family: c for c in (DiT, UViT, PixArt)}
    if family not in classes:
        raise ValueError(f"unknown backbone family {family!r}; choose one of {sorted(classes)}")
    return classes[family]


def from_mapping(spec) -> CachedBackbone:
    """A backbone from ``{"family": ..., **constructor arguments}`` (unknown keys are ignored;
    ``out_channels`` = 2 x ``in_channels`` means learned sigma)."""
    import inspect

    spec = dict(spec)
    cls = family_class(str(spec.pop("family")))
    params = inspect.signature(cls.__init__).parameters
    if "out_channels" in spec and "learn_sigma" in params:
        spec["learn_sigma"] = int(spec.pop("out_channels")) == 2 * int(spec.get("in_channels", 4))
    return cls(**{k: v for k, v in spec.items() if k in params})


def check_weights_given(arch: str | None, ckpt: str | None, random_init: bool) -> None:
    """Real backbones refuse to run on random weights unless asked to (before a slow init).

    Tiny and MNIST variants are test/demo models and may run on random weights; so may a user's own class
    (no ``arch`` in its config).
    """
    _populate()
    if ckpt or random_init or arch is None or arch.startswith(DEMO_PREFIXES) or arch not in REGISTRY:
        return
    raise ValueError(
        f"backbone {arch} needs its pretrained weights: pass backbone.ckpt=/path/to/file "
        f"({weights_hint(arch)}); nothing is downloaded at run time. "
        "For speed benchmarks only, backbone.random_init=true runs it with random weights.")


def weights_hint(arch: str | None) -> str:
    """Where a variant's weights come from, for error messages ("" for the tiny test models and unknown names)."""
    _populate()
    arch = str(arch or "")
    if arch.startswith("mnist"):
        return "the MNIST teachers ship in the repository's assets/ (git checkout assets/), or retrain them with `make teachers`"
    if arch.startswith("tiny") or arch not in REGISTRY:
        return ""
    return "get " + WHERE_TO_GET.get(getattr(REGISTRY[arch], "family", ""), "its pretrained weights")


def load_backbone(arch: str, ckpt: str | None = None, random_init: bool = False, clip_denoised: bool | None = None,
                  dtype=None, **overrides) -> CachedBackbone:
    """The one teacher loader: build ``arch``, load ``ckpt`` strictly, eval mode (a frozen teacher).

    ``clip_denoised`` None keeps the variant's sampling convention (the pixel-space MNIST variants clip x0);
    ``dtype`` (fp32 | bf16 | fp16) is the weights' compute dtype.
    """
    dt = model_dtype(dtype)  # a bad name fails before a slow build
    check_weights_given(arch, ckpt, random_init)
    return _ready(build_backbone(arch, **overrides), ckpt, clip_denoised).to(dt)


def from_config(cfg) -> CachedBackbone:
    """:func:`load_backbone` for a ``backbone`` config node: ``_target_`` (``build_backbone`` with ``arch``, or
    a user's :class:`CachedBackbone` subclass) is instantiated; the :data:`RUN_KEYS` are not constructor
    arguments but settings of the run (weights, guidance, noise schedule, x0 clipping)."""
    c, run = _split(cfg)
    dt = model_dtype(run.get("dtype"))  # a bad name fails before a slow build
    if "_target_" not in c:
        raise ValueError("the backbone config needs _target_ (e.g. diffcache.backbones.build_backbone with arch=, "
                         "or your own CachedBackbone subclass)")
    check_weights_given(c.get("arch"), run.get("ckpt"), bool(run.get("random_init", False)))
    return _ready(instantiate(c, **(run.get("overrides") or {})), run.get("ckpt"), run.get("clip_denoised")).to(dt)


def meta_backbone(cfg) -> CachedBackbone:
    """The backbone of a config node on the meta device: its layout and conventions, no weights, no memory
    (the preflight's router-shape checks)."""
    c, run = _split(cfg)
    with torch.device("meta"):
        return instantiate(c, **(run.get("overrides") or {}))


def _split(cfg) -> tuple[dict, dict]:
    """A backbone config node as (constructor arguments, the :data:`RUN_KEYS` settings of the run)."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
    return c, {k: c.pop(k) for k in RUN_KEYS if k in c}


def _ready(model: CachedBackbone, ckpt: str | None, clip_denoised: bool | None) -> CachedBackbone:
    if ckpt:
        load_checkpoint(model, ckpt)
    if clip_denoised is not None:
        model.clip_denoised = bool(clip_denoised)
    return model.eval()


__all__ = ["RUN_KEYS", "CachedBackbone", "CheckpointError", "REGISTRY", "available", "build_backbone",
           "check_weights_given", "count_parameters", "family_class", "from_config", "from_mapping", "load_backbone",
           "load_checkpoint", "meta_backbone", "model_dtype", "register", "weights_hint"]
