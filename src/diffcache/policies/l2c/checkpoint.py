"""Reading and writing the official Learning-to-Cache router checkpoints.

Two formats exist (both checked against the four released files):

DiT (``DiT/ckpt/DDIM{20,50}_router.pt``)
    ``{"routers": OrderedDict{"0.prob": f32[2*depth], ..., "{N-1}.prob": ...},
       "opt": AdamW.state_dict(), "args": argparse.Namespace}``.
    One router per sampling step; ``"opt"`` holds Adam moments only for the routers that were trained
    (the even respaced indices); the stored tensors were CUDA tensors (we always map to CPU).

U-ViT (``U-ViT/ckpt/dpm{20,50}_router.pth``)
    A plain ``OrderedDict{"i.prob": f32[2*depth]}`` (the ``routers`` state dict on its own), one router
    per NFE.

Lightning checkpoints of router training (``checkpoints/last.ckpt``) are read too: their ``state_dict``
holds only ``policy.routers.{i}``. What run a router was made for (solver, steps, interval, backbone)
is recorded and checked as :mod:`.provenance` describes; logits that are not finite are refused.

In both, ``prob`` holds raw *logits* (the name is upstream's); entry ``2*l`` is the attention branch and
``2*l+1`` the MLP branch of layer ``l``. The state-dict ``_metadata`` of the upstream ``ModuleList`` of
``Router`` modules (each with an ``activation`` child) is reproduced on export so ``load_state_dict`` on
the upstream classes sees exactly what it would see with a released file.

Safe loading: the DiT file pickles an ``argparse.Namespace``, which ``torch.load(weights_only=True)``
refuses by default. We allow-list exactly that one class (``torch.serialization.safe_globals``): the
weights-only unpickler then rebuilds it from a plain attribute dict and still refuses any other global,
so a malicious file cannot execute code. ``weights_only=False`` (full pickle) is available for trusted
files that carry other objects.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import provenance

FORMATS = ("dit", "uvit")
_KEY = re.compile(r"^(\d+)\.prob$")

# AdamW(lr=1e-3, wd=0) param-group fields exactly as the released DiT files store them.
DEFAULT_PARAM_GROUP: dict[str, Any] = {
    "lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0, "amsgrad": False, "foreach": None,
    "maximize": False, "capturable": False, "differentiable": False, "fused": None,
}


class RouterCheckpointError(ValueError):
    """A file that is not (or not a valid) L2C router checkpoint."""


@dataclass
class OfficialRouters:
    """The content of an official router file, format-independent.

    logits: one float32 CPU tensor per router index (``"{i}.prob"``), in index order.
    fmt: ``"dit"`` or ``"uvit"``. opt / args: the DiT file's optimiser state and ``Namespace`` (None for
    U-ViT). archive_name: the folder inside the zip (``0020000``, ``nnet``), reused on re-export.
    """

    logits: list[torch.Tensor]
    fmt: str
    opt: dict | None = None
    args: argparse.Namespace | None = None
    archive_name: str | None = None
    extra: dict = field(default_factory=dict)
    record: dict | None = None  # the run it was made for (:mod:`.provenance`); None = unknown

    @property
    def num_routers(self) -> int:
        return len(self.logits)

    @property
    def num_sites(self) -> int:
        return int(self.logits[0].numel())


# ---------------------------------------------------------------------------------------- reading
def _torch_load(path: Path, weights_only: bool):
    if weights_only:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError on non-torch files, ...
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "Unsupported global" in str(e) or "weights_only" in str(e).lower():
                raise RouterCheckpointError(
                    f"{path}: refused by the weights-only loader ({msg}). Official L2C router files only need "
                    f"argparse.Namespace, which is allow-listed; if you trust this file, pass weights_only=False."
                ) from e
            raise RouterCheckpointError(f"{path}: not a readable torch checkpoint ({msg})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RouterCheckpointError(f"{path}: not a readable torch checkpoint ({e})") from e


def router_state_to_logits(state: Mapping, where: str = "router state") -> list[torch.Tensor]:
    """``{"0.prob": t0, "1.prob": t1, ...}`` -> ``[t0, t1, ...]`` with strict key checks."""
    found: dict[int, torch.Tensor] = {}
    unexpected = []
    for k, v in state.items():
        m = _KEY.match(str(k))
        if m is None:
            unexpected.append(k)
        else:
            found[int(m.group(1))] = v
    if unexpected:
        raise RouterCheckpointError(
            f"{where}: unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; an L2C router "
            f"state holds only '{{i}}.prob' logits")
    if not found:
        raise RouterCheckpointError(f"{where}: no '{{i}}.prob' router keys")
    n = max(found) + 1
    missing = [f"{i}.prob" for i in range(n) if i not in found]
    if missing:
        raise RouterCheckpointError(f"{where}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                                    f"(router indices must run 0..{n - 1})")
    logits = []
    for i in range(n):
        t = found[i]
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or not t.is_floating_point():
            raise RouterCheckpointError(f"{where}: '{i}.prob' must be a 1-D float tensor, got "
                                        f"{getattr(t, 'shape', type(t).__name__)}")
        logits.append(t.detach().to("cpu", copy=True))
    sizes = {t.numel() for t in logits}
    if len(sizes) != 1:
        raise RouterCheckpointError(f"{where}: routers have different lengths {sorted(sizes)}")
    return logits


def _archive_name(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    return names[0].split("/", 1)[0] if names and "/" in names[0] else None


def load_official(path: str | os.PathLike, *, weights_only: bool = True) -> OfficialRouters:
    """Read a DiT ``.pt``, U-ViT ``.pth`` or Lightning ``.ckpt`` router file (format from its content);
    non-finite logits are refused."""
    off = _load(Path(path), weights_only)
    off.extra["path"] = str(path)
    check_finite(off.logits, str(path))
    return off


def check_finite(logits: Sequence[torch.Tensor], where: str) -> None:
    """Refuse NaN / inf logits: a diverged run must never write or load such a router."""
    bad = [i for i, t in enumerate(logits) if not torch.isfinite(t.detach()).all()]
    if bad:
        raise RouterCheckpointError(f"{where}: router logits {bad[:8]} are not finite (NaN/inf): the run diverged; "
                                    f"retrain with a smaller policy.lam / module.optimizer.lr")


def _load(path: Path, weights_only: bool) -> OfficialRouters:
    if not path.is_file():
        raise FileNotFoundError(f"router checkpoint not found: {path}")
    obj = _torch_load(path, weights_only)
    arch = _archive_name(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) and "pytorch-lightning_version" in obj:
        sd = obj["state_dict"]
        routers = {k[len("policy.routers."):] + ".prob": v for k, v in sd.items() if k.startswith("policy.routers.")}
        if not routers or len(routers) != len(sd):
            raise RouterCheckpointError(f"{path}: a Lightning checkpoint, but its state_dict is not an L2C router "
                                        f"training's (policy.routers.N only); found {list(sd)[:4]}")
        meta = obj.get("diffcache") if isinstance(obj.get("diffcache"), Mapping) else None
        return OfficialRouters(router_state_to_logits(routers, f"{path}['state_dict']"), "lightning",
                               record=provenance.file_record("lightning", lightning=meta) if meta else None,
                               extra={"global_step": obj.get("global_step")})
    if isinstance(obj, Mapping) and "routers" in obj:
        unknown = sorted(set(obj) - {"routers", "opt", "args"})
        if unknown:
            raise RouterCheckpointError(f"{path}: unexpected top-level keys {unknown} in a DiT router file "
                                        f"(expected 'routers', 'opt', 'args')")
        if not isinstance(obj["routers"], Mapping):
            raise RouterCheckpointError(f"{path}: 'routers' must be a state dict, got {type(obj['routers']).__name__}")
        logits = router_state_to_logits(obj["routers"], f"{path}['routers']")
        opt = obj.get("opt")
        if opt is not None and (not isinstance(opt, Mapping) or not {"state", "param_groups"} <= set(opt)):
            raise RouterCheckpointError(f"{path}: 'opt' is not an optimizer state_dict (needs 'state', 'param_groups')")
        return OfficialRouters(logits, "dit", opt=opt, args=obj.get("args"), archive_name=arch,
                               record=provenance.file_record("dit", args=obj.get("args")))
    if isinstance(obj, Mapping) and obj and all(_KEY.match(str(k)) for k in obj):
        return OfficialRouters(router_state_to_logits(obj, str(path)), "uvit", archive_name=arch,
                               record=provenance.file_record("uvit", path=path))
    keys = list(obj)[:6] if isinstance(obj, Mapping) else None
    raise RouterCheckpointError(
        f"{path}: not an L2C router checkpoint. Expected a DiT router file {{'routers', 'opt', 'args'}} or a "
        f"U-ViT state dict of '{{i}}.prob' logits; found "
        + (f"keys {keys}" if keys is not None else f"a {type(obj).__name__}"))


# ---------------------------------------------------------------------------------------- writing
def router_state(logits: Sequence[torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The upstream ``ModuleList[Router].state_dict()``: keys, values and ``_metadata``."""
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    meta: OrderedDict[str, dict] = OrderedDict({"": {"version": 1}})
    for i, t in enumerate(logits):
        sd[f"{i}.prob"] = t.detach().to("cpu", copy=True).contiguous()
        meta[str(i)] = {"version": 1}
        meta[f"{i}.activation"] = {"version": 1}
    sd._metadata = meta  # type: ignore[attr-defined]
    return sd


def empty_opt_state(num_routers: int, **group: Any) -> dict:
    """A valid AdamW ``state_dict`` with no moments (routers never stepped)."""
    return {"state": {}, "param_groups": [{**DEFAULT_PARAM_GROUP, **group, "params": list(range(num_routers))}]}


def optimizer_state(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> dict:
    """``optimizer.state_dict()`` on CPU, checked to index exactly ``params`` (the routers) in order."""
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(opt_params) != len(params) or any(a is not b for a, b in zip(opt_params, params)):
        raise ValueError("the optimizer must hold exactly the policy's router parameters, in router order "
                         "(torch.optim.AdamW(policy.parameters())), so that its state indices are router indices")

    def cpu(v):
        return v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)

    sd = optimizer.state_dict()
    return {"state": {i: {k: cpu(v) for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": copy.deepcopy(sd["param_groups"])}


def _save(obj: Any, path: Path, archive_name: str | None) -> None:
    """``torch.save`` whose zip folder is ``archive_name`` (torch names it after the file's stem)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not archive_name or archive_name == path.stem:
        torch.save(obj, path)
        return
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", archive_name):
        raise ValueError(f"archive_name {archive_name!r} must be a plain file stem")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / f"{archive_name}{path.suffix or '.pt'}"
        torch.save(obj, tmp_path)
        shutil.move(str(tmp_path), path)


def save_official(path: str | os.PathLike, logits: Sequence[torch.Tensor], fmt: str, *, opt: dict | None = None,
                  args: argparse.Namespace | Mapping | None = None, archive_name: str | None = None,
                  record: dict | None = None) -> Path:
    """Write ``logits`` in the official ``fmt`` (``"dit"`` or ``"uvit"``); returns the path written.

    DiT: ``{"routers", "opt", "args"}``; ``opt`` defaults to an empty-but-valid AdamW state and ``args`` to a
    ``Namespace(num_sampling_steps=N, ste_threshold=None)``. U-ViT: the bare router state dict. ``record``
    (:func:`.provenance.run_record`) goes into ``args.diffcache`` (DiT) or a ``.meta.json`` sidecar (U-ViT).
    """

    if fmt not in FORMATS:
        raise ValueError(f"unknown router format {fmt!r}; choose one of {FORMATS}")
    path = Path(path)
    check_finite(logits, str(path))
    routers = router_state(logits)
    if fmt == "uvit":
        _save(routers, path, archive_name)
        if record is not None:
            provenance.write_sidecar(path, record)
        return path
    if args is None:
        args = argparse.Namespace(num_sampling_steps=len(logits), ste_threshold=None)
    elif isinstance(args, Mapping):
        args = argparse.Namespace(**dict(args))
    if record is not None:
        args = copy.copy(args)
        args.diffcache = dict(record)
    _save({"routers": routers, "opt": opt if opt is not None else empty_opt_state(len(logits)), "args": args},
          path, archive_name)
    return path


def export_policy(policy, path: str | os.PathLike, fmt: str | None = None, *,
                  optimizer: torch.optim.Optimizer | None = None, args: argparse.Namespace | Mapping | None = None,
                  archive_name: str | None = None, record: dict | None = None) -> Path:
    """Write an :class:`~diffcache.policies.l2c.L2CPolicy`'s routers in the official format.

    ``fmt`` "dit" | "uvit" (default: the imported file's, else the backbone's ``router_format``). DiT
    ``opt``: from ``optimizer`` if given (built on ``policy.parameters()``), else the imported file's if
    the routers are unchanged since import, else an empty AdamW state. ``args``: given, else imported,
    else a Namespace describing the policy. A path without a suffix gets ``.pt`` (DiT) or ``.pth`` (U-ViT).
    """
    fmt = fmt or policy.router_format or "dit"
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".pth" if fmt == "uvit" else ".pt")
    logits = [p.detach() for p in policy.routers]
    off = policy.imported
    unchanged = off is not None and len(off.logits) == len(logits) and all(
        torch.equal(a.cpu(), b.cpu()) for a, b in zip(off.logits, logits))
    opt = None
    if optimizer is not None:
        opt = optimizer_state(optimizer, list(policy.routers))
    elif unchanged and off.opt is not None:
        opt = off.opt
    if args is None:
        sched = policy.schedule
        args = off.args if off is not None and off.args is not None else argparse.Namespace(
            num_sampling_steps=sched.num_steps if sched else policy.num_routers, l1=policy.lam,
            ste_threshold=None, clamp=policy.clamp, theta=policy.theta, cache_interval=policy.cache_interval,
            source="diffcache")
    if archive_name is None and off is not None:
        archive_name = off.archive_name
    if record is None:
        record = getattr(policy, "run_record", None)
    return save_official(path, logits, fmt, opt=opt, args=args, archive_name=archive_name, record=record)


def policy_from_file(cls, path, *, weights_only: bool = True, **kwargs: Any):
    """``cls(**kwargs)`` holding the routers of ``path`` (:meth:`L2CPolicy.from_official`)."""
    off = load_official(path, weights_only=weights_only)
    if off.fmt in FORMATS:
        kwargs.setdefault("router_format", off.fmt)
    kwargs.pop("num_routers", None)
    policy = cls(**kwargs)
    K = len(policy.site_kinds)
    if off.num_sites % K:
        raise RouterCheckpointError(f"{path}: router length {off.num_sites} is not a multiple of {K} site kinds "
                                    f"{policy.site_kinds}")
    if policy.layout is not None and policy.layout.num_sites != off.num_sites:
        raise RouterCheckpointError(f"{path}: router length {off.num_sites} != depth {policy.layout.depth} x {K}")
    policy._build(off.num_routers, off.num_sites, init=off.logits)
    policy.imported = off
    if policy.schedule is not None:
        policy._check_schedule(policy.schedule)
    return policy


def load_into(policy, path, *, weights_only: bool = True) -> OfficialRouters:
    """Copy the logits of ``path`` into ``policy``'s routers (created if it has none yet)."""
    off = load_official(path, weights_only=weights_only)
    if len(policy.routers) and (off.num_routers, off.num_sites) != (policy.num_routers, policy.num_sites):
        raise RouterCheckpointError(f"{path}: {off.num_routers} routers of length {off.num_sites}, but this policy "
                                    f"has {policy.num_routers} of length {policy.num_sites}")
    if not len(policy.routers):
        policy._build(off.num_routers, off.num_sites, init=off.logits)
    else:
        with torch.no_grad():
            for p, t in zip(policy.routers, off.logits):
                p.copy_(t)
    policy.imported = off
    return off
