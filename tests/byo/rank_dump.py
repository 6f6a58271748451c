"""A test callback (loaded through Hydra's ``_target_``): every DDP rank saves its policy's state at the end."""
from pathlib import Path

import lightning as L
import torch


class DumpPolicyPerRank(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in module.policy.state_dict().items()},
                   self.out_dir / f"rank{trainer.global_rank}.pt")
