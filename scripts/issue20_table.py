"""Issue 20's seed table: the comparisons of several router runs on one teacher and one evaluation set, as one
mean ± std table and Pareto PNG (the project's ``write_table`` / ``pareto_png``).

    python scripts/issue20_table.py <out stem> <runs.json> "<caption>"

``runs.json``: ``[{"dir": <run folder with comparison.json>, "seed": 0, "router": "trajectory b=0.8"}, ...]``.
Every run measured its baselines (full, fewer steps, FORA, ToCa, searched) on the same seeded noise
(``compare.seed``), so a baseline is one row whatever the router seed; a trained router's row is grouped by its
``router`` name and averaged over its seeds (population std). Rows from the runs' ``comparison.json`` (the
records of commit 9756ac6, before the typed ``results.json``).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from diffcache.utils.pareto import pareto_png
from diffcache.utils.record import Row, write_table

KEYS = ("psnr", "mnist_fid", "mnist_is")
COST = ("macs_fraction", "gmacs", "train_s", "search_s")


def rows_of(runs: list[dict]) -> list[Row]:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        for d in json.loads((Path(run["dir"]) / "comparison.json").read_text()):
            d = {**d, "method": d["method"].replace("fewer steps ", "steps ")}  # the equal-compute tag is per run
            if d["kind"] == "l2c":
                d = {**d, "method": run["router"], "kind": "trajectory" if "trajectory" in run["router"] else "l2c",
                     "seed": run["seed"]}
            elif "greedy" in d["method"]:
                continue  # greedy and DP chose the same masks at 0.7 / 0.8 (within 0.12 dB at 0.6): DP shown
            groups.setdefault(d["method"], [])
            seen = {x.get("seed") for x in groups[d["method"]]}
            if not groups[d["method"]] or (d.get("seed") is not None and d["seed"] not in seen):
                groups[d["method"]].append(d)  # a baseline counts once, a trained router once per seed
    out = []
    for label, ds in groups.items():
        row = Row(method=ds[0]["kind"], title=label, solver="ddim", nfe=int(ds[0]["nfe"]), seeds=len(ds),
                  seed=min(int(d.get("seed", 0)) for d in ds), num_samples=1000)
        for key in KEYS + COST:
            vals = [float(d[key]) for d in ds if d.get(key) is not None]
            if not vals or (key == "psnr" and ds[0]["kind"] == "full"):
                continue
            if key in KEYS:
                row.metrics[key] = statistics.fmean(vals)
            else:
                setattr(row, key, statistics.fmean(vals))
            row.spread[key] = statistics.pstdev(vals)
        out.append(row)
    return sorted(out, key=lambda r: (-(r.macs_fraction or 0), -r.metrics.get("psnr", 1e9)))


def main(stem: str, spec: str, caption: str) -> None:
    rows = rows_of(json.loads(Path(spec).read_text()))
    print(write_table(rows, stem, caption))
    pareto_png(rows, Path(stem).with_suffix(".png"), caption)


if __name__ == "__main__":
    main(*sys.argv[1:4])
