"""Chapter 3's exercises: split the heads, a whole multi-head forward pass, and the parameter count of a layer.

Solutions: :func:`split_heads`, :func:`multihead_forward`, :func:`mha_parameters`. Checkers:
:func:`check_split_heads`, :func:`check_multihead_forward`, :func:`check_mha_parameters`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "split_heads", "multihead_forward", "mha_parameters",
    "check_split_heads", "check_multihead_forward", "check_mha_parameters",
    "SPLIT_HEADS", "MULTIHEAD_FORWARD", "MHA_PARAMETERS", "EXERCISES",
]


# -- 1. Split the heads --------------------------------------------------------------------------------------
def split_heads(x: Tensor, h: int) -> Tensor:
    """``(B, n, E) -> (B, h, n, E / h)``: head ``i`` gets the columns ``i d .. (i + 1) d - 1`` of every position.

    The columns of ``x W^Q`` are the ``h`` heads' queries side by side, so cut the last dimension into
    ``(h, d)`` *first*, then move the head dimension in front of the positions.
    """
    B, n, E = x.shape
    return x.reshape(B, n, h, E // h).transpose(1, 2)  # (B, n, h, d) -> (B, h, n, d)


def _split_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, n: int, E: int, h: int) -> Case:
        return Case((torch.randn(b, n, E, generator=g), h), label=f"x ({b}, {n}, {E}), h = {h}")

    return [draw(2, 3, 8, 2), draw(1, 5, 12, 3), draw(2, 4, 6, 1), draw(3, 2, 8, 4)]


SPLIT_HEADS = Exercise(
    name="split_heads",
    chapter=3,
    title="Split the heads",
    solution=split_heads,
    cases=_split_cases,
    hint="Check one entry by hand: head i, position t, feature c must be x[b, t, i * d + c].",
    mistakes=(
        Mistake("view_without_transpose", "`x.reshape(B, h, n, d)` (or `view`) reads the memory in its order "
                "`(n, E)`, so a 'head' holds pieces of several positions: the heads and positions are mixed. "
                "Reshape to `(B, n, h, d)` first, then `.transpose(1, 2)`.",
                lambda x, h: x.reshape(x.shape[0], h, x.shape[1], x.shape[2] // h)),
        Mistake("strided_heads", "the columns are grouped the wrong way: head i gets columns i, i + h, i + 2h, ... "
                "(a reshape to `(B, n, d, h)`), but `W^Q`'s heads sit side by side, head i in columns "
                "`i d .. (i + 1) d - 1`. Reshape to `(B, n, h, d)`.",
                lambda x, h: x.reshape(x.shape[0], x.shape[1], x.shape[2] // h, h).permute(0, 3, 1, 2)),
        Mistake("no_transpose", "the result is `(B, n, h, d)`: the columns are cut correctly, but the head "
                "dimension must come before the positions, `(B, h, n, d)`, so that attention batches over heads: "
                "add `.transpose(1, 2)`.",
                lambda x, h: x.reshape(x.shape[0], x.shape[1], h, x.shape[2] // h)),
    ),
)


# -- 2. A whole multi-head forward pass --------------------------------------------------------------------
def multihead_forward(
    x: Tensor, W_q: Tensor, W_k: Tensor, W_v: Tensor, W_o: Tensor, h: int, key_mask: Tensor | None = None
) -> Tensor:
    """Multi-head self-attention without biases: ``Concat(head_1..head_h) W^O``, ``head_i = softmax(Q_i K_iᵀ / √d) V_i``.

    Shapes: ``x (B, n, E)``; ``W_q, W_k, W_v, W_o (E, E)`` acting on the right (``Q = x W_q``, as in the
    equations, not ``nn.Linear``'s ``x Wᵀ``); ``h`` divides ``E`` and ``d = E / h``; ``key_mask (B, n)``
    boolean, True = real token -> ``(B, n, E)``.
    """
    B, n, E = x.shape
    d = E // h

    def split(t: Tensor) -> Tensor:
        return t.reshape(B, n, h, d).transpose(1, 2)  # (B, h, n, d)

    q, k, v = split(x @ W_q), split(x @ W_k), split(x @ W_v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, h, n, n): each head scaled by its own width
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    heads = torch.softmax(scores, dim=-1) @ v  # (B, h, n, d)
    concat = heads.transpose(1, 2).reshape(B, n, E)  # (B, n, h * d): the heads side by side
    return concat @ W_o


def _forward_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, n: int, E: int, h: int, lengths: list[int] | None = None) -> Case:
        ws = tuple(torch.randn(E, E, generator=g) / math.sqrt(E) for _ in range(4))
        args = (torch.randn(b, n, E, generator=g), *ws, h)
        label = f"x ({b}, {n}, {E}), h = {h}"
        if lengths is None:
            return Case(args, label=label + ", no mask")
        mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
        return Case(args, {"key_mask": mask}, label=label + f", key_mask with lengths {lengths}")

    return [draw(2, 4, 8, 2), draw(2, 5, 12, 3, [4, 2]), draw(1, 3, 6, 1), draw(3, 6, 16, 4, [2, 3, 5])]


def _mha(x: Tensor, W_q: Tensor, W_k: Tensor, W_v: Tensor, W_o: Tensor | None, h: int, key_mask: Tensor | None,
         *, scale: float | None = None, split: str = "right", merge: str = "right") -> Tensor:
    B, n, E = x.shape
    d = E // h

    def cut(t: Tensor) -> Tensor:
        return t.reshape(B, h, n, d) if split == "view" else t.reshape(B, n, h, d).transpose(1, 2)

    q, k, v = cut(x @ W_q), cut(x @ W_k), cut(x @ W_v)
    s = q @ k.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(d))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    heads = torch.softmax(s, -1) @ v
    concat = heads.reshape(B, n, E) if merge == "view" else heads.transpose(1, 2).reshape(B, n, E)
    return concat if W_o is None else concat @ W_o


MULTIHEAD_FORWARD = Exercise(
    name="multihead_forward",
    chapter=3,
    title="A multi-head forward pass",
    solution=multihead_forward,
    cases=_forward_cases,
    grad=True,
    hint="Check the shapes after each step: (B, n, E) -> (B, h, n, d) -> (B, h, n, n) -> (B, h, n, d) -> (B, n, E).",
    mistakes=(
        Mistake("scale_by_E", "the scores are divided by √E, the model width: each head's dot product runs over "
                "its own d = E / h features, so divide by `math.sqrt(E // h)`.",
                lambda x, W_q, W_k, W_v, W_o, h, key_mask=None:
                _mha(x, W_q, W_k, W_v, W_o, h, key_mask, scale=1 / math.sqrt(x.shape[-1]))),
        Mistake("merge_without_transpose", "the heads are merged with a plain reshape of `(B, h, n, d)` to "
                "`(B, n, E)`, which mixes heads and positions: transpose back to `(B, n, h, d)` first "
                "(`.transpose(1, 2).reshape(B, n, E)`).",
                lambda x, W_q, W_k, W_v, W_o, h, key_mask=None:
                _mha(x, W_q, W_k, W_v, W_o, h, key_mask, merge="view")),
        Mistake("split_without_transpose", "the heads are split with a plain reshape of `(B, n, E)` to "
                "`(B, h, n, d)`, which mixes heads and positions: reshape to `(B, n, h, d)`, then "
                "`.transpose(1, 2)` (the first exercise).",
                lambda x, W_q, W_k, W_v, W_o, h, key_mask=None:
                _mha(x, W_q, W_k, W_v, W_o, h, key_mask, split="view")),
        Mistake("linear_convention", "the matrices are applied as `x @ W.T`, `nn.Linear`'s convention: here they "
                "act on the right as in the chapter's equations, `Q = x @ W_q` (and `concat @ W_o`).",
                lambda x, W_q, W_k, W_v, W_o, h, key_mask=None:
                _mha(x, W_q.T, W_k.T, W_v.T, W_o.T, h, key_mask)),
        Mistake("no_output_projection", "the concatenated heads are returned as they are: multiply them by "
                "`W_o`, which mixes the heads' outputs into the model's space.",
                lambda x, W_q, W_k, W_v, W_o, h, key_mask=None: _mha(x, W_q, W_k, W_v, None, h, key_mask)),
        Mistake("mask_inverted", "the key mask is used the other way round: `key_mask` is True at real tokens, so "
                "fill the scores where it is False, broadcast over heads and queries as `key_mask[:, None, None, :]`.",
                lambda x, W_q, W_k, W_v, W_o, h, key_mask=None:
                _mha(x, W_q, W_k, W_v, W_o, h, None if key_mask is None else ~key_mask)),
    ),
)


# -- 3. Count the parameters -------------------------------------------------------------------------------
def mha_parameters() -> int:
    """The parameters of a multi-head attention layer with ``E = 512``, ``h = 8`` and biases, as in
    ``attn.multihead.MultiHeadAttention(512, 8)``: four ``E x E`` matrices and four biases of ``E``."""
    E, h = 512, 8
    d = E // h
    per_head = 3 * (E * d + d)  # W_i^Q, W_i^K, W_i^V and their biases
    return h * per_head + (h * d * E + E)  # + W^O, which reads the h d concatenated features


MHA_PARAMETERS = Exercise(
    name="mha_parameters",
    chapter=3,
    title="The parameters of a multi-head layer",
    solution=mha_parameters,
    kind="value",
    atol=0.5,
    rtol=0.0,
    hint="Each head's W_i^Q is E x d with d = E / h; stack the h of them and count W^O too.",
    mistakes=(
        Mistake("no_bias", "that is the four weight matrices without their biases: each projection has a bias "
                "of E numbers too (4E more).", lambda: 4 * 512 * 512),
        Mistake("no_output", "that leaves out the output projection `W^O` (E x E and its bias), which every "
                "multi-head layer applies to the concatenated heads.", lambda: 3 * 512 * 512 + 3 * 512),
        Mistake("full_width_heads", "that gives every head full E x E projections: each head projects to "
                "d = E / h features only, so the h heads together hold what one E x E matrix does, and the head "
                "count does not change the parameter count.",
                lambda: 8 * 3 * (512 * 512 + 512) + 512 * 512 + 512),
        Mistake("head_sized", "that counts d x d matrices per head: each head's projection reads the whole "
                "E-wide input, so it is E x d, not d x d.", lambda: 8 * 4 * 64 * 64 + 4 * 512),
    ),
)

check_split_heads = SPLIT_HEADS.checker()
check_multihead_forward = MULTIHEAD_FORWARD.checker()
check_mha_parameters = MHA_PARAMETERS.checker()

EXERCISES = (SPLIT_HEADS, MULTIHEAD_FORWARD, MHA_PARAMETERS)
