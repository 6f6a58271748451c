"""Train a cache router: ``python train.py backbone=uvit solver=dpm20 policy=l2c``."""
import hydra
from omegaconf import DictConfig

import diffcache  # noqa: F401  (registers the config resolvers before Hydra names the run directory)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from diffcache.tasks.train import train
    from diffcache.utils.cli import user_errors

    with user_errors():
        train(cfg)


if __name__ == "__main__":
    main()
