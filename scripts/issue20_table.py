"""Issue 20's seed table: the comparisons of several router runs on one teacher and one evaluation set, as one
mean ± std table and Pareto PNG (the project's ``average`` / ``write_table`` / ``pareto_png``).

    python scripts/issue20_table.py <out stem> <runs.json> "<caption>"

``runs.json``: ``[{"dir": <run folder with results.json>, "seed": 0}, ...]`` (the router seed of each run).
Every run measured its baselines (full, fewer steps, FORA, ToCa, searched) on the same seeded noise
(``compare.seed``), so a baseline is one measurement whatever the router seed, and ``average`` counts it once.
A trained router's row carries the compare seed too, so here it takes its run's router seed instead: the
routers of one recipe (objective and budget) are averaged over their seeds. Greedy and DP searches chose the same
masks in every run measured so far (within 0.12 dB), so only DP rows are shown.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from diffcache.utils.pareto import pareto_png
from diffcache.utils.record import RESULTS, average, load_rows, write_table


TITLES = {"trajectory": "final-sample, search init", "iepo": "L2C + IEPO"}


def rows_of(runs: list[dict]) -> list:
    rows = []
    for run in runs:
        for r in load_rows(Path(run["dir"]) / RESULTS):
            if r.method == "search" and r.params.get("algo") == "greedy":
                continue
            if r.train_s is None:
                rows.append(replace(r, role=""))
                continue
            # one recipe per (objective, budget, and a λ or lr other than the experiment's): settings shared by
            # every run (noise data, batch 2) and whether validation ran (it changes no router update) stay in
            # the caption
            objective = r.variant.get("module.objective", "l2c")
            v = {k: r.variant[k] for k in ("module.trajectory.budget", "module.optimizer.lr") if k in r.variant}
            lam = r.variant.get("policy.lam", r.variant.get("lam"))
            if objective == "l2c" and lam is not None:  # the λ sweep of converged L2C
                v["lam"] = f"{float(lam):g}"
            method, title = (r.method, r.title) if objective in ("l2c", "budget") else (objective, TITLES[objective])
            params = {} if objective == "trajectory" else r.params  # theta is moved onto the budget's top-k
            rows.append(replace(r, seed=int(run["seed"]), variant=v, method=method, title=title, params=params))
    return average(rows)


def main(stem: str, spec: str, caption: str) -> None:
    rows = rows_of(json.loads(Path(spec).read_text()))
    print(write_table(rows, stem, caption))
    pareto_png(rows, Path(stem).with_suffix(".png"), caption)


if __name__ == "__main__":
    main(*sys.argv[1:4])
