"""Prototype: which router objective gets closest to the full sampler at equal MACs (issue 20, D).

    OMP_NUM_THREADS=1 python scripts/prototype_objectives.py [teacher=mnist_dit] [n=200] [budgets=0.8,0.7,0.6] [arms=...]

On one seeded evaluation set (seed 0, ``n`` samples, the teacher's guidance) it measures PSNR to the full sampler
and the MACs fraction of: fewer solver steps, the DP-searched schedule at each budget (16 calibration samples,
seed 1000), and routers trained here by ``train.py`` (arms: ``traj`` = trajectory objective from a random init,
``traj_search`` = the same from the searched mask, ``l2c`` = converged L2C at lambda 1e-4), one seed. Prints a
table and writes ``prototype.json`` in the current directory. Development tool, not part of the comparison.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = {"mnist_dit": ("ddim20", 1.5, "experiment=mnist_dit"), "mnist_uvit": ("dpm20", 0.4, "experiment=mnist_uvit")}


def _args(argv):
    kv = dict(a.split("=", 1) for a in argv)
    return (kv.get("teacher", "mnist_dit"), int(kv.get("n", 200)), [float(b) for b in kv.get("budgets", "0.8").split(",")],
            kv.get("arms", "traj_search").split(","), kv.get("extra", ""))


def _psnr(x, ref) -> float:
    mse = (x.clamp(-1, 1) - ref.clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse.clamp_min(1e-20))).mean())


def _train(teacher: str, budget: float, arm: str, out: Path, extra: str) -> tuple[Path, float]:
    exp = TEACHERS[teacher][2]
    common = [exp, "metrics=none", "compare=none", "router_cache=null", "trainer.enable_progress_bar=false",
              f"hydra.run.dir={out}"]
    if arm.startswith("traj"):
        common += ["module.objective=trajectory", f"module.trajectory.budget={budget}", "data=noise", "data.batch_size=2",
                   f"module.trajectory.init={'search' if arm == 'traj_search' else 'random'}"]
    elif arm == "l2c":
        common += ["policy.lam=1e-4"]
    common += [e for e in extra.split(" ") if e]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), *common], check=True, cwd=ROOT,
                   stdout=open(out.with_suffix(".log"), "w"), stderr=subprocess.STDOUT)
    return out / "router.pt", time.perf_counter() - t0


def main(argv) -> None:
    from hydra import compose, initialize_config_dir

    import diffcache  # noqa: F401
    from diffcache.data.seeded import seeded_inputs
    from diffcache.metrics.cost import policy_cost
    from diffcache.modules.trajectory import search_init  # noqa: F401  (the search used by the init)
    from diffcache.policies.l2c import L2CPolicy
    from diffcache.search import ScheduleSearch
    from diffcache.sampling import sample
    from diffcache.backbones import from_config
    from diffcache.utils.build import build_solver

    teacher, n, budgets, arms, extra = _args(argv)
    sname, guidance, exp = TEACHERS[teacher]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[exp])
    bb, solver = from_config(cfg.backbone), build_solver(cfg.solver)
    noise, cond = seeded_inputs(bb, range(n), 0, "cpu")
    run = lambda s, p: sample(bb, s, p, noise, cond, guidance, generator=torch.Generator().manual_seed(0))  # noqa: E731
    full = run(solver, None)
    rows = []

    def add(name, s, p, extra_cols=None):
        rows.append({"method": name, "macs": float(policy_cost(bb, s, p)["macs_ratio"] if p is not None else
                                                   policy_cost(bb, s, None)["macs"] / policy_cost(bb, solver, None)["macs"]),
                     "psnr": _psnr(run(s, p), full), **(extra_cols or {})})
        print(rows[-1], flush=True)

    from hydra.utils import instantiate
    for k in sorted({round(b * int(cfg.solver.num_steps)) for b in budgets}):
        add(f"steps {k}", instantiate(cfg.solver, num_steps=k), None)
    for b in budgets:
        t0 = time.perf_counter()
        res = ScheduleSearch(budget=b, method="dp", proxy="final", num_samples=16, seed=1000, guidance=guidance,
                             progress=False).run(bb, solver)
        add(f"search dp b={b}", solver, res.policy, {"time_s": time.perf_counter() - t0})
        for arm in arms:
            out = Path(f"/tmp/proto_{teacher}_{arm}_{b}")
            path, secs = _train(teacher, b, arm, out, extra)
            theta = float(cfg.policy.theta)
            add(f"{arm} b={b}", solver, L2CPolicy.from_official(path, solver=solver, theta=theta),
                {"time_s": secs, "summary": {k: v for k, v in json.loads((out / "summary.json").read_text()).items()
                                             if k in ("global_step", "stopped_by", "updates_per_router_min")}})
    Path("prototype.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(f"{r['method']:28s} macs {r['macs']:.3f}  psnr {r['psnr']:.2f}  {r.get('time_s', '')}")


if __name__ == "__main__":
    main(sys.argv[1:])
