"""Chapter 29's exercises: the MLA cache per token, why the rotary key is separate, the absorbed attention.

Solutions: :func:`deepseek_cache_bytes`, :func:`rope_blocks_absorption`, :func:`absorbed_attention`. Checkers:
:func:`check_deepseek_cache_bytes`, :func:`check_rope_blocks_absorption`, :func:`check_absorbed_attention`.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..positions import RotaryEmbedding
from ._core import Case, Exercise, Mistake

__all__ = [
    "deepseek_cache_bytes", "rope_blocks_absorption", "absorbed_attention", "check_deepseek_cache_bytes",
    "check_rope_blocks_absorption", "check_absorbed_attention", "DEEPSEEK_CACHE_BYTES", "ROPE_BLOCKS_ABSORPTION",
    "ABSORBED_ATTENTION", "EXERCISES",
]


def deepseek_cache_bytes() -> int:
    """MLA cache bytes per token of DeepSeek-V2: ``L (d_c + d_R)`` numbers of 2 bytes (bf16).

    ``L = 60`` layers, ``h = 128`` heads of width ``d = 128``, ``d_c = 512``, ``d_R = 64``: each layer caches
    one latent ``c`` and one rotary key ``k^R`` shared by all heads.
    """
    layers, kv_rank, rope_dim, bytes_per_number = 60, 512, 64, 2
    return layers * (kv_rank + rope_dim) * bytes_per_number


_L, _DC, _DR, _H, _D = 60, 512, 64, 128, 128

DEEPSEEK_CACHE_BYTES = Exercise(
    name="deepseek_cache_bytes",
    chapter=29,
    title="The MLA cache of DeepSeek-V2",
    solution=deepseek_cache_bytes,
    kind="value",
    atol=0.5,
    rtol=0.0,
    hint="Per layer, the cache holds the latent c (d_c numbers) and the rotary key k^R (d_R), once per token.",
    mistakes=(
        Mistake("latent_twice", "that caches the latent twice, once for the keys and once for the values "
                "(`2 d_c + d_R`): keys and values are both up-projected from the *same* latent, the joint "
                "compression, so it is stored once.", lambda: _L * (2 * _DC + _DR) * 2),
        Mistake("kv_factor", "that doubles everything (`2 (d_c + d_R)`), as for the K and V of MHA: MLA stores one "
                "latent for both, and the rotary key has no value partner.", lambda: _L * 2 * (_DC + _DR) * 2),
        Mistake("no_rope_key", "that leaves out the decoupled rotary key: each token also caches `k^R` "
                "(d_R = 64 numbers per layer), rotated once when the token arrives.", lambda: _L * _DC * 2),
        Mistake("rope_key_per_head", "that caches a rotary key per head: `k^R` is one key *shared by all heads* "
                "(d_R numbers per layer, not h d_R).", lambda: _L * (_DC + _H * _DR) * 2),
        Mistake("mha", "that is the cache of MHA with the same heads (`2 h d` per layer): MLA caches the latent "
                "instead of the up-projected keys and values, `d_c + d_R` per layer.",
                lambda: _L * 2 * _H * _D * 2),
        Mistake("one_layer", "that is one layer's share: each of the 60 layers has its own cache.",
                lambda: (_DC + _DR) * 2),
    ),
)


def absorbed_attention(q_c: Tensor, q_r: Tensor, c: Tensor, k_r: Tensor, w_uk: Tensor, w_uv: Tensor) -> Tensor:
    r"""Causal MLA from the cached latents, with ``W^UK`` absorbed into the query and ``W^UV`` applied after the sum.

    ``s_tj,i = ((W^UK_iᵀ q^C_t,i)ᵀ c_j + q^R_t,iᵀ k^R_j) / √(d + d_R)``, ``o_t,i = W^UV_i Σ_j softmax_j(s) c_j``.

    Shapes: ``q_c (B, h, t, d)``, ``q_r (B, h, t, d_R)``, ``c (B, m, d_c)``, ``k_r (B, m, d_R)`` (one rotary key
    shared by the heads), ``w_uk (h, d, d_c)``, ``w_uv (h, d_v, d_c)`` -> ``(B, h, t, d_v)``. The queries are
    the ``t <= m`` newest tokens: query ``i`` sees keys ``j <= m - t + i``.
    """
    d, d_r = q_c.shape[-1], q_r.shape[-1]
    t, m = q_c.shape[2], c.shape[1]
    q_lat = torch.einsum("bhtd,hdr->bhtr", q_c, w_uk)  # (B, h, t, d_c): W^UK_iᵀ q^C, the absorbed query
    scores = q_lat @ c[:, None].transpose(-2, -1)  # (B, h, t, m): every head reads the same latents
    scores = scores + q_r @ k_r[:, None].transpose(-2, -1)  # the shared rotary key
    scores = scores / math.sqrt(d + d_r)  # the width of the unabsorbed query [q^C; q^R]
    visible = torch.arange(m)[None, :] <= torch.arange(m - t, m)[:, None]  # (t, m), True = may attend
    a = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    o_lat = a @ c[:, None]  # (B, h, t, d_c): the weighted sum of latents
    return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)  # W^UV_i after the sum


def _absorb_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, h: int, t: int, m: int, d: int, dc: int, dr: int, dv: int) -> tuple[Tensor, ...]:
        return (torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, dr, generator=g),
                torch.randn(b, m, dc, generator=g), torch.randn(b, m, dr, generator=g),
                torch.randn(h, d, dc, generator=g) / math.sqrt(dc), torch.randn(h, dv, dc, generator=g))

    return [
        Case(draw(2, 4, 5, 5, 4, 16, 2, 4), label="prefill: h 4, t = m = 5, d 4, d_c 16, d_R 2, d_v 4"),
        Case(draw(1, 2, 1, 7, 8, 12, 4, 6), label="one decoding step: h 2, t 1, m 7, d 8, d_c 12, d_R 4, d_v 6"),
        Case(draw(2, 3, 3, 6, 4, 8, 2, 4), label="3 queries after 3 cached tokens: h 3, d 4, d_c 8, d_R 2, d_v 4"),
    ]


def _absorb(q_c: Tensor, q_r: Tensor, c: Tensor, k_r: Tensor, w_uk: Tensor, w_uv: Tensor, *,
            width: str = "d+dR", rope: bool = True, causal: bool = True) -> Tensor:
    d, d_r, d_c = q_c.shape[-1], q_r.shape[-1], c.shape[-1]
    t, m = q_c.shape[2], c.shape[1]
    s = torch.einsum("bhtd,hdr,bmr->bhtm", q_c, w_uk, c)
    if rope:
        s = s + torch.einsum("bhtr,bmr->bhtm", q_r, k_r)
    s = s / math.sqrt({"d+dR": d + d_r, "dc+dR": d_c + d_r, "d": d}[width])
    if causal:
        s = s.masked_fill(torch.ones(t, m, dtype=torch.bool).tril(m - t).logical_not(), float("-inf"))
    return torch.einsum("bhtm,bmr,hvr->bhtv", torch.softmax(s, -1), c, w_uv)


ABSORBED_ATTENTION = Exercise(
    name="absorbed_attention",
    chapter=29,
    title="Absorbed multi-head latent attention",
    solution=absorbed_attention,
    cases=_absorb_cases,
    grad=True,
    hint="Absorbed query W^UKᵀ q^C (B, h, t, d_c); scores against the latents plus the rotary part; causal "
         "softmax; weighted sum of latents; then W^UV.",
    mistakes=(
        Mistake("latent_scale", "the scores are divided by √(d_c + d_R), the width of the absorbed query: "
                "absorption must not change the numbers, so the scale stays that of the unabsorbed query "
                "`[q^C; q^R]`, `1 / √(d + d_R)`.", lambda *a: _absorb(*a, width="dc+dR")),
        Mistake("head_scale", "the scores are divided by √d, forgetting the rotary part: a score is the dot "
                "product of `[q^C; q^R]` and `[k^C; k^R]`, d + d_R wide, so divide by `√(d + d_R)`.",
                lambda *a: _absorb(*a, width="d")),
        Mistake("no_rope_part", "the rotary part of the score is missing: add `q^Rᵀ k^R` (the shared rotary key, "
                "`k_r[:, None]` broadcast over the heads) to the latent part before the softmax.",
                lambda *a: _absorb(*a, rope=False)),
        Mistake("no_causal_mask", "there is no causal mask: query i (at position m - t + i) must not see the "
                "later keys; fill those scores with `-inf` before the softmax.",
                lambda *a: _absorb(*a, causal=False)),
    ),
)

@functools.cache
def rope_blocks_absorption() -> str:
    """If RoPE rotated the compressed keys, what would the absorbed query of head i depend on? ``"c"``.

    The options: ``"a"`` nothing new (absorption works as before), ``"b"`` the query's position only, ``"c"`` the
    distance ``t - j`` to each key, so one absorbed query per key, ``"d"`` the key's latent ``c_j``. Checked
    numerically: ``(R_t q)ᵀ R_j W^UK c_j`` equals ``(W^UKᵀ R_{t-j} q)ᵀ c_j`` but not ``(W^UKᵀ R_t q)ᵀ c_j``.
    """
    g = torch.Generator().manual_seed(0)
    d, d_c, t = 8, 12, 5
    q = torch.randn(1, d, generator=g, dtype=torch.float64)
    w_uk = torch.randn(d, d_c, generator=g, dtype=torch.float64)
    c = torch.randn(t + 1, d_c, generator=g, dtype=torch.float64)  # latents of keys 0..t
    rope = RotaryEmbedding(d)
    keys = rope(c @ w_uk.T, torch.arange(t + 1))  # (t + 1, d): RoPE on the compressed keys
    true = (rope(q, torch.tensor([t])) @ keys.T)[0]  # (t + 1,) scores
    by_distance = torch.stack([(rope(q, torch.tensor([t - j])) @ w_uk)[0] @ c[j] for j in range(t + 1)])
    by_query = (rope(q, torch.tensor([t])) @ w_uk @ c.T)[0]  # one absorbed query for all keys
    if torch.allclose(by_query, true):
        return "b"
    return "c" if torch.allclose(by_distance, true) else "d"


def _choice(got: object, expected: object) -> str | None:
    if not isinstance(got, str) or got.strip().lower() not in ("a", "b", "c", "d"):
        return f"answer with one letter, 'a', 'b', 'c' or 'd'; got {got!r}."
    return None if got.strip().lower() == expected else f"{got!r} is not what the absorbed query would need."


ROPE_BLOCKS_ABSORPTION = Exercise(
    name="rope_blocks_absorption",
    chapter=29,
    title="Why the rotary key is separate",
    solution=rope_blocks_absorption,
    kind="value",
    compare=_choice,
    hint="Write the score (R_t q)ᵀ R_j W^UK c_j and move everything but c_j to the left.",
    mistakes=(
        Mistake("absorbs_anyway", "a rotation sits between the query and W^UK: `q^T R_t^T R_j W^UK c_j = "
                "q^T R_{j-t} W^UK c_j`, and R_{j-t} changes with every key, so no single absorbed matrix exists. "
                "That is why MLA rotates a separate, small key instead.", lambda: "a"),
        Mistake("query_position", "the query's own rotation R_t could be absorbed, but the key's rotation R_j "
                "cannot be moved past W^UK into the latent: the two combine to R_{j-t}, which depends on the key "
                "too.", lambda: "b"),
        Mistake("latent", "the latent c_j stays on the right of the dot product, as before: what changes with "
                "the key is its position, through R_{j-t}.", lambda: "d"),
    ),
)

check_deepseek_cache_bytes = DEEPSEEK_CACHE_BYTES.checker()
check_absorbed_attention = ABSORBED_ATTENTION.checker()
check_rope_blocks_absorption = ROPE_BLOCKS_ABSORPTION.checker()

EXERCISES = (DEEPSEEK_CACHE_BYTES, ROPE_BLOCKS_ABSORPTION, ABSORBED_ATTENTION)
