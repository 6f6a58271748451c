"""evaluate.py end to end on tiny backbones: compute, latency and fidelity vs the uncached sampler."""
from __future__ import annotations

import json

import pytest
import torch
from hydra_utils import compose_cfg

from diffcache.tasks.evaluate import evaluate

EVAL = ["eval.num_samples=3", "eval.batch_size=2", "eval.progress=false", "eval.latency_repeats=1"]


def perturbed_ckpt(arch: str, path) -> str:
    """A tiny backbone whose weights are not the official init (which zeroes DiT/PixArt outputs), saved
    in its official checkpoint format: what a user would pass as backbone.ckpt."""
    from diffcache.backbones import build_backbone

    torch.manual_seed(0)
    m = build_backbone(arch)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"state_dict": m.state_dict()} if m.text_conditioned else m.state_dict(), path)
    return str(path)


def test_evaluate_none_is_reference(tmp_path):
    cfg = compose_cfg("evaluate", ["backbone=tiny_dit", "solver=ddim20", "policy=none", *EVAL], tmp_path)
    res = evaluate(cfg)
    assert res["num_samples"] == 3 and "mse_vs_full" not in res
    assert res["macs_fraction"] == pytest.approx(1.0)
    assert (tmp_path / "samples.png").is_file()
    assert torch.load(tmp_path / "samples.pt").shape == (3, 4, 8, 8)


@pytest.mark.parametrize("backbone,solver,policy", [("tiny_dit", "ddim20", "fora"), ("tiny_pixart", "dpmpp20", "fora"),
                                                     ("tiny_uvit", "dpm20", "toca")])
def test_evaluate_cached_policy_costs_less_and_differs(tmp_path, backbone, solver, policy):
    extra = ["policy.preset=uvit_dpm20"] if policy == "toca" else []
    extra.append(f"backbone.ckpt={perturbed_ckpt(backbone, tmp_path / 'teacher.pt')}")
    cfg = compose_cfg("evaluate", [f"backbone={backbone}", f"solver={solver}", f"policy={policy}", *extra, *EVAL],
                      tmp_path)
    res = evaluate(cfg)
    assert 0 < res["macs_fraction"] < 1
    assert res["mse_vs_full"] > 0 and res["psnr_vs_full_db"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["macs_fraction"] == res["macs_fraction"]


def test_evaluate_batch_size_does_not_change_ddpm_results(tmp_path):
    """DDPM-20 (per-step noise) with FORA: eval.batch_size 1, 2, 4, 8 give the same samples and PSNR to full, to
    float32 round-off of differently batched kernels (eps 1.2e-7 x 20 steps x ~4 accumulated layers ~ 1e-5 of
    the samples' scale); the old per-batch step generator differed by O(scale)."""
    ck = f"backbone.ckpt={perturbed_ckpt('tiny_dit', tmp_path / 'teacher.pt')}"
    res, xs = {}, {}
    for bs in (1, 2, 4, 8):
        res[bs] = evaluate(compose_cfg("evaluate", [ck, "policy=fora", "solver=ddpm250", "solver.num_steps=20",
                                                    "eval.num_samples=8", f"eval.batch_size={bs}", "eval.save_grid=false",
                                                    "eval.latency_repeats=0", "eval.progress=false"], tmp_path / str(bs)))
        xs[bs] = torch.load(tmp_path / str(bs) / "samples.pt")
    scale = xs[1].abs().max()
    assert scale > 0.1
    for bs in (2, 4, 8):
        torch.testing.assert_close(xs[bs], xs[1], rtol=0, atol=1e-5 * float(scale))
        assert res[bs]["psnr_vs_full_db"] == pytest.approx(res[1]["psnr_vs_full_db"], abs=1e-3)
        assert res[bs]["macs_fraction"] == res[1]["macs_fraction"]


def test_evaluate_router_trained_by_train_py(tmp_path):
    """train.py writes the router in the official format; evaluate.py samples with it."""
    from diffcache.tasks.train import train

    ck = f"backbone.ckpt={perturbed_ckpt('tiny_dit', tmp_path / 'teacher.pt')}"
    train(compose_cfg("train", [ck, "trainer=cpu", "trainer.max_steps=2", "data.batch_size=2", "callbacks=none",
                                "trainer.enable_progress_bar=false"], tmp_path / "train"))
    router = tmp_path / "train" / "router.pt"
    res = evaluate(compose_cfg("evaluate", [ck, "policy=l2c", f"router_ckpt={router}", "policy.theta=0.5", *EVAL],
                               tmp_path / "eval"))
    assert 0 < res["macs_fraction"] < 1 and res["mse_vs_full"] > 0
    with pytest.raises(ValueError, match="routers were made for 20 evaluations"):
        evaluate(compose_cfg("evaluate", [ck, "solver=ddim50", "policy=l2c", f"router_ckpt={router}", *EVAL],
                             tmp_path / "eval50"))


def test_sharded_evaluation_is_rank_independent_and_resumes(tmp_path):
    """2 gloo processes write exactly the samples 1 process does, in the same order; a run whose shards were
    partly lost resumes from the rest and ends with the same set (hashes equal)."""
    import hashlib

    from hydra_utils import run_cli

    ck = f"backbone.ckpt={perturbed_ckpt('tiny_dit', tmp_path / 'teacher.pt')}"
    common = [ck, "policy=fora", "eval.shards=true", "eval.num_samples=6", "eval.batch_size=2", "eval.latency_repeats=0",
              "eval.progress=false", "eval.save_grid=false"]
    one = run_cli("evaluate.py", [*common, "trainer=cpu", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli("evaluate.py", [*common, "trainer=ddp_sim", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert a["samples_sha256"] == b["samples_sha256"] and a["mse_vs_full"] == b["mse_vs_full"] > 0
    assert len(list((tmp_path / "two" / "shards" / "cached").glob("shard_*.pt"))) == 3
    (tmp_path / "two" / "shards" / "cached" / "shard_000001.pt").unlink()  # "killed" before this shard landed
    again = run_cli("evaluate.py", [*common, "trainer=cpu", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    c = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert c["samples_sha256"] == a["samples_sha256"]
    x = torch.load(tmp_path / "one" / "samples.pt")
    assert hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest() == a["samples_sha256"]


def test_evaluate_reports_quality_with_an_injected_extractor(tmp_path):
    from hydra_utils import ROOT

    byo = ROOT / "tests" / "byo"
    cfg = compose_cfg("evaluate", [f"hydra.searchpath=[file://{byo / 'conf'}]", "backbone=tiny_dit",
                                   "backbone.overrides={in_channels:1}", "policy=fora", "metrics=tiny", *EVAL,
                                   "eval.num_samples=6"], tmp_path)
    res = evaluate(cfg)
    assert {"tiny_fid", "tiny_is", "psnr", "mse"} <= set(res) and res["tiny_fid"] > 0 and res["tiny_is"] >= 1
    assert json.loads((tmp_path / "summary.json").read_text())["tiny_fid"] == res["tiny_fid"]
    cfg = compose_cfg("evaluate", [f"hydra.searchpath=[file://{byo / 'conf'}]", "backbone=tiny_dit", "policy=fora",
                                   "metrics=tiny", *EVAL], tmp_path / "latent")
    with pytest.raises(ValueError, match="needs images"):
        evaluate(cfg)
