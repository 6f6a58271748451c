"""What a router was made for, and the refusal to run it anywhere else.

Routers are per step of one sampler on one backbone: a DDIM-20 router on DPM-Solver++ 20, or an
interval-3 router at interval 2, runs without error and gives silently wrong results. Every router file
diffcache writes therefore records the run it came from (:func:`run_record`):

* DiT format: inside the official ``args`` Namespace as ``args.diffcache`` (a plain dict), next to the
  official keys (``model``, ``num_sampling_steps``), so upstream code still loads the file;
* U-ViT format (a bare state dict upstream code loads as is): a sidecar ``<stem>.meta.json``;
* Lightning checkpoints: ``checkpoint["diffcache"]`` (written by ``RouterDistill.on_save_checkpoint``).

Released files carry no such record. DiT ones name their model and step count in the official
``args``; their sampler is DDIM (the official L2C DiT code trains and samples its routers with DDIM,
``DDIM{20,50}_router.pt``). U-ViT ones record nothing: "unknown, not checked", said in the log.

:func:`check` compares a file's record with the run on every key both know and refuses a difference with
one line naming the setting to change; ``policy.allow_mismatch=true`` turns that into a warning. The
threshold ``theta`` is recorded but never refused: it is an inference choice (sensitivity sweeps).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: record key -> the setting a user changes to match it
SETTING = {"solver": "solver=", "solver_name": "solver=", "num_steps": "solver.num_steps=",
           "num_evals": "solver=", "cache_interval": "policy.cache_interval=", "family": "backbone=",
           "arch": "backbone.arch=", "backbone_class": "backbone=", "depth": "backbone="}


def run_record(backbone, solver=None, policy=None) -> dict[str, Any]:
    """The facts a router depends on, for the run that is about to use (or has just trained) it."""
    rec: dict[str, Any] = {"family": getattr(backbone, "family", None) or None,
                           "arch": getattr(backbone, "arch", None), "backbone_class": type(backbone).__name__,
                           "depth": int(backbone.layout.depth), "site_kinds": list(backbone.layout.site_kinds)}
    if solver is not None:
        rec.update({"solver": type(solver).__name__, "solver_name": getattr(solver, "name", None),
                    "num_steps": int(solver.num_steps), "num_evals": int(solver.num_evals)})
    if policy is not None:
        rec.update({"cache_interval": int(policy.cache_interval), "theta": float(policy.theta)})
    return {k: v for k, v in rec.items() if v is not None}


def sidecar(path: str | Path) -> Path:
    """``router.pth`` -> ``router.meta.json``."""
    path = Path(path)
    return path.with_name(path.stem + ".meta.json")


def write_sidecar(path: str | Path, record: dict) -> Path:
    side = sidecar(path)
    side.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return side


def file_record(fmt: str, args=None, path: str | Path | None = None, lightning: dict | None = None) -> dict | None:
    """The record stored with a router (None: the file says nothing about its run)."""
    if lightning is not None:  # RouterDistill.on_save_checkpoint: solver is the solver's short name
        rec = {"solver_name": lightning.get("solver"), "num_steps": lightning.get("num_steps"),
               "num_evals": lightning.get("num_evals"), "cache_interval": lightning.get("cache_interval"),
               "backbone_class": lightning.get("backbone"), "depth": lightning.get("depth")}
        return {k: v for k, v in rec.items() if v is not None}
    if args is not None:
        ours = getattr(args, "diffcache", None)
        if isinstance(ours, dict):
            return dict(ours)
        rec = {}
        if getattr(args, "model", None):
            rec["arch"] = str(args.model)
        if getattr(args, "num_sampling_steps", None):
            rec.update({"num_steps": int(args.num_sampling_steps), "solver": "DDIM"})
        return rec or None
    if path is not None and sidecar(path).is_file():
        return json.loads(sidecar(path).read_text())
    return None


def differences(record: dict, run: dict) -> list[str]:
    """``["solver: router DDIM, run DPMSolverPP2M (change solver)", ...]`` for keys both sides know."""
    keys = [k for k in SETTING if k in record and k in run]
    if "solver" in keys and "solver_name" in keys:  # the same fact twice: name it once
        keys.remove("solver_name")
    out = []
    for key in keys:
        if str(record[key]) != str(run[key]):
            setting = SETTING[key]
            hint = f"set {setting}{record[key]}" if key in ("num_steps", "cache_interval") else f"change {setting[:-1]}"
            out.append(f"{key}: router {record[key]}, run {run[key]} ({hint})")
    return out


def check(record: dict | None, run: dict, where: str, allow_mismatch: bool = False) -> list[str]:
    """Refuse (ValueError) a router whose record differs from ``run``; returns the differences found."""
    if record is None:
        log.warning("%s records no solver / backbone (a released U-ViT router?): unknown, not checked", where)
        return []
    diffs = differences(record, run)
    if "theta" in record and "theta" in run and float(record["theta"]) != float(run["theta"]):
        log.info("%s was trained at theta=%s; this run uses theta=%s", where, record["theta"], run["theta"])
    if diffs and not allow_mismatch:
        raise ValueError(f"{where} was made for another run: " + "; ".join(diffs)
                         + ". Routers are per step of one sampler on one backbone; policy.allow_mismatch=true "
                           "runs it anyway")
    if diffs:
        log.warning("%s was made for another run (%s); running it anyway (policy.allow_mismatch=true)",
                    where, "; ".join(diffs))
    return diffs
