"""What a user reads: each log line once, no library advertising, a progress bar that says what runs.

Lightning installs its own console handler on the ``lightning`` logger, and Hydra's job logging adds one
on the root logger, so every Lightning INFO line was printed twice; :func:`setup_console` keeps Hydra's
(formatted, also written to the run's log file) and drops Lightning's, plus its "litlogger" tip.
:class:`StepProgressBar` counts optimiser steps (router training is step-based: ``max_epochs=-1`` gave
"Epoch 0/-2") and prints losses of 1e-6 in scientific notation instead of "0.000".
"""
from __future__ import annotations

import logging

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme

_ADVERTS = ("litlogger", "LitLogger")


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(a in str(record.msg) for a in _ADVERTS)


def setup_console() -> None:
    """Route Lightning's log records through the root handlers only, without its tips or warnings about
    what is intended here (the frozen teacher in eval mode; a torch deprecation inside Lightning)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    root_has_handlers = bool(logging.getLogger().handlers)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        if root_has_handlers:
            for h in list(lg.handlers):
                if type(h) is logging.StreamHandler:
                    lg.removeHandler(h)
            lg.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.logger_connector.logger_connector"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in lg.filters):
            lg.addFilter(_DropAdverts())


class StepProgressBar(RichProgressBar):
    """Rich progress bar over optimiser steps, metrics in ``.3e``."""

    def __init__(self, **kw) -> None:
        super().__init__(theme=RichProgressBarTheme(metrics_format=".3e"), **kw)

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the bar's label
        max_steps = self.trainer.max_steps
        return f"train (max_steps {max_steps})" if max_steps and max_steps > 0 else f"epoch {current_epoch}"


def model_summary_line(module) -> str:
    """One line instead of Lightning's table (whose FLOPs column is 0 for a frozen teacher)."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.backbone.parameters())
    policy = module.policy
    return (f"trainable: {trainable:,} router logits ({policy.num_routers} routers x {policy.num_sites} sites); "
            f"frozen teacher {type(module.backbone).__name__}: {frozen:,} parameters")
