"""ToCa and FORA policies: the planner against the reference's cycles, the token scores, the partial
recompute, equivalences with the uncached model and memory.

Anchors come from shared/reference/toca.md (§1.6-1.7, §3.2, [SIM]); every model here is a tiny one.
"""
from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from tiny_models import bound_for_test, perturbed

from diffcache.backbones import build_backbone
from diffcache.backbones.base import SiteLayout
from diffcache.backbones.layers import Attention, CrossAttention, Mlp
from diffcache.context import StepContext
from diffcache.policies.fora import FORAPolicy, fora_full_evals
from diffcache.policies.toca import (
    PRESETS,
    ToCaPolicy,
    entropy_score,
    plan,
    preset_params,
    ratio,
    spatial_bonus,
)
from diffcache.sampling import sample
from diffcache.solvers import make_solver


def run_inputs(m, B: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, m.in_channels, m.input_size, m.input_size, generator=g)
    if m.text_conditioned:
        y = torch.randn(B, m.token_num, m.caption_channels, generator=g)
        mask = torch.ones(B, m.token_num, dtype=torch.long)
        mask[0, 5:] = 0
        return x, {"y": y, "mask": mask}
    return x, torch.tensor([3, 7][:B])


SETUPS = {  # family: (arch, solver, guidance)
    "dit": ("tiny_dit", ("ddim", 10), 1.5),
    "pixart": ("tiny_pixart", ("dpm_solver_pp", 8), 4.5),
    "uvit": ("tiny_uvit", ("dpm_solver2", 8), 0.4),
}


def run(family: str, policy, **kw):
    arch, (alg, n), guidance = SETUPS[family]
    m = perturbed(arch)
    x, cond = run_inputs(m)
    with torch.no_grad():
        out = sample(m, make_solver(alg, n), policy, x, cond, guidance=guidance)
    return out, m


# ============================================================================ planner anchors
def test_dit_ddim50_fresh_cycle_matches_reference():
    s = plan(preset_params("dit_ddim50"), 50, 28, 256)
    assert s.fully_refreshed_ref() == {49, 44, 40, 36, 30, 27, 24, 21, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0}
    assert s.layer0_only_ref() == {45, 32}
    # nfe 0 is the noisiest step = reference index 49 (DiT counts down)
    assert s.ref_index(0) == 49 and all(s.full[0])
    e45 = 49 - 45
    assert s.full[e45][0] and not any(s.full[e45][1:])


def test_dit_ddim50_without_legacy_quirk():
    s = plan(preset_params("dit_ddim50", legacy_layer0_refresh=False), 50, 28, 256)
    assert s.layer0_only_ref() == set()
    assert s.fully_refreshed_ref() == {49, 45, 44, 40, 36, 32, 30, 27, 24, 21, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0}


def test_dit_ddpm250_n4_cycle():
    s = plan(preset_params("dit_ddpm250"), 250, 28, 256)
    full = s.fully_refreshed_ref()
    assert len(full) == 72 and s.layer0_only_ref() == {245, 155}
    assert {249, 240, 234, 228, 222, 216, 210, 205, 200, 165, 160, 152, 148, 100, 96, 94, 92, 50, 48, 45, 42, 3,
            0} <= full
    assert all(i in full for i in range(50, 97, 2)) and 98 not in full  # window [0.2T, 0.4T): every 2 steps


def test_pixart_20_steps_cycle():
    s = plan(preset_params("pixart_r70"), 20, 28, 256, ("attn", "xattn", "mlp"))
    assert s.fully_refreshed_ref() == {0, 6, 9, 12, 15, 18}
    assert s.layer0_only_ref() == {4}
    assert s.ref_index(3) == 3  # PixArt counts up


def test_ratio_scheduler_formulas_and_depth_generalisation():
    p = preset_params("dit_ddpm250")
    # lam_layer 1.8 at layer 0 and 0.2 at layer 27 (28 layers); MLP x2.5, attention x0
    r0 = ratio(p, 125, 250, 0, 28, "mlp") / (0.07 * 2.5 * 1.0)
    r27 = ratio(p, 125, 250, 27, 28, "mlp") / (0.07 * 2.5 * 1.0)
    assert r0 == pytest.approx(1.8) and r27 == pytest.approx(0.2)
    assert ratio(p, 125, 250, 3, 28, "attn") == 0.0
    # the same endpoints for a 2-layer tiny model (27 -> depth - 1)
    assert ratio(p, 125, 250, 1, 2, "mlp") == pytest.approx(ratio(p, 125, 250, 27, 28, "mlp"))
    # lam_t at the first sampling step of DDPM-250 (reference index 249) is ~0.6
    assert ratio(p, 249, 250, 0, 28, "mlp") / ratio(p, 125, 250, 0, 28, "mlp") == pytest.approx(0.6032 / 1.0, abs=1e-4)
    # DDIM-50: lam_t = 3 - 4 i / 50 < 0 early -> 0 tokens
    s = plan(preset_params("dit_ddim50"), 50, 28, 256)
    assert s.k(1, 5, "mlp") == 0 and s.k(49 - 1, 27, "mlp") > 0
    # k = int(r * N) (floor) and clamped to [0, N]
    q = preset_params("pixart_r60")
    sp = plan(q, 20, 28, 256, ("attn", "xattn", "mlp"))
    for (e, l, kind), r in sp.ratios.items():
        assert sp.tokens[(e, l, kind)] == int(min(max(r, 0.0), 1.0) * 256)
    assert max(sp.tokens[k] for k in sp.tokens if k[2] == "mlp") == 256  # saturates early
    assert all(sp.tokens[k] == 0 for k in sp.tokens if k[2] == "attn")  # self-attention never partial


def test_presets_and_config():
    assert {"dit_ddpm250", "dit_ddim50", "pixart_r60", "pixart_r70", "pixart_r80", "pixart_r90",
            "uvit_dpm20"} <= set(PRESETS)
    assert [preset_params(f"pixart_r{r}").fresh_ratio for r in (60, 70, 80, 90)] == [0.4, 0.3, 0.2, 0.1]
    with pytest.raises(ValueError, match="dit_ddim50"):
        ToCaPolicy("nope")
    with pytest.raises(TypeError, match="unknown ToCa options"):
        ToCaPolicy("dit_ddim50", bogus=1)
    p = instantiate({"_target_": "diffcache.policies.toca.ToCaPolicy", "preset": "dit_ddim50", "fresh_threshold": None,
                     "fresh_ratio": None, "legacy_layer0_refresh": None})
    assert p.params.fresh_threshold == 3 and p.params.legacy_layer0_refresh is True
    q = ToCaPolicy("pixart_r70", fresh_threshold=4, soft_fresh_weight=0.5, bonus_ratio=0.0,
                   legacy_layer0_refresh=False)
    assert (q.params.fresh_threshold, q.params.soft_fresh_weight, q.params.bonus_ratio) == (4, 0.5, 0.0)
    assert q.params.legacy_layer0_refresh is False
    # preset=None takes the backbone's toca_preset when bound; s2 presets refuse a backbone without cross-attention
    m = build_backbone("tiny_uvit")
    assert bound_for_test(ToCaPolicy(None), m).preset == "uvit_dpm20"
    with pytest.raises(ValueError, match="cross-attention"):
        bound_for_test(ToCaPolicy("pixart_r70"), build_backbone("tiny_dit"))


def test_compute_mask_covers_every_site():
    for arch in ("tiny_dit", "tiny_pixart", "tiny_uvit"):
        m = build_backbone(arch)
        pol = bound_for_test(ToCaPolicy(None), m)
        mask = pol.compute_mask(m.layout, 20)
        assert set(mask) == {(e, l, k) for e in range(20) for (l, k) in m.cache_sites()}
        assert all(0.0 <= v <= 1.0 for v in mask.values())
        assert all(mask[(0, l, k)] == 1.0 for (l, k) in m.cache_sites())
        s = pol.summary(m.layout, 20)
        assert 0 < s["fresh_layer_frac"] < 1 and 0 < s["mean_token_frac"] < 1


# ============================================================================ scores
def test_column_scores_equal_explicit_softmax_map():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(3, 20, 32)
    q, k, _ = attn._qkv(x)
    A = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1).mean(1)  # (B, N, N) head mean
    expect = A.sum(1)  # column sums
    for chunk in (1, 7, 20, 256):
        torch.testing.assert_close(attn.column_scores(x, chunk), expect, rtol=1e-5, atol=1e-5)


def test_spatial_bonus_blocks():
    s = torch.arange(16, dtype=torch.float32).reshape(1, 16) / 16 + 0.1
    out = spatial_bonus(s, (4, 4), 2, 0.6)
    winners = {5, 7, 13, 15}  # bottom-right of each 2x2 block (row-major 4x4 grid)
    for j in range(16):
        assert out[0, j] == pytest.approx(s[0, j] * (1.6 if j in winners else 1.0))
    torch.testing.assert_close(spatial_bonus(s, (4, 4), 3, 0.6), s)  # not divisible: unchanged
    torch.testing.assert_close(spatial_bonus(s, (4, 4), 4, 0.0), s)


def test_entropy_score_pairs_cfg_halves():
    H = torch.rand(4, 10)
    s = entropy_score(H, paired=True)
    ref = torch.nn.functional.normalize(1 + math.log(2) + 0.5 * (H[:2] + H[2:]), dim=1)
    torch.testing.assert_close(s, torch.cat([ref, ref]))
    torch.testing.assert_close(entropy_score(H, paired=False), torch.nn.functional.normalize(1 + H, dim=1))


# ============================================================================ runtime
def _ctx(nfe, E=10, branch="all", layout=None):
    return StepContext(nfe=nfe, step=nfe, num_steps=E, num_evals=E, branch=branch, cfg_layout=layout)


def _half_policy(preset="dit_ddim50", **kw):
    """Every evaluation after the first is cached (N=1000) and computes int(0.5 N) tokens of partial branches."""
    pol = ToCaPolicy(preset, fresh_threshold=1000, fresh_ratio=0.5, w_t=0.0, w_l=0.0, module_weight=0.0,
                     interval_stretch=0.0, sensitive_window=None, **kw)
    return pol


def test_partial_recompute_equals_full_recompute_on_selected_tokens():
    torch.manual_seed(0)
    B, N, C = 2, 16, 32
    pol = _half_policy()
    pol.set_geometry(depth=1, num_tokens=N, num_prefix_tokens=0, site_kinds=("attn", "mlp"), token_grid=(4, 4))
    attn, mlp = Attention(C, 4), Mlp(C, 4 * C)
    h0, h1 = torch.randn(B, N, C), torch.randn(B, N, C)
    pol.begin(_ctx(0))
    a0 = pol.site(0, "attn", attn, h0)
    m0 = pol.site(0, "mlp", mlp, h0)
    assert torch.equal(pol._stale[("all", 0, "mlp")], torch.zeros(B, N, dtype=torch.long))
    pol.begin(_ctx(1))
    a1 = pol.site(0, "attn", attn, h1)
    assert a1 is a0  # attention fully reused
    m1 = pol.site(0, "mlp", mlp, h1)
    full = mlp(h1)
    k = pol.schedule(10).k(1, 0, "mlp")
    assert k == N // 2
    for b in range(B):
        fresh = torch.isclose(m1[b], full[b], atol=1e-4).all(-1)  # fp32 round-off ~1e-7 vs O(1) for stale tokens
        kept = torch.equal(m1[b][~fresh], m0[b][~fresh])
        assert int(fresh.sum()) == k and kept
        stale = pol._stale[("all", 0, "mlp")][b]
        assert torch.equal(stale == 0, fresh) and torch.all(stale[~fresh] == 1)  # s3: +1, then 0 for computed


def test_partial_cross_attention_and_shared_selection_for_cfg_halves():
    torch.manual_seed(0)
    B, N, C, L = 4, 16, 32, 6
    pol = _half_policy("pixart_r70")
    pol.set_geometry(depth=1, num_tokens=N, site_kinds=("attn", "xattn", "mlp"), token_grid=(4, 4))
    xa, mlp, attn = CrossAttention(C, 4), Mlp(C, 4 * C), Attention(C, 4)
    y = torch.randn(B, L, C)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 4:] = False
    x0, x1 = torch.randn(B, N, C), torch.randn(B, N, C)
    pol.begin(_ctx(0, layout="uncond_cond"))
    pol.site(0, "attn", attn, x0)
    c0 = pol.site(0, "xattn", xa, x0, y, mask)
    pol.site(0, "mlp", mlp, x0)
    H0 = pol._score[("all", 0)].clone()
    torch.testing.assert_close(H0, xa.entropy(x0, y, mask))
    pol.begin(_ctx(1, layout="uncond_cond"))
    c1 = pol.site(0, "xattn", xa, x1, y, mask)
    full = xa(x1, y, mask)
    fresh = torch.isclose(c1, full, atol=1e-4).all(-1)  # (B, N); round-off ~1e-7 vs O(1) when stale
    assert (fresh.sum(1) == N // 2).all()
    assert torch.equal(fresh[:2], fresh[2:])  # cond and uncond halves select the same tokens
    assert torch.equal(c1[~fresh], c0[~fresh])
    # entropies refreshed exactly for the recomputed tokens
    H1 = pol._score[("all", 0)]
    Hfull = xa.entropy(x1, y, mask)
    torch.testing.assert_close(H1[fresh], Hfull[fresh])
    assert torch.equal(H1[~fresh], H0[~fresh])


def test_uvit_prefix_tokens_always_recomputed():
    torch.manual_seed(0)
    B, P, N, C = 2, 2, 16, 32
    pol = _half_policy("uvit_dpm20")
    pol.set_geometry(depth=1, num_tokens=N, num_prefix_tokens=P, site_kinds=("attn", "mlp"), token_grid=(4, 4))
    attn, mlp = Attention(C, 4), Mlp(C, 4 * C)
    h0, h1 = torch.randn(B, P + N, C), torch.randn(B, P + N, C)
    pol.begin(_ctx(0, branch="cond"))
    pol.site(0, "attn", attn, h0)
    pol.site(0, "mlp", mlp, h0)
    assert pol._score[("cond", 0)].shape == (B, N)  # prefix tokens are never scored
    pol.begin(_ctx(1, branch="cond"))
    pol.site(0, "attn", attn, h1)
    m1 = pol.site(0, "mlp", mlp, h1)
    full = mlp(h1)
    torch.testing.assert_close(m1[:, :P], full[:, :P])  # prefix: always
    fresh = torch.isclose(m1[:, P:], full[:, P:], atol=1e-4).all(-1)  # round-off vs O(1)
    assert (fresh.sum(1) == N // 2).all()
    # k = 0: the prefix is still recomputed
    pol2 = ToCaPolicy("uvit_dpm20", fresh_ratio=0.0, fresh_threshold=1000)
    pol2.set_geometry(depth=1, num_tokens=N, num_prefix_tokens=P, site_kinds=("attn", "mlp"), token_grid=(4, 4))
    pol2.begin(_ctx(0))
    pol2.site(0, "mlp", mlp, h0)
    pol2.begin(_ctx(1))
    out = pol2.site(0, "mlp", mlp, h1)
    torch.testing.assert_close(out[:, :P], full[:, :P])
    torch.testing.assert_close(out[:, P:], mlp(h0)[:, P:])


@pytest.mark.parametrize("family", ["dit", "pixart", "uvit"])
def test_fresh_ratio_one_equals_none(family):
    ref, m = run(family, None)
    preset = {"dit": "dit_ddim50", "pixart": "pixart_r70", "uvit": "uvit_dpm20"}[family]
    pol = ToCaPolicy(preset, fresh_ratio=1.0)
    got, _ = run(family, pol)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("family", ["dit", "pixart", "uvit"])
def test_fora_interval_one_equals_none(family):
    ref, _ = run(family, None)
    got, _ = run(family, FORAPolicy(interval=1))
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("family", ["dit", "pixart", "uvit"])
def test_toca_run_matches_its_plan(family):
    """A cached run is finite, differs from the uncached one, and computes exactly the tokens the planner
    (and therefore the cost counter) says it does."""
    ref, m = run(family, None)
    preset = {"dit": "dit_ddim50", "pixart": "pixart_r70", "uvit": "uvit_dpm20"}[family]
    pol = ToCaPolicy(preset, fresh_threshold=2, fresh_ratio=0.3, w_t=0.0)
    got, m = run(family, pol)
    assert torch.isfinite(got).all() and not torch.allclose(got, ref)
    E = make_solver(*SETUPS[family][1]).num_evals
    mask = pol.compute_mask(m.layout, E)
    T = m.num_tokens + m.num_prefix_tokens
    passes = 2 if family == "uvit" else 1  # U-ViT runs cond and uncond as separate passes
    planned = passes * sum(round(v * T) for v in mask.values() if v > 0)
    partial_computed = pol._stats["tokens_computed"]
    assert partial_computed == planned
    assert pol._stats["partial_site_calls"] > 0


def test_fora_cycle_and_mask():
    full = fora_full_evals(50, 3)
    assert sum(full) == 18 and full[0] and full[1] and not full[2]  # i = 49 (first), 48, 45, ...
    assert {49 - e for e, f in enumerate(full) if f} == {49} | set(range(0, 49, 3))
    pol = FORAPolicy(interval=3)
    mask = pol.compute_mask(SiteLayout(depth=2, site_kinds=("attn", "mlp")), 50)
    assert sum(mask.values()) == 18 * 4
    # DPM-Solver-2 (20 evaluations), interval 2: every midpoint (odd nfe) is full, as L2C's shifted schedule
    assert [e for e, f in enumerate(fora_full_evals(20, 2)) if f] == [0] + list(range(1, 20, 2))


def test_fora_reuses_per_branch():
    ref, _ = run("uvit", None)
    got, _ = run("uvit", FORAPolicy(interval=2))
    assert torch.isfinite(got).all() and not torch.allclose(got, ref)


# ============================================================================ memory
def _state_for(input_size: int):
    m = perturbed("tiny_dit", input_size=input_size, hidden_size=48)
    pol = ToCaPolicy("dit_ddim50", fresh_threshold=2, fresh_ratio=0.3, w_t=0.0, column_chunk=8)
    bound_for_test(pol, m)
    x = torch.randn(2, 4, input_size, input_size)
    y = torch.tensor([1, 2])
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        pol.begin(_ctx(0, E=4))  # a fresh step: outputs, s1 side pass, counters
        m(x, torch.full((2,), 500.0), y)
    peak_alloc = max((e.cpu_memory_usage for e in prof.events() if e.name in ("aten::softmax", "aten::_softmax")),
                     default=0)
    shapes = [tuple(t.shape) for t in pol.state_tensors()]
    nbytes = pol.state_nbytes()
    pol._test_binding.__exit__(None, None, None)
    return m.num_tokens, nbytes, shapes, peak_alloc


def test_state_and_score_pass_memory_do_not_scale_with_n_squared():
    """Measured: (1) the bytes of every tensor the policy keeps between evaluations (caches, s1 vectors,
    s3 counters); (2) the largest softmax allocation of the s1 side pass, via the CPU profiler. With the
    query chunk fixed, quadrupling N quadruples both (O(B N C) state, O(B H chunk N) side pass), where an
    attention map would grow 16x. Allocations of the backbone's own SDPA are not counted here."""
    n1, b1, shapes1, p1 = _state_for(8)
    n2, b2, shapes2, p2 = _state_for(16)
    assert n2 == 4 * n1
    assert b2 / b1 == pytest.approx(4.0, rel=0.05)
    for shape in shapes2:
        assert shape.count(n2) <= 1  # never an (N, N) map
    assert p1 > 0, "the profiler recorded no softmax of the s1 side pass"
    assert p2 / p1 == pytest.approx(4.0, rel=0.05)  # chunk x N, not N x N
