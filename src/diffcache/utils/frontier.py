"""A sweep's results gathered into one frontier: every method's records (``results.json`` of each run, written
by compare or evaluate) averaged over seeds (mean +- population std, a repeated baseline counted once per
seed), as ``frontier.{md,csv}`` and one Pareto plot (:func:`~diffcache.utils.pareto.pareto_png`). Rows are
grouped by their fields (:meth:`~diffcache.utils.record.Row.identity`), never by their labels."""
from __future__ import annotations

from pathlib import Path

from .pareto import pareto_png
from .record import RESULTS, Row, average, caption, load_rows, write_table


def gather(sweep_dir: str | Path) -> list[Row]:
    """Every run's records, averaged over seeds (:func:`~diffcache.utils.record.average`)."""
    rows = []
    for run in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
        if (run / RESULTS).is_file():
            rows += load_rows(run / RESULTS)
    return average(rows)


def write_frontier(rows: list[Row], sweep_dir: str | Path) -> Path | None:
    """``frontier.{md,csv,png}`` in ``sweep_dir``; returns the Markdown path (None without rows)."""
    if not rows:
        return None
    sweep_dir = Path(sweep_dir)
    prov = next((r.provenance for r in rows if r.provenance.get("commit")), {"commit": "unknown", "machine": "unknown"})
    seeds = max(r.seeds for r in rows)
    text = caption(f"frontier, mean ± std over {seeds} seed(s)", prov.get("teacher", "unknown"),
                   rows[0].num_samples, rows[0].seed, prov)
    write_table(rows, sweep_dir / "frontier", text)
    pareto_png(rows, sweep_dir / "frontier.png", text)
    return sweep_dir / "frontier.md"
