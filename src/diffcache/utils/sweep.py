"""Hydra callback: after a multirun, gather every run's ``summary.json`` into one table."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

COLUMNS = ["run", "overrides", "lam", "theta", "global_step", "train/loss", "train/mse", "train/sum_beta",
           "cached", "cacheable", "cached_fraction", "macs_ratio"]


def summarize(sweep_dir: str | Path) -> list[dict]:
    """Rows of the sweep table; writes ``summary.csv`` and ``summary.md`` into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for f in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: int(p.parent.name.split("_")[0] or 0)):
        s = json.loads(f.read_text())
        rows.append({"run": f.parent.name, **{k: s.get(k) for k in COLUMNS[1:]},
                     "overrides": " ".join(s.get("overrides", []))})
    if not rows:
        return rows
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        rows = summarize(config.hydra.sweep.dir)
        if rows:
            log.info("sweep summary (%d runs):\n%s", len(rows), (Path(config.hydra.sweep.dir) / "summary.md").read_text())
