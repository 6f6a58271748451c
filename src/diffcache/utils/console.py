"""What a user reads: each log line once, no library advertising or accelerator roll call.

Lightning installs its own console handler on the ``lightning`` logger, and Hydra's job logging adds one
on the root logger, so every Lightning INFO line was printed twice; :func:`setup_console` keeps Hydra's
(formatted, also written to the run's log file) and drops Lightning's, plus its "litlogger" tip.
The progress display is :mod:`diffcache.callbacks.progress`.
"""
from __future__ import annotations

import logging

# library lines a user cannot act on: advertising, the accelerators this run does not use (it says what it
# runs on itself), the loader's default when it reads a checkpoint this project wrote, a default restated
_NOISE = ("litlogger", "LitLogger", "GPU available:", "TPU available:", "HPU available:", "IPU available:",
          "`weights_only` was not set", "was configured so 100% of the batches")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(a in str(record.msg) for a in _NOISE)


def setup_console() -> None:
    """Route Lightning's log records through the root handlers only, without its tips or warnings about
    what is intended here (the frozen teacher in eval mode; a torch deprecation inside Lightning)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # a resumed run continues in its own folder, whose checkpoints/ is not empty by design
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    root_has_handlers = bool(logging.getLogger().handlers)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        if root_has_handlers:
            for h in list(lg.handlers):
                if type(h) is logging.StreamHandler:
                    lg.removeHandler(h)
            lg.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.logger_connector.logger_connector",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in lg.filters):
            lg.addFilter(_DropNoise())


def model_summary_line(module) -> str:
    """One line instead of Lightning's table (whose FLOPs column is 0 for a frozen teacher)."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.backbone.parameters())
    policy = module.policy
    return (f"trainable: {trainable:,} router logits ({policy.num_routers} routers x {policy.num_sites} sites); "
            f"frozen teacher {type(module.backbone).__name__}: {frozen:,} parameters")
