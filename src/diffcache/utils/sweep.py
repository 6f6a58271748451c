"""Hydra callback: after a multirun, gather every run's ``summary.json`` into one table.

Train and evaluate sweeps share one table format; a column appears when some run reports it (so an
evaluate sweep gets its fidelity and speedup columns, a train sweep its losses). Key names are the run
summaries' own (``cached_fraction``, ``macs_fraction`` = cached / full MACs, ``speedup_*`` = full / cached).
A run that failed (a ``FAILED`` marker, no summary) is listed with its error in ``status``. When the runs
wrote result records (``results.json``: compare, evaluate), they are gathered into ``frontier.{md,csv,png}``
(mean +- std over seeds, quality and PSNR vs MACs: :mod:`diffcache.utils.frontier`); the run table has no plot
of its own (a training loss is no quality axis).
"""
from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from .cli import exit_later
from .frontier import gather, write_frontier

log = logging.getLogger(__name__)

COLUMNS = ["run", "status", "overrides", "lam", "theta", "theta_effective", "global_step", "train/loss", "train/mse",
           "train/sum_beta", "cached", "cacheable", "cached_fraction", "macs_fraction", "speedup_macs",
           "mse_vs_full", "psnr_vs_full_db", "latency_cached_s", "latency_full_s", "speedup_latency"]
ALWAYS = ("run", "status", "overrides")


def _job_number(run_dir: Path) -> int:
    head = run_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def summarize(sweep_dir: str | Path) -> list[dict]:
    """Rows of the sweep table; writes ``summary.csv`` and ``summary.md`` into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for run in sorted((p for p in sweep_dir.iterdir() if p.is_dir()) if sweep_dir.is_dir() else [], key=_job_number):
        if (run / "summary.json").is_file():
            s = json.loads((run / "summary.json").read_text())
            status = "partial" if s.get("partial") else "ok"
        elif (run / "FAILED").is_file():
            s, status = {}, "failed: " + (run / "FAILED").read_text().strip()
        else:
            continue
        rows.append({**{k: s.get(k) for k in COLUMNS}, **{k: v for k, v in s.items() if k.startswith("val/")},
                     "run": run.name, "status": status, "overrides": " ".join(s.get("overrides", []))})
    if not rows:
        return rows
    extra = sorted({k for r in rows for k in r if k.startswith("val/")})
    columns = [c for c in COLUMNS if c in ALWAYS or any(r[c] is not None for r in rows)] + extra
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        rows = summarize(config.hydra.sweep.dir)
        if rows:
            log.info("sweep summary (%d runs):\n%s", len(rows), (Path(config.hydra.sweep.dir) / "summary.md").read_text())
        md = write_frontier(gather(config.hydra.sweep.dir), config.hydra.sweep.dir)
        if md is not None:
            print(f"\n{md.read_text()}\nfrontier: {md} (.csv), {md.with_suffix('.png')}")
        failed = [r for r in rows if str(r["status"]).startswith("failed")]
        if failed:
            print(f"error: {len(failed)} of {len(rows)} sweep runs failed ({', '.join(r['run'] for r in failed)}); "
                  f"see {Path(config.hydra.sweep.dir) / 'summary.md'}", file=sys.stderr)
            exit_later(2)
