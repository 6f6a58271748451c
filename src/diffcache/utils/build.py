"""Config -> objects, with Hydra as the factory: every group node names its class with ``_target_``.

The backbone needs more than ``instantiate`` (weights, x0 clipping): :func:`diffcache.backbones.from_config`.
"""
from __future__ import annotations

from hydra.utils import instantiate


def build_solver(cfg):
    return instantiate(cfg)


def build_policy(cfg, router_ckpt: str | None = None):
    """``policy._target_`` -> a CachePolicy; ``router_ckpt`` loads an L2C router file into it."""
    policy = instantiate(cfg)
    if router_ckpt:
        if not policy.trainable:
            raise ValueError(f"router_ckpt is only for policy=l2c (this run uses {policy.name})")
        policy.load_official(router_ckpt)
    return policy


def build_loggers(cfg) -> list:
    return [instantiate(v) for v in (cfg or {}).values() if v is not None and "_target_" in v]


build_callbacks = build_loggers
