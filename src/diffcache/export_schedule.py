"""Export a static cache schedule for other tools (see :mod:`diffcache.policies.static_schedule`).

    python -m diffcache.export_schedule router.pt --solver ddim20 --out sched.json [--cache-dit mask.json]
    python -m diffcache.export_schedule --fora 3 --backbone dit --solver ddim50 --out fora.json

``router.pt``: an L2C router (trained, released or searched), read at ``--theta`` (default: the
``policy=l2c`` config's ``theta``, what ``evaluate.py`` uses) or ``--budget``. ``--backbone`` / ``--solver``
are config-group names (``conf/backbone``, ``conf/solver``); only the layout and the step schedule are
read, no weights are loaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from .backbones import meta_backbone
from .policies import static_schedule as ss
from .policies.fora import FORAPolicy
from .policies.l2c import L2CPolicy
from .utils.resolvers import conf_dir


def _conf_dir(given: str | None) -> Path:
    for cand in ([Path(given)] if given else []) + [conf_dir()]:
        if (cand / "evaluate.yaml").is_file():
            return cand.resolve()
    raise FileNotFoundError("no config directory with evaluate.yaml found; pass --config-dir /path/to/diffcache/conf")


def compose_run(backbone: str, solver: str, overrides: list[str], conf_dir: str | None = None):
    """(backbone on the meta device, solver, the composed config) from the config groups."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(_conf_dir(conf_dir)), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"backbone={backbone}", f"solver={solver}", "policy=l2c", *overrides])
    return meta_backbone(cfg.backbone), instantiate(cfg.solver), cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffcache.export_schedule",
                                description="Export a static cache schedule (which branches each evaluation computes) "
                                            "from an L2C router or FORA, as JSON for other tools.")
    p.add_argument("router", nargs="?", help="L2C router file (.pt / .pth); omit with --fora")
    p.add_argument("--solver", required=True, help="solver config name, e.g. ddim20, dpmpp10, dpm20")
    p.add_argument("--backbone", default="mnist_dit",
                   help="backbone config name for the site layout, as evaluate.py's backbone= (default mnist_dit)")
    p.add_argument("--theta", type=float, default=None, help="L2C threshold (default: policy=l2c's theta)")
    p.add_argument("--budget", type=float, default=None, help="L2C compute budget instead of theta")
    p.add_argument("--cache-interval", type=int, default=2, help="L2C schedule cache interval (default 2)")
    p.add_argument("--fora", type=int, default=None, metavar="N", help="export FORA with interval N instead of a router")
    p.add_argument("--out", required=True, help="diffcache-static-schedule/v1 JSON to write")
    p.add_argument("--cache-dit", default=None, help="also write cache-dit's steps_computation_mask JSON here")
    p.add_argument("--config-dir", default=None, help="diffcache conf/ directory (default: ./conf or the repo's)")
    p.add_argument("overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        if (a.router is None) == (a.fora is None):
            raise ValueError("give either a router file or --fora N")
        backbone, solver, cfg = compose_run(a.backbone, a.solver, a.overrides, a.config_dir)
        layout = backbone.layout
        if a.fora is not None:
            policy, what = FORAPolicy(a.fora), {"policy": "fora", "interval": a.fora}
        else:
            theta = float(a.theta if a.theta is not None else cfg.policy.theta)
            policy = L2CPolicy.from_official(a.router, theta=theta, budget=a.budget, cache_interval=a.cache_interval)
            try:
                policy.prepare(layout, solver)  # evaluate.py's checks and messages (length vs depth, steps)
            except ValueError as e:
                raise ValueError(f"{e} (the layout comes from --backbone {a.backbone}; name the router's backbone, "
                                 f"e.g. --backbone dit for a DiT-XL/2 router)") from None
            what = {"policy": "l2c", "router": str(a.router), "theta": theta, "budget": a.budget,
                    "cache_interval": a.cache_interval}
        mask = ss.static_mask(policy, layout, solver)
        obj = ss.schedule_json(mask, layout, solver, backbone=str(cfg.backbone.get("arch") or a.backbone),
                               source=ss.reuse_sources(policy, mask), **what)
        ss.write_json(obj, a.out)
        print(f"wrote {a.out}: {len(mask)} evaluations x {layout.num_sites} branches, "
              f"{sum(map(sum, mask))} of {len(mask) * layout.num_sites} computed")
        if a.cache_dit:
            cd = ss.cache_dit_mask(mask)
            ss.write_json({**cd, "solver": obj["solver"], "steps": len(mask), "exported_from": what}, a.cache_dit)
            print(f"wrote {a.cache_dit}: lost {cd['lost']}")
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
