"""Draw any L2C router file: ``python -m diffcache.plot router.pt [--theta 0.1] [--out router.png]``.

Reads what ``router_ckpt=`` reads (a DiT ``.pt``, a U-ViT ``.pth``, released ones included, or a
``last.ckpt`` of train.py) and draws the routers the schedule reads (cache steps, in sampling order) as
``sigmoid(logit)`` above the binary compute mask at ``theta``, columns labelled by site
(``layer.attn`` ...). Site kinds: the file's record, else the ``attn, mlp`` of every released file
(``--kinds`` overrides). Rows: the cache evaluations of the schedule the file records
(``--schedule`` where it records none), else every router.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .callbacks.router_stats import router_heatmap
from .policies.l2c import alternating_schedule, shifted_schedule
from .policies.l2c.checkpoint import load_official


def _schedule(num_routers: int, record: dict, kind: str | None):
    """The L2C schedule the routers were made for: from the record (one or two evaluations per step),
    or ``kind`` given by the user; None = unknown (every router is drawn)."""

    steps = record.get("num_steps")
    evals = record.get("num_evals", steps if record.get("solver") == "DDIM" else None)
    if kind is None and steps and evals:
        kind = "shifted" if int(evals) == 2 * int(steps) else "alternating" if int(evals) == int(steps) else None
    if kind == "alternating":
        return alternating_schedule(num_routers, int(record.get("cache_interval", 2)))
    if kind == "shifted" and num_routers % 2 == 0:
        return shifted_schedule(num_routers // 2)
    return None


def draw(path: str | Path, out: str | Path | None = None, theta: float | None = None,
         kinds: tuple[str, ...] | None = None, schedule: str | None = None) -> Path:
    off = load_official(path)
    record = off.record or {}
    kinds = tuple(kinds or record.get("site_kinds") or ("attn", "mlp"))
    if off.num_sites % len(kinds):
        raise ValueError(f"{path}: router length {off.num_sites} is not a multiple of {len(kinds)} kinds {kinds}; "
                         f"pass --kinds")
    depth = off.num_sites // len(kinds)
    labels = [f"{layer}.{k}" for layer in range(depth) for k in kinds]
    sched = _schedule(off.num_routers, record, schedule)
    logits = torch.stack(off.logits)
    if sched is not None and sched.num_routers == off.num_routers:
        rows = sched.cache_evals()
        betas = torch.sigmoid(logits[[sched.router[e] for e in rows]])
        row_labels = [f"nfe {e + 1} (r{sched.router[e]})" for e in rows]
    else:
        betas, row_labels = torch.sigmoid(logits), [f"r{i}" for i in range(off.num_routers)]
    theta = float(record.get("theta", 0.1)) if theta is None else float(theta)
    cached = int((betas <= theta).sum())
    where = record.get("solver", "solver not recorded")
    title = (f"{Path(path).name}: {cached}/{betas.numel()} cached at theta={theta:g} "
             f"({where}, {off.num_routers} evaluations)")
    out = Path(out) if out else Path(path).with_suffix(".png")
    return router_heatmap(betas, row_labels, out, title=title, site_labels=labels, theta=theta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffcache.plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("router", help="router file (.pt / .pth / Lightning .ckpt)")
    ap.add_argument("--theta", type=float, default=None, help="threshold of the mask (default: the file's, else 0.1)")
    ap.add_argument("--out", default=None, help="PNG path (default: next to the router, .png)")
    ap.add_argument("--kinds", default=None, help="site kinds per layer, comma-separated (default attn,mlp)")
    ap.add_argument("--schedule", choices=("alternating", "shifted"), default=None,
                    help="one (DDIM, DPM-Solver++) or two (DPM-Solver-2) evaluations per step, for files that do "
                         "not record it (released U-ViT routers: shifted); default: every router")
    args = ap.parse_args(argv)
    try:
        png = draw(args.router, args.out, args.theta, tuple(args.kinds.split(",")) if args.kinds else None,
                   args.schedule)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
