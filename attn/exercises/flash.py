"""Chapter 25's exercises: one step of the online softmax, the log-sum-exp merge of two partial attentions, and
the memory traffic of the tiled forward at a long sequence.

Solutions: :func:`online_softmax_step`, :func:`merge_two`, :func:`traffic_ratio`. Checkers:
:func:`check_online_softmax_step`, :func:`check_merge_two`, :func:`check_traffic_ratio`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..flash import flash_traffic, naive_traffic, sram_block_q
from ._core import Case, Exercise, Mistake

__all__ = [
    "online_softmax_step", "merge_two", "traffic_ratio",
    "check_online_softmax_step", "check_merge_two", "check_traffic_ratio",
    "ONLINE_SOFTMAX_STEP", "MERGE_TWO", "TRAFFIC_RATIO", "EXERCISES",
]


# ----------------------------------------------------------------------------- 1. one step of the online softmax
def online_softmax_step(m: Tensor, ell: Tensor, o: Tensor, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Fold one block of keys into the running statistics of a block of query rows.

    ``m_new = max(m, max_c s_c)``, ``gamma = exp(m - m_new)``, ``P = exp(s - m_new)``,
    ``ell_new = gamma ell + Σ_c P_c``, ``o_new = gamma o + P v``; ``o`` stays unnormalised (``y = o / ell``
    after the last block).

    Shapes: ``m``, ``ell`` ``(..., r, 1)`` (before the first block ``m = -inf``, ``ell = 0``), ``o (..., r, d_v)``,
    the block's scores ``s (..., r, c)`` (finite) and values ``v (..., c, d_v)`` -> ``(m_new, ell_new, o_new)``.
    """
    m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # (..., r, 1): the running max
    gamma = torch.exp(m - m_new)  # (..., r, 1): rescales what was summed under the old max (0 at the start)
    p = torch.exp(s - m_new)  # (..., r, c): every entry in (0, 1]
    ell_new = gamma * ell + p.sum(dim=-1, keepdim=True)  # (..., r, 1)
    o_new = gamma * o + p @ v  # (..., r, d_v)
    return m_new, ell_new, o_new


def _state(s0: Tensor, v0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The statistics after one earlier block of scores ``s0`` and values ``v0``."""
    m = s0.amax(-1, keepdim=True)
    p = torch.exp(s0 - m)
    return m, p.sum(-1, keepdim=True), p @ v0


def _online_cases(g: torch.Generator) -> list[Case]:
    def block(*lead: int, r: int, c: int, dv: int, shift: float = 0.0) -> tuple[Tensor, Tensor]:
        return 2 * torch.randn(*lead, r, c, generator=g) + shift, torch.randn(*lead, c, dv, generator=g)

    s1, v1 = block(2, 3, r=4, c=5, dv=6)
    first = (torch.full((2, 3, 4, 1), float("-inf")), torch.zeros(2, 3, 4, 1), torch.zeros(2, 3, 4, 6))
    m2, l2, o2 = _state(*block(3, r=5, c=4, dv=3))
    s2, v2 = block(3, r=5, c=6, dv=3, shift=4.0)  # the new block's scores are higher: the max moves
    m3, l3, o3 = _state(*block(2, r=3, c=4, dv=2, shift=1.0))
    s3, v3 = block(2, r=3, c=4, dv=2, shift=-1.0)  # mixed: some rows keep their max, some move it
    m4, l4, o4 = _state(*block(1, r=1, c=3, dv=4))
    s4, v4 = block(1, r=1, c=1, dv=4, shift=3.0)
    return [
        Case((*first, s1, v1), label="the first block: m = -inf, ell = 0, o = 0; s (2, 3, 4, 5), v (2, 3, 5, 6)"),
        Case((m2, l2, o2, s2, v2), label="a later block with higher scores: s (3, 5, 6), v (3, 6, 3)"),
        Case((m3, l3, o3, s3, v3), label="a later block, some rows keep their max: s (2, 3, 4), v (2, 4, 2)"),
        Case((m4, l4, o4, s4, v4), label="one query row, a block of one key: s (1, 1, 1), v (1, 1, 4)"),
    ]


def _step(m: Tensor, ell: Tensor, o: Tensor, s: Tensor, v: Tensor, rescale_ell: bool = True,
          rescale_o: bool = True, inverted: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    gamma = torch.exp(m_new - m) if inverted else torch.exp(m - m_new)
    p = torch.exp(s - m_new)
    ell_new = (gamma * ell if rescale_ell else ell) + p.sum(-1, keepdim=True)
    o_new = (gamma * o if rescale_o else o) + p @ v
    return m_new, ell_new, o_new


def _normalised_early(m: Tensor, ell: Tensor, o: Tensor, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m_new, ell_new, o_new = _step(m, ell, o, s, v)
    return m_new, ell_new, o_new / ell_new


def _no_max_subtraction(m: Tensor, ell: Tensor, o: Tensor, s: Tensor,
                        v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    p = torch.exp(s)
    return m_new, ell + p.sum(-1, keepdim=True), o + p @ v


def _block_max_only(m: Tensor, ell: Tensor, o: Tensor, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m_blk = s.amax(-1, keepdim=True)
    p = torch.exp(s - m_blk)
    return m_blk, ell + p.sum(-1, keepdim=True), o + p @ v


ONLINE_SOFTMAX_STEP = Exercise(
    name="online_softmax_step",
    chapter=25,
    title="One step of the online softmax",
    solution=online_softmax_step,
    cases=_online_cases,
    atol=1e-5,
    rtol=1e-4,
    hint="New max first; then one factor gamma = exp(m_old - m_new) multiplies both old sums.",
    mistakes=(
        Mistake("no_rescale", "neither old sum is rescaled when the maximum moves: the old terms were "
                "exp(s - m_old) and must become exp(s - m_new), so multiply *both* ell and o by "
                "gamma = exp(m_old - m_new).", lambda m, ell, o, s, v: _step(m, ell, o, s, v, rescale_ell=False, rescale_o=False)),
        Mistake("no_rescale_o", "ell is rescaled but o is not: the output's old terms were also computed "
                "under the old max, so `o_new = gamma * o + P @ v` with the same gamma.",
                lambda m, ell, o, s, v: _step(m, ell, o, s, v, rescale_o=False)),
        Mistake("no_rescale_ell", "o is rescaled but ell is not: the normaliser's old terms need the same "
                "factor, `ell_new = gamma * ell + P.sum(-1, keepdim=True)`.",
                lambda m, ell, o, s, v: _step(m, ell, o, s, v, rescale_ell=False)),
        Mistake("gamma_inverted", "the rescale factor is exp(m_new - m_old), which is ≥ 1: the old terms must "
                "*shrink* when the max grows, gamma = exp(m_old - m_new) ≤ 1 (0 before the first block).",
                lambda m, ell, o, s, v: _step(m, ell, o, s, v, inverted=True)),
        Mistake("normalised_early", "o comes back divided by ell: the running output stays unnormalised, "
                "and the division y = o / ell happens once, after the last block (a normalised o would need "
                "rescaling by ell_old / ell_new too).", _normalised_early),
        Mistake("no_max_subtraction", "P is exp(s), not exp(s - m_new): ell and o are kept relative to the "
                "running max, which keeps every exponential at most 1 (exp(s) overflows float32 once a score "
                "passes 88); subtract m_new, and rescale the old sums when it moves.", _no_max_subtraction),
        Mistake("block_max_only", "the max of this block alone replaces the running max, and the old sums "
                "are added as they are: take m_new = max(m_old, max of the block) and rescale the old sums "
                "by exp(m_old - m_new).", _block_max_only),
    ),
)


# ----------------------------------------------------------------------------- 2. merging two partial attentions
def merge_two(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    r"""Attention over two disjoint chunks of keys from each chunk's output and log-sum-exp.

    ``L = log(e^{L_1} + e^{L_2})``, ``O = e^{L_1 - L} O_1 + e^{L_2 - L} O_2``, computed with the larger ``L_c``
    subtracted first so that nothing overflows; a chunk a query cannot see has ``L_c = -inf`` (weight 0).

    Shapes: ``o1, o2 (..., n, d_v)``, ``lse1, lse2 (..., n)`` (for every query at least one ``L_c`` finite)
    -> ``(o (..., n, d_v), lse (..., n))``.
    """
    m = torch.maximum(lse1, lse2)  # (..., n), finite: a stabiliser only
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)  # (..., n), in [0, 1], one of them 1
    total = w1 + w2  # e^{L - m}, in [1, 2]
    lse = m + torch.log(total)  # (..., n)
    o = (w1 / total)[..., None] * o1 + (w2 / total)[..., None] * o2  # (..., n, d_v)
    return o, lse


def _merge_cases(g: torch.Generator) -> list[Case]:
    def partial(*shape: int, dv: int, centre: float) -> tuple[Tensor, Tensor]:
        return torch.randn(*shape, dv, generator=g), centre + 2 * torch.randn(*shape, generator=g)

    o1, l1 = partial(2, 5, dv=3, centre=1.0)
    o2, l2 = partial(2, 5, dv=3, centre=2.0)
    o3, l3 = partial(2, 3, 4, dv=2, centre=400.0)  # large log-sum-exps: exp(L) overflows float32
    o4, l4 = partial(2, 3, 4, dv=2, centre=398.0)
    o5, l5 = partial(1, 6, dv=4, centre=0.0)
    o6, l6 = partial(1, 6, dv=4, centre=0.0)
    l6[0, :2] = float("-inf")  # the second chunk is invisible to the first two queries
    o6[0, :2] = 0.0
    return [
        Case((o1, l1, o2, l2), label="o (2, 5, 3), lse (2, 5)"),
        Case((o3, l3, o4, l4), label="o (2, 3, 4, 2), lse around 400 (exp overflows)"),
        Case((o5, l5, o6, l6), label="o (1, 6, 4), lse (1, 6), the second chunk invisible to two queries"),
    ]


def _merge_reference(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    return merge_two(o1, l1, o2, l2)


def _merge_mean(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    return (o1 + o2) / 2, _merge_reference(o1, l1, o2, l2)[1]


def _merge_lse_max(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    return _merge_reference(o1, l1, o2, l2)[0], torch.maximum(l1, l2)


def _merge_lse_sum(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    return _merge_reference(o1, l1, o2, l2)[0], l1 + l2


def _merge_linear(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    o = (l1[..., None] * o1 + l2[..., None] * o2) / (l1 + l2)[..., None]
    return o, _merge_reference(o1, l1, o2, l2)[1]


def _merge_unnormalised(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    return w1[..., None] * o1 + w2[..., None] * o2, _merge_reference(o1, l1, o2, l2)[1]


def _merge_unstable(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    e1, e2 = torch.exp(l1), torch.exp(l2)
    return (e1[..., None] * o1 + e2[..., None] * o2) / (e1 + e2)[..., None], torch.log(e1 + e2)


MERGE_TWO = Exercise(
    name="merge_two",
    chapter=25,
    title="Merging two partial attentions",
    solution=merge_two,
    cases=_merge_cases,
    hint="Each chunk's share of the softmax's normaliser is e^{L_c} / (e^{L_1} + e^{L_2}); subtract the larger "
         "L_c before exponentiating.",
    mistakes=(
        Mistake("mean_of_outputs", "the outputs are averaged with equal weights: each chunk's output counts "
                "in proportion to its share of the normaliser, e^{L_c - L} with L = log(e^{L_1} + e^{L_2}).",
                _merge_mean),
        Mistake("lse_is_max", "the merged log-sum-exp is the larger L_c: that is only the stabiliser; the "
                "log-sum-exp of all the keys is m + log(e^{L_1 - m} + e^{L_2 - m}).", _merge_lse_max),
        Mistake("lse_is_sum", "the log-sum-exps are added: L_1 + L_2 is the log of the *product* of the two "
                "normalisers; the normaliser of all the keys is their sum, L = log(e^{L_1} + e^{L_2}).",
                _merge_lse_sum),
        Mistake("weights_linear_in_lse", "the outputs are weighted by L_c itself: L_c is a *log* of the "
                "chunk's normaliser, so its weight is e^{L_c - L}.", _merge_linear),
        Mistake("weights_not_normalised", "the outputs are weighted by e^{L_c - m} but not divided by their "
                "sum: the weights must be e^{L_c - L} = e^{L_c - m} / (e^{L_1 - m} + e^{L_2 - m}), which sum to "
                "one (each O_c is already normalised).", _merge_unnormalised),
        Mistake("overflow", "right for moderate scores, but e^{L_c} overflows (inf/inf = NaN) when the "
                "log-sum-exps are large: subtract m = max(L_1, L_2) before exponentiating, "
                "w_c = e^{L_c - m}.", _merge_unstable),
    ),
)


# ----------------------------------------------------------------------------- 3. the traffic at a long sequence
@functools.cache
def traffic_ratio() -> float:
    r"""Numbers moved by the naive forward over the tiled one at ``n = 65536``, ``d = 64``, ``b_k = 64``, 192 KB
    of on-chip memory holding float32 (49,152 numbers): about ``2 b_q / d`` for long sequences.
    """
    n, d, memory = 65536, 64, 192 * 1024 // 4
    block_q = sram_block_q(memory, d)  # 211 query rows fit on the chip
    naive = sum(naive_traffic(n, n, d).values())  # ≈ 4 n²: S and P written and read
    tiled = sum(flash_traffic(n, n, d, block_q, 64).values())  # ≈ (n / b_q) 2 n d: K and V per query block
    return naive / tiled


@functools.cache
def _ratio(n: int, memory: int, inverted: bool = False) -> float:
    naive = sum(naive_traffic(n, n, 64).values())
    tiled = sum(flash_traffic(n, n, 64, sram_block_q(memory, 64), 64).values())
    return tiled / naive if inverted else naive / tiled


TRAFFIC_RATIO = Exercise(
    name="traffic_ratio",
    chapter=25,
    title="The traffic at a long sequence",
    solution=traffic_ratio,
    kind="value",
    atol=0.0,
    rtol=0.02,
    hint="Both totals grow as n² at long sequences; compare their leading terms, 4 n² and (n / b_q) 2 n d.",
    mistakes=(
        Mistake("grows_with_n", "the ratio does not keep growing with n: both totals grow as n² (4 n² for "
                "the naive one, (n / b_q) 2 n d for the tiled one), so the ratio tends to 2 b_q / d.",
                lambda: 16 * _ratio(4096, 49152)),
        Mistake("inverted", "that is the tiled traffic over the naive one: the exercise asks how many times "
                "*more* the naive forward moves.", lambda: _ratio(65536, 49152, inverted=True)),
        Mistake("bytes_as_numbers", "that counts the chip's 192 KB as 196,608 numbers: at float32 it holds "
                "192 × 1024 / 4 = 49,152, which bounds the query block b_q.", lambda: _ratio(65536, 192 * 1024)),
        Mistake("half_precision", "that is the chip holding float16 (98,304 numbers): the exercise counts "
                "float32 numbers, 49,152 of them.", lambda: _ratio(65536, 192 * 1024 // 2)),
        Mistake("same_as_n_4096", "that is the ratio the chapter prints at n = 4096: at n = 65536 the terms "
                "linear in n matter less and the ratio moves closer to 2 b_q / d.", lambda: _ratio(4096, 49152)),
    ),
)

check_online_softmax_step = ONLINE_SOFTMAX_STEP.checker()
check_merge_two = MERGE_TWO.checker()
check_traffic_ratio = TRAFFIC_RATIO.checker()

EXERCISES = (ONLINE_SOFTMAX_STEP, MERGE_TWO, TRAFFIC_RATIO)
