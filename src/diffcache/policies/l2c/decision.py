"""A hard L2C evaluation's static choice per cache site, made before the evaluation starts.

``L2CPolicy.begin`` turns the routers' hard mask (cache evaluations) or the store plan (full evaluations)
into one tuple, and the site reads nothing else: a compiled forward (``eval.compile``) specialises on it,
so it holds one graph per distinct decision and a later run recompiles nothing. Every cache key is laid
out at a run's first evaluation and written at every full evaluation, so what a compiled forward sees of
the cache never depends on where in the run it is.
"""
from __future__ import annotations

from typing import Callable, Sequence

# cache evaluations REUSE or COMPUTE a site; full evaluations compute every site and STORE it, or DROP its
# entry (no later evaluation reads it)
REUSE, COMPUTE, STORE, DROP = 0, 1, 2, 3


def decide(full: bool, store: Sequence[bool] | None, mask: Sequence[bool] | None, num_sites: int) -> tuple[int, ...]:
    """A full evaluation's STORE / DROP from ``store`` (None: store all), or a cache one's COMPUTE / REUSE."""
    if full:
        return tuple(STORE if store is None or keep else DROP for keep in (store or [True] * num_sites))
    return tuple(COMPUTE if c else REUSE for c in mask)


def lay_out(cache: dict, branch: str, depth: int, kinds: Sequence[str]) -> None:
    """Every key of CFG branch ``branch`` present (None until stored), before the run's first forward."""
    if (branch, 0, kinds[0]) not in cache:
        cache.update({(branch, layer, kind): None for layer in range(depth) for kind in kinds})


def run_site(d: int, cache: dict, key, branch, keep_graph: bool, cached: Callable):
    """One site under decision ``d``: the cached output (its branch never evaluated), or the computed one."""
    if d == REUSE:
        return cached(key, branch.x)
    out = branch()
    if d == STORE:
        cache[key] = out if keep_graph else out.detach()
    elif d == DROP:
        cache[key] = None
    return out
