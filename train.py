"""Train a cache router: ``python train.py backbone=uvit solver=dpm20 policy=l2c``."""
import logging
import sys

import hydra
from omegaconf import DictConfig

import diffcache  # noqa: F401  (registers the config resolvers before Hydra names the run directory)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from diffcache.tasks.train import train
    from diffcache.utils.cli import user_errors
    from diffcache.utils.console import choose_threads

    choose_threads(logging.getLogger("diffcache"))  # a script's choice; train(cfg) from Python keeps torch's
    with user_errors():
        if train(cfg).get("interrupted"):
            sys.exit(130)  # Ctrl-C: checkpoint and partial router saved, the resume command printed


if __name__ == "__main__":
    main()
