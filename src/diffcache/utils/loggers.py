"""A CSV logger that writes one row per step.

Lightning's CSV writer appends one row per ``log_metrics`` call, so the learning-rate monitor, the
training losses and the router statistics of one step landed on three mostly empty rows. Here calls for
the same step merge into one row; the last row is held back until the next step (or the end) so a
flush between two calls of one step cannot split it.
"""
from __future__ import annotations

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _StepWriter(ExperimentWriter):
    final = False

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
