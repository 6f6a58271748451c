"""Config -> objects. Tasks and tests call these so every entry point builds things the same way."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def _plain(cfg) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


def build_backbone(cfg):
    from ..backbones import load_backbone

    c = _plain(cfg)
    return load_backbone(c["arch"], ckpt=c.get("ckpt"), random_init=bool(c.get("random_init", False)),
                         **(c.get("overrides") or {}))


def build_solver(cfg):
    from ..solvers import make_solver

    c = _plain(cfg)
    c.pop("name", None)
    return make_solver(**c)


def build_policy(cfg, backbone=None, solver=None, router_ckpt: str | None = None):
    """``policy=none|l2c|toca|fora`` -> a CachePolicy attached to ``backbone``."""
    c = _plain(cfg)
    name = c.pop("name")
    if name == "none":
        from ..policies.none import NoCache

        policy = NoCache()
    elif name == "l2c":
        from ..policies.l2c import L2CPolicy

        policy = L2CPolicy.from_config(c, backbone=backbone, solver=solver, ckpt=router_ckpt)
    elif name == "toca":
        from ..policies.toca import ToCaPolicy

        policy = ToCaPolicy.from_config(c, backbone=backbone)
    elif name == "fora":
        from ..policies.fora import FORAPolicy

        policy = FORAPolicy(**c)
    else:
        raise ValueError(f"unknown policy {name!r}; choose none | l2c | toca | fora")
    if backbone is not None:
        policy.attach(backbone)
    return policy


def build_loggers(cfg) -> list:
    from hydra.utils import instantiate

    return [instantiate(v) for v in (cfg or {}).values() if v is not None and "_target_" in v]


def build_callbacks(cfg) -> list:
    from hydra.utils import instantiate

    return [instantiate(v) for v in (cfg or {}).values() if v is not None and "_target_" in v]
