"""Value and file checks that need no weights, run by the preflight before the run folder exists.

A negative lambda, theta outside [0, 1], an odd NFE for DPM-Solver-2, a missing / unreadable / truncated
checkpoint or a router made for another backbone used to fail only after the imports, the model build and
the folder creation, leaving a ``FAILED`` folder beside the real runs. Here they fail in a second or two,
with the same messages the task would give (the policy, solver and data constructors are the checks; the
router is set up on a weightless copy of the backbone, ``torch.device("meta")``).
"""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..backbones import meta_backbone, weights_hint
from ..utils.build import build_policy
from ..utils.cli import user_error


def _build(node, setting: str):
    """``instantiate(node)``; a config error surfaces as the ValueError the class raised."""
    try:
        return instantiate(node)
    except Exception as e:  # noqa: BLE001 - an input error is re-raised plain, a bug with its traceback
        err = user_error(e)
        if err is None:
            raise
        raise ValueError(f"{setting}: {err}" if setting not in str(err) else str(err)) from None


def check_file(path, setting: str, hint: str = "") -> Path:
    """``path`` exists, is readable and is not cut short (zip central directory / safetensors header)."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{setting}={path}: no such file" + (f"; {hint}" if hint else ""))
    if p.is_dir():
        return p  # a diffusers directory: its files are checked where they are read
    if not os.access(p, os.R_OK):
        raise PermissionError(f"{setting}={path}: the file cannot be read (permissions)")
    size = p.stat().st_size
    with p.open("rb") as fh:
        head = fh.read(8)
    if p.suffix == ".safetensors":
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        ok = 0 <= n and 8 + n <= size
    elif head[:2] == b"PK":  # torch.save's zip format: the central directory sits at the very end
        try:
            with zipfile.ZipFile(p) as z:
                ok = bool(z.namelist())
        except (zipfile.BadZipFile, OSError):
            ok = False
    else:
        ok = size > 0 and head[:1] == b"\x80"  # torch's legacy pickle format
    if not ok:
        raise ValueError(f"{setting}={path} is not a readable torch checkpoint ({size:,} bytes: truncated by an "
                         f"interrupted copy or download, or not a checkpoint); fetch or write it again")
    return p


def _check_metrics_fit(cfg: DictConfig) -> None:
    """MNIST metrics (what the default experiments bring) on a teacher that does not sample MNIST digits."""
    target = str(OmegaConf.select(cfg, "metrics.quality._target_") or "")
    arch = str(OmegaConf.select(cfg, "backbone.arch") or "")
    if "mnist" in target and arch and not arch.startswith("mnist"):
        exp = "mnist_dit" if cfg.get("task_name") == "train" else "mnist_eval"
        raise ValueError(f"metrics=mnist measures MNIST digits, but backbone={arch} does not sample them: the default "
                         f"experiment={exp} brings them; add experiment=none (or the teacher's own experiment, or "
                         f"metrics=fid_is)")


def _check_json(path, setting: str) -> None:
    import json

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{setting}={path}: no such file (error_table.json, or error_table.partial.json of "
                                f"an interrupted search)")
    try:
        json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{setting}={path} is not a readable JSON table ({e}); measure it again") from None


def check_router_fits(cfg: DictConfig, path, setting: str) -> None:
    """The router file (or Lightning checkpoint) at ``path`` drives this backbone and solver (same messages
    as the run: router length vs depth x kinds, steps, provenance)."""
    check_file(path, setting)
    policy = build_policy(cfg.policy)
    if not policy.trainable:
        raise ValueError(f"{setting} is only for policy=l2c / search (this run uses policy={policy.name})")
    policy.load_official(path)
    if setting == "ckpt_path" and policy.imported.fmt != "lightning":
        raise ValueError(f"ckpt_path={path} is a router file, not a Lightning checkpoint of train.py; resume from "
                         f"<run>/checkpoints/last.ckpt (or evaluate the router with router_ckpt=)")
    policy.setup(meta_backbone(cfg.backbone), _build(cfg.solver, "solver"))


def check_inputs(cfg: DictConfig) -> None:
    """Every value and file check of one run (train / evaluate / search); raises ValueError / FileNotFoundError."""
    task = cfg.get("task_name")
    if cfg.get("solver") is not None:
        _build(cfg.solver, "solver")
    if cfg.get("policy") is not None:
        _build(cfg.policy, "policy")
    _check_metrics_fit(cfg)
    ckpt = OmegaConf.select(cfg, "backbone.ckpt")
    if ckpt:
        check_file(ckpt, "backbone.ckpt", weights_hint(OmegaConf.select(cfg, "backbone.arch")))
    if task == "train":
        if cfg.get("data") is not None:
            _build(cfg.data, "data")
        if cfg.get("ckpt_path"):
            check_router_fits(cfg, cfg.ckpt_path, "ckpt_path")
    elif task == "evaluate" and cfg.get("router_ckpt"):
        check_router_fits(cfg, cfg.router_ckpt, "router_ckpt")
    elif task == "search":
        _build(cfg.searcher, "searcher")
        table = OmegaConf.select(cfg, "searcher.table")
        if table:
            _check_json(table, "searcher.table")
