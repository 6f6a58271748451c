"""Compare a router (or none) with full / fewer steps / FORA / ToCa / searched schedules, without training:
``python compare.py router_ckpt=logs/train/runs/<run>/router.pt``."""
import hydra
from omegaconf import DictConfig

import diffcache  # noqa: F401  (registers the config resolvers before Hydra names the run directory)
from diffcache.utils.cli import run_main


@hydra.main(version_base="1.3", config_path="conf", config_name="compare_task")
def main(cfg: DictConfig) -> None:
    from diffcache.tasks.compare import run
    from diffcache.utils.cli import user_errors

    with user_errors():
        run(cfg)


if __name__ == "__main__":
    run_main(main)  # exits 2 when a sweep had failed jobs
