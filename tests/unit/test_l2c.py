"""Learning-to-Cache policy: schedules, routers, modes, budget and the official checkpoint formats.

Numbers come from /work/shared/reference/l2c.md (§1.4-1.6, §3) and from independent computations in
this file. Tests that read the four released router files skip when ``shared/fixtures`` is absent.
"""
from __future__ import annotations

import argparse
import math
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from diffcache.backbones.base import CachedBackbone, SiteLayout
from diffcache.context import StepContext
from diffcache.policies.l2c import (
    L2CPolicy,
    alternating_schedule,
    budget_masks,
    make_schedule,
    shifted_schedule,
    site_costs,
    theta_for_budget,
)
from diffcache.policies.l2c import RouterCheckpointError, load_official, save_official
from tiny_models import bound_for_test

FIXTURES = Path(__file__).resolve().parents[2] / "../shared/fixtures/l2c_routers"
needs_routers = pytest.mark.skipif(not FIXTURES.is_dir(),
                                   reason=f"official L2C router files not found at {FIXTURES} (shared/ fixtures)")
DIT20, DIT50 = FIXTURES / "DiT_DDIM20_router.pt", FIXTURES / "DiT_DDIM50_router.pt"
UVIT20, UVIT50 = FIXTURES / "U-ViT_dpm20_router.pth", FIXTURES / "U-ViT_dpm50_router.pth"


# ============================================================================ a stand-in backbone
class _Block(nn.Module):
    def __init__(self, dim: int, kinds):
        super().__init__()
        self.kinds = kinds
        self.attn = nn.Linear(dim, dim)
        self.cross_attn = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ada = nn.Linear(1, 3 * dim)


class StandIn(CachedBackbone):
    """adaLN-gated residual blocks on tokens (B, N, C): x += gate(t) * site(branch)(x)."""

    family = "dit"

    def __init__(self, depth: int = 3, dim: int = 8, site_kinds=("attn", "mlp"), family: str = "dit"):
        super().__init__()
        self.depth, self.site_kinds, self.family = depth, tuple(site_kinds), family
        self.blocks = nn.ModuleList(_Block(dim, self.site_kinds) for _ in range(depth))

    def forward(self, x, t, cond=None):
        for layer, blk in enumerate(self.blocks):
            gates = blk.ada(t.view(-1, 1, 1).float()).chunk(3, dim=-1)
            for g, kind in zip(gates, self.site_kinds):
                mod = {"attn": blk.attn, "xattn": blk.cross_attn, "mlp": blk.mlp}[kind]
                x = x + g * self.site(layer, kind, mod, x)
        return x


def _branch(blk, kind):
    return {"attn": blk.attn, "xattn": blk.cross_attn, "mlp": blk.mlp}[kind]


def _manual(bb: StandIn, x, t, branch_fn):
    """Independent forward: branch_fn(layer, kind, fresh_fn, h) gives each branch's ungated output."""
    for layer, blk in enumerate(bb.blocks):
        gates = blk.ada(t.view(-1, 1, 1).float()).chunk(3, dim=-1)
        for g, kind in zip(gates, bb.site_kinds):
            x = x + g * branch_fn(layer, kind, _branch(blk, kind), x)
    return x


def _run(bb, policy, x, times, branch="all", nfe_list=None):
    """A toy sampler: x <- x - 0.1 * model(x, t) over the evaluations (all in one solver-step per eval)."""
    n = len(times)
    outs = []
    if policy is not None:
        policy.reset()
    for k in range(n) if nfe_list is None else nfe_list:
        t = torch.full((x.shape[0],), float(times[k]))
        if policy is not None:
            policy.begin(StepContext(nfe=k, step=k, num_steps=n, num_evals=n, branch=branch))
        out = bb(x, t)
        outs.append(out)
        x = x - 0.1 * out
    return x, outs


class _FakeSolver:
    """Only what a schedule may read: num_steps, num_evals, step_of (never the name)."""

    def __init__(self, name, num_steps, per_step):
        self.name, self.num_steps, self.per = name, num_steps, per_step
        self.num_evals = num_steps * per_step

    def step_of(self, k):
        return k // self.per


def ddim(n):
    return _FakeSolver("ddim", n, 1)


def dpm(nfe):
    return _FakeSolver("dpm_solver2", nfe // 2, 2)


@pytest.fixture
def bb():
    torch.manual_seed(0)
    return StandIn(depth=3, dim=8).eval().requires_grad_(False)


# ============================================================================ schedules
def test_ddim_schedule_alternates_first_full_router_is_respaced_index():
    s = make_schedule(ddim(20))
    assert s.kind == "alternating" and s.num_evals == 20 and s.num_routers == 20
    assert s.cache_evals() == list(range(1, 20, 2))
    # respaced index N-1-step: the official DiT reads even indices 0..N-2, from 18 down to 0
    assert s.used_routers() == list(range(18, -1, -2))
    assert all(s.source[e] == e - 1 for e in s.cache_evals())
    assert s.router[0] is None and s.router[19] == 0
    assert s == alternating_schedule(20)  # DDPM and DPM-Solver++ multistep (one evaluation per step): the same


@pytest.mark.parametrize("n", [19, 7, 9])
def test_alternating_schedule_rejects_odd_step_count(n):
    with pytest.raises(ValueError, match="even number of steps"):
        make_schedule(ddim(n))


@pytest.mark.parametrize("nfe, n_cache", [(20, 9), (50, 24)])
def test_dpm_solver2_schedule_is_shifted(nfe, n_cache):
    s = make_schedule(dpm(nfe))
    assert s.kind == "shifted" and s.num_evals == nfe and s.num_steps == nfe // 2 and s.num_routers == nfe
    one_based = [e + 1 for e in s.cache_evals()]
    assert one_based == list(range(3, nfe, 2)) and len(one_based) == n_cache
    assert s.used_routers() == list(range(1, nfe // 2))  # U-ViT routers 1 .. N/2-1
    # each step start t_j reuses the previous step's midpoint s1_{j-1}; midpoints are never cached
    assert all(s.source[e] == e - 1 and e % 2 == 0 for e in s.cache_evals())
    assert all(s.router[e] is None for e in range(1, nfe, 2))
    assert s == shifted_schedule(nfe // 2)


def test_cache_interval_reuses_one_full_step():
    s = make_schedule(ddim(12), cache_interval=3)
    assert [e for e in range(12) if not s.is_cache(e)] == [0, 3, 6, 9]
    assert [s.source[e] for e in s.cache_evals()] == [0, 0, 3, 3, 6, 6, 9, 9]
    assert [s.router[e] for e in s.cache_evals()] == [12 - 1 - e for e in s.cache_evals()]
    assert make_schedule(ddim(13), cache_interval=3).num_evals == 13  # no parity constraint beyond k=2
    with pytest.raises(ValueError, match="only defined for one-evaluation-per-step"):
        make_schedule(dpm(20), cache_interval=3)


class _Irregular(_FakeSolver):
    def step_of(self, k):  # DPM-Solver-fast style: 3, 3, 2, 1, 1 evaluations per step
        return [0, 0, 0, 1, 1, 1, 2, 2, 3, 4][k]


def test_schedule_from_solver_attributes_and_errors():
    """Built from num_steps / num_evals / step_of only: a solver's name never matters."""
    assert make_schedule(_FakeSolver("anything", 20, 1)) == alternating_schedule(20)
    assert make_schedule(_FakeSolver("ddim20", 10, 2)) == shifted_schedule(10)
    with pytest.raises(ValueError, match="no L2C schedule"):
        make_schedule(_FakeSolver("dpm3_30", 10, 3))
    with pytest.raises(ValueError, match="no L2C schedule"):
        make_schedule(_Irregular("dpm_fast", 5, 2))
    with pytest.raises(TypeError, match="pass a solver"):
        make_schedule("ddim20")


# ============================================================================ official routers
DIT20_THETA = {0.01: 231, 0.05: 245, 0.1: 248, 0.3: 260, 0.5: 268, 0.7: 282, 0.9: 309}
DIT50_THETA = {0.01: 45, 0.05: 645, 0.1: 664, 0.3: 701, 0.5: 726, 0.7: 753, 0.9: 793}
UVIT20_THETA = {0.1: 289, 0.5: 302, 0.7: 315, 0.9: 333}
UVIT50_THETA = {0.1: 1236, 0.5: 1263, 0.7: 1282, 0.9: 1304}


@pytest.fixture(scope="module")
def official():
    if not FIXTURES.is_dir():
        pytest.skip(f"official L2C router files not found at {FIXTURES}")
    return {
        "dit20": L2CPolicy.from_official(DIT20, solver=ddim(20), theta=0.1),
        "dit50": L2CPolicy.from_official(DIT50, solver=ddim(50), theta=0.1),
        "uvit20": L2CPolicy.from_official(UVIT20, solver=dpm(20), theta=0.9),
        "uvit50": L2CPolicy.from_official(UVIT50, solver=dpm(50), theta=0.9),
    }


@needs_routers
@pytest.mark.parametrize("key, cached, total, attn, mlp", [
    ("dit20", 248, 560, 123, 125),
    ("dit50", 664, 1400, 329, 335),
    ("uvit20", 333, 522, 158, 175),
    ("uvit50", 1304, 1392, 649, 655),
])
def test_official_routers_reproduce_paper_table4(official, key, cached, total, attn, mlp):
    st = official[key].cache_stats()
    assert (st["cached"], st["cacheable"]) == (cached, total)
    assert st["per_kind"] == {"attn": attn, "mlp": mlp}
    # the MAC counter's mask agrees: zeros = cached sites, full evaluations all ones
    mask = official[key].compute_mask()
    assert sum(1 for v in mask.values() if v == 0.0) == cached


@needs_routers
@pytest.mark.parametrize("key, table", [("dit20", DIT20_THETA), ("dit50", DIT50_THETA),
                                        ("uvit20", UVIT20_THETA), ("uvit50", UVIT50_THETA)])
def test_official_routers_theta_sensitivity(official, key, table):
    assert {th: official[key].cache_stats(theta=th)["cached"] for th in table} == table


@needs_routers
def test_official_dit20_per_step_pattern(official):
    p = official["dit20"]
    st = p.cache_stats()
    by_router = {p.schedule.router[e]: n for e, n in st["per_eval"].items()}
    # reference §1.5: cache-step (respaced) index -> cached sub-layers
    assert by_router == {0: 0, 2: 1, 4: 1, 6: 1, 8: 3, 10: 30, 12: 48, 14: 52, 16: 56, 18: 56}
    # and the odd (full-step) routers are never read
    assert sorted(by_router) == list(range(0, 20, 2))


@needs_routers
def test_official_router_file_structure():
    d = load_official(DIT20)
    assert d.fmt == "dit" and d.num_routers == 20 and d.num_sites == 56 and d.archive_name == "0020000"
    assert isinstance(d.args, argparse.Namespace) and d.args.l1 == 5e-6 and d.args.num_sampling_steps == 20
    assert sorted(d.opt["state"]) == list(range(0, 20, 2))  # Adam moments only for trained routers
    u = load_official(UVIT50)
    assert u.fmt == "uvit" and u.num_routers == 50 and u.num_sites == 58 and u.opt is None
    assert u.archive_name == "nnet"
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in d.logits + u.logits)


def _raw(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


@needs_routers
@pytest.mark.parametrize("src", ["DiT_DDIM20_router.pt", "U-ViT_dpm20_router.pth"])
def test_import_official_then_export_is_bit_exact(tmp_path, src):
    p = L2CPolicy.from_official(FIXTURES / src)
    out = p.to_official(tmp_path / "again")
    orig, new = _raw(FIXTURES / src), _raw(out)
    orig_sd, new_sd = (orig["routers"], new["routers"]) if "routers" in orig else (orig, new)
    assert list(orig_sd) == list(new_sd)
    assert all(torch.equal(orig_sd[k], new_sd[k]) and new_sd[k].dtype == torch.float32 for k in orig_sd)
    assert dict(new_sd._metadata) == dict(orig_sd._metadata)
    with zipfile.ZipFile(out) as z:
        assert z.namelist()[0].split("/")[0] == ("0020000" if "DiT" in src else "nnet")
    if "routers" in orig:
        assert out.suffix == ".pt" and set(new) == {"routers", "opt", "args"}
        assert vars(new["args"]) == vars(orig["args"])
        assert new["opt"]["param_groups"] == orig["opt"]["param_groups"]
        for i, s in orig["opt"]["state"].items():
            assert all(torch.equal(s[k].cpu(), new["opt"]["state"][i][k]) for k in s)
    else:
        assert out.suffix == ".pth" and isinstance(new, OrderedDict)


@pytest.mark.parametrize("fmt", ["dit", "uvit"])
def test_export_import_round_trip_is_bit_exact(tmp_path, fmt):
    p = L2CPolicy(num_routers=6, depth=4, init_seed=3)
    with torch.no_grad():
        p.routers[1][0] = 16.635  # saturating U-ViT-like values and tiny ones survive exactly
        p.routers[1][1] = -1e-30
    opt = torch.optim.AdamW(p.parameters(), lr=1e-3, weight_decay=0)
    p.routers[1].sum().backward()
    opt.step()
    path = p.to_official(tmp_path / "r", fmt, optimizer=opt if fmt == "dit" else None)
    q = L2CPolicy.from_official(path)
    assert q.num_routers == 6 and q.num_sites == 8 and q.router_format == fmt
    assert all(torch.equal(a, b) for a, b in zip(p.routers, q.routers))
    if fmt == "dit":
        raw = _raw(path)
        assert list(raw["opt"]["state"]) == [1]  # only the stepped router has Adam state
        assert torch.equal(raw["opt"]["state"][1]["exp_avg"], opt.state[p.routers[1]]["exp_avg"])
        # re-export of the imported (unchanged) routers keeps that optimiser state
        raw2 = _raw(q.to_official(tmp_path / "r2"))
        assert torch.equal(raw2["opt"]["state"][1]["exp_avg_sq"], raw["opt"]["state"][1]["exp_avg_sq"])
        # an empty-but-valid AdamW state loads into a fresh optimiser
        raw3 = _raw(save_official(tmp_path / "r3.pt", list(p.routers), "dit"))
        torch.optim.AdamW(q.parameters()).load_state_dict(raw3["opt"])
        assert raw3["args"].num_sampling_steps == 6


def test_router_file_errors(tmp_path, bb):
    torch.save(OrderedDict({"0.prob": torch.zeros(6), "2.prob": torch.zeros(6)}), tmp_path / "gap.pth")
    with pytest.raises(RouterCheckpointError, match=r"missing keys \['1.prob'\]"):
        load_official(tmp_path / "gap.pth")
    torch.save({"x_embedder.proj.weight": torch.zeros(3)}, tmp_path / "model.pt")
    with pytest.raises(RouterCheckpointError, match="not an L2C router checkpoint"):
        load_official(tmp_path / "model.pt")
    torch.save({"routers": {"0.prob": torch.zeros(6), "0.bias": torch.zeros(6)}, "opt": None, "args": None},
               tmp_path / "extra.pt")
    with pytest.raises(RouterCheckpointError, match="unexpected keys"):
        load_official(tmp_path / "extra.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(RouterCheckpointError, match="not a readable torch checkpoint"):
        load_official(tmp_path / "text.pt")
    with pytest.raises(FileNotFoundError):
        load_official(tmp_path / "absent.pt")
    # a DiT-sized router (56 = 28 x 2) cannot drive a U-ViT-H/2-sized backbone (29 layers -> 58)
    save_official(tmp_path / "dit.pt", [torch.zeros(56)] * 4, "dit")
    with pytest.raises(ValueError, match="router length 56 does not match the backbone: depth 29"):
        bound_for_test(L2CPolicy.from_official(tmp_path / "dit.pt"), StandIn(depth=29, dim=4))
    with pytest.raises(ValueError, match="made for 4 evaluations but the solver runs 20"):
        L2CPolicy.from_official(tmp_path / "dit.pt", solver=ddim(20))


class Evil:  # any global other than argparse.Namespace is refused by the weights-only loader
    pass


def test_weights_only_loading_refuses_other_globals(tmp_path):
    torch.save({"routers": {"0.prob": torch.zeros(4)}, "opt": None, "args": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(RouterCheckpointError, match="weights_only=False"):
        load_official(tmp_path / "evil.pt")
    assert load_official(tmp_path / "evil.pt", weights_only=False).num_routers == 1  # trusted file: opt-in


# ============================================================================ routers
def test_routers_are_per_step_parameters_with_seeded_normal_init(bb):
    p = bound_for_test(L2CPolicy(solver=ddim(20), init_seed=7), bb)
    assert isinstance(p.routers, nn.ParameterList) and p.num_routers == 20 and p.num_sites == 6
    g = torch.Generator().manual_seed(7)
    assert all(torch.equal(r, torch.randn(6, generator=g)) for r in p.routers)
    assert [k for k, _ in p.named_parameters()] == [f"routers.{i}" for i in range(20)]
    assert list(bb.state_dict()) == list(StandIn(3, 8).state_dict())  # the policy adds no backbone keys
    px = bound_for_test(L2CPolicy(solver=ddim(20)), StandIn(depth=2, site_kinds=("attn", "xattn", "mlp")))
    assert px.num_sites == 6 and px.site_index(1, "xattn") == 4 and px.site_labels()[:3] == ["0.attn", "0.xattn", "0.mlp"]
    with pytest.raises(ValueError, match="number of routers is unknown"):
        bound_for_test(L2CPolicy(), StandIn())


def test_unused_routers_get_no_grad_and_no_adamw_update(bb):
    p = bound_for_test(L2CPolicy(solver=ddim(4), init_seed=0).train(), bb)
    opt = torch.optim.AdamW(p.parameters(), lr=1e-2, weight_decay=0.0)
    x = torch.randn(2, 5, 8)

    def iteration(nfe):
        p.reset()
        p.begin(StepContext(nfe=nfe - 1, step=nfe - 1, num_steps=4, num_evals=4))
        with torch.no_grad(), p.recording():
            bb(x, torch.full((2,), 0.9))
        p.begin(StepContext(nfe=nfe, step=nfe, num_steps=4, num_evals=4))
        loss = bb(x + 0.1, torch.full((2,), 0.5)).pow(2).mean() + 1e-3 * p.sum_beta()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return p.schedule.router[nfe]

    before = [r.detach().clone() for r in p.routers]
    r = iteration(1)
    assert r == 2
    assert p.routers[r].grad is not None and all(p.routers[i].grad is None for i in range(4) if i != r)
    opt.step()
    assert not torch.equal(p.routers[r], before[r])
    assert all(torch.equal(p.routers[i], before[i]) for i in range(4) if i != r)
    # next iteration trains router 0: router 2 keeps its value (no momentum drift without a grad)
    after_first = p.routers[2].detach().clone()
    assert iteration(3) == 0
    opt.step()
    assert torch.equal(p.routers[2], after_first) and not torch.equal(p.routers[0], before[0])


def test_clamp():
    p = L2CPolicy(num_routers=2, depth=2, clamp=5.0)
    with torch.no_grad():
        p.routers[0].copy_(torch.tensor([-9.0, -5.0, 0.3, 7.0]))
    p.clamp_()
    assert torch.equal(p.routers[0], torch.tensor([-5.0, -5.0, 0.3, 5.0]))
    q = L2CPolicy(num_routers=1, depth=2, clamp=None)  # U-ViT: no clamp, logits may reach +-16.6
    with torch.no_grad():
        q.routers[0].copy_(torch.tensor([-16.6, 16.6, 0.0, 1.0]))
    q.clamp_()
    assert torch.equal(q.routers[0], torch.tensor([-16.6, 16.6, 0.0, 1.0]))
    r = L2CPolicy(num_routers=1, depth=1, clamp=(-1.0, 2.0))
    with torch.no_grad():
        r.routers[0].copy_(torch.tensor([-3.0, 3.0]))
    r.clamp_()
    assert torch.equal(r.routers[0], torch.tensor([-1.0, 2.0]))


# ============================================================================ modes
def test_soft_mix_matches_independent_computation(bb):
    p = bound_for_test(L2CPolicy(solver=ddim(4), init_seed=1).train(), bb)
    x0, x1 = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    t0, t1 = torch.full((2,), 0.9), torch.full((2,), 0.6)
    p.begin(StepContext(nfe=0, step=0, num_steps=4, num_evals=4))
    with p.recording():
        full = bb(x0, t0)
    p.begin(StepContext(nfe=1, step=1, num_steps=4, num_evals=4))
    student = bb(x1, t1)

    cached = {}
    ref_full = _manual(bb, x0, t0, lambda l, k, f, h: cached.setdefault((l, k), f(h)))
    beta = torch.sigmoid(p.routers[2].detach())  # nfe 1 of DDIM-4 reads respaced index 2
    ref = _manual(bb, x1, t1, lambda l, k, f, h: beta[2 * l + (k == "mlp")] * f(h)
                  + (1 - beta[2 * l + (k == "mlp")]) * cached[(l, k)])
    torch.testing.assert_close(full, ref_full, rtol=0, atol=0)
    torch.testing.assert_close(student, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.sum_beta(), beta.sum())
    assert torch.equal(p.sum_beta(1), p.l1())
    with pytest.raises(ValueError, match="full evaluation"):
        p.sum_beta(0)


def test_hard_inference_reuses_cached_branch_and_applies_current_gate(bb):
    p = bound_for_test(L2CPolicy(solver=ddim(4), init_seed=1, theta=0.5), bb)
    with torch.no_grad():
        p.routers[2].copy_(torch.tensor([3.0, -3.0, 0.0, 2.0, -0.1, 9.0]))  # compute iff sigmoid > 0.5
    x0, x1 = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    t0, t1 = torch.full((2,), 0.9), torch.full((2,), 0.6)
    p.begin(StepContext(nfe=0, step=0, num_steps=4, num_evals=4))
    bb(x0, t0)
    # the full step keeps only what the next cache step reuses (0.mlp, 1.attn, 2.attn)
    stored = sorted(k for k, v in p._cache.items() if v is not None)  # keys of unstored sites hold None
    assert stored == [("all", 0, "mlp"), ("all", 1, "attn"), ("all", 2, "attn")]
    p.begin(StepContext(nfe=1, step=1, num_steps=4, num_evals=4))
    out = bb(x1, t1)
    cached = {}
    _manual(bb, x0, t0, lambda l, k, f, h: cached.setdefault((l, k), f(h)))
    compute = [True, False, False, True, False, True]  # sigmoid(0) = 0.5 is not > 0.5: reused
    ref = _manual(bb, x1, t1, lambda l, k, f, h: f(h) if compute[2 * l + (k == "mlp")] else cached[(l, k)])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    m = p.compute_mask()
    assert [m[(1, l, k)] for l in range(3) for k in ("attn", "mlp")] == [float(c) for c in compute]
    assert all(m[(e, l, k)] == 1.0 for e in (0, 2) for l in range(3) for k in ("attn", "mlp"))
    assert p.summary()["cached"] == 3 + p.cache_stats()["per_eval"][3]


@pytest.mark.parametrize("theta", [0.0, 1e-6])  # N(0,1) logits: sigmoid > 1e-6 always
def test_nothing_cached_equals_uncached_model_bit_for_bit(bb, theta):
    times = torch.linspace(0.95, 0.05, 6)
    x = torch.randn(3, 5, 8)
    ref, _ = _run(bb, None, x, times)
    p = bound_for_test(L2CPolicy(solver=ddim(6), theta=theta, init_seed=0), bb)  # N(0,1) logits: sigmoid > 0
    out, _ = _run(bb, p, x, times)
    assert sum(p.compute_mask().values()) == 6 * 6  # every site computed
    assert torch.equal(out, ref)
    p.theta = 1.0  # and the comparison is not vacuous: caching everything changes the result
    assert not torch.allclose(_run(bb, p, x, times)[0], ref)


def test_record_mode_computes_and_stores_even_on_cache_steps(bb):
    p = bound_for_test(L2CPolicy(solver=ddim(4), theta=1.0), bb)
    x, t = torch.randn(2, 5, 8), torch.full((2,), 0.6)
    p.begin(StepContext(nfe=1, step=1, num_steps=4, num_evals=4))
    with p.recording():
        out = bb(x, t)
    with p.disabled():
        assert torch.equal(out, bb(x, t))
    assert sorted(p._cache) == [("all", l, k) for l in range(3) for k in ("attn", "mlp")]
    # outside recording() (eval mode: hard routing) every site reuses exactly what was recorded
    p.begin(StepContext(nfe=1, step=1, num_steps=4, num_evals=4))
    assert torch.equal(bb(x, t), out)


def test_disabled_is_a_pass_through_that_never_touches_the_cache(bb):
    p = bound_for_test(L2CPolicy(solver=ddim(4), theta=1.0), bb)
    x, t = torch.randn(2, 5, 8), torch.full((2,), 0.4)
    p.begin(StepContext(nfe=1, step=1, num_steps=4, num_evals=4))
    with p.disabled():
        out = bb(x, t)
    assert all(v is None for v in p._cache.values())  # nothing stored (begin only laid out the keys)
    plain = StandIn(bb.depth, 8)
    plain.load_state_dict(bb.state_dict())
    assert torch.equal(out, plain(x, t))
    with pytest.raises(RuntimeError, match="cache miss at nfe 1"):
        bb(x, t)


def test_cfg_branches_keep_separate_caches(bb):
    p = bound_for_test(L2CPolicy(solver=ddim(4), theta=1.0), bb)  # theta=1: every site reused on cache steps
    xc, xu, x1 = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    t0, t1 = torch.full((2,), 0.9), torch.full((2,), 0.6)
    ctx0 = StepContext(nfe=0, step=0, num_steps=4, num_evals=4)
    ctx1 = StepContext(nfe=1, step=1, num_steps=4, num_evals=4)
    for branch, xb in (("cond", xc), ("uncond", xu)):
        p.begin(ctx0.with_branch(branch))
        bb(xb, t0)
    outs = {}
    for branch in ("cond", "uncond"):
        p.begin(ctx1.with_branch(branch))
        outs[branch] = bb(x1, t1)
    for branch, xb in (("cond", xc), ("uncond", xu)):
        cached = {}
        _manual(bb, xb, t0, lambda l, k, f, h: cached.setdefault((l, k), f(h)))
        ref = _manual(bb, x1, t1, lambda l, k, f, h: cached[(l, k)])
        torch.testing.assert_close(outs[branch], ref, rtol=0, atol=0)


def test_shifted_schedule_drives_the_policy_from_step_context(bb):
    """DPM-Solver-2 (2 evaluations per step) binds the shifted schedule; nfe 2 reuses nfe 1."""
    p = bound_for_test(L2CPolicy(num_routers=8, depth=3, theta=1.0), bb, dpm(8))
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    ts = [torch.full((2,), v) for v in (0.9, 0.8, 0.7)]
    for nfe in range(3):
        p.begin(StepContext(nfe=nfe, step=nfe // 2, num_steps=4, num_evals=8))
        out = bb(xs[nfe], ts[nfe])
    assert p.schedule == make_schedule(dpm(8)) and p._active == 1
    cached = {}
    _manual(bb, xs[1], ts[1], lambda l, k, f, h: cached.setdefault((l, k), f(h)))
    torch.testing.assert_close(out, _manual(bb, xs[2], ts[2], lambda l, k, f, h: cached[(l, k)]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="StepContext reports 4 evaluations"):
        p.begin(StepContext(nfe=0, step=0, num_steps=4, num_evals=4))


def test_cache_interval_policy_reuses_the_full_step(bb):
    p = bound_for_test(L2CPolicy(solver=ddim(6), cache_interval=3, theta=1.0), bb)
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    t = torch.full((2,), 0.5)
    for nfe in range(3):
        p.begin(StepContext(nfe=nfe, step=nfe, num_steps=6, num_evals=6))
        out = bb(xs[nfe], t)
    cached = {}
    _manual(bb, xs[0], t, lambda l, k, f, h: cached.setdefault((l, k), f(h)))
    torch.testing.assert_close(out, _manual(bb, xs[2], t, lambda l, k, f, h: cached[(l, k)]), rtol=0, atol=0)


def test_invalid_settings_are_refused_at_construction():
    with pytest.raises(ValueError, match="theta"):
        L2CPolicy(theta=1.5)
    with pytest.raises(ValueError, match="lam"):
        L2CPolicy(lam=-1e-6)
    with pytest.raises(ValueError, match="lam"):
        L2CPolicy(lam=float("inf"))
    with pytest.raises(ValueError, match="budget"):
        L2CPolicy(budget=1.2)


# ============================================================================ budget
def test_budget_masks_hand_computed():
    costs = site_costs(("attn", "mlp"), 2)  # [1, 2, 1, 2]
    assert costs.tolist() == [1.0, 2.0, 1.0, 2.0]
    logits = [torch.tensor([0.0, 0.0, 0.0, 0.0]), torch.tensor([4.0, -1.0, 2.0, 3.0]),
              torch.tensor([-2.0, 1.0, 5.0, -3.0])]
    # global: ranking 5.0(r2,1) 4.0(r1,1) 3.0(r1,2) 2.0(r1,1) 1.0(r2,2) ...; total 12, target 0.5*12 = 6
    # cumulative cost 1, 2, 4, 5, 7 -> keep the first five
    theta, m = budget_masks(logits, [1, 2], costs, 0.5)
    assert m[1].tolist() == [True, False, True, True] and m[2].tolist() == [False, True, True, False]
    assert theta == pytest.approx(1 / (1 + math.exp(1.0)))  # sigmoid(-1): best dropped logit
    assert theta_for_budget(logits, [1, 2], costs, 0.5) == theta
    # per step: each router keeps >= 3 of its 6 MAC units
    _, m = budget_masks(logits, [1, 2], costs, 0.5, per_step=True)
    assert m[1].tolist() == [True, False, False, True] and m[2].tolist() == [False, True, True, False]
    assert budget_masks(logits, [1, 2], costs, 1.0)[1][1].all() and budget_masks(logits, [1, 2], costs, 1.0)[0] == 0.0
    assert not any(v.any() for v in budget_masks(logits, [1, 2], costs, 0.0)[1].values())
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        budget_masks(logits, [1], costs, 1.5)


@needs_routers
@pytest.mark.parametrize("mode", ["global", "per_step"])
def test_budget_policy_keeps_the_requested_macs(mode):
    p = L2CPolicy.from_official(DIT20, solver=ddim(20), budget=0.6, budget_mode=mode)
    s = p.summary()
    # 10 cache steps x 28 layers x (1 + 2) MAC units: overshoot below one MLP site (per step: per router)
    assert 0.6 <= s["cache_step_macs_kept"] < 0.6 + 2 / (840 if mode == "global" else 84)
    if mode == "global":  # a single theta reproduces the chosen mask on these (untied) logits
        theta, _ = budget_masks(list(p.routers), p.schedule.used_routers(), p.costs(), 0.6)
        assert p.effective_theta() == theta and p.summary()["theta_effective"] == theta
        q = L2CPolicy.from_official(DIT20, solver=ddim(20), theta=theta)
        assert q.compute_mask() == p.compute_mask()
    sites = L2CPolicy.from_official(DIT20, solver=ddim(20), budget=1 - 248 / 560, budget_unit="sites")
    assert sites.cache_stats()["cached"] == 248


def test_hydra_group_builds_the_policy(bb):
    from hydra.utils import instantiate

    cfg = {"_target_": "diffcache.policies.l2c.L2CPolicy", "lam": 1e-6, "theta": 0.1, "clamp": 5.0,
           "cache_interval": 2, "budget": None, "budget_mode": "global", "init_seed": 0}
    p = bound_for_test(instantiate(cfg), bb, ddim(20))
    assert p.clamp == (-5.0, 5.0) and p.num_routers == 20 and p.trainable_evals() == list(range(1, 20, 2))
    betas, labels = p.beta_table()
    assert betas.shape == (10, 6) and labels[0] == "nfe 2 (r18)"
    assert set(p.summary()) >= {"cached", "cacheable", "cached_attn", "cached_mlp", "mean_beta"}
    with pytest.raises(Exception, match="thetta"):
        instantiate({"_target_": "diffcache.policies.l2c.L2CPolicy", "thetta": 0.1})


def test_compute_mask_for_another_solver_reads_without_rebinding_the_policy(bb):
    """Issue 22: compute_mask (and so policy_cost) re-prepared the policy with the solver it was asked about.
    DDIM-20 and DPM-Solver-2 NFE 20 both read 20 routers, so the old code silently switched the policy's
    schedule from alternating to shifted."""
    p = bound_for_test(L2CPolicy(solver=ddim(20), theta=0.5, init_seed=0), bb)
    before = p.schedule
    other = p.compute_mask(bb.layout, dpm(20))
    assert p.schedule is before and p.schedule.kind == "alternating"
    mine = p.compute_mask()
    assert other != mine  # the question was really about another schedule: its cache evaluations differ
    assert {e for (e, _, _), v in other.items() if v == 0.0} <= set(make_schedule(dpm(20)).cache_evals())
    with pytest.raises(ValueError, match="router length 6 does not match"):
        p.compute_mask(SiteLayout(depth=2, site_kinds=("attn", "mlp")))
    assert p.layout == bb.layout
    with pytest.raises(ValueError, match="no routers yet"):
        L2CPolicy(theta=0.5).compute_mask()
    fresh = L2CPolicy(theta=0.5)  # no routers yet: a cost estimate builds the ones a run would start from
    assert len(fresh.compute_mask(bb.layout, ddim(20))) == 20 * bb.layout.num_sites and len(fresh.routers) == 20
