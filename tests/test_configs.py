"""Every option of every config group composes and instantiates (tiny sizes where needed).

Real-size backbones are built on the meta device (shapes only, no memory); GPU trainer configs are
instantiated with the accelerator switched to CPU when no GPU is present.
"""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from hydra_utils import CONF, compose_cfg

from diffcache.utils.build import build_backbone, build_callbacks, build_loggers, build_policy, build_solver


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_config_groups_exist():
    for group in ["backbone", "solver", "policy", "module", "data", "metrics", "trainer", "logger", "callbacks",
                  "paths", "hydra", "debug", "experiment"]:
        assert options(group), group
    assert set(options("trainer")) == {"default", "cpu", "gpu", "ddp", "ddp_sim"}
    assert set(options("logger")) == {"csv", "wandb", "tensorboard"}
    assert {"ddim20", "ddim50", "ddim250", "ddpm250", "dpm20", "dpm50", "dpmpp20"} <= set(options("solver"))
    assert {"none", "l2c", "toca", "fora"} <= set(options("policy"))


@pytest.mark.parametrize("name", options("backbone"))
def test_backbone_options(tmp_path, name):
    cfg = compose_cfg("train", [f"backbone={name}", "backbone.random_init=true"], tmp_path)
    tiny = name.startswith(("tiny", "mnist"))  # small: built on CPU (mnist_* load their shipped assets)
    with torch.device("cpu" if tiny else "meta"):
        bb = build_backbone(cfg.backbone)
    assert bb.family == {"dit": "dit", "uvit": "uvit", "pixart": "pixart"}[name.split("_")[-1] if tiny else name.split("_")[0]]
    assert len(bb.cache_sites()) == bb.depth * len(bb.site_kinds)
    assert cfg.run_name.startswith(f"{name}-ddim20-l2c")


@pytest.mark.parametrize("name", options("solver"))
@pytest.mark.parametrize("backbone", ["tiny_dit", "tiny_uvit"])
def test_solver_options(tmp_path, name, backbone):
    cfg = compose_cfg("train", [f"backbone={backbone}", f"solver={name}"], tmp_path)
    solver = build_solver(cfg.solver)
    assert solver.num_evals == cfg.solver.num_steps
    assert len(solver.model_times()) == solver.num_evals


@pytest.mark.parametrize("name", options("policy"))
def test_policy_options(tmp_path, name):
    cfg = compose_cfg("train", [f"policy={name}", "solver=ddim50"], tmp_path)
    bb = build_backbone(cfg.backbone)
    policy = build_policy(cfg.policy, bb, build_solver(cfg.solver))
    assert policy.name == name
    assert bb.policy is policy


@pytest.mark.parametrize("name", options("module"))
def test_module_options(tmp_path, name):
    from diffcache.modules.router_distill import RouterDistill

    cfg = compose_cfg("train", [f"module={name}"], tmp_path)
    bb, solver = build_backbone(cfg.backbone), build_solver(cfg.solver)
    if name == "teacher_pretrain":  # trains a backbone, not a router (scripts/train_teachers.py)
        from diffcache.modules.teacher_pretrain import TeacherPretrain

        module = TeacherPretrain(bb, **cfg.module)
        assert module.lr == cfg.module.lr and module.ema_decay == cfg.module.ema_decay
        return
    module = RouterDistill(bb, solver, build_policy(cfg.policy, bb, solver), **cfg.module)
    assert module.lr == cfg.module.lr and module.cache_evals


@pytest.mark.parametrize("name", options("data"))
def test_data_options(tmp_path, name):
    from diffcache.data.datamodule import build_datamodule

    extra = []
    if name == "latents":
        torch.save({"latents": torch.randn(6, 4, 8, 8), "labels": torch.arange(6) % 10}, tmp_path / "lat.pt")
        extra = [f"data.path={tmp_path / 'lat.pt'}", "data.num_workers=0", "data.batch_size=2"]
    cfg = compose_cfg("train", [f"data={name}", *extra], tmp_path)
    dm = build_datamodule(cfg.data, build_backbone(cfg.backbone))
    batch = next(iter(dm.train_dataloader()))
    assert ("x0" in batch) == (name != "noise")


@pytest.mark.parametrize("name", options("metrics"))
def test_metrics_options(tmp_path, name):
    cfg = compose_cfg("evaluate", [f"metrics={name}"], tmp_path)
    assert cfg.metrics.name == name


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options(tmp_path, name):
    cfg = compose_cfg("train", [f"trainer={name}"], tmp_path)
    kw = {}
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        kw = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}
    trainer = instantiate(cfg.trainer, logger=False, **kw)
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options(tmp_path, name, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg("train", [f"logger={name}"] + (["logger.wandb.offline=true"] if name == "wandb" else []), tmp_path)
    (lg,) = build_loggers(cfg.logger)
    lg.log_metrics({"x": 1.0}, step=0)
    lg.finalize("success")
    if name == "wandb":
        import wandb

        wandb.finish()
    assert any(tmp_path.rglob("*")), "logger wrote nothing"


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_options(tmp_path, name):
    cfg = compose_cfg("train", [f"callbacks={name}"], tmp_path)
    cbs = build_callbacks(cfg.callbacks)
    assert len(cbs) == len([v for v in (cfg.callbacks or {}).values() if v])


@pytest.mark.parametrize("name", options("debug"))
def test_debug_options(tmp_path, name):
    cfg = compose_cfg("train", [f"debug={name}"], tmp_path)
    assert cfg.callbacks is None


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options(tmp_path, name):
    task = "train" if name.startswith("l2c") else "evaluate"
    cfg = compose_cfg(task, [f"experiment={name}", "backbone.random_init=true"], tmp_path)
    with torch.device("meta"):
        bb = build_backbone(cfg.backbone)
    solver = build_solver(cfg.solver)
    policy = build_policy(cfg.policy, bb, solver)
    assert policy.name == cfg.policy.name


def test_experiment_hyperparameters_match_reference(tmp_path):
    """Paper Table 8 / reference l2c.md: lambda, theta, clamp, reduction per setting."""
    expect = {"l2c_dit_ddim20": (5e-6, 0.1, 5.0, "mean", 20000), "l2c_dit_ddim50": (1e-6, 0.1, 5.0, "mean", 40000),
              "l2c_uvit_dpm20": (0.1, 0.9, None, "sum", 40000), "l2c_uvit_dpm50": (0.1, 0.9, None, "sum", 40000)}
    for name, (lam, theta, clamp, red, steps) in expect.items():
        cfg = compose_cfg("train", [f"experiment={name}"], tmp_path)
        assert (cfg.policy.lam, cfg.policy.theta, cfg.policy.clamp, cfg.module.loss_reduction, cfg.trainer.max_steps) \
            == (lam, theta, clamp, red, steps), name
        assert cfg.module.lr == 1e-3 and cfg.module.label_drop == 0.1
        assert cfg.data.batch_size * cfg.trainer.devices == 64


def test_run_dir_named_after_choices(tmp_path):
    cfg = compose_cfg("train", ["backbone=tiny_uvit", "solver=dpm20", "policy=l2c"], tmp_path)
    assert "tiny_uvit-dpm20-l2c" in cfg.hydra.run.dir
