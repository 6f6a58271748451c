"""Train a cache router: ``python train.py backbone=uvit solver=dpm20 policy=l2c``."""
import logging
import sys

import hydra
from omegaconf import DictConfig

import diffcache  # noqa: F401  (registers the config resolvers before Hydra names the run directory)
from diffcache.utils.cli import run_main


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from diffcache.tasks.train import train
    from diffcache.utils.cli import user_errors
    from diffcache.utils.console import choose_threads

    choose_threads(logging.getLogger("diffcache"))  # a script's choice; train(cfg) from Python keeps torch's
    result = {}  # an input error in a sweep job ends that job only (user_errors reports it)
    with user_errors():
        result = train(cfg)
    if result.get("partial"):  # interrupted (Ctrl-C): the partial router is saved; the shell sees 130
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)  # exits 2 when a sweep had failed jobs
