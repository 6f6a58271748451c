"""Issue 9 end to end: sweeps with path overrides and their tables, reproducible DDPM fidelity, latency and
speedup keys, real conditioning, decoded side-by-side pictures, one CSV row per step, Ctrl-C and resume."""
from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from cli_batch import run_many
from hydra_utils import FAST, ROOT, compose_cfg, with_tiny
from test_evaluate import perturbed_ckpt

from diffcache.backbones import build_backbone, from_config
from diffcache.policies.l2c import L2CPolicy
from diffcache.sampling import sample
from diffcache.solvers import DDPM
from diffcache.tasks.evaluate import evaluate
from diffcache.tasks.train import train

QUICK = ["eval.progress=false", "eval.latency_repeats=0"]


def _env(cwd):
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "PROJECT_ROOT": str(cwd),
            "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cli(script, args, cwd, timeout=400):
    args = with_tiny(script, args)
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=_env(cwd), capture_output=True,
                          text=True, timeout=timeout)


def test_sweeps_with_a_path_override_keep_one_folder_per_run_and_fill_the_table(tmp_path):
    """The README's lambda sweep on a real checkpoint path (plus a bad value: that job fails alone, the table
    lists it, the sweep exits 2), then an evaluate sweep over theta."""
    ckdir = tmp_path / "ckpts" / "DiT tiny"
    ckdir.mkdir(parents=True)
    teacher = perturbed_ckpt("tiny_dit", ckdir / "model.pt")
    res = _cli("train.py", ["-m", "policy.lam=1e-6,-1,1e-5", f"backbone.ckpt={teacher}", "trainer.max_steps=2",
                            "data.batch_size=2", "callbacks=none"], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in out, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 2 and "policy.lam" in errors[0] and "1 of 3 sweep runs failed" in errors[1]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").glob("*/*")
    runs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    assert [(r / "summary.json").is_file() for r in runs] == [True, False, True]
    assert (runs[1] / "FAILED").is_file() and not list(runs[1].glob("router.*"))
    assert all(r.name.startswith(f"{i}_") and not set(r.name) & set("/=, ") for i, r in enumerate(runs))
    table = pd.read_csv(sweep / "summary.csv")
    assert list(table["status"])[::2] == ["ok", "ok"] and table["status"][1].startswith("failed: ValueError: policy.lam")
    table = table.iloc[[0, 2]]
    assert sorted(table["lam"]) == [1e-6, 1e-5]
    for col in ("cached_fraction", "macs_fraction", "speedup_macs", "train/loss"):
        assert table[col].notna().all(), col
    assert ((table["macs_fraction"] > 0) & (table["macs_fraction"] <= 1)).all()
    assert (table["speedup_macs"] * table["macs_fraction"]).round(9).eq(1).all()  # one meaning: full / cached
    # the console: each log line once, no litlogger advert, no "Total FLOPs: 0", losses in scientific notation
    logged = [ln for ln in out.splitlines() if ln.startswith("[20")]
    assert len(logged) == len(set(logged)) and not any(ln.startswith("INFO: ") for ln in out.splitlines())
    assert "litlogger" not in out and "Total FLOPs" not in out and "Epoch 0/-2" not in out
    assert "e-0" in out  # the progress bar shows ~1e-6 losses as 1.234e-06, not 0.000

    router = runs[0] / "router.pt"
    res = _cli("evaluate.py", ["-m", "policy=l2c", f"router_ckpt={router}", "policy.theta=0.2,0.8",
                               f"backbone.ckpt={teacher}", "eval.num_samples=2", "eval.batch_size=2",
                               "eval.latency_repeats=1", "eval.progress=false"], tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    (esweep,) = (tmp_path / "logs" / "evaluate" / "multiruns").glob("*/*")
    et = pd.read_csv(esweep / "summary.csv")
    assert len(et) == 2 and all((esweep / r / "summary.json").is_file() for r in et["run"])  # flat, router path too
    for col in ("cached_fraction", "macs_fraction", "speedup_macs", "mse_vs_full", "latency_cached_s",
                "latency_full_s", "speedup_latency"):
        assert et[col].notna().all(), col
    assert et["cached_fraction"].iloc[0] <= et["cached_fraction"].iloc[1]  # a higher theta caches more


def _ddpm_router(tmp_path, steps=20):
    """A DDPM-20 router file recorded for DDPM (random logits: theta=0 computes every branch anyway)."""
    bb = build_backbone("tiny_dit")
    pol = L2CPolicy(theta=0.0, init_seed=0)
    pol.setup(bb, DDPM(steps, schedule="linear"))
    return pol.export_official(tmp_path / "ddpm_router")


def test_ddpm_fidelity_is_exact_and_reproducible(tmp_path):
    ck = f"backbone.ckpt={perturbed_ckpt('tiny_dit', tmp_path / 'teacher.pt')}"
    ddpm = ["solver=ddpm250", "solver.num_steps=20", "eval.num_samples=3", "eval.batch_size=2", *QUICK]
    res = evaluate(compose_cfg("evaluate", [ck, *ddpm, "policy=l2c", "policy.theta=0.0",
                                            f"router_ckpt={_ddpm_router(tmp_path)}"], tmp_path / "l2c"))
    assert res["cached"] == 0 and res["mse_vs_full"] == 0.0  # caches nothing: bit-identical to the full sampler
    a = evaluate(compose_cfg("evaluate", [ck, *ddpm, "policy=fora"], tmp_path / "a"))
    b = evaluate(compose_cfg("evaluate", [ck, *ddpm, "policy=fora"], tmp_path / "b"))
    assert a["mse_vs_full"] > 0 and a["mse_vs_full"] == b["mse_vs_full"]
    assert torch.equal(torch.load(tmp_path / "a" / "samples.pt"), torch.load(tmp_path / "b" / "samples.pt"))


def test_evaluate_reports_cached_and_full_latency_and_their_ratio(tmp_path):
    cfg = compose_cfg("evaluate", ["policy=fora", "eval.num_samples=2", "eval.batch_size=2", "eval.progress=false"],
                      tmp_path)
    assert cfg.eval.latency_repeats >= 3
    res = evaluate(cfg)
    assert res["latency_repeats"] == cfg.eval.latency_repeats
    assert res["latency_cached_min_s"] <= res["latency_cached_s"] <= res["latency_cached_max_s"]
    assert res["latency_full_min_s"] <= res["latency_full_s"] <= res["latency_full_max_s"]
    assert res["speedup_latency"] == pytest.approx(res["latency_full_s"] / res["latency_cached_s"])
    assert res["speedup_macs"] == pytest.approx(1 / res["macs_fraction"])


def _expected(backbone, cfg, cond_of):
    """Samples rebuilt by hand from the documented seeding (noise of sample i from seed * 7919 + i)."""
    outs = []
    for i in range(int(cfg.eval.num_samples)):
        g = torch.Generator().manual_seed(cfg.seed * 7919 + i)
        noise = torch.randn(1, backbone.in_channels, backbone.input_size, backbone.input_size, generator=g)
        from diffcache.utils.build import build_solver
        outs.append(sample(backbone, build_solver(cfg.solver), None, noise, cond_of(i), guidance=cfg.eval.guidance))
    return torch.cat(outs)


def test_evaluate_uses_real_labels_and_encoded_prompts(tmp_path):
    cfg = compose_cfg("evaluate", ["eval.labels=[3,7]", "eval.num_samples=3", "eval.batch_size=2", *QUICK],
                      tmp_path / "labels")
    evaluate(cfg)
    bb = from_config(cfg.backbone)
    want = _expected(bb, cfg, lambda i: torch.tensor([[3, 7][i % 2]]))
    torch.testing.assert_close(torch.load(tmp_path / "labels" / "samples.pt"), want, rtol=0, atol=1e-5)

    pix = build_backbone("tiny_pixart")
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, pix.token_num, pix.caption_channels, generator=g)
    mask = torch.ones(2, pix.token_num, dtype=torch.long)
    mask[1, 5:] = 0
    torch.save({"y": y, "mask": mask, "prompts": ["a cat", "a dog"]}, tmp_path / "prompts.pt")
    ck = perturbed_ckpt("tiny_pixart", tmp_path / "pixart.pt")
    cfg = compose_cfg("evaluate", ["backbone=tiny_pixart", f"backbone.ckpt={ck}", "solver=dpmpp20",
                                   f"eval.prompts={tmp_path / 'prompts.pt'}", "eval.num_samples=2", "eval.batch_size=2",
                                   *QUICK], tmp_path / "prompts")
    evaluate(cfg)
    bb = from_config(cfg.backbone)
    want = _expected(bb, cfg, lambda i: {"y": y[i:i + 1], "mask": mask[i:i + 1]})
    # float32 round-off of batch 2 vs batch 1 kernels over 20 steps (cf. test_evaluate_batch_size_...)
    torch.testing.assert_close(torch.load(tmp_path / "prompts" / "samples.pt"), want, rtol=0,
                               atol=1e-5 * float(want.abs().max()))


def test_samples_png_decodes_through_the_vae_cached_beside_full(tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    ck = perturbed_ckpt("tiny_dit", tmp_path / "teacher.pt")
    res = evaluate(compose_cfg("evaluate", [f"backbone.ckpt={ck}", "policy=fora", f"backbone.vae={tmp_path / 'vae'}",
                                            "eval.num_samples=2", "eval.batch_size=2", *QUICK], tmp_path / "run"))
    assert res["grid"] == str(tmp_path / "run" / "samples.png") and Image.open(res["grid"]).size[0] > 300  # labelled
    raw = tmp_path / "run" / "samples_raw.png"
    img = torch.from_numpy(__import__("numpy").array(Image.open(raw).convert("RGB"))).permute(2, 0, 1)
    # 2 samples x (cached, full), each 8x8 latent -> 16x16 pixels, upscaled x8 to 128, padding 2 (make_grid)
    assert tuple(img.shape) == (3, 128 + 4, 4 * (128 + 2) + 2)
    cached = torch.load(tmp_path / "run" / "samples.pt")
    with torch.no_grad():
        dec = ((AutoencoderKL.from_pretrained(tmp_path / "vae").decode(cached[:1] / 0.18215).sample + 1) / 2).clamp(0, 1)
    tile = img[:, 2:130, 2:130].float() / 255
    want = torch.nn.functional.interpolate(dec, scale_factor=8, mode="nearest")[0]
    assert (tile - want).abs().max() <= 1 / 255 + 1e-6  # 8-bit quantisation of the same decoded picture
    full_tile = img[:, 2:130, 132:260].float() / 255
    assert (full_tile - tile).abs().max() > 0  # the uncached sample beside it differs (FORA changes samples)


def test_csv_has_one_row_per_step_and_overrides_name_one_setting(tmp_path):
    train(compose_cfg("train", ["trainer=cpu", "trainer.max_steps=3", "data.batch_size=2", "module.heatmap_every=1",
                                *FAST], tmp_path / "t"))
    with open(tmp_path / "t" / "csv" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(r["train/loss"] and r["lr-AdamW"] and r["router/cached"] for r in rows)
    for arch in ("tiny_dit", "tiny_uvit", "tiny_pixart"):  # backbone.overrides={input_size:4}: one name everywhere
        cfg = compose_cfg("train", [f"backbone={arch}", "backbone.overrides={input_size:4}"], tmp_path / arch)
        assert from_config(cfg.backbone).input_size == 4, arch


def _wait_for_rows(csv_path, n, proc, timeout=300.0):
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if csv_path.is_file() and len(csv_path.read_text().splitlines()) > n:
            return True
        time.sleep(0.2)
    return False


def _start(args, run, log_path, cwd):
    """train.py in the background, stdout to a file (a full pipe would stall it). SIGINT back to its default:
    a job started in the background of a non-interactive shell (as CI may be) inherits it *ignored*."""
    fh = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run}"], cwd=cwd,
                            env=_env(cwd), stdout=fh, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, fh


def _steps(run):
    with open(run / "csv" / "metrics.csv") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh)]


def _routers(run):
    return torch.load(run / "router.pt", weights_only=False)["routers"]


def test_interrupt_and_kill_then_resume_lose_nothing(tmp_path):
    """Issue 23.1: Ctrl-C writes last.ckpt at the interrupted step and prints the resume command; after Ctrl-C
    or kill -9, that command finishes the run with every step's CSV row once, train_s summed over both
    segments, no warning, and the router of an uninterrupted run."""
    n = 60  # lr 0.05 and clamp 1: logits reach the clamp, so a resume that skipped it would differ
    args = [*with_tiny("train", []), f"trainer.max_steps={n}", "data.batch_size=2", "module.optimizer.lr=0.05",
            "policy.clamp=1.0"]
    procs = {sig: _start(args, tmp_path / sig.name, tmp_path / f"{sig.name}.out", tmp_path)
             for sig in (signal.SIGINT, signal.SIGKILL)}
    sent: set = set()
    try:
        t0 = time.time()
        while len(sent) < len(procs) and time.time() - t0 < 300:
            for sig, (proc, _) in procs.items():  # past the step-20 checkpoint, not past step 30
                rows = tmp_path / sig.name / "csv" / "metrics.csv"
                if sig not in sent and proc.poll() is None and rows.is_file() and len(rows.read_text().splitlines()) > 23:
                    proc.send_signal(sig)  # no wait here: the other run must not finish while this one shuts down
                    sent.add(sig)
            time.sleep(0.05)
        for proc, _ in procs.values():
            proc.wait(timeout=400)  # generous: a loaded 2-core CI machine
    finally:
        for proc, fh in procs.values():
            proc.kill()
            fh.close()
    ref = train(compose_cfg("train", [*args, *FAST], tmp_path / "ref"))  # the uninterrupted run
    assert not ref.get("partial")
    out = (tmp_path / "SIGINT.out").read_text()
    assert procs[signal.SIGINT][0].returncode == 130, out[-3000:]
    assert procs[signal.SIGKILL][0].returncode == -signal.SIGKILL  # killed mid-run, not finished first
    run = tmp_path / "SIGINT"
    first = json.loads((run / "summary.json").read_text())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["partial"] and 23 <= first["global_step"] == ckpt["global_step"] < n  # the interrupted step
    for i, v in enumerate(_routers(run).values()):  # the same step: the same logits
        assert torch.equal(v, ckpt["state_dict"][f"policy.routers.{i}"])
    command = shlex.split(out[out.index("resume with:"):].splitlines()[1])
    assert command[:2] == ["python", "train.py"] and command[-1] == f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    resumes = {"SIGINT": command[2:], "SIGKILL": [*args, f"ckpt_path={tmp_path / 'SIGKILL/checkpoints/last.ckpt'}"]}
    results = run_many("train.py", list(resumes.values()), tmp_path)
    for (name, _), r in zip(resumes.items(), results):
        run = tmp_path / name
        assert r["code"] == 0, r["out"][-3000:]
        assert "resumed at step" in r["out"], r["out"]
        for noise in ("Warning", "deleted", "not empty", "not resumable", "GPU available"):
            assert noise not in r["out"], (noise, r["out"])
        assert _steps(run) == list(range(n)), name  # every step once, the history before the checkpoint kept
        summary = json.loads((run / "summary.json").read_text())
        assert summary["global_step"] == n and not summary["partial"]
        for k, v in _routers(tmp_path / "ref").items():
            assert torch.equal(v, _routers(run)[k]), (name, k)
    assert json.loads((tmp_path / "SIGINT" / "summary.json").read_text())["train_s"] > first["train_s"]
    assert not (tmp_path / "logs").exists(), "resuming opened a new run folder"

    # evaluate takes the Lightning checkpoint as a router file
    res = evaluate(compose_cfg("evaluate", ["policy=l2c", f"router_ckpt={tmp_path / 'SIGINT/checkpoints/last.ckpt'}",
                                            "eval.num_samples=1", "eval.batch_size=1", *QUICK], tmp_path / "eval"))
    assert res["router"].endswith("last.ckpt") and 0 < res["macs_fraction"] <= 1


def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    """Run folders are named to the second: a second run that finds the name taken (another job started in the
    same second) claims ``<name>-2`` instead of sharing the first one's logs, CSV and checkpoints. Every name
    the run could get in the next two minutes is taken beforehand, so the collision is certain."""
    runs = tmp_path / "logs" / "evaluate" / "runs" / "probe"
    now = time.time()
    taken = {time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now + k)) for k in range(120)}
    for name in taken:
        (runs / name).mkdir(parents=True)
    res = _cli("evaluate.py", ["policy=fora", "eval.num_samples=2", "eval.batch_size=2", "run_name=probe",
                               "paths.log_dir=logs", *QUICK], tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    written = [p.parent for p in runs.rglob("summary.json")]
    assert len(written) == 1 and written[0].name.endswith("-2") and written[0].name[:-2] in taken, written
    assert all(not any((runs / name).iterdir()) for name in taken)  # the taken folders were left alone
    assert sorted(p.name for p in runs.iterdir() if p.name not in taken) == [written[0].name]  # no stray folder


def test_two_sweeps_started_in_the_same_second_get_their_own_folders(tmp_path):
    """The same for ``-m``: Hydra names the sweep folder to the second and its jobs' subfolders by job number,
    so a second sweep in the same second wrote its ``0_...`` jobs over the first one's. It now claims
    ``<name>-2``, and every job (whose config Hydra recomposes from the overrides) and the sweep table follow."""
    sweeps = tmp_path / "logs" / "evaluate" / "multiruns" / "probe"
    now = time.time()
    taken = {time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now + k)) for k in range(120)}
    for name in taken:
        (sweeps / name).mkdir(parents=True)
    res = _cli("evaluate.py", ["-m", "policy=fora,none", "eval.num_samples=2", "eval.batch_size=2", "run_name=probe",
                               "paths.log_dir=logs", *QUICK], tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (claimed,) = [p for p in sweeps.iterdir() if p.name not in taken]
    assert claimed.name.endswith("-2") and claimed.name[:-2] in taken
    assert sorted(p.parent.name.split("_")[0] for p in claimed.rglob("summary.json")) == ["0", "1"]
    assert (claimed / "summary.csv").is_file()  # the sweep table was written where the jobs ran
    assert all(not any((sweeps / name).iterdir()) for name in taken)
