"""Issue 9: every input mistake a user meets on the command line ends with one ``error: ...`` line (exit 2)
naming the setting to change; failed runs are marked; nothing half written. The cases of one script run
in one process through the real ``@hydra.main`` (``cli_batch.run_many``)."""
from __future__ import annotations

import json
import tempfile

import pytest
import torch
from cli_batch import one_error_line, run_many
from hydra_utils import FAST, compose_cfg
from test_evaluate import perturbed_ckpt

from diffcache.tasks.train import train


def _read_only_dir() -> str | None:
    """A directory nobody (not even root) can write: sysfs. None where it is writable."""
    try:
        tempfile.TemporaryDirectory(dir="/sys/fs").cleanup()
    except OSError:
        return "/sys/fs/diffcache_test"
    return None


RO = _read_only_dir()
needs_ro = pytest.mark.skipif(RO is None, reason="no read-only directory (/sys/fs) to test with")
TINY = ["trainer.max_steps=2", "data.batch_size=2", "callbacks=none", *FAST]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A teacher, a trained router (interval 3), a Lightning checkpoint, and broken files."""
    d = tmp_path_factory.mktemp("files")
    teacher = perturbed_ckpt("tiny_dit", d / "teacher.pt")
    train(compose_cfg("train", [f"backbone.ckpt={teacher}", "trainer=cpu", "policy.cache_interval=3",
                                "callbacks.model_checkpoint.every_n_train_steps=1", "trainer.max_steps=2",
                                "data.batch_size=2", *FAST], d / "run3"))
    m = torch.load(teacher, weights_only=True)
    m = {k: (v * float("nan") if "final_layer" in k else v) for k, v in m.items()}
    torch.save(m, d / "nan_teacher.pt")
    torch.save({"latents": torch.randn(4, 4, 8, 8), "labels": torch.tensor([0, 1, 2, 50])}, d / "bad_labels.pt")
    nan = torch.load(d / "run3" / "router.pt", weights_only=False)
    nan["routers"]["1.prob"][0] = float("nan")
    torch.save(nan, d / "nan_router.pt")
    return {"teacher": teacher, "router3": str(d / "run3" / "router.pt"), "d": d,
            "last3": str(d / "run3" / "checkpoints" / "last.ckpt")}


def test_train_input_mistakes_are_one_line_and_wandb_defaults_to_offline(tmp_path, files):
    f = files
    cases = {
        "policy=toca": (["policy=toca", *TINY], ["router training needs policy=l2c"]),
        "lam=inf": (["policy.lam=inf", *TINY], ["policy.lam"]),
        "latents w/o path": (["data=latents", *TINY], ["data.path="]),
        "labels>=classes": (["data=latents", f"data.path={f['d'] / 'bad_labels.pt'}", *TINY], ["labels span 0..50"]),
        "resume other solver": ([f"ckpt_path={f['last3']}", "solver=dpm20", *TINY],
                                ["solver_name: router ddim, run dpm_solver2"]),
        "cpu devices=2": (["trainer=cpu", "trainer.devices=2", *TINY], ["ddp_find_unused_parameters_true"]),
        "non-finite loss": ([f"backbone.ckpt={f['d'] / 'nan_teacher.pt'}", "trainer=cpu", *TINY],
                            ["module.nonfinite=skip"]),
    }
    if torch.cuda.device_count() < 8:
        cases["experiment devices: 8"] = (["experiment=l2c_dit_ddim20"], ["trainer."])
    if RO:
        cases["read-only log dir"] = ([f"paths.log_dir={RO}", *TINY], ["paths.log_dir=", "not writable"])
        cases["read-only ckpt dir"] = ([f"callbacks.model_checkpoint.dirpath={RO}", "trainer.max_steps=2",
                                        "data.batch_size=2", *FAST], ["callbacks.model_checkpoint.dirpath="])
    # last (it sets WANDB_MODE for the process): W&B with no key, no netrc and no WANDB_MODE logs offline
    wandb_case = ["logger=wandb", "trainer=cpu", *TINY, f"hydra.run.dir={tmp_path / 'wandb_run'}"]
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "none"),
           "WANDB_SILENT": "true"}
    results = run_many("train.py", [argv for argv, _ in cases.values()] + [wandb_case], tmp_path, env=env)
    for (name, (_, needles)), r in zip(cases.items(), results):
        one_error_line(r, *needles)
    wb = results[-1]
    assert wb["code"] == 0 and "logging offline" in wb["out"], wb["out"][-3000:]
    assert list((tmp_path / "wandb_run").rglob("offline-run-*")), "no offline W&B run written"
    # a failure inside the task marks its run folder; a config-time refusal creates none
    runs = list((tmp_path / "logs" / "train" / "runs").glob("*/*"))  # the W&B run has its own folder
    assert runs and all((r / "FAILED").is_file() and not (r / "summary.json").exists() for r in runs)
    assert not list((tmp_path / "logs").rglob("router.p*")), "a failed run wrote a router"


def test_evaluate_input_mistakes_are_one_line(tmp_path, files):
    f = files
    ck = f"backbone.ckpt={f['teacher']}"
    quick = ["eval.num_samples=1", "eval.batch_size=1", "eval.latency_repeats=0", "eval.progress=false",
             "eval.save_grid=false"]
    cases = {
        "l2c w/o router": (["policy=l2c", ck, *quick], ["router_ckpt="]),
        "num_samples=0": (["eval.num_samples=0", ck], ["eval.num_samples"]),
        "batch_size=0": (["eval.batch_size=0", ck], ["eval.batch_size"]),
        "nan router": (["policy=l2c", f"router_ckpt={f['d'] / 'nan_router.pt'}", ck, *quick], ["not finite"]),
        "interval mismatch": (["policy=l2c", f"router_ckpt={f['router3']}", ck, *quick],
                              ["cache_interval: router 3, run 2", "policy.cache_interval=3"]),
        "solver mismatch": (["policy=l2c", f"router_ckpt={f['router3']}", "policy.cache_interval=3", "solver=dpmpp20",
                             ck, *quick], ["solver: router DDIM, run DPMSolverPP2M"]),
        "fresh_ratio>1": (["policy=toca", "policy.fresh_ratio=1.5", ck, *quick], ["policy.fresh_ratio"]),
        "labels out of range": (["eval.labels=[3,10]", ck, *quick], ["eval.labels"]),
    }
    if not torch.cuda.is_available():
        cases["cuda w/o gpu"] = (["eval.device=cuda", ck, *quick], ["eval.device=cpu"])
    if RO:
        cases["read-only log dir"] = ([f"paths.log_dir={RO}", ck, *quick], ["paths.log_dir="])
    argvs = [argv for argv, _ in cases.values()]
    argvs.append(["policy=l2c", f"router_ckpt={f['router3']}", "policy.allow_mismatch=true", ck, *quick,
                  f"hydra.run.dir={tmp_path / 'allowed'}"])
    argvs.append(["policy=l2c", f"router_ckpt={f['last3']}", "policy.cache_interval=3", ck, *quick,
                  f"hydra.run.dir={tmp_path / 'from_ckpt'}"])
    results = run_many("evaluate.py", argvs, tmp_path)
    for (name, (_, needles)), r in zip(cases.items(), results):
        one_error_line(r, *needles)
    allowed, from_ckpt = results[-2], results[-1]
    assert allowed["code"] == 0 and "allow_mismatch" in allowed["out"], allowed["out"][-2000:]
    assert from_ckpt["code"] == 0, from_ckpt["out"][-2000:]  # a Lightning last.ckpt is a router file too
    assert json.loads((tmp_path / "allowed" / "summary.json").read_text())["router"] == f["router3"]
    assert json.loads((tmp_path / "from_ckpt" / "summary.json").read_text())["router"] == f["last3"]


def test_preflight_refuses_bad_values_and_files_before_any_folder_exists(tmp_path):
    """Issue 23.5: value and file mistakes end in the preflight: one ``error:`` line, exit 2, and no run
    folder (not even ``logs/``), so the newest folder is still the latest real run."""
    from diffcache.backbones import build_backbone
    from diffcache.policies.l2c import L2CPolicy
    from diffcache.solvers import DDIM

    bb = build_backbone("tiny_uvit")
    pol = L2CPolicy(theta=0.5, init_seed=0)
    pol.setup(bb, DDIM(20, schedule="linear"))
    uvit_router = pol.export_official(tmp_path / "uvit_router")  # 2 x 2 sites + skips: not tiny_dit's length
    teacher = perturbed_ckpt("tiny_dit", tmp_path / "teacher.pt")
    (tmp_path / "cut.pt").write_bytes(open(teacher, "rb").read()[:1000])
    train_cases = {
        "lam<0": (["policy.lam=-1e-6", *TINY], ["policy.lam", ">= 0"]),
        "theta>1": (["policy.theta=1.5", *TINY], ["policy.theta", "[0, 1]"]),
        "odd NFE": (["solver=dpm20", "solver.num_steps=19", *TINY], ["even NFE, got 19"]),
        "missing teacher": (["backbone=mnist_dit", "backbone.ckpt=nowhere/teacher.pt", *TINY],
                            ["backbone.ckpt=nowhere/teacher.pt: no such file", "assets/"]),
        "truncated teacher": ([f"backbone.ckpt={tmp_path / 'cut.pt'}", *TINY], ["not a readable torch checkpoint"]),
        "truncated ckpt_path": ([f"ckpt_path={tmp_path / 'cut.pt'}", *TINY], ["ckpt_path=", "not a readable"]),
        "router as ckpt_path": ([f"ckpt_path={uvit_router}", *TINY], ["is a router file, not a Lightning checkpoint"]),
    }
    eval_cases = {
        "router of another backbone": (["backbone=tiny_dit", "policy=l2c", f"router_ckpt={uvit_router}"],
                                       ["router length", "does not match the backbone: depth 2"]),
        "missing router": (["policy=l2c", "router_ckpt=nowhere.pt"], ["router_ckpt=nowhere.pt: no such file"]),
    }
    for script, cases in (("train.py", train_cases), ("evaluate.py", eval_cases)):
        results = run_many(script, [argv for argv, _ in cases.values()], tmp_path)
        for (_, needles), r in zip(cases.values(), results):
            one_error_line(r, *needles)
    assert not (tmp_path / "logs").exists(), list((tmp_path / "logs").rglob("*"))
