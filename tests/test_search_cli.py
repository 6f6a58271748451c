"""search.py end to end, and L2C / search / FORA on few-step solvers (DDIM-10, DPM-Solver++ 10 and 20).

Each run uses a tiny DiT moved off its official init (which zeroes every gate, so caching would change
nothing) and a handful of samples.
"""
from __future__ import annotations

import json

import pytest
import torch
from hydra_utils import FAST, compose_cfg, run_cli

from diffcache.tasks.evaluate import evaluate
from diffcache.tasks.search import search
from diffcache.tasks.train import train

EVAL = ["eval.num_samples=2", "eval.batch_size=2", "eval.progress=false", "eval.latency_repeats=0", "eval.save_grid=false"]
SEARCH = ["searcher.num_samples=2", "searcher.progress=false"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from diffcache.backbones import build_backbone

    torch.manual_seed(0)
    m = build_backbone("tiny_dit")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(m.state_dict(), path)
    return f"backbone.ckpt={path}"


def test_search_cli_writes_router_that_evaluate_reads(tmp_path, teacher):
    res = run_cli("search.py", [teacher, *SEARCH, "searcher.budget=0.75", f"hydra.run.dir={tmp_path / 'run'}"],
                  tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "run"
    for name in ("router.pt", "error_table.json", "error_table.csv", "summary.json", "schedule.png"):
        assert (run / name).is_file(), name
    s = json.loads((run / "summary.json").read_text())
    assert s["budget"] == 0.75 and s["method"] == "dp" and s["proxy_dp"] <= s["proxy_greedy"]
    ev = evaluate(compose_cfg("evaluate", [teacher, "policy=l2c", f"router_ckpt={run / 'router.pt'}", *EVAL],
                              tmp_path / "eval"))
    # the MAC counter reads the written router exactly as the search counted it
    assert ev["macs_fraction"] == pytest.approx(s["macs_fraction"], rel=1e-12)
    assert ev["macs_fraction"] <= 0.75 and ev["mse_vs_full"] > 0
    # a budget sweep selects again from the written table without measuring
    again = search(compose_cfg("search", [teacher, "searcher.budget=0.9", f"searcher.table={run / 'error_table.json'}",
                                          "searcher.progress=false"], tmp_path / "again"))
    assert again["proxy_dp"] < s["proxy_dp"] and 0.75 < again["macs_fraction"] <= 0.9
    with pytest.raises(ValueError, match="measured for cache evaluations"):
        search(compose_cfg("search", [teacher, "solver=ddim10", f"searcher.table={run / 'error_table.json'}"],
                           tmp_path / "mismatch"))
    bad = run_cli("search.py", [teacher, *SEARCH, "searcher.budget=0.2", f"hydra.run.dir={tmp_path / 'bad'}"],
                  tmp_path, timeout=300)
    assert bad.returncode == 2 and "raise the budget" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("solver", ["ddim10", "dpmpp10", "dpmpp20"])
def test_caching_on_few_step_solvers(tmp_path, teacher, solver):
    # searched schedule -> evaluate as L2C
    s = search(compose_cfg("search", [teacher, f"solver={solver}", *SEARCH, "searcher.proxy=step",
                                      "searcher.budget=0.8"], tmp_path / "search"))
    steps = int(solver[-2:])
    assert s["num_steps"] == steps and s["macs_fraction"] <= 0.8
    ev = evaluate(compose_cfg("evaluate", [teacher, f"solver={solver}", "policy=l2c", f"router_ckpt={s['router']}",
                                           *EVAL], tmp_path / "eval_search"))
    assert ev["num_evals"] == steps and ev["macs_fraction"] == pytest.approx(s["macs_fraction"], rel=1e-12)
    # a trained L2C router on the same solver
    train(compose_cfg("train", [teacher, f"solver={solver}", "trainer=cpu", "trainer.max_steps=1", "data.batch_size=2",
                                "callbacks=none", *FAST], tmp_path / "train"))
    ev = evaluate(compose_cfg("evaluate", [teacher, f"solver={solver}", "policy=l2c", "policy.theta=0.5",
                                           f"router_ckpt={tmp_path / 'train' / 'router.pt'}", *EVAL], tmp_path / "eval_l2c"))
    assert ev["num_evals"] == steps and 0.5 <= ev["macs_fraction"] <= 1.0
    # FORA
    ev = evaluate(compose_cfg("evaluate", [teacher, f"solver={solver}", "policy=fora", *EVAL], tmp_path / "eval_fora"))
    assert 0 < ev["macs_fraction"] < 1 and ev["mse_vs_full"] > 0
