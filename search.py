"""Search a static cache schedule: ``python search.py backbone=tiny_dit solver=ddim20 searcher.budget=0.7``."""
import hydra
from omegaconf import DictConfig

import diffcache  # noqa: F401  (registers the config resolvers before Hydra names the run directory)


@hydra.main(version_base="1.3", config_path="conf", config_name="search")
def main(cfg: DictConfig) -> None:
    from diffcache.tasks.search import search
    from diffcache.utils.cli import user_errors

    with user_errors():
        search(cfg)


if __name__ == "__main__":
    main()
