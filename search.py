"""Search a static cache schedule: ``python search.py solver=ddim20 searcher.budget=0.7``."""
import logging
import sys

import hydra
from omegaconf import DictConfig

import diffcache  # noqa: F401  (registers the config resolvers before Hydra names the run directory)
from diffcache.utils.cli import run_main


@hydra.main(version_base="1.3", config_path="conf", config_name="search")
def main(cfg: DictConfig) -> None:
    from diffcache.tasks.search import search
    from diffcache.utils.cli import user_errors
    from diffcache.utils.console import choose_threads

    choose_threads(logging.getLogger("diffcache"))  # a script's choice; train(cfg) from Python keeps torch's
    result = {}  # an input error in a sweep job ends that job only (user_errors reports it)
    with user_errors():
        result = search(cfg)
    if result.get("partial"):  # Ctrl-C: the measured part of the table kept, the command that continues it printed
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)  # exits 2 when a sweep had failed jobs
