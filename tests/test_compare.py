"""``compare.py`` on its own (no training): composed through Hydra (conf/compare_task.yaml, real ``_target_``s),
with a router file or none; the row cache reuses measured rows and the "fewer steps" tag (the equal-compute
baseline) is recomputed for every run (issue 20 item 6: a reused row kept the tag of the run that measured it)."""
from __future__ import annotations

import math

import torch
from hydra_utils import compose_cfg, run_cli

from diffcache.tasks.compare import run
from diffcache.backbones import from_config
from diffcache.utils.build import build_policy, build_solver
from diffcache.utils.record import load_rows

BASE = ["experiment=none", "backbone=tiny_dit", "backbone.overrides={in_channels:1}", "solver=ddim20",
        "compare=default", "compare.num_samples=4", "compare.batch_size=2", "compare.latency_repeats=0",
        "compare.fora_intervals=[]", "compare.toca=false", "device=cpu"]


def _teacher_and_router(tmp_path):
    """A teacher checkpoint (a tiny pixel DiT off its zero init) and an L2C router file with N(0, 1) logits."""
    cfg = compose_cfg("compare_task", BASE, tmp_path / "setup")
    torch.manual_seed(0)
    bb = from_config(cfg.backbone)
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(bb.state_dict(), tmp_path / "teacher.pt")
    policy = build_policy(cfg.policy)
    policy.setup(bb, build_solver(cfg.solver))
    return str(tmp_path / "teacher.pt"), str(policy.export_official(tmp_path / "router"))


def test_compare_without_training_recomputes_the_fewer_steps_tag_of_reused_rows(tmp_path, capsys):
    ckpt, router = _teacher_and_router(tmp_path)
    common = [*BASE, f"backbone.ckpt={ckpt}", f"router_ckpt={router}", f"compare.cache_dir={tmp_path / 'cache'}"]
    first = run(compose_cfg("compare_task", [*common, "policy.theta=0.9"], tmp_path / "a"))
    few_a = next(r for r in first if r.role == "fewer steps")
    # a lower threshold caches less: more MACs, a larger equal-compute step count; ask for the first run's one too
    second = run(compose_cfg("compare_task", [*common, "policy.theta=0.6", f"compare.steps=[{few_a.nfe}]"],
                             tmp_path / "b"))
    full, l2c = second[0], next(r for r in second if r.method == "l2c")
    # independently: DDIM's MACs grow linearly with its steps, so the equal-compute count is ceil(20 * fraction)
    want = math.ceil(20 * l2c.gmacs / full.gmacs - 1e-9)
    assert want > few_a.nfe and full.provenance["reused"] and not l2c.provenance["reused"]
    reused = next(r for r in second if r.method == "steps" and r.nfe == few_a.nfe)
    assert reused.provenance["reused"] and reused.role == "" and reused.label == f"DDIM-{few_a.nfe}"
    tagged = [r for r in second if r.role == "fewer steps"]
    assert [r.nfe for r in tagged] == [want] and tagged[0].label == f"fewer steps: DDIM-{want}"
    assert load_rows(tmp_path / "b" / "results.json")[2].role == reused.role  # the record on disk says the same
    md = (tmp_path / "b" / "comparison.md").read_text()
    assert f"| DDIM-{few_a.nfe} (reused) |" in md and f"| fewer steps: DDIM-{want} |" in md
    # no router: the baselines alone, all from the cache, nothing tagged
    alone = run(compose_cfg("compare_task", [*common, "router_ckpt=null", f"compare.steps=[{few_a.nfe}]"],
                            tmp_path / "c"))
    assert [r.method for r in alone] == ["full", "steps"] and all(r.provenance["reused"] and not r.role for r in alone)
    assert (tmp_path / "c" / "comparison_samples.png").is_file()
    assert "(reused)" in capsys.readouterr().out


def test_compare_cli_refuses_a_missing_router(tmp_path):
    res = run_cli("compare.py", [*BASE, f"router_ckpt={tmp_path / 'nope.pt'}", f"hydra.run.dir={tmp_path / 'run'}"],
                  tmp_path, timeout=120)
    assert res.returncode == 2 and "router_ckpt=" in res.stderr and "does not exist" in res.stderr
