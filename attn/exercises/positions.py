"""Chapter 28's exercises: RoPE in the half layout, the ALiBi bias, and which position pairs give the same RoPE score.

Solutions: :func:`rope_rotate`, :func:`alibi_causal_bias`, :func:`same_rope_score`. Checkers:
:func:`check_rope_rotate`, :func:`check_alibi_causal_bias`, :func:`check_same_rope_score`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "rope_rotate", "alibi_causal_bias", "same_rope_score",
    "check_rope_rotate", "check_alibi_causal_bias", "check_same_rope_score",
    "ROPE_ROTATE", "ALIBI_CAUSAL_BIAS", "SAME_ROPE_SCORE", "EXERCISES",
]


def rope_rotate(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    r"""Rotate pair ``(x_i, x_{i + d/2})`` of the token at position ``p`` by the angle ``p ω_i``, ``ω_i = base^{-2i/d}``.

    ``x̃ = x ⊙ cos(pω) + rot(x) ⊙ sin(pω)`` with ``rot(x_1, x_2) = (-x_2, x_1)`` on the two halves.
    Shapes: ``x (..., n, d)`` with ``d`` even, ``positions (n,)`` integers -> ``(..., n, d)``.
    """
    d = x.shape[-1]
    i = torch.arange(d // 2, dtype=torch.float64)
    omega = base ** (-2 * i / d)  # (d/2,) frequencies
    angle = positions.to(torch.float64)[:, None] * omega  # (n, d/2)
    angle = torch.cat([angle, angle], dim=-1)  # (n, d): pair i and i + d/2 share an angle
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)  # rot(x): a quarter turn of every pair
    return x * cos + rotated * sin


def _rope_cases(g: torch.Generator) -> list[Case]:
    return [
        Case((torch.randn(6, 8, generator=g), torch.arange(6)), label="x (6, 8), positions 0..5"),
        Case((torch.randn(2, 3, 5, 16, generator=g), torch.arange(7, 12)),
             label="x (2, 3, 5, 16), positions 7..11"),
        Case((torch.randn(1, 4, 4, generator=g), torch.tensor([0, 3, 40, 1000])), {"base": 100.0},
             label="x (1, 4, 4), positions (0, 3, 40, 1000), base 100"),
        Case((torch.randn(3, 6, generator=g), torch.tensor([2, 9, 17])), {"base": 500000.0},
             label="x (3, 6), positions (2, 9, 17), base 500000"),
    ]


def _rope(x: Tensor, positions: Tensor, base: float = 10000.0, *, layout: str = "half", sign: float = 1.0,
          two: float = 2.0, use_base: bool = True) -> Tensor:
    d = x.shape[-1]
    b = base if use_base else 10000.0
    angle = positions.double()[:, None] * b ** (-two * torch.arange(d // 2).double() / d)
    if layout == "half":
        angle = torch.cat([angle, angle], -1)
        rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    else:  # pairs (x_{2i}, x_{2i+1})
        angle = angle.repeat_interleave(2, -1)
        rot = torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2)
    return x * angle.cos().to(x.dtype) + sign * rot * angle.sin().to(x.dtype)


ROPE_ROTATE = Exercise(
    name="rope_rotate",
    chapter=28,
    title="Rotary embedding, half layout",
    solution=rope_rotate,
    cases=_rope_cases,
    grad=True,
    atol=5e-4,
    rtol=1e-4,
    hint="Build the (n, d/2) angles p ω_i, repeat them for both halves, then x cos + rot(x) sin.",
    mistakes=(
        Mistake("interleaved", "that is the *interleaved* layout (pairs `(x_2i, x_2i+1)`, GPT-J / Meta's Llama): "
                "this book, like `transformers`, pairs coordinate i with i + d/2, `rot(x) = cat(-x[..., d/2:], "
                "x[..., :d/2])` and the angles `cat([angle, angle])`. Mixing the layouts scrambles a "
                "checkpoint's queries and keys.", lambda x, p, base=10000.0: _rope(x, p, base, layout="interleaved")),
        Mistake("wrong_direction", "the pairs turn the wrong way (by -p ω_i): `rot(x)` must be `(-x_2, x_1)`, "
                "a quarter turn counter-clockwise, so that `x cos + rot(x) sin` is the rotation matrix of "
                "the equation.", lambda x, p, base=10000.0: _rope(x, p, base, sign=-1.0)),
        Mistake("frequency_exponent", "the frequencies are `base^(-i/d)`: the exponent is `-2i/d` for pair "
                "i = 0 .. d/2 - 1 (so the slowest pair turns at about `1/base` per position, not `base^(-1/2)`).",
                lambda x, p, base=10000.0: _rope(x, p, base, two=1.0)),
        Mistake("base_ignored", "the `base` argument is ignored (10000 is used every time): the frequencies are "
                "`base^(-2i/d)` for the base given.", lambda x, p, base=10000.0: _rope(x, p, base, use_base=False)),
    ),
)


def alibi_causal_bias(n: int, num_heads: int) -> Tensor:
    """The causal ALiBi bias ``(H, n, n)``: ``-m_h (i - j)`` for key ``j <= i``, ``-inf`` for ``j > i``.

    Slopes ``m_h = 2^{-8 (h + 1) / H}`` for heads ``h = 0 .. H - 1`` (``H`` a power of 2).
    """
    h = torch.arange(num_heads, dtype=torch.float32)
    slopes = 2.0 ** (-8 * (h + 1) / num_heads)  # (H,): 2^{-8/H}, 2^{-16/H}, ..., 2^{-8}
    i = torch.arange(n)[:, None]  # query positions (n, 1)
    j = torch.arange(n)[None, :]  # key positions (1, n)
    distance = (i - j).float()  # (n, n)
    bias = -slopes[:, None, None] * distance  # (H, n, n)
    return bias.masked_fill(j > i, float("-inf"))


def _alibi_cases(g: torch.Generator) -> list[Case]:
    return [Case((5, 4)), Case((7, 8)), Case((4, 2)), Case((6, 16)), Case((1, 4), label="(n = 1, H = 4)")]


def _alibi(n: int, num_heads: int, *, sign: float = -1.0, order: str = "decreasing", first: int = 1,
           per_head: float | None = None, causal: bool = True) -> Tensor:
    h = torch.arange(num_heads, dtype=torch.float32) + first
    slopes = 2.0 ** (-(8 / num_heads if per_head is None else per_head) * h)
    if order == "increasing":
        slopes = slopes.flip(0)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    bias = sign * slopes[:, None, None] * ((i - j).float() if causal else (i - j).abs().float())
    return bias.masked_fill(j > i, float("-inf")) if causal else bias


ALIBI_CAUSAL_BIAS = Exercise(
    name="alibi_causal_bias",
    chapter=28,
    title="The ALiBi bias",
    solution=alibi_causal_bias,
    cases=_alibi_cases,
    hint="Slopes first, (H,); then the distance i - j, (n, n); their product, with -inf above the diagonal.",
    mistakes=(
        Mistake("positive_sign", "the bias has the wrong sign: it *rewards* distant keys. ALiBi subtracts "
                "`m_h (i - j)`, a penalty that grows with the distance.",
                lambda n, h: _alibi(n, h, sign=1.0)),
        Mistake("slopes_reversed", "the slopes are in the reverse order: head 0 has the *steepest* slope, "
                "`m_0 = 2^(-8/H)`, and each head's is smaller, down to `2^(-8)` for the last.",
                lambda n, h: _alibi(n, h, order="increasing")),
        Mistake("slopes_from_zero", "the slopes start at `2^0 = 1`: heads are counted from h = 0 but the exponent "
                "is `-8 (h + 1) / H`, so the first slope is `2^(-8/H)`.",
                lambda n, h: _alibi(n, h, first=0)),
        Mistake("slopes_ignore_heads", "the slopes are `1/2, 1/4, 1/8, ...` whatever the number of heads: they "
                "are `2^(-8 (h + 1) / H)`, spread so that the last head's slope is always `2^(-8)`.",
                lambda n, h: _alibi(n, h, per_head=1.0)),
        Mistake("not_causal", "the keys after the query are not hidden: the causal bias is `-inf` where j > i "
                "(the penalty -m_h |i - j| alone is ALiBi's bidirectional form).",
                lambda n, h: _alibi(n, h, causal=False)),
    ),
)


@functools.cache
def same_rope_score() -> str:
    """Which position pair (query, key) gives the same RoPE score as (3, 1), for any q and k: ``"a"``.

    The options: ``"a"`` (13, 11), ``"b"`` (1, 3), ``"c"`` (6, 2), ``"d"`` none (the score depends on the
    absolute positions). Checked numerically with :func:`rope_rotate` on random q, k of width 16.
    """
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        return float(rope_rotate(q[None], torch.tensor([m])) @ rope_rotate(k[None], torch.tensor([n]))[0])

    same = [o for o, (m, n) in {"a": (13, 11), "b": (1, 3), "c": (6, 2)}.items()
            if abs(score(m, n) - score(3, 1)) < 1e-9]
    return same[0] if len(same) == 1 else "d"


def _choice(got: object, expected: object) -> str | None:
    if not isinstance(got, str) or got.strip().lower() not in ("a", "b", "c", "d"):
        return f"answer with one letter, 'a', 'b', 'c' or 'd'; got {got!r}."
    return None if got.strip().lower() == expected else f"{got!r} is not the pair with the same score."


SAME_ROPE_SCORE = Exercise(
    name="same_rope_score",
    chapter=28,
    title="Which pair scores the same under RoPE",
    solution=same_rope_score,
    kind="value",
    compare=_choice,
    hint="Write the score as q R_{n - m} k and ask which pairs keep n - m.",
    mistakes=(
        Mistake("swapped", "(1, 3) swaps query and key: the distance changes sign, and `q R_{n-m} k` is not "
                "symmetric in it (`R_{-a}` is the transpose of `R_a`), so the score changes. Only the signed "
                "distance n - m is kept by a shift of both positions.", lambda: "b"),
        Mistake("ratio", "(6, 2) keeps the ratio of the positions, not their difference: RoPE rotates by angles "
                "proportional to the position, and only the *difference* of the two angles enters the score.",
                lambda: "c"),
        Mistake("absolute", "the rotations do depend on the absolute positions, but the score does not: "
                "`(R_m q)ᵀ (R_n k) = qᵀ R_{n-m} k`, since rotations compose by adding angles. Move the "
                "explorer's **offset**: the weights do not change.", lambda: "d"),
    ),
)

check_rope_rotate = ROPE_ROTATE.checker()
check_alibi_causal_bias = ALIBI_CAUSAL_BIAS.checker()
check_same_rope_score = SAME_ROPE_SCORE.checker()

EXERCISES = (ROPE_ROTATE, ALIBI_CAUSAL_BIAS, SAME_ROPE_SCORE)
