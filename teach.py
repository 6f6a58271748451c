"""Train a demo teacher from scratch on MNIST: ``python teach.py backbone=mnist_uvit trainer.max_steps=8000``."""
import logging

import hydra
from omegaconf import DictConfig

import diffcache  # noqa: F401  (registers the config resolvers before Hydra names the run directory)
from diffcache.utils.cli import run_main


@hydra.main(version_base="1.3", config_path="conf", config_name="teach")
def main(cfg: DictConfig) -> None:
    from diffcache.tasks.teach import teach
    from diffcache.utils.cli import user_errors
    from diffcache.utils.console import choose_threads

    choose_threads(logging.getLogger("diffcache"))
    with user_errors():
        teach(cfg)


if __name__ == "__main__":
    run_main(main)  # exits 2 when a sweep had failed jobs
