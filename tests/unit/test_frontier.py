"""A sweep's result records -> one frontier: rows grouped by their fields (method, parameters, the router's
swept settings), mean and population std over seeds (checked against numbers computed here), a baseline
repeated in every run of a seed counted once, the table with units and caption, and the Pareto plot."""
from __future__ import annotations

import statistics

import pytest

from diffcache.utils.frontier import gather, write_frontier
from diffcache.utils.pareto import pareto_front
from diffcache.utils.record import Row, save_rows, varying


def _run(root, name, lam, seed, fid_full, fid_l2c, fid_fora):
    prov = {"commit": "abc1234", "machine": "test machine", "teacher": "tiny"}
    rows = [Row("full", "full DDIM-20", "ddim", 20, seed=seed, metrics={"mnist_fid": fid_full}, macs_fraction=1.0,
                provenance=prov),
            Row("l2c", "L2C", "ddim", 20, params={"θ": 0.1}, variant={"policy.lam": lam, "data": "mnist"}, seed=seed,
                metrics={"mnist_fid": fid_l2c, "psnr": 40.0 + fid_l2c}, macs_fraction=0.7, provenance=prov),
            Row("fora", "FORA", "ddim", 20, params={"N": 2}, seed=seed, metrics={"mnist_fid": fid_fora, "psnr": 30.0},
                macs_fraction=0.55, provenance=prov)]
    save_rows(rows, root / name)


def test_gather_averages_over_seeds_and_counts_repeated_baselines_once(tmp_path):
    # two lambdas x two seeds; the baselines repeat in both lambda runs of a seed (as the compare cache gives)
    _run(tmp_path, "0_a", "1e-5", 0, 10.0, 12.0, 20.0)
    _run(tmp_path, "1_b", "1e-4", 0, 10.0, 15.0, 20.0)
    _run(tmp_path, "2_c", "1e-5", 1, 14.0, 13.0, 26.0)
    _run(tmp_path, "3_d", "1e-4", 1, 14.0, 19.0, 26.0)
    gathered = gather(tmp_path)
    swept = varying(gathered)
    assert swept == ["policy.lam"]  # data=mnist is the same in every run: it tells no row apart
    rows = {r.describe(swept): r for r in gathered}
    assert set(rows) == {"full DDIM-20", "FORA N=2", "L2C θ=0.1 (lam=1e-5)", "L2C θ=0.1 (lam=1e-4)"}
    full = rows["full DDIM-20"]
    assert full.seeds == 2 and full.metrics["mnist_fid"] == pytest.approx(12.0)
    assert full.spread["mnist_fid"] == pytest.approx(statistics.pstdev([10.0, 14.0])) == pytest.approx(2.0)
    assert rows["L2C θ=0.1 (lam=1e-4)"].metrics["mnist_fid"] == pytest.approx(17.0)
    assert rows["L2C θ=0.1 (lam=1e-4)"].short(swept) == "lam=1e-4"  # the plot labels a router by its swept value
    assert rows["FORA N=2"].spread["macs_fraction"] == 0.0
    md = write_frontier(list(rows.values()), tmp_path)
    text = md.read_text()
    assert "| L2C θ=0.1 (lam=1e-4) | 20 | 2 | 17 ± 2 |" in text and "12 ± 2" in text and text.count("\n") == 4 + 4
    assert text.startswith("*frontier, mean ± std over 2 seed(s): teacher tiny") and "commit abc1234" in text
    assert "| method | NFE | seeds | MNIST-FID | PSNR to full (dB) | MACs (fraction of full) |" in text
    assert (tmp_path / "frontier.png").stat().st_size > 1000 and (tmp_path / "frontier.csv").is_file()


def test_pareto_front_keeps_the_points_nothing_beats():
    pts = [(1.0, 10.0), (0.7, 12.0), (0.7, 11.0), (0.5, 30.0), (0.6, 35.0)]
    assert pareto_front(pts, higher_better=False) == [(0.5, 30.0), (0.7, 11.0), (1.0, 10.0)]
    assert pareto_front(pts, higher_better=True) == [(0.5, 30.0), (0.6, 35.0)]
