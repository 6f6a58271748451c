"""Backbone registry: ``load_backbone("DiT-XL/2", ckpt=...)`` builds a variant by name and loads its weights."""
from __future__ import annotations

from typing import Callable

from .base import CachedBackbone, count_parameters
from .weights import WHERE_TO_GET, CheckpointError, load_checkpoint

REGISTRY: dict[str, Callable[..., CachedBackbone]] = {}


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


def load_backbone(arch: str, ckpt: str | None = None, random_init: bool = False, **overrides) -> CachedBackbone:
    """Build ``arch`` and load ``ckpt``; real backbones refuse to run on random weights unless asked to.

    Tiny variants (``tiny_*``) are test/demo models and may run on random weights. The result is in eval
    mode: every consumer in this project treats the backbone as a frozen teacher.
    """
    _populate()
    if not ckpt and not random_init and not arch.startswith("tiny") and arch in REGISTRY:
        family = "uvit" if arch.startswith("U-ViT") or "uvit" in arch else "pixart" if arch.startswith("PixArt") else "dit"
        raise ValueError(  # before building: a 675M-parameter init takes seconds for nothing
            f"backbone {arch} needs its pretrained weights: pass backbone.ckpt=/path/to/file "
            f"({WHERE_TO_GET[family]}); nothing is downloaded at run time. "
            "For speed benchmarks only, backbone.random_init=true runs it with random weights.")
    model = build_backbone(arch, **overrides)
    if ckpt:
        load_checkpoint(model, ckpt)
    return model.eval()


__all__ = ["CachedBackbone", "CheckpointError", "REGISTRY", "available", "build_backbone", "count_parameters",
           "load_backbone", "load_checkpoint", "register"]
