"""The result record: one typed :class:`Row` per measured method, written and read by compare, evaluate,
sweep frontiers and the Pareto plot, and one table writer for all of them.

A row says what ran (``method`` family, ``params`` within it, ``variant``: the run settings that made a
trained router), on which sampler (``solver``, ``nfe``) and sample set (``seed``, ``num_samples``), what it
scored (``metrics``), what it cost (``gmacs``, ``macs_fraction``) and took (``latency_s``, ``train_s``,
``search_s``), and where it came from (``provenance``). Rows are grouped and labelled from these fields,
never by parsing a label. ``role`` is relative to the run that shows the row (e.g. "fewer steps": the
equal-compute baseline of *this* run's router), so it is never stored with a cached row.
"""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .hashing import file_sha256

RESULTS = "results.json"  # every task's rows, in a run directory
# quality metrics: (key, column header, higher is better); PSNR / MSE are to the full sampler on the same noise
QUALITY = [("mnist_fid", "MNIST-FID", False), ("mnist_is", "MNIST-IS", True), ("fid", "FID", False),
           ("is", "IS", True), ("tiny_fid", "FID (test extractor)", False), ("tiny_is", "IS (test extractor)", True),
           ("precision", "precision", True), ("recall", "recall", True), ("psnr", "PSNR to full (dB)", True),
           ("mse", "MSE to full", False)]
# cost and timing fields: (attribute, column header)
COST = [("gmacs", "GMACs / image"), ("macs_fraction", "MACs (fraction of full)"), ("latency_s", "latency (s / batch)"),
        ("speedup_latency", "speedup (latency)"), ("train_s", "train (s)"), ("search_s", "search (s)")]


@dataclass
class Row:
    """One measured method (see the module docstring)."""

    method: str
    title: str
    solver: str
    nfe: int
    params: dict = field(default_factory=dict)
    variant: dict = field(default_factory=dict)
    seed: int = 0
    num_samples: int = 0
    metrics: dict = field(default_factory=dict)
    gmacs: float | None = None
    macs_fraction: float | None = None
    latency_s: float | None = None
    speedup_latency: float | None = None
    train_s: float | None = None
    search_s: float | None = None
    provenance: dict = field(default_factory=dict)
    role: str = ""
    seeds: int = 1
    spread: dict = field(default_factory=dict)  # std over seeds of every averaged field (frontier rows)

    def identity(self) -> str:
        """What makes two rows the same method (seed, numbers and role aside): the frontier's group key."""
        return json.dumps([self.method, self.solver, self.nfe, self.params, self.variant], sort_keys=True, default=str)

    @property
    def label(self) -> str:
        """``[role: ]title params``, e.g. ``fewer steps: DDIM-17`` or ``L2C θ=0.1`` (see :meth:`describe`)."""
        return self.describe(())

    def describe(self, keys) -> str:
        """The label with the trained router's settings ``keys`` (those that differ between the rows shown, see
        :func:`varying`) in parentheses: ``L2C θ=0.1 (lam=0.001 data=noise)``."""
        words = [self.title] + [str(v) if isinstance(v, str) else f"{k}={v:g}" for k, v in self.params.items()]
        shown = [f"{k.rsplit('.', 1)[-1]}={self.variant[k]}" for k in keys if k in self.variant]
        text = " ".join(words) + (f" ({' '.join(shown)})" if shown else "")
        return f"{self.role}: {text}" if self.role else text

    def short(self, keys=()) -> str:
        """A plot point's label: the swept values of a trained router, else the parameters (or the title)."""
        shown = [f"{k.rsplit('.', 1)[-1]}={self.variant[k]}" for k in keys if k in self.variant]
        words = [str(v) if isinstance(v, str) else f"{k}={v:g}" for k, v in self.params.items()]
        return " ".join(shown + ([] if shown and self.method == "l2c" else words)) or self.title

    def value(self, key: str):
        return self.metrics.get(key) if key in self.metrics else getattr(self, key, None)

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label}

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def save_rows(rows: list[Row], run_dir) -> Path:
    path = Path(run_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_dict() for r in rows], indent=2, default=str))
    return path


def load_rows(path) -> list[Row]:
    return [Row.from_dict(d) for d in json.loads(Path(path).read_text())]


def average(rows: list[Row]) -> list[Row]:
    """Rows of the same :meth:`Row.identity` averaged over seeds (population std in ``spread``); a seed's
    repeated row (a baseline reused in every run of that seed) counts once. Sorted by MACs, largest first."""
    groups: dict[str, dict[int, Row]] = {}
    for r in rows:
        groups.setdefault(r.identity(), {}).setdefault(r.seed, r)
    out = []
    for by_seed in groups.values():
        runs = list(by_seed.values())
        mean = replace(runs[0], role="", seeds=len(runs), metrics={}, spread={})
        for key in [k for k, _, _ in QUALITY] + [k for k, _ in COST]:
            vals = [float(v) for v in (r.value(key) for r in runs) if v is not None]
            if vals:
                if hasattr(mean, key):
                    setattr(mean, key, statistics.fmean(vals))
                else:
                    mean.metrics[key] = statistics.fmean(vals)
                mean.spread[key] = statistics.pstdev(vals)
        out.append(mean)
    return sorted(out, key=lambda r: -(r.macs_fraction or 0.0))


def varying(rows: list[Row]) -> list[str]:
    """The router settings (``variant`` keys) whose values differ between ``rows``: what tells them apart."""
    keys = dict.fromkeys(k for r in rows for k in r.variant)
    return [k for k in keys if len({json.dumps(r.variant.get(k), default=str) for r in rows if r.variant}) > 1]


def _cell(row: Row, key: str) -> str:
    v = row.value(key)
    if v is None:
        return "—"
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return f"{text} ± {row.spread[key]:.2g}" if row.seeds > 1 and key in row.spread else text


def write_table(rows: list[Row], stem, caption: str = "") -> str:
    """``stem.md`` (named columns with units, the caption first) and ``stem.csv`` (one flat row per record);
    returns the Markdown. Columns appear when some row has them."""
    keys = [(k, h) for k, h, _ in QUALITY if any(r.value(k) is not None for r in rows)]
    keys += [(k, h) for k, h in COST if any(r.value(k) is not None for r in rows)]
    head = ["method", "NFE"] + (["seeds"] if any(r.seeds > 1 for r in rows) else []) + [h for _, h in keys]
    lines = ([f"*{caption}*", ""] if caption else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    swept = varying(rows)
    for r in rows:
        cells = [r.describe(swept) + (" (reused)" if r.provenance.get("reused") else ""), str(r.nfe)]
        cells += [str(r.seeds)] if "seeds" in head else []
        lines.append("| " + " | ".join(cells + [_cell(r, k) for k, _ in keys]) + " |")
    md = "\n".join(lines) + "\n"
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(md)
    cols = ["label", "method", "solver", "nfe", "seed", "seeds", "params", "variant"] + [k for k, _ in keys]
    cols += [f"{k}_std" for k, _ in keys if any(k in r.spread for r in rows)] + ["provenance"]
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            flat = {**r.to_dict(), **{k: r.value(k) for k, _ in keys}, **{f"{k}_std": v for k, v in r.spread.items()}}
            w.writerow({**flat, **{k: json.dumps(flat[k], default=str) for k in ("params", "variant", "provenance")}})
    return md


def provenance() -> dict:
    """Where numbers were made: the repository commit (``+dirty`` with local changes), the machine, torch."""
    import os
    import platform
    import subprocess

    import torch

    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty=+dirty", "--abbrev=7"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine = f"{gpu}, " if gpu else ""
    machine += f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    return {"commit": commit, "machine": machine}


def caption(what: str, teacher: str, num_samples: int, seed: int, prov: dict) -> str:
    """The one-line caption of a table or figure: what, teacher, sample set, commit, machine."""
    return f"{what}: teacher {teacher}, {num_samples} samples (seed {seed}), commit {prov['commit']}, {prov['machine']}"


def teacher_label(backbone_cfg) -> str:
    """``arch (file, sha256 prefix)`` of a backbone config's checkpoint, or ``arch (random weights)``."""

    ckpt = backbone_cfg.get("ckpt")
    name = str(backbone_cfg.get("arch") or backbone_cfg.get("_target_", "backbone")).rsplit(".", 1)[-1]
    if ckpt and Path(ckpt).is_file():
        return f"{name} ({Path(ckpt).name}, sha256 {file_sha256(ckpt)[:8]})"
    return f"{name} (random weights)"
