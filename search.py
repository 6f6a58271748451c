"""Search a static cache schedule: ``python search.py solver=ddim20 searcher.budget=0.7``."""
import logging
import sys

import hydra
from omegaconf import DictConfig

import diffcache  # noqa: F401  (registers the config resolvers before Hydra names the run directory)


@hydra.main(version_base="1.3", config_path="conf", config_name="search")
def main(cfg: DictConfig) -> None:
    from diffcache.tasks.search import search
    from diffcache.utils.cli import user_errors
    from diffcache.utils.console import choose_threads

    choose_threads(logging.getLogger("diffcache"))  # a script's choice; train(cfg) from Python keeps torch's
    with user_errors():
        if search(cfg).get("interrupted"):
            sys.exit(130)  # Ctrl-C: the measured part of the table kept, the command that continues it printed


if __name__ == "__main__":
    main()
