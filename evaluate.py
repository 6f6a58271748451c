"""Sample with a cache policy and report compute, latency and error vs the uncached sampler:
``python evaluate.py backbone=dit solver=ddim50 policy=toca backbone.ckpt=...``."""
import logging

import hydra
from omegaconf import DictConfig

import diffcache  # noqa: F401  (registers the config resolvers before Hydra names the run directory)
from diffcache.utils.cli import run_main


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from diffcache.tasks.evaluate import evaluate
    from diffcache.utils.cli import user_errors
    from diffcache.utils.console import choose_threads

    choose_threads(logging.getLogger("diffcache"))  # a script's choice; train(cfg) from Python keeps torch's
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    run_main(main)  # exits 2 when a sweep had failed jobs
