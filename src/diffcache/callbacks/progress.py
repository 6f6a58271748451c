"""Training progress a user can read on a terminal, in a log file and in CI.

Lightning's bars count batches of an epoch (router training is step-based: a resumed run showed ``30/19``),
wrap into several lines at 80 columns when metrics are shown, freeze without a word while validation
samples, print nothing at all when stdout is not a terminal, and never print the validation metrics.
:class:`StepProgress` counts optimiser steps from the resumed step to the run's length, on one line that
fits the terminal (redrawn in place), and off a terminal prints a plain line every ``every_steps`` steps or
``every_s`` seconds; validation is announced before it starts and its metrics are printed when it ends.
"""
from __future__ import annotations

import shutil
import sys
import time

from lightning.pytorch.callbacks import ProgressBar

_SHOWN = {"train/loss": "loss", "train/sum_beta": "sum_beta"}
_VAL = {"val/mnist_fid": "MNIST-FID", "val/mnist_is": "MNIST-IS", "val/fid": "FID", "val/is": "IS",
        "val/psnr": "PSNR {:.1f} dB", "val/macs_fraction": "MACs {:.3f}", "val/cached_fraction": "cached {:.2f}"}


def duration(s: float) -> str:
    """``95`` -> ``1m35s``; ``4000`` -> ``1h06m``."""
    s = int(round(max(s, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StepProgress(ProgressBar):
    """Steps ``global_step / total`` (``total``: ``trainer.max_steps``, else the run's stated length)."""

    def __init__(self, total: int | None = None, every_steps: int = 50, every_s: float = 30.0, stream=None) -> None:
        super().__init__()
        self.total, self.every_steps, self.every_s = total, int(every_steps), float(every_s)
        self.stream = stream or sys.stdout
        self._enabled, self._drawn, self.t0, self.start, self.last = True, False, 0.0, 0, 0.0

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    @property
    def tty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def _write(self, text: str, inline: bool = False) -> None:
        if not self._enabled:
            return
        if self.tty:
            width = shutil.get_terminal_size((80, 24)).columns - 1
            self.stream.write("\r" + text[:width].ljust(width) + ("" if inline else "\n"))
            self._drawn = inline
        elif not inline:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _end_line(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def _total(self, trainer) -> int | None:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else self.total

    def line(self, trainer) -> str:
        """``train 123/400 31% 2.6 it/s ETA 1m46s loss 1.234e-02``"""
        step, total, now = trainer.global_step, self._total(trainer), time.monotonic()
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9) if done else 0.0
        text = f"train {step}/{total}" if total else f"train {step}"
        if total:
            text += f" {100 * step / total:.0f}%"
        if rate:
            text += f" {rate:.2f} it/s" + (f" ETA {duration((total - step) / rate)}" if total and total > step else "")
        metrics = trainer.progress_bar_metrics
        return text + "".join(f" {name} {float(metrics[k]):.3e}" for k, name in _SHOWN.items() if k in metrics)

    def on_train_start(self, trainer, module) -> None:
        self.t0 = self.last = time.monotonic()
        self.start = trainer.global_step
        if self.start:
            self._write(f"resumed at step {self.start} of {self._total(trainer) or 'an open-ended run'}")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        step, now = trainer.global_step, time.monotonic()
        if self.tty:
            self._write(self.line(trainer), inline=True)
        elif step % self.every_steps == 0 or now - self.last >= self.every_s or step == self._total(trainer):
            self._write(self.line(trainer))
            self.last = now

    def on_validation_start(self, trainer, module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._end_line()
        n = sum(len(dl.dataset) for dl in _loaders(trainer.val_dataloaders))
        self._write(f"validating at step {trainer.global_step}: sampling {n} images with the router and the "
                    f"teacher ...")

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        parts = [(fmt if "{" in fmt else fmt + " {:.3g}").format(float(m[k])) for k, fmt in _VAL.items() if k in m]
        self._write(f"validation at step {trainer.global_step}: " + (", ".join(parts) or "done"))

    def on_train_end(self, trainer, module) -> None:
        self._end_line()

    def on_exception(self, trainer, module, exception) -> None:
        self._end_line()


def _loaders(dls) -> list:
    if dls is None:
        return []
    return list(dls.values()) if isinstance(dls, dict) else list(dls) if isinstance(dls, (list, tuple)) else [dls]
