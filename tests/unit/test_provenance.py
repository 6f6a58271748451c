"""Router files record the run they were made for; loading refuses another solver / interval / backbone."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from diffcache.backbones import build_backbone
from diffcache.policies.l2c import L2CPolicy, RouterCheckpointError, load_official
from diffcache.policies.l2c.checkpoint import router_state
from diffcache.policies.l2c.provenance import sidecar
from diffcache.solvers import DDIM, DDPM, DPMSolver2, DPMSolverPP2M

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "l2c_routers"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"released L2C routers not found at {FIXTURES}")


def _trained(tmp_path, solver, name="router", interval=2, arch="tiny_dit"):
    bb = build_backbone(arch)
    pol = L2CPolicy(theta=0.3, cache_interval=interval, init_seed=0)
    pol.setup(bb, solver)
    return bb, pol, pol.export_official(tmp_path / name)


def test_dit_format_records_the_run_next_to_the_official_keys(tmp_path):
    bb, pol, path = _trained(tmp_path, DDIM(20, schedule="linear"))
    blob = torch.load(path, map_location="cpu", weights_only=False)
    assert set(blob) == {"routers", "opt", "args"}  # the official layout, loadable by upstream code
    assert blob["args"].num_sampling_steps == 20
    rec = blob["args"].diffcache
    assert rec["solver"] == "DDIM" and rec["num_steps"] == 20 and rec["num_evals"] == 20
    assert rec["cache_interval"] == 2 and rec["family"] == bb.family and rec["depth"] == bb.depth
    assert rec["theta"] == 0.3 and rec["arch"] == "tiny_dit"
    assert load_official(path).record == rec


def test_uvit_format_writes_a_sidecar_and_stays_a_bare_state_dict(tmp_path):
    bb, pol, path = _trained(tmp_path, DPMSolver2(20, schedule="scaled_linear"), arch="tiny_uvit")
    assert path.suffix == ".pth" and sidecar(path).name == "router.meta.json" and sidecar(path).is_file()
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert all(k.endswith(".prob") for k in blob)  # what upstream U-ViT code loads
    rec = load_official(path).record
    assert rec["solver"] == "DPMSolver2" and rec["num_steps"] == 10 and rec["num_evals"] == 20


def test_mismatched_solver_interval_or_backbone_is_refused_with_the_setting_to_change(tmp_path, caplog):
    _, _, ddim = _trained(tmp_path, DDIM(20, schedule="linear"), "ddim")
    bb = build_backbone("tiny_dit")
    pol = L2CPolicy(theta=0.3).load_official(ddim)
    with pytest.raises(ValueError, match=r"solver: router DDIM, run DPMSolverPP2M \(change solver\)"):
        pol.setup(bb, DPMSolverPP2M(20, schedule="linear"))
    with pytest.raises(ValueError, match="solver: router DDIM, run DDPM"):
        L2CPolicy().load_official(ddim).setup(bb, DDPM(20, schedule="linear"))
    L2CPolicy().load_official(ddim).setup(bb, DDIM(20, schedule="linear"))  # the run it was made for

    _, _, int3 = _trained(tmp_path, DDIM(20, schedule="linear"), "int3", interval=3)
    with pytest.raises(ValueError, match=r"cache_interval: router 3, run 2 \(set policy.cache_interval=3\)"):
        L2CPolicy(cache_interval=2).load_official(int3).setup(bb, DDIM(20, schedule="linear"))
    with caplog.at_level(logging.WARNING):
        L2CPolicy(cache_interval=2, allow_mismatch=True).load_official(int3).setup(bb, DDIM(20, schedule="linear"))
    assert "allow_mismatch" in caplog.text

    # same router length, another family or depth: every difference named
    from diffcache.policies.l2c.provenance import differences
    diffs = differences({"family": "dit", "depth": 28, "theta": 0.1}, {"family": "uvit", "depth": 28, "theta": 0.9})
    assert diffs == ["family: router dit, run uvit (change backbone)"]  # theta is an inference choice, never refused


@needs_fixtures
def test_released_dit_router_is_ddim_only_and_released_uvit_is_unknown(caplog):
    with torch.device("meta"):
        dit = build_backbone("DiT-XL/2")
    pol = L2CPolicy(theta=0.1).load_official(FIXTURES / "DiT_DDIM20_router.pt")
    assert pol.imported.record == {"arch": "DiT-XL/2", "num_steps": 20, "solver": "DDIM"}
    with pytest.raises(ValueError, match="solver: router DDIM, run DPMSolverPP2M"):
        pol.setup(dit, DPMSolverPP2M(20, schedule="linear"))
    pol.setup(dit, DDIM(20, schedule="linear"))

    with torch.device("meta"):
        uvit = build_backbone("U-ViT-H/2")
    with caplog.at_level(logging.WARNING):
        L2CPolicy(theta=0.9).load_official(FIXTURES / "U-ViT_dpm20_router.pth").setup(
            uvit, DPMSolver2(20, schedule="scaled_linear"))
    assert "not checked" in caplog.text


def test_nan_routers_are_never_written_or_loaded(tmp_path):
    bad = [torch.zeros(4), torch.tensor([0.0, float("nan"), 0.0, 0.0])]
    torch.save(router_state(bad), tmp_path / "nan.pth")  # as a diverged run of another tool would write it
    with pytest.raises(RouterCheckpointError, match="not finite"):
        load_official(tmp_path / "nan.pth")
    bb = build_backbone("tiny_dit")
    pol = L2CPolicy()
    pol.setup(bb, DDIM(20, schedule="linear"))
    with torch.no_grad():
        pol.routers[3][0] = float("inf")
    with pytest.raises(RouterCheckpointError, match="not finite"):
        pol.export_official(tmp_path / "inf")
    assert not (tmp_path / "inf.pt").exists()
