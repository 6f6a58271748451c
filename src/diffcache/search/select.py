"""Choosing which (cache evaluation, site) pairs to reuse under a MAC budget, from an additive error table.

The problem: cache evaluations ``i`` x sites ``j`` with measured error ``E[i, j] >= 0`` (what reusing that
site alone costs in quality) and MACs ``c[j]``. Reusing a set ``S`` saves ``sum_S c`` MACs; the proxy
of ``S`` is ``sum_S E``. Find the ``S`` that saves at least ``need`` MACs with the smallest proxy (a
minimum-cost cover, i.e. a 0/1 knapsack). Three solvers:

* :func:`greedy` -- the textbook rule: reuse sites by increasing error per MAC until enough is saved.
  Fast, not optimal (a test shows a table where it loses).
* :func:`dynamic_programme` -- exact on the proxy (for integer MAC units). First, per cache evaluation,
  a knapsack over its sites gives the cheapest error for every number of units saved in that
  evaluation (the evaluation's candidate sets); then a DP over evaluations x units saved (capped at
  the requirement) picks one candidate per evaluation. Never worse than greedy on the proxy.
* :func:`brute_force` -- enumerates every mask (tests only).

Both real solvers return a *minimal* cover (no reused site could be computed again without missing
the budget), so the MACs saved exceed ``need`` by less than one branch: ``b * full - one branch <
MACs <= b * full``.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

_TOL = 1e-9


def mac_units(costs, max_den: int = 12) -> tuple[np.ndarray, float, bool]:
    """Integer units for the site costs: ``(units, unit, exact)``.

    ``unit = min(cost) / q`` for the smallest ``q <= max_den`` making every cost an integer multiple
    (DiT / U-ViT: attn 1, mlp 2). If none does (PixArt cross-attention with its text length), ``q =
    max_den`` and the units are rounded *down*, so the MACs credited never exceed the MACs saved and
    the budget still holds; the DP is then exact on the rounded costs only (``exact=False``).
    """
    c = np.asarray(costs, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or (c <= 0).any():
        raise ValueError(f"site costs must be a non-empty vector of positive MACs, got {c.tolist()}")
    for q in range(1, max_den + 1):
        unit = float(c.min()) / q
        r = c / unit
        if np.all(np.abs(r - np.round(r)) <= 1e-6 * np.maximum(r, 1.0)):
            return np.round(r).astype(np.int64), unit, True
    unit = float(c.min()) / max_den
    return np.floor(c / unit + 1e-9).astype(np.int64), unit, False


def _check(errors, costs) -> tuple[np.ndarray, np.ndarray]:
    E = np.asarray(errors, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    if E.ndim != 2 or E.shape[1] != c.size:
        raise ValueError(f"error table must be [cache evals, sites] with {c.size} sites, got shape {E.shape}")
    if not np.isfinite(E).all() or (E < 0).any():
        raise ValueError("error table entries must be finite and >= 0 (a measured error)")
    return E, c


def _need_check(need: float, c: np.ndarray, rows: int) -> float:
    total = float(c.sum()) * rows
    if need > total * (1 + 1e-12) + _TOL:
        raise ValueError(f"the budget asks to save {need:.6g} MACs but reusing every cacheable site saves only "
                         f"{total:.6g}; raise the budget")
    return max(float(need), 0.0)


def proxy_of(mask, errors) -> float:
    """The proxy of a reuse mask (True = reuse): the sum of its errors."""
    return float(np.asarray(errors, dtype=np.float64)[np.asarray(mask, dtype=bool)].sum())


def saved_of(mask, costs) -> float:
    m = np.asarray(mask, dtype=bool)
    return float((m * np.asarray(costs, dtype=np.float64)[None, :]).sum())


def make_minimal(mask, errors, costs, need: float) -> np.ndarray:
    """Compute again any reused site the budget does not need (largest error first); never raises the proxy."""
    m = np.array(mask, dtype=bool)
    E, c = _check(errors, costs)
    slack = saved_of(m, c) - need
    while True:
        idx = [(E[i, j], c[j], i, j) for i, j in zip(*np.nonzero(m)) if c[j] <= slack + _TOL * max(1.0, c[j])]
        if not idx:
            return m
        _, cj, i, j = max(idx)
        m[i, j] = False
        slack -= cj


def greedy(errors, costs, need: float) -> np.ndarray:
    """Reuse sites by increasing error per MAC (ties: sampling order) until ``need`` MACs are saved."""
    E, c = _check(errors, costs)
    need = _need_check(need, c, E.shape[0])
    ratio = (E / c[None, :]).reshape(-1)
    order = np.argsort(ratio, kind="stable")
    m = np.zeros(E.size, dtype=bool)
    saved = 0.0
    for k in order:
        if saved >= need - _TOL * max(1.0, need):
            break
        m[k] = True
        saved += c[k % c.size]
    return m.reshape(E.shape)


def _row_candidates(e: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knapsack inside one evaluation: ``best[u]`` = least error saving exactly ``u`` units, and
    ``take[j, u]`` the choice table to rebuild the set (standard 0/1 DP, items in order)."""
    U = int(w.sum())
    best = np.full(U + 1, np.inf)
    best[0] = 0.0
    take = np.zeros((w.size, U + 1), dtype=bool)
    for j, (ej, wj) in enumerate(zip(e, w)):
        cand = np.full(U + 1, np.inf)
        cand[wj:] = best[: U + 1 - wj] + ej
        better = cand < best
        take[j] = better
        best = np.where(better, cand, best)
    return best, take


def _row_set(take: np.ndarray, w: np.ndarray, u: int) -> np.ndarray:
    chosen = np.zeros(w.size, dtype=bool)
    for j in range(w.size - 1, -1, -1):
        if take[j, u]:
            chosen[j] = True
            u -= int(w[j])
    assert u == 0
    return chosen


def dynamic_programme(errors, costs, need: float) -> np.ndarray:
    """The least-proxy reuse mask saving at least ``need`` MACs (exact for integer MAC units; see the module)."""
    E, c = _check(errors, costs)
    need = _need_check(need, c, E.shape[0])
    w, unit, exact = mac_units(c)
    # units to save; with rounded-down units, ask for enough rounded units to cover the real MACs
    R = int(math.ceil(need / unit - 1e-9))
    R = min(R, int(w.sum()) * E.shape[0]) if exact else R
    rows = [_row_candidates(E[i], w) for i in range(E.shape[0])]
    # G[U]: least error over the rows so far saving exactly U units (U < R) or at least R (U = R)
    G = np.full(R + 1, np.inf)
    G[0] = 0.0
    back = []  # per row: (units taken, predecessor index) for every capped total
    for best, _ in rows:
        newG = np.full(R + 1, np.inf)
        arg_u = np.zeros(R + 1, dtype=np.int64)
        arg_p = np.zeros(R + 1, dtype=np.int64)
        for u in np.nonzero(np.isfinite(best))[0]:
            u = int(u)
            cand = G + best[u]
            lo = max(R - u, 0)  # predecessors p >= lo reach the cap R; p < lo land on p + u
            if lo:
                better = cand[:lo] < newG[u:u + lo]
                tgt = np.nonzero(better)[0]
                newG[tgt + u], arg_u[tgt + u], arg_p[tgt + u] = cand[tgt], u, tgt
            p = lo + int(np.argmin(cand[lo:]))
            if cand[p] < newG[R]:
                newG[R], arg_u[R], arg_p[R] = cand[p], u, p
        back.append((arg_u, arg_p))
        G = newG
    if not np.isfinite(G[R]):
        raise ValueError(f"no reuse mask saves {need:.6g} MACs (rounded cost units); raise the budget")
    m = np.zeros(E.shape, dtype=bool)
    U = R
    for i in range(E.shape[0] - 1, -1, -1):
        arg_u, arg_p = back[i]
        m[i] = _row_set(rows[i][1], w, int(arg_u[U]))
        U = int(arg_p[U])
    assert U == 0
    return make_minimal(m, E, c, need)


def brute_force(errors, costs, need: float) -> np.ndarray:
    """Every reuse mask, the least proxy among those saving at least ``need`` (tests; <= 20 entries)."""
    E, c = _check(errors, costs)
    if E.size > 20:
        raise ValueError(f"brute force over {E.size} entries (2^{E.size} masks) is too many; use <= 20")
    best, best_m = math.inf, None
    cc = np.broadcast_to(c, E.shape).reshape(-1)
    ee = E.reshape(-1)
    for bits in itertools.product((False, True), repeat=E.size):
        b = np.array(bits)
        if cc[b].sum() >= need - _TOL * max(1.0, need) and ee[b].sum() < best:
            best, best_m = float(ee[b].sum()), b
    if best_m is None:
        raise ValueError("no mask meets the requirement")
    return best_m.reshape(E.shape)


METHODS = {"greedy": greedy, "dp": dynamic_programme}
