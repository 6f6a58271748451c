"""A CSV logger that writes one row per step and keeps a resumed run's history.

Lightning's CSV writer appends one row per ``log_metrics`` call, so the learning-rate monitor, the
training losses and the router statistics of one step landed on three mostly empty rows. Here calls for
the same step merge into one row; the last row is held back until the next step (or the end) so a
flush between two calls of one step cannot split it.

Lightning's writer also deletes an existing ``metrics.csv`` ("Previous log files in this directory will be
deleted"), so resuming a run in its folder lost every row before the checkpoint. Here the earlier rows are
kept up to the first step the resumed run logs (rows from the checkpoint on are logged again), so the file
holds every step once. With ``flush_logs_every_n_steps: 1`` (the config's) each step's row is on disk once the
next step starts, so even after ``kill -9`` the rows before the last checkpoint are there.
"""
from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _StepWriter(ExperimentWriter):
    final = False
    earlier: list[dict] | None = None

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes the file; keep its rows (see save)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.earlier = list(csv.DictReader(fh))

    def _keep_earlier(self) -> None:
        """Rewrite the file with the earlier rows before the first step this run logs."""
        first = min(int(r["step"]) for r in self.metrics)
        rows = [r for r in self.earlier if r.get("step") not in (None, "") and int(float(r["step"])) < first]
        self.earlier = None
        self.metrics_keys = sorted({k for r in rows for k in r if r[k] not in (None, "")} | set(self.metrics_keys))
        with self._fs.open(self.metrics_file_path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.metrics_keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def log_metrics(self, metrics_dict, step=None) -> None:
        super().log_metrics(metrics_dict, step)
        new = self.metrics.pop()
        same = [r for r in self.metrics if r.get("step") == new["step"]]
        if same:
            same[-1].update(new)
        else:
            self.metrics.append(new)

    def save(self) -> None:
        held = [] if self.final or not self.metrics else self.metrics[-1:]
        self.metrics = self.metrics[: len(self.metrics) - len(held)]
        if self.earlier is not None and self.metrics:
            self._keep_earlier()
        super().save()
        self.metrics = held


class StepCSVLogger(CSVLogger):
    """:class:`lightning.pytorch.loggers.CSVLogger` with one row per step (``metrics.csv``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _StepWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _StepWriter(log_dir=self.log_dir)
        return self._experiment

    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self._experiment.final = True
        super().finalize(status)
