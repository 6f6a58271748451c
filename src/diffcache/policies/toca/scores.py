"""ToCa's token scores (s2 entropy, s4 spatial bonus) and top-k gather / scatter. All (B, N) vectors:
no attention map is ever stored."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


# =============================================================================================== scores
def spatial_bonus(score: torch.Tensor, grid: tuple[int, int], block: int, bonus: float) -> torch.Tensor:
    """s4: multiply the best token of every ``block x block`` cell of the (rows, cols) grid by ``1 + bonus``.

    Returns ``score`` unchanged when ``bonus == 0``, ``block <= 1`` or the grid is not divisible.
    """
    rows, cols = grid
    B, N = score.shape
    if bonus == 0 or block <= 1 or rows * cols != N or rows % block or cols % block:
        return score
    g = block
    cells = score.reshape(B, rows // g, g, cols // g, g).permute(0, 1, 3, 2, 4).reshape(B, -1, g * g)
    best = cells.argmax(dim=-1, keepdim=True)
    factor = torch.ones_like(cells).scatter_(-1, best, 1.0 + bonus)
    cells = cells * factor
    return cells.reshape(B, rows // g, cols // g, g, g).permute(0, 1, 3, 2, 4).reshape(B, N)


def entropy_score(H: torch.Tensor, paired: bool) -> torch.Tensor:
    """s2 from per-token cross-attention entropies (B, N). ``paired``: the batch is two CFG halves that
    share one selection (``normalize(1 + ln2 + (H_a + H_b)/2)`` repeated over the halves)."""
    if paired and H.shape[0] % 2 == 0:
        a, b = H.chunk(2)
        s = F.normalize(1.0 + LN2 + 0.5 * (a + b), p=2, dim=1)
        return s.repeat(2, 1)
    return F.normalize(1.0 + H, p=2, dim=1)


def select_tokens(score: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample indices of the ``k`` highest scores (descending, stable)."""
    return torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]


def _scatter_(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst[b, idx[b, i]] = src[b, i]`` in place (the token cache is updated, never copied)."""
    return dst.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, dst.shape[-1]), src.to(dst.dtype))
