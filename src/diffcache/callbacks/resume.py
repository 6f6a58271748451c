"""Interrupt and resume without losing anything: a checkpoint at the step reached, and the command that
continues it.

The first Ctrl-C (SIGINT) asks :class:`StopOnInterrupt` to finish the running step, write
``checkpoints/last.ckpt`` there and stop: written in ``on_train_batch_end``, where ``ModelCheckpoint`` writes
its own, so Lightning resumes it exactly (every later step, and every CSV row, lands on the step an
uninterrupted run gives it). A second Ctrl-C stops at once (Lightning's shutdown; ``last.ckpt`` stays at the
last periodic checkpoint). Not Lightning's ``OnExceptionCheckpoint``: its checkpoint is taken mid-step,
which Lightning resumes one logging step late, and with one present ``fit(ckpt_path=None)`` resumes from any
"last" checkpoint it finds.
"""
from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

import lightning as L


class StopOnInterrupt(L.Callback):
    """First Ctrl-C: finish this step, save ``<dirpath>/last.ckpt``, stop (``requested`` stays True)."""

    def __init__(self, dirpath) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.requested, self._previous = False, None

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:  # the second Ctrl-C: at once
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving it (Ctrl-C again stops at once, without saving)",
              file=sys.stderr, flush=True)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_start(self, trainer, module) -> None:
        try:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Ctrl-C keeps Lightning's handling
            self._previous = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.requested and not trainer.should_stop:
            policy = getattr(module, "policy", None)
            if policy is not None and hasattr(policy, "clamp_"):
                policy.clamp_()  # the module's own hook clamps after the callbacks'
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True

    def on_train_end(self, trainer, module) -> None:
        self._restore()

    def on_exception(self, trainer, module, exception) -> None:
        self._restore()


def resume_command(overrides: list[str], ckpt: Path | None, script: str = "train.py") -> str:
    """The command line that continues this run: its own overrides plus ``ckpt_path=`` (when given)."""
    kept = [o for o in overrides if not o.startswith("ckpt_path=")]
    return " ".join(shlex.quote(a) for a in ["python", script, *kept, *([f"ckpt_path={ckpt}"] if ckpt else [])])
