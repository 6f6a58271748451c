"""Config-time checks, run by Hydra before it creates the run folder (a Hydra callback).

Mistakes that would otherwise surface as a library traceback, or only after minutes of setup, end here
with one ``error: ...`` line (exit 2) naming the setting to change: an output or checkpoint directory
that cannot be written, a bad value or input file (:mod:`.inputs`: lambda, theta, NFE parity, a missing,
unreadable or truncated checkpoint, a router that does not fit the backbone), more GPUs than the machine
has, several devices without the DDP strategy router training needs, ``train.py`` with a policy that has nothing to train, a router recipe whose ``lr x updates
per router`` cannot move a logit past theta (refused when it states ``module.updates_per_router``, else
warned). ``logger=wandb`` with no API key configured and no ``WANDB_MODE`` logs offline (``wandb sync``
uploads later), and says so. When every check passes it claims the run or sweep folder (``-2`` when another
run started in the same second holds the name).
"""
from __future__ import annotations

import logging
import netrc
import os
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..modules.convergence import recipe_reach
from ..policies.base import require_trainable
from ..utils.cli import Rejected
from .inputs import check_inputs

log = logging.getLogger(__name__)


def _select(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``, or None where it cannot be resolved yet (e.g. the Hydra output dir)."""
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception:  # noqa: BLE001 - an unresolvable value is simply not checked here
        return None


def check_writable(path, setting: str) -> None:
    """``path`` can be created (or exists) and written; probes the nearest existing ancestor."""
    p = Path(str(path)).expanduser().absolute()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{setting}={path} is not usable: {probe} is a file, not a directory")
    try:
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as e:
        raise ValueError(f"{setting}={path} is not writable ({e.strerror or e}); choose a writable directory, "
                         f"e.g. {setting}=./logs") from None


def _num_devices(devices, available: int) -> int:
    if isinstance(devices, int):
        return available if devices == -1 else devices
    if isinstance(devices, str):
        return available if devices in ("auto", "-1") else len(devices.split(",")) if "," in devices else int(devices)
    return len(list(devices))


def check_trainer(trainer) -> None:
    import torch

    acc = str(trainer.get("accelerator", "auto"))
    strategy = str(trainer.get("strategy", "auto"))
    gpus = torch.cuda.device_count()
    if acc in ("gpu", "cuda") and gpus == 0:
        raise ValueError(f"trainer.accelerator={acc} but this machine has no CUDA GPU; use trainer=cpu "
                         f"(or trainer=ddp_sim to try the multi-device path on CPU)")
    on_gpu = acc in ("gpu", "cuda") or (acc == "auto" and gpus > 0)
    n = _num_devices(trainer.get("devices", 1), gpus if on_gpu else 1)
    if on_gpu and n > gpus:
        raise ValueError(f"trainer.devices={trainer.get('devices')} but this machine has {gpus} GPU(s); set "
                         f"trainer.devices={gpus} (or -1 for all of them)")
    if n > 1 and "find_unused_parameters_true" not in strategy:
        raise ValueError(f"trainer.devices={n} with trainer.strategy={strategy}: each rank trains the router of its "
                         f"own cache step, so the others are unused there and plain DDP stops; use trainer=ddp (GPUs) "
                         f"or trainer=ddp_sim (CPU), which set strategy=ddp_find_unused_parameters_true")


def check_policy_trains(policy) -> None:
    from hydra.utils import get_class

    target = policy.get("_target_") if policy is not None else None
    try:
        cls = get_class(target) if target else None
    except Exception:  # noqa: BLE001 - an unimportable target fails, with its own message, where it is built
        return
    if cls is not None:
        require_trainable(cls)


def check_recipe_reach(cfg: DictConfig) -> None:
    """A router recipe whose ``lr x updates per router`` cannot move a logit past theta: refused when the recipe
    states ``module.updates_per_router``, a loud warning when ``trainer.max_steps`` caps it (a smoke run)."""

    try:
        problem, stated = recipe_reach(cfg)
    except Exception:  # noqa: BLE001 - a config that cannot be read here fails, with its own message, where it is built
        return
    if problem and stated:
        raise ValueError(problem)
    if problem:
        log.warning("THIS ROUTER CANNOT CONVERGE: %s", problem)


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or Path.home() / ".netrc")
        return any("wandb" in host for host in rc.hosts)
    except (OSError, netrc.NetrcParseError):
        return False


def default_wandb_offline(loggers) -> bool:
    """Set ``WANDB_MODE=offline`` when W&B is asked for without a key or a mode; True if it did."""
    wb = [v for v in (loggers or {}).values() if v is not None and "Wandb" in str(v.get("_target_", ""))]
    if not wb or os.environ.get("WANDB_MODE") or all(v.get("offline") for v in wb) or wandb_has_key():
        return False
    os.environ["WANDB_MODE"] = "offline"
    log.warning("logger=wandb: no W&B API key configured (WANDB_API_KEY / wandb login) and no WANDB_MODE, so "
                "logging offline; upload later with `wandb sync`, or set WANDB_MODE=online")
    return True


def check(cfg: DictConfig, run_dir_key: str) -> None:
    """Every check that needs only the config; raises ValueError."""
    for key, setting in (("paths.log_dir", "paths.log_dir"), (run_dir_key, run_dir_key)):
        value = _select(cfg, key)
        if value:
            check_writable(value, setting)
    for name, node in (_select(cfg, "callbacks") or {}).items():
        dirpath = _select(cfg, f"callbacks.{name}.dirpath") if isinstance(node, DictConfig) else None
        if dirpath:
            check_writable(dirpath, f"callbacks.{name}.dirpath")
    if cfg.get("task_name") == "train":
        check_policy_trains(cfg.get("policy"))
        if cfg.get("trainer") is not None:
            check_trainer(cfg.trainer)
            check_recipe_reach(cfg)
    default_wandb_offline(_select(cfg, "logger"))


def resume_in_place(cfg: DictConfig) -> Path | None:
    """``train.py ckpt_path=<run>/checkpoints/last.ckpt``: continue in ``<run>`` (unless hydra.run.dir is set)."""
    from omegaconf import open_dict, read_write

    ck = cfg.get("ckpt_path") if cfg.get("task_name") == "train" else None
    if not ck or any(str(o).startswith("hydra.run.dir=") for o in cfg.hydra.overrides.hydra):
        return None
    run = Path(str(ck)).absolute().parent.parent
    if Path(str(ck)).absolute().parent.name != "checkpoints" or not (run / ".hydra").is_dir():
        return None
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.run.dir = str(run)
    log.info("resuming in the run folder %s", run)
    return run


def claim_run_dir(cfg: DictConfig, key: str = "hydra.run.dir") -> Path | None:
    """Create the run (or sweep) folder now, atomically, with a ``-2``, ``-3`` ... suffix when another run (two
    jobs started in the same second) holds the timestamped name, so two runs never share logs and checkpoints.
    A folder the user names (``hydra.run.dir=`` / ``hydra.sweep.dir=``) or a resume in place is used as it is.
    A sweep's jobs recompose their configs from the Hydra overrides, so the claimed sweep folder is added there."""
    from omegaconf import open_dict, read_write

    if any(str(o).startswith(f"{key}=") for o in cfg.hydra.overrides.hydra):
        return None
    base = Path(str(_select(cfg, key) or ""))
    if not str(base) or str(base) == "." or "'" in str(base):
        return None
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        run = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            run.mkdir()
        except FileExistsError:
            continue
        with read_write(cfg.hydra), open_dict(cfg.hydra):
            OmegaConf.update(cfg, key, str(run))
            if key == "hydra.sweep.dir":
                cfg.hydra.overrides.hydra.append(f"{key}='{run}'")
        return run
    return None


def _run(cfg: DictConfig, run_dir_key: str) -> None:
    try:
        if run_dir_key == "hydra.run.dir":
            resumed = resume_in_place(cfg)
        check(cfg, run_dir_key)
        if run_dir_key == "hydra.run.dir":  # a sweep checks values per job: a bad one fails alone, in the table
            check_inputs(cfg)
            if resumed is None:
                claim_run_dir(cfg)
        else:
            claim_run_dir(cfg, run_dir_key)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        if os.environ.get("DIFFCACHE_DEBUG"):
            raise
        raise Rejected(str(e)) from e  # the entry point's run_main prints it and exits 2


class Preflight(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _run(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _run(config, "hydra.sweep.dir")
