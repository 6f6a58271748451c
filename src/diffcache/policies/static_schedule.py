"""Static schedules in the formats other tools read (issue 12 item 5), and back to an L2C router.

Any policy whose ``compute_mask`` is 0/1 (an L2C router at its theta or budget, a searched router, FORA)
is a *static schedule*: ``mask[e][j] = 1`` if model evaluation ``e`` computes site ``j``. No standard
format exists and tools disagree on polarity, so every file written here says ``"polarity": "1 = compute"``.

* :func:`schedule_json` -- ``diffcache-static-schedule/v1``: evaluations x sites, plus per row the
  evaluation whose outputs a 0 reuses (``source``: L2C's schedule, or FORA's last full evaluation).
* :func:`cache_dit_mask` -- cache-dit's ``steps_computation_mask`` (one int per step, 1 = compute).
  It is step-level only: a row that computes some branches and reuses others cannot be written, so
  a step is 1 only if every branch computes, and the file lists the rows that were partial (cache-dit
  then reuses more than diffcache does there). Cache-dit also always computes its first ``Fn`` blocks
  and caches residuals, which this mask cannot describe.
* :func:`router_from_schedule` -- the inverse for masks the L2C schedule can express.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .l2c.policy import L2CPolicy
from .l2c.schedule import make_schedule

FORMAT = "diffcache-static-schedule/v1"
POLARITY = "1 = compute"
BIG = 10.0


def static_mask(policy, layout, solver) -> list[list[int]]:
    """``[num_evals][num_sites]`` 0/1 (1 = compute) from ``policy.compute_mask``; None means all ones."""
    n = int(solver.num_evals)
    cm = policy.compute_mask(layout, solver) if policy is not None else None
    idx = {s: i for i, s in enumerate(layout.sites())}
    mask = [[1] * layout.num_sites for _ in range(n)]
    for (e, layer, kind), v in (cm or {}).items():
        if float(v) not in (0.0, 1.0):
            raise ValueError(f"{type(policy).__name__} computes a fraction {v} of a branch at nfe {e}: not a static "
                             f"0/1 schedule (token-level policies such as ToCa cannot be exported)")
        mask[e][idx[(layer, kind)]] = int(v)
    return mask


def reuse_sources(policy, mask: list[list[int]]) -> list[int | None]:
    """Per evaluation, the evaluation its reused branches come from (None where nothing is reused): the
    L2C schedule's ``source`` for L2C routers, else the last all-ones row (FORA)."""
    sched = getattr(policy, "schedule", None)
    out, last = [], None
    for e, row in enumerate(mask):
        if all(row):
            out.append(None)
            last = e if sched is None or sched.router[e] is None else last
        else:
            out.append(sched.source[e] if sched is not None else last)
    return out


def schedule_json(mask: list[list[int]], layout, solver, backbone: str = "", source: list | None = None,
                  **extra: Any) -> dict:
    """The documented JSON: one row per model evaluation (sampling order), one column per site."""
    steps = int(solver.num_steps)
    evals = len(mask)
    return {
        "format": FORMAT, "polarity": POLARITY, "steps": evals, "branches": layout.labels(), "mask": mask,
        "source": source if source is not None else reuse_sources(None, mask),
        "solver": getattr(solver, "name", type(solver).__name__), "solver_steps": steps,
        "evals_per_step": evals // steps if steps else 1, "backbone": backbone,
        "reuse": "rows are model evaluations (NFE, 0-based, sampling order), columns the branches; 0 = reuse this "
                 "branch's pre-gate output from evaluation source[row], which computed every branch (CFG branches "
                 "keep separate caches); source is null where nothing is reused",
        **extra,
    }


def cache_dit_mask(mask: list[list[int]]) -> dict:
    """cache-dit's ``steps_computation_mask`` (1 = compute) and what branch-level detail was lost."""
    steps = [1 if all(row) else 0 for row in mask]
    partial = [e for e, row in enumerate(mask) if any(row) and not all(row)]
    lost = sum(sum(mask[e]) for e in partial)
    return {
        "steps_computation_mask": steps, "polarity": POLARITY,
        "lost": (f"branch-level caching is not expressible: {len(partial)} evaluation(s) computed only some branches "
                 f"(0-based {partial}); they are written as 0 (cached), so {lost} branch computations of the "
                 f"diffcache schedule become reuses here. cache-dit also always computes its first Fn blocks and "
                 f"caches residuals, which this mask does not describe.") if partial else "nothing (step-level schedule)",
        "partial_evals": partial,
    }


_FLAT = re.compile(r"\[(\s*(?:-?\d+|null)(?:,\s*(?:-?\d+|null))*\s*)\]")


def write_json(obj: dict, path) -> Path:
    """Indented JSON with every list of integers on one line (one mask row per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _FLAT.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", json.dumps(obj, indent=1))
    path.write_text(text + "\n")
    return path


def read_schedule(path_or_obj) -> dict:
    obj = path_or_obj if isinstance(path_or_obj, dict) else json.loads(Path(path_or_obj).read_text())
    if obj.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file (format={obj.get('format')!r})")
    if obj.get("polarity") != POLARITY:
        raise ValueError(f"expected polarity {POLARITY!r}, got {obj.get('polarity')!r}")
    return obj


def router_from_schedule(sched: dict, layout, solver, cache_interval: int = 2):
    """An L2C policy (theta 0.5, logits +/-10) that runs the schedule; ValueError if L2C cannot express it.

    Expressible means: every evaluation that reuses anything is a cache evaluation of the L2C schedule
    with this ``cache_interval``, and its source (the evaluation it reuses) is the last all-ones row.
    """

    sched = read_schedule(sched)
    mask = sched["mask"]
    l2c = make_schedule(solver, cache_interval)
    if len(mask) != l2c.num_evals or any(len(r) != layout.num_sites for r in mask):
        raise ValueError(f"schedule is {len(mask)} x {len(mask[0]) if mask else 0} but the solver runs {l2c.num_evals} "
                         f"evaluations of {layout.num_sites} sites")
    if sched.get("branches") and list(sched["branches"]) != layout.labels():
        raise ValueError(f"schedule branches {sched['branches'][:4]}... do not match the backbone's {layout.labels()[:4]}...")
    src = sched.get("source") or reuse_sources(None, mask)
    pol = L2CPolicy(theta=0.5, cache_interval=cache_interval, layout=layout, solver=solver)
    with torch.no_grad():
        for p in pol.routers:
            p.fill_(BIG)
        for e, row in enumerate(mask):
            if all(row):
                continue
            if l2c.router[e] is None or l2c.source[e] != src[e]:
                raise ValueError(f"evaluation {e} reuses branches but is not an L2C cache evaluation reusing the last "
                                 f"full one ({l2c.kind} schedule, cache_interval={cache_interval}); this schedule has "
                                 f"no L2C router (try another cache_interval)")
            pol.routers[l2c.router[e]].copy_(torch.tensor([BIG if v else -BIG for v in row]))
    return pol
