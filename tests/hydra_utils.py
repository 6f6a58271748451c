"""Compose the real Hydra configs in tests, with outputs redirected to a temporary directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FAST = ["trainer.enable_progress_bar=false"]
# train.py / evaluate.py / search.py default to the MNIST demo teacher (experiment=mnist_dit / mnist_eval;
# search: backbone=mnist_dit); tests compose the groups alone on the tiny random backbone unless they choose an
# experiment or a backbone
TINY = ["backbone=tiny_dit"]


def with_tiny(name: str, overrides: list[str]) -> list[str]:
    """``overrides`` plus ``experiment=none`` for configs that pick no experiment, and ``backbone=tiny_dit`` for
    those that pick neither an experiment nor a backbone (search has no experiment of its own)."""
    name = name.removesuffix(".py")
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "experiment" in keys or name not in ("train", "evaluate", "search"):
        return list(overrides)
    extra = ([] if name == "search" else ["experiment=none"]) + ([] if "backbone" in keys else TINY)
    return [*overrides, *extra]  # after the flags (train.py -m ...: argparse takes one block of overrides)


def compose_cfg(name: str, overrides: list[str], out: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=with_tiny(name, overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out / "logs")
    return cfg


def run_cli(script: str, args: list[str], cwd: Path, timeout: int = 400, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "PROJECT_ROOT": str(cwd), **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    args = with_tiny(script, args)
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
