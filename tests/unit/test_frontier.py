"""A sweep's comparison tables -> one frontier table: rows keyed by (method, seed), mean and population std
over seeds (checked against numbers computed here), L2C rows named after the run's overrides, and the PNG."""
from __future__ import annotations

import json
import statistics

import pytest

from diffcache.utils.frontier import gather, write_frontier


def _run(root, name, overrides, rows):
    d = root / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"overrides": overrides}))
    (d / "comparison.json").write_text(json.dumps(rows))


def _rows(fid_full, fid_l2c, fid_fora):
    return [{"method": "full ddim-20", "kind": "full", "mnist_fid": fid_full, "macs_fraction": 1.0},
            {"method": "L2C theta=0.1", "kind": "l2c", "mnist_fid": fid_l2c, "macs_fraction": 0.7},
            {"method": "FORA N=2", "kind": "fora", "mnist_fid": fid_fora, "macs_fraction": 0.55}]


def test_gather_averages_over_seeds_and_counts_repeated_baselines_once(tmp_path):
    # two lambdas x two seeds; the baselines repeat in both lambda runs of a seed (as the compare cache gives)
    _run(tmp_path, "0_a", ["policy.lam=1e-5", "seed=0"], _rows(10.0, 12.0, 20.0))
    _run(tmp_path, "1_b", ["policy.lam=1e-4", "seed=0"], _rows(10.0, 15.0, 20.0))
    _run(tmp_path, "2_c", ["policy.lam=1e-5", "seed=1"], _rows(14.0, 13.0, 26.0))
    _run(tmp_path, "3_d", ["policy.lam=1e-4", "seed=1"], _rows(14.0, 19.0, 26.0))
    rows = {r["method"]: r for r in gather(tmp_path)}
    assert set(rows) == {"full ddim-20", "FORA N=2", "L2C policy.lam=1e-5 (theta=0.1)", "L2C policy.lam=1e-4 (theta=0.1)"}
    full = rows["full ddim-20"]
    assert full["seeds"] == 2 and full["mnist_fid_mean"] == pytest.approx(12.0)
    assert full["mnist_fid_std"] == pytest.approx(statistics.pstdev([10.0, 14.0])) == pytest.approx(2.0)
    assert rows["L2C policy.lam=1e-4 (theta=0.1)"]["mnist_fid_mean"] == pytest.approx(17.0)
    assert rows["FORA N=2"]["macs_fraction_std"] == 0.0
    md = write_frontier(list(rows.values()), tmp_path)
    text = md.read_text()
    assert "12 ± 2" in text and text.count("\n") == 2 + 4
    assert (tmp_path / "frontier.png").stat().st_size > 1000 and (tmp_path / "frontier.csv").is_file()
