"""Searched static schedules: selection (greedy vs exact DP vs brute force), budgets in MACs, the error
table, the router it writes, and the static-schedule export round trip.

Expected optima come from brute-force enumeration or from hand-worked tables (comments show the sums);
MAC figures from the MAC counter run on an independent policy (FORA) or from the DiT formulas.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import perturbed

from diffcache.metrics.cost import policy_cost
from diffcache.policies.fora import FORAPolicy
from diffcache.policies.l2c import L2CPolicy, make_schedule
from diffcache.search import (
    ScheduleSearch,
    brute_force,
    dynamic_programme,
    greedy,
    measure_error_table,
    proxy_of,
    saved_of,
    site_macs,
)
from diffcache.policies import static_schedule as ss
from diffcache.sampling import sample
from diffcache.solvers import DDIM

GUIDANCE = 1.5


# ============================================================================ selection on synthetic tables
def test_greedy_strictly_worse_than_dp_on_a_hand_worked_table():
    # one cache evaluation, sites (cost, error): a (1, 0.10), m1 (2, 0.22), m2 (2, 0.22); save >= 4.
    # greedy by error/MAC takes a (0.10), m1 (0.11) -> 3 saved, then m2 -> 5 saved: 0.54.
    # the optimum reuses m1 + m2: 4 saved, 0.44 (a + one m saves only 3).
    E, c = np.array([[0.10, 0.22, 0.22]]), np.array([1.0, 2.0, 2.0])
    g, d = greedy(E, c, 4.0), dynamic_programme(E, c, 4.0)
    assert g.tolist() == [[True, True, True]] and proxy_of(g, E) == pytest.approx(0.54)
    assert d.tolist() == [[False, True, True]] and proxy_of(d, E) == pytest.approx(0.44)


@pytest.mark.parametrize("seed", range(40))
def test_dp_finds_brute_force_optimum_and_never_loses_to_greedy(seed):
    rng = np.random.default_rng(seed)
    rows, sites = int(rng.integers(1, 4)), int(rng.integers(2, 5))
    c = rng.choice([1.0, 2.0], size=sites)  # attn 1 : mlp 2 like DiT
    E = rng.random((rows, sites)) ** 3       # skewed, with near-ties
    need = float(rng.random() * c.sum() * rows)
    bf, dp, gr = brute_force(E, c, need), dynamic_programme(E, c, need), greedy(E, c, need)
    assert proxy_of(dp, E) == pytest.approx(proxy_of(bf, E), abs=1e-12)
    assert proxy_of(dp, E) <= proxy_of(gr, E) + 1e-12
    for m in (dp, gr):  # enough saved, and less than one branch too much (a minimal cover)
        assert need - 1e-9 <= saved_of(m, c) < need + c.max()


def test_dp_non_integer_costs_still_meet_the_budget():
    # PixArt-like costs with no small common unit: units are rounded down, so MACs never exceed the budget
    rng = np.random.default_rng(1)
    c, E = np.array([1.0, 0.7301, 2.0]), rng.random((3, 3))
    need = 5.3
    d = dynamic_programme(E, c, need)
    assert saved_of(d, c) >= need
    assert proxy_of(d, E) <= proxy_of(greedy(E, c, need), E) + 1e-12


def test_selection_rejects_bad_tables():
    with pytest.raises(ValueError, match=">= 0"):
        greedy(np.array([[-1.0]]), np.array([1.0]), 0.5)
    with pytest.raises(ValueError, match="raise the budget"):
        dynamic_programme(np.ones((2, 2)), np.array([1.0, 2.0]), 7.0)


# ============================================================================ on a real tiny DiT
@pytest.fixture(scope="module")
def tiny():
    return perturbed("tiny_dit", seed=3, scale=0.1), DDIM(20)


@pytest.fixture(scope="module")
def table(tiny):
    backbone, solver = tiny
    return ScheduleSearch(num_samples=4, progress=False, guidance=GUIDANCE).measure(backbone, solver)


def test_error_table_shape_and_meaning(tiny, table):
    backbone, solver = tiny
    sched = make_schedule(solver)
    assert table.cache_evals == sched.cache_evals() == list(range(1, 20, 2))
    assert table.sites == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    assert (table.errors > 0).all()  # every reuse changes a perturbed model's output
    # independent check of one entry: an L2C router that reuses only layer 1's MLP at the last cache step
    pol = L2CPolicy(theta=0.5, layout=backbone.layout, solver=solver)
    with torch.no_grad():
        for p in pol.routers:
            p.fill_(10.0)
        pol.routers[sched.router[19]][3] = -10.0
    noise, cond = __import__("diffcache.data.seeded", fromlist=["x"]).seeded_inputs(backbone, range(4))
    ref = sample(backbone, solver, None, noise, cond, GUIDANCE)
    got = sample(backbone, solver, pol, noise, cond, GUIDANCE)
    want = (got.double() - ref.double()).pow(2).mean().item()
    # same computations in a different loop (advance from a stored state vs one sample): float32 identical
    assert table.errors[-1, 3].item() == pytest.approx(want, rel=1e-6)


def test_step_proxy_is_the_next_state_error(tiny):
    backbone, solver = tiny[0], DDIM(10)
    from diffcache.data.seeded import seeded_inputs

    noise, cond = seeded_inputs(backbone, range(2))
    t = measure_error_table(backbone, solver, noise, cond, GUIDANCE, proxy="step", progress=False)
    tf = measure_error_table(backbone, solver, noise, cond, GUIDANCE, proxy="final", progress=False)
    # at the last evaluation the next state is the final sample: both proxies agree there
    torch.testing.assert_close(t.errors[-1], tf.errors[-1], rtol=1e-6, atol=0)
    assert not torch.allclose(t.errors[0], tf.errors[0])


def test_budget_one_caches_nothing_and_is_bit_exact(tiny, table):
    backbone, solver = tiny
    res = ScheduleSearch(budget=1.0, progress=False, guidance=GUIDANCE).run(backbone, solver, table=table)
    assert not res.masks["dp"].any() and not res.masks["greedy"].any()
    assert res.cost["macs_ratio"] == 1.0
    from diffcache.data.seeded import seeded_inputs

    noise, cond = seeded_inputs(backbone, range(3), seed=5)
    assert torch.equal(sample(backbone, solver, res.policy, noise, cond, GUIDANCE),
                       sample(backbone, solver, None, noise, cond, GUIDANCE))


@pytest.mark.parametrize("budget", [0.9, 0.8, 0.7, 0.62])
def test_budget_macs_within_one_branch(tiny, table, budget):
    backbone, solver = tiny
    branch = float(site_macs(backbone).max())  # one MLP branch of one image
    for method in ("dp", "greedy"):
        res = ScheduleSearch(budget=budget, method=method, progress=False).run(backbone, solver, table=table)
        macs, full = res.cost["macs"], res.cost["macs_full"]
        assert budget * full - branch < macs <= budget * full * (1 + 1e-12)
    assert res.proxies["dp"] <= res.proxies["greedy"] + 1e-15


def test_site_macs_match_the_dit_formula(tiny):
    backbone, _ = tiny
    T, D = backbone.layout.num_tokens, backbone.hidden_size  # 16 tokens, width 64, MLP ratio 4
    assert site_macs(backbone).tolist() == [4 * T * D * D, 8 * T * D * D] * 2


def test_budget_below_reach_says_what_to_change(tiny, table):
    backbone, solver = tiny
    with pytest.raises(ValueError, match="below what this schedule can reach"):
        ScheduleSearch(budget=0.3, progress=False).run(backbone, solver, table=table)
    # the cache-step unit (L2C's policy.budget): 0.0 reuses every cacheable site = FORA interval 2 "up"
    res = ScheduleSearch(budget=0.0, budget_of="cache_steps", progress=False).run(backbone, solver, table=table)
    fora = policy_cost(backbone, solver, FORAPolicy(2, direction="up"))
    assert res.cost["macs"] == pytest.approx(fora["macs"], rel=1e-12)


# ============================================================================ export round trip
def test_export_json_round_trip_and_cache_dit(tiny, table, tmp_path):
    backbone, solver = tiny
    res = ScheduleSearch(budget=0.75, progress=False).run(backbone, solver, table=table)
    path = res.policy.export_official(tmp_path / "router")
    pol = L2CPolicy.from_official(path, theta=0.1, layout=backbone.layout)  # the DiT family's evaluate theta
    mask = ss.static_mask(pol, backbone.layout, solver)
    obj = ss.schedule_json(mask, backbone.layout, solver, backbone="tiny_dit", source=ss.reuse_sources(pol, mask))
    ss.write_json(obj, tmp_path / "s.json")
    back = ss.router_from_schedule(ss.read_schedule(tmp_path / "s.json"), backbone.layout, solver)
    assert back.compute_mask(backbone.layout, solver) == pol.compute_mask(backbone.layout, solver)
    # rows: evaluations; full evaluations (even NFE) compute all; cache rows hold the searched mask
    assert obj["steps"] == 20 and obj["polarity"] == "1 = compute" and len(obj["branches"]) == 4
    assert all(all(mask[e]) for e in range(0, 20, 2))
    assert [mask[e] for e in res.table.cache_evals] == (~res.masks["dp"]).astype(int).tolist()
    cd = ss.cache_dit_mask(mask)
    partial = [e for e in res.table.cache_evals if any(mask[e]) and not all(mask[e])]
    assert cd["partial_evals"] == partial and len(cd["steps_computation_mask"]) == 20
    assert cd["steps_computation_mask"] == [int(all(r)) for r in mask]


def test_fora_exports_step_level_and_is_not_an_l2c_router(tiny):
    backbone, solver = tiny
    mask = ss.static_mask(FORAPolicy(3), backbone.layout, solver)
    cd = ss.cache_dit_mask(mask)
    assert cd["partial_evals"] == [] and cd["lost"].startswith("nothing")
    # FORA interval 3 on 20 evaluations: full at e = 0 and at count-down index 19 - e = 0 mod 3
    assert cd["steps_computation_mask"] == [1 if e == 0 or (19 - e) % 3 == 0 else 0 for e in range(20)]
    obj = ss.schedule_json(mask, backbone.layout, solver, source=ss.reuse_sources(FORAPolicy(3), mask))
    with pytest.raises(ValueError, match="not an L2C cache evaluation"):
        ss.router_from_schedule(obj, backbone.layout, solver)


def test_export_cli(tiny, table, tmp_path, capsys):
    from diffcache.export_schedule import main

    backbone, solver = tiny
    res = ScheduleSearch(budget=0.8, progress=False).run(backbone, solver, table=table)
    path = res.policy.export_official(tmp_path / "router")
    rc = main([str(path), "--solver", "ddim20", "--backbone", "tiny_dit", "--out", str(tmp_path / "s.json"),
               "--cache-dit", str(tmp_path / "cd.json")])
    assert rc == 0
    obj, cd = json.loads((tmp_path / "s.json").read_text()), json.loads((tmp_path / "cd.json").read_text())
    assert obj["format"] == "diffcache-static-schedule/v1" and obj["theta"] == 0.1
    assert obj["mask"] == ss.static_mask(res.policy, backbone.layout, solver)
    assert cd["polarity"] == "1 = compute" and "lost" in cd
    assert main(["--solver", "ddim20", "--out", str(tmp_path / "x.json")]) == 2  # neither router nor --fora
    capsys.readouterr()
    # issue 23.7: a tiny_dit router (depth 2) read with the default layout (mnist_dit, depth 6): evaluate's sentence
    assert main([str(path), "--solver", "ddim20", "--out", str(tmp_path / "y.json")]) == 2
    err = capsys.readouterr().err
    assert "router length 4 does not match the backbone: depth 6 x 2 kinds" in err and "--backbone" in err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert ":mod:" not in capsys.readouterr().out


def test_uvit_dpm_solver2_shifted_schedule(tmp_path):
    # two evaluations per step, separate CFG passes: cache evaluations reuse the previous midpoint
    from diffcache.solvers import DPMSolver2

    backbone, solver = perturbed("tiny_uvit", seed=1, scale=0.1), DPMSolver2(20, time_input="scaled")
    s = ScheduleSearch(budget=0.8, proxy="step", num_samples=2, progress=False, guidance=0.4)
    res = s.run(backbone, solver)
    assert res.table.cache_evals == list(range(2, 20, 2))
    assert res.cost["macs"] <= 0.8 * res.cost["macs_full"] and res.proxies["dp"] <= res.proxies["greedy"]
    assert res.cost["macs"] > 0.8 * res.cost["macs_full"] - site_macs(backbone).max()
    one = ScheduleSearch(budget=1.0, proxy="step", num_samples=2, progress=False).run(backbone, solver, table=res.table)
    from diffcache.data.seeded import seeded_inputs

    noise, cond = seeded_inputs(backbone, range(2))
    assert torch.equal(sample(backbone, solver, one.policy, noise, cond, 0.4), sample(backbone, solver, None, noise, cond, 0.4))
    assert res.policy.export_official(tmp_path / "r").suffix == ".pth"  # U-ViT's official router format


def test_an_interrupted_table_continues_where_it_stopped(tiny, table, tmp_path):
    """Issue 23.4: the entries an interrupted search measured are saved (NaN where not yet measured) and
    ``searcher.table=<partial>`` measures only the rest, giving the table of an uninterrupted search."""
    backbone, solver = tiny
    first = ScheduleSearch(num_samples=4, progress=False, guidance=GUIDANCE)
    first.partial = [table.errors.clone()]
    first.partial[0][3:] = float("nan")  # as if Ctrl-C came after the first three cache evaluations' rows
    done, total = first.save_partial(tmp_path / "partial.json")
    assert (done, total) == (3 * table.errors.shape[1], table.errors.numel())
    again = ScheduleSearch(num_samples=4, progress=False, guidance=GUIDANCE, table=str(tmp_path / "partial.json"))
    res = again.run(backbone, solver)
    torch.testing.assert_close(res.table.errors, table.errors, rtol=0, atol=0)
    other = ScheduleSearch(num_samples=8, progress=False, guidance=GUIDANCE, table=str(tmp_path / "partial.json"))
    with pytest.raises(ValueError, match="partial table of another calibration setting"):
        other.run(backbone, solver)
