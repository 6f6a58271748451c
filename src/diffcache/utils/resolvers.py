"""OmegaConf resolvers the configs use; registered on ``import diffcache`` (before Hydra names run dirs).

``${dc.run_name:${backbone},${solver},${policy}}`` names a run after what actually runs (the arch, or a
user class; the solver class and step count; the policy), so ``backbone.arch=DiT-L/2`` never yields a
run called ``dit-...``. ``${dc.slug:...}`` makes any override string safe as one folder name, and as a
value on a later command line (``router_ckpt=<sweep>/<run>/router.pt``): Hydra's override grammar takes
no ``=`` or ``,`` unquoted, so ``key=value,key=value`` becomes ``key-value_key-value``. ``${dc.root:}`` is
the checkout's root (``paths.root_dir`` when ``PROJECT_ROOT`` is unset).
"""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def slug(text, max_len: int = 80) -> str:
    """One safe path component: runs of other characters become ``_``; long names keep a hash suffix."""
    import hashlib

    s = _UNSAFE.sub("_", str(text).replace("=", "-").replace(",", "_")).strip("._") or "run"
    if len(s) > max_len:
        s = s[: max_len - 9] + "_" + hashlib.sha1(s.encode()).hexdigest()[:8]
    return s


def _target_name(node) -> str:
    target = str(node.get("_target_", "") or "")
    return target.rsplit(".", 1)[-1] if target else "custom"


def run_name(backbone, solver, policy, choice=None) -> str:
    """``arch-solver_steps-policy``; ``choice`` (the policy config's name) names the run when it is not a preset
    of the class (``policy=search`` runs an L2CPolicy: the folder says ``search``, not ``l2c``)."""
    from hydra.utils import get_class

    arch = backbone.get("arch") or _target_name(backbone)
    try:
        alg = getattr(get_class(solver._target_), "name", _target_name(solver))
    except Exception:  # a run name must never be the reason a run fails
        alg = _target_name(solver)
    steps = solver.get("num_steps", "")
    try:
        pol = getattr(get_class(policy._target_), "name", _target_name(policy))
    except Exception:
        pol = _target_name(policy)
    preset = policy.get("preset")
    if choice and not str(choice).startswith(str(pol)):
        pol, preset = str(choice), None
    return slug(f"{arch}-{alg}_{steps}-{pol}" + (f"-{preset}" if preset else ""))


def choice(group: str):
    """The config group's chosen option (``hydra:runtime.choices.<group>``), or None before Hydra has set its
    config: a multirun's sweep directory is resolved then, where the ``hydra:`` resolver would raise."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def project_root() -> str:
    """The checkout this package runs from (it holds ``conf/`` and ``assets/``), else the working directory:
    ``paths.root_dir`` then finds the shipped teachers from any working directory."""
    root = Path(__file__).resolve().parents[3]
    return str(root) if (root / "conf" / "train.yaml").is_file() else str(Path.cwd())


def conf_dir() -> Path:
    """The one place ``conf/`` is looked up (the configs' backbone files are read outside Hydra too)."""
    return Path(project_root()) / "conf"


def assets_dir() -> Path:
    """The shipped teachers and classifier (``assets/``)."""
    return Path(project_root()) / "assets"


def register() -> None:
    OmegaConf.register_new_resolver("dc.root", project_root, replace=True)
    OmegaConf.register_new_resolver("dc.run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("dc.slug", slug, replace=True)
    OmegaConf.register_new_resolver("dc.choice", choice, replace=True)
