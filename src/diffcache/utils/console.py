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


def choose_threads(log: logging.Logger | None = None) -> int:
    """CPU threads for this run, said in one line. Unless ``OMP_NUM_THREADS`` is set, one per core the machine
    has free (cores minus the 1-minute load average, at least 1): torch's default of one per core collapses
    when the cores are shared (the demo ran at 0.1 it/s with 2 threads on a busy 2-core box, 2.6 it/s with 1)."""
    import os

    import torch

    cores = os.cpu_count() or 1
    if os.environ.get("OMP_NUM_THREADS"):
        why = "OMP_NUM_THREADS"
    else:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        torch.set_num_threads(max(1, min(cores, cores - int(round(load)))))
        why = f"{cores} cores, load average {load:.1f}; OMP_NUM_THREADS=N overrides"
    n = torch.get_num_threads()
    if log is not None and not torch.cuda.is_available():
        log.info("CPU threads: %d (%s)", n, why)
    return n
