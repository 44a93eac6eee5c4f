"""Chapter 4's exercises: the shapes of a cross-attention call, single-head cross-attention with a memory key
mask, and the cost of decoding with the memory projected once.

Solutions: :func:`cross_shapes`, :func:`cross_attention`, :func:`cached_decoding_flops`. Checkers:
:func:`check_cross_shapes`, :func:`check_cross_attention`, :func:`check_cached_decoding_flops`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "cross_shapes", "cross_attention", "cached_decoding_flops",
    "check_cross_shapes", "check_cross_attention", "check_cached_decoding_flops",
    "CROSS_SHAPES", "CROSS_ATTENTION", "CACHED_DECODING_FLOPS", "EXERCISES",
]


# -- 1. Predict the shapes ---------------------------------------------------------------------------------
def cross_shapes() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(weights shape, output shape)`` of ``CrossAttention(32, 4, kdim=48)`` called on a target ``(2, 7, 32)``
    and a memory ``(2, 11, 48)`` with ``need_weights=True``: one row of weights per target position and
    head, one column per source position; the output lives in the target's space."""
    B, L, E, h = 2, 7, 32, 4  # the target (queries)
    S = 11  # the memory's length; its width 48 disappears in the key/value projections
    return (B, h, L, S), (B, L, E)


def _as_shapes(x: Any) -> Any:
    if isinstance(x, torch.Size | list | tuple):
        return tuple(_as_shapes(v) for v in x)
    return x


def _same_shapes(got: Any, expected: Any) -> str | None:
    got = _as_shapes(got)
    if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(s, tuple) for s in got)):
        return "give two shapes, `(weights shape, output shape)`, e.g. `((1, 2, 3, 4), (1, 2, 3))`."
    for what, g, e in zip(("weights", "output"), got, expected, strict=True):
        if g != e:
            return f"the {what} shape {g} is not right."
    return None


CROSS_SHAPES = Exercise(
    name="cross_shapes",
    chapter=4,
    title="The shapes of a cross-attention call",
    solution=cross_shapes,
    kind="value",
    compare=_same_shapes,
    hint="Name every size first: B, the target length L, the source length S, E, h.",
    mistakes=(
        Mistake("weights_transposed", "the weights have one row per *target* position (the queries) and one "
                "column per *source* position (the keys): `(B, h, L, S)`, here `(2, 4, 7, 11)`.",
                lambda: ((2, 4, 11, 7), (2, 7, 32))),
        Mistake("square_weights", "that is self-attention's square map: in cross-attention the rows are the 7 "
                "target positions and the columns the 11 source positions, `(2, 4, 7, 11)`.",
                lambda: ((2, 4, 7, 7), (2, 7, 32))),
        Mistake("output_in_memory_space", "the output is a mix of *projected* values, brought back to the "
                "target's width E = 32 by `W^O`: `kdim = 48` is only the memory's input width.",
                lambda: ((2, 4, 7, 11), (2, 7, 48))),
        Mistake("output_per_source", "the output has one row per target position (each query reads the "
                "whole source), `(2, 7, 32)`, not one per source position.",
                lambda: ((2, 4, 7, 11), (2, 11, 32))),
    ),
)


# -- 2. Single-head cross-attention with a memory key mask -------------------------------------------------
def cross_attention(
    x: Tensor, c: Tensor, W_q: Tensor, W_k: Tensor, W_v: Tensor, key_mask: Tensor | None = None
) -> Tensor:
    """One head of cross-attention: queries from the target ``x``, keys and values from the memory ``c``.

    ``A = softmax(x W_q (c W_k)ᵀ / √d_k)`` with padded source positions at weight 0, output ``A c W_v``.
    Shapes: ``x (B, L, E)``, ``c (B, S, d_c)``, ``W_q (E, d_k)``, ``W_k (d_c, d_k)``, ``W_v (d_c, d_k)``,
    ``key_mask (B, S)`` boolean (True = real source token) -> ``(B, L, d_k)``.
    """
    q = x @ W_q  # (B, L, d_k): one query per target position
    k, v = c @ W_k, c @ W_v  # (B, S, d_k): keys and values from the memory
    scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, L, S)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))  # mask columns: source padding
    return torch.softmax(scores, dim=-1) @ v  # each target row normalises over the source


def _cross_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, L: int, S: int, E: int, d_c: int, d_k: int, keep: list[str] | None) -> Case:
        args: tuple[Any, ...] = (torch.randn(b, L, E, generator=g), torch.randn(b, S, d_c, generator=g),
                                 torch.randn(E, d_k, generator=g) / math.sqrt(E),
                                 torch.randn(d_c, d_k, generator=g) / math.sqrt(d_c),
                                 torch.randn(d_c, d_k, generator=g) / math.sqrt(d_c))
        label = f"x ({b}, {L}, {E}), c ({b}, {S}, {d_c}), d_k {d_k}"
        if keep is None:
            return Case(args, label=label + ", no mask")
        mask = torch.tensor([[ch == "1" for ch in row] for row in keep])
        return Case((*args, mask), label=label + f", key_mask {' '.join(keep)} (1 = real source token)")

    # every masked source has padding, so an inverted mask never hides a whole row
    return [draw(2, 3, 5, 8, 6, 4, None), draw(2, 4, 6, 8, 10, 4, ["111100", "110000"]),
            draw(3, 2, 7, 6, 4, 3, ["1111110", "1000000", "0011111"]), draw(1, 1, 3, 4, 5, 2, None)]


def _cross(x: Tensor, c: Tensor, W_q: Tensor, W_k: Tensor, W_v: Tensor, key_mask: Tensor | None, *,
           mask: str = "right", dim: int = -1, scale: float | None = None, swap_kv: bool = False) -> Tensor:
    q, k, v = x @ W_q, c @ W_k, c @ W_v
    if swap_kv:
        k, v = v, k
    s = q @ k.transpose(1, 2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if key_mask is not None and mask == "right":
        s = s.masked_fill(~key_mask[:, None, :], float("-inf"))
    elif key_mask is not None and mask == "inverted":
        s = s.masked_fill(key_mask[:, None, :], float("-inf"))
    return torch.softmax(s, dim=dim) @ v


CROSS_ATTENTION = Exercise(
    name="cross_attention",
    chapter=4,
    title="Cross-attention with a memory key mask",
    solution=cross_attention,
    cases=_cross_cases,
    grad=True,
    hint="Queries come from the target `x`, keys and values from the memory `c`; the weights are (B, L, S), "
    "rows target positions, columns source positions, and the key mask hides columns.",
    mistakes=(
        Mistake("softmax_over_queries", "the softmax runs over the target positions (`dim=-2`): each target "
                "position reads a distribution over the *source*, so normalise each row over `dim=-1`.",
                lambda x, c, W_q, W_k, W_v, key_mask=None: _cross(x, c, W_q, W_k, W_v, key_mask, dim=-2)),
        Mistake("mask_inverted", "the key mask is used the other way round: `key_mask` is True at real source "
                "tokens, so fill the scores where it is False (`~key_mask[:, None, :]`).",
                lambda x, c, W_q, W_k, W_v, key_mask=None: _cross(x, c, W_q, W_k, W_v, key_mask, mask="inverted")),
        Mistake("mask_ignored", "the source padding still gets weight: `key_mask` has no effect. Fill the scores "
                "of the padded *columns* with `-inf` before the softmax, `key_mask[:, None, :]` broadcast over the "
                "target rows.",
                lambda x, c, W_q, W_k, W_v, key_mask=None: _cross(x, c, W_q, W_k, W_v, key_mask, mask="none")),
        Mistake("scale_by_input_width", "the scores are divided by the square root of the target's width E: "
                "the dot products run over the d_k projected features, so divide by `math.sqrt(d_k)`.",
                lambda x, c, W_q, W_k, W_v, key_mask=None:
                _cross(x, c, W_q, W_k, W_v, key_mask, scale=1 / math.sqrt(x.shape[-1]))),
        Mistake("keys_values_swapped", "the keys and values are swapped: the scores compare the queries with "
                "`c @ W_k` and the output mixes `c @ W_v`.",
                lambda x, c, W_q, W_k, W_v, key_mask=None: _cross(x, c, W_q, W_k, W_v, key_mask, swap_kv=True)),
    ),
)


# -- 3. The cost of decoding with a projected memory -------------------------------------------------------
def cached_decoding_flops() -> int:
    """The matrix-product FLOPs of ``T = 20`` decoding steps of cross-attention (``E = 64``,
    ``kdim = vdim = 64``, a memory of ``n_k = 100`` positions), the memory projected once: the cost equation
    of the chapter, ``2 n_k E (kdim + vdim) + T (4 E² + 4 n_k E)``."""
    E, kdim, vdim, n_k, T = 64, 64, 64, 100, 20
    once = 2 * n_k * E * (kdim + vdim)  # K = C W^K and V = C W^V, once per source sentence
    per_step = 2 * E * E + 2 * n_k * E + 2 * n_k * E + 2 * E * E  # q, scores, weighted sum, W^O
    return once + T * per_step


CACHED_DECODING_FLOPS = Exercise(
    name="cached_decoding_flops",
    chapter=4,
    title="The cost of decoding with the memory projected once",
    solution=cached_decoding_flops,
    kind="value",
    atol=0.5,
    rtol=0.0,
    hint="Count a multiply-add as 2 FLOPs; split the work into what depends on the step and what does not.",
    mistakes=(
        Mistake("memory_every_step", "that projects the memory again at every step: K = C W^K and V = C W^V do "
                "not depend on the target, so a decoder computes them once per source sentence.",
                lambda: 20 * (2 * 100 * 64 * 128 + 4 * 64 * 64 + 4 * 100 * 64)),
        Mistake("steps_only", "that leaves out the memory's projection, paid once: "
                "2 n_k E (kdim + vdim) FLOPs before the first step.",
                lambda: 20 * (4 * 64 * 64 + 4 * 100 * 64)),
        Mistake("multiply_adds", "that counts multiply-adds: the book counts a multiply-add as 2 FLOPs, as "
                "`FlopCounterMode` does, so double it.",
                lambda: 100 * 64 * 128 + 20 * (2 * 64 * 64 + 2 * 100 * 64)),
    ),
)

check_cross_shapes = CROSS_SHAPES.checker()
check_cross_attention = CROSS_ATTENTION.checker()
check_cached_decoding_flops = CACHED_DECODING_FLOPS.checker()

EXERCISES = (CROSS_SHAPES, CROSS_ATTENTION, CACHED_DECODING_FLOPS)
