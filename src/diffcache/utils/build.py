"""Config -> objects, with Hydra as the factory: every group node names its class with ``_target_``.

Only the backbone needs more than ``instantiate``: its node also carries settings that other groups
and the tasks read (weights, guidance, noise schedule, x0 clipping), which are not
constructor arguments; they are listed once, in :data:`BACKBONE_RUN_KEYS`.
"""
from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

BACKBONE_RUN_KEYS = ("name", "ckpt", "random_init", "overrides", "guidance", "schedule", "time_input", "vae",
                     "vae_scale", "clip_denoised", "dtype")
# backbone.dtype: the weights' compute dtype (the solver state stays float32; see Denoiser)
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
          "float16": "float16", "fp64": "float64", "float64": "float64"}


def model_dtype(name):
    """``backbone.dtype`` -> a torch dtype (None: float32)."""
    import torch

    key = "fp32" if name is None else str(name).lower()
    if key not in DTYPES:
        raise ValueError(f"backbone.dtype={name!r} is not one of fp32, bf16, fp16 (or float32 / bfloat16 / float16)")
    return getattr(torch, DTYPES[key])


def _plain(cfg) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


def build_backbone(cfg):
    """Instantiate ``backbone._target_`` (a :class:`~diffcache.backbones.base.CachedBackbone` subclass or
    factory), load ``backbone.ckpt`` strictly and cast it to ``backbone.dtype``; the result is in eval mode
    (a frozen teacher). The one place evaluate / train / search build a backbone."""
    from ..backbones import check_weights_given, load_checkpoint

    c = _plain(cfg)
    run = {k: c.pop(k) for k in BACKBONE_RUN_KEYS if k in c}
    dtype = model_dtype(run.get("dtype"))  # a bad name fails before a slow build
    if "_target_" not in c:
        raise ValueError("the backbone config needs _target_ (e.g. diffcache.backbones.build_backbone with arch=, "
                         "or your own CachedBackbone subclass)")
    check_weights_given(c.get("arch"), run.get("ckpt"), bool(run.get("random_init", False)))
    model = instantiate(c, **(run.get("overrides") or {}))
    if run.get("ckpt"):
        load_checkpoint(model, run["ckpt"])
    if run.get("clip_denoised") is not None:
        model.clip_denoised = bool(run["clip_denoised"])
    return model.to(dtype).eval()


def build_solver(cfg):
    return instantiate(cfg)


def build_policy(cfg, router_ckpt: str | None = None):
    """``policy._target_`` -> a CachePolicy; ``router_ckpt`` loads an L2C router file into it."""
    policy = instantiate(cfg)
    if router_ckpt:
        if not hasattr(policy, "load_official"):
            raise ValueError(f"router_ckpt is only for policy=l2c (this run uses {policy.name})")
        policy.load_official(router_ckpt)
    return policy


def build_loggers(cfg) -> list:
    return [instantiate(v) for v in (cfg or {}).values() if v is not None and "_target_" in v]


build_callbacks = build_loggers
