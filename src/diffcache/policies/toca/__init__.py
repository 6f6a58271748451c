"""ToCa (Zou et al., ICLR 2025): token-wise feature caching.

Behaviour follows the public ToCa code (github.com/Shenyi-Z/ToCa at HEAD ``e84096f``, as the project's ToCa
write-up describes it); this is an independent implementation.

What a run does
    Every ``(evaluation, layer)`` is either *fresh* or *cached* (:func:`plan`). A fresh layer computes
    all its branches for all tokens, stores their **ungated** outputs (the backbone applies the current
    step's gate afterwards) and refreshes the token scores. A cached layer reuses the self-attention
    output for every token and recomputes the token-wise branches (MLP; PixArt also cross-attention)
    for the top-``k`` tokens only: their inputs are gathered, the module runs on them, the outputs are
    scattered into the cached tensor, and the whole tensor is returned.

Token scores (all (B, N) vectors; no attention map is ever stored)
    * s1 (DiT, U-ViT): column sums of the head-mean self-attention map of the layer's last fresh
      evaluation (``Attention.column_scores``, a query-chunked side pass run on fresh layers only),
      L2-normalised over tokens.
    * s2 (PixArt): cross-attention entropy per token (``CrossAttention.entropy``), refreshed on fresh
      layers and for the recomputed tokens of cached layers. With a one-batch CFG layout both halves
      share one score, ``normalize(1 + ln2 + (H_a + H_b) / 2)`` -- exactly what the reference's packed
      block-diagonal map gives -- so cond and uncond select the same tokens.
    * s3: staleness counter per (layer, branch): the score uses ``weight * counter / N`` (weight 0.25),
      then the counter does ``+= 1`` for all tokens and is zeroed for the recomputed ones.
    * s4: on ``g x g`` blocks of the image-token grid, each block's best token is multiplied by
      ``1 + bonus`` (DiT 0.6 / 2, PixArt 0.4 / 4); skipped when the grid is not divisible by ``g``.
    Top-k is per sample (argsort, descending), ``k = int(clamp(r, 0, 1) * N)``.

Ratio scheduler: ``r = r0 * lam_layer * lam_t * lam_type`` with
    ``lam_layer(l) = 1 + w_l - 2 w_l l / (depth - 1)`` (the reference hard-codes 27 = 28 - 1),
    ``lam_t(i) = 1 + w_t - 2 w_t i / T`` on the preset's *reference index* ``i`` (DiT counts down
    ``T-1 .. 0``, PixArt counts up ``0 .. T-1``), ``lam_type = 1 - (1 - m) w_m`` for the attention-like
    branch and ``1 + m w_m`` for the MLP. Self-attention is never partially recomputed.

Fresh cycle (per layer, the reference's "cal_type" logic)
    The first evaluation is fresh. Afterwards layer ``l`` is fresh iff ``i % interval == 0``; on a fresh
    evaluation layer 0 re-computes the interval ``round(N / (1 + a - 2 a i / T))`` (half to even; DiT
    ``a = 0.4``, PixArt ``a = -0.2`` i.e. ``0.8 + 0.4 i / T``), forced to 2 inside DiT's sensitive window
    ``[0.2 T, 0.4 T)``. With ``legacy_layer0_refresh=True`` (the reference, needed for its FLOP figures)
    layers 1.. are re-tested against the *new* interval, so some evaluations refresh layer 0 only (DiT
    DDIM-50 N=3: steps 45 and 32; PixArt N=3: step 4). With ``False`` the decision is made once per
    evaluation and every layer follows layer 0. With DiT presets ``fresh_ratio = 0`` is FORA (fixed
    interval N, no stretch, no window), as in the reference.

Counting (a choice): the planner counts *model evaluations* (``ctx.nfe``, ``T = num_evals``). For one
evaluation per step (DDIM, DDPM, DPM-Solver++) this is the reference's step index; for DPM-Solver-2
singlestep the midpoint evaluations are slots like any other.

``fresh_ratio >= 1`` (R = 0 %) is defined as "every layer fresh at every evaluation", i.e. the uncached
model (the reference would still reuse self-attention on its cycle's cached steps).

Presets
    ``dit_ddpm250`` (N=4, r0=0.07, ``ToCa-ddpm250``), ``dit_ddim50`` (N=3, r0=0.07, ``ToCa-ddim50``),
    ``pixart_r60/r70/r80/r90`` (N=3, r0=0.4/0.3/0.2/0.1, DPM-Solver++ 20) and ``uvit_dpm20`` (ours; no
    published ToCa for U-ViT): DiT-style scores s1 + s3 + s4 (0.6, 2x2), a fixed interval of 3
    evaluations counted up over the 20 DPM-Solver-2 evaluations (first evaluation fresh, no stretch,
    no window, so no layer-0-only quirk), r0 = 0.15 with no layer/time weighting (U-ViT's long skips
    make the layer index a poor proxy for sensitivity and there is no tuning data) and the DiT type
    weights (m 0.6, w_m 2.5): attention fully reused, MLP on int(0.375 N) image tokens. U-ViT's prefix
    tokens (label, time) are always recomputed in token-wise branches and never scored.
"""
from .plan import PRESETS, ToCaParams, ToCaSchedule, plan, preset_params, ratio
from .policy import ToCaPolicy
from .scores import entropy_score, select_tokens, spatial_bonus

__all__ = ["PRESETS", "ToCaParams", "ToCaPolicy", "ToCaSchedule", "entropy_score", "plan", "preset_params",
           "ratio", "select_tokens", "spatial_bonus"]
