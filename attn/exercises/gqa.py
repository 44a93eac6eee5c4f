"""Chapter 27's exercises: grouped-query attention, the KV cache's bytes per token, one cached decoding step.

Solutions: :func:`grouped_query_attention`, :func:`mistral_cache_bytes`, :func:`decode_step`. Checkers:
:func:`check_grouped_query_attention`, :func:`check_mistral_cache_bytes`, :func:`check_decode_step`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "grouped_query_attention", "mistral_cache_bytes", "decode_step",
    "check_grouped_query_attention", "check_mistral_cache_bytes", "check_decode_step",
    "GROUPED_QUERY_ATTENTION", "MISTRAL_CACHE_BYTES", "DECODE_STEP", "EXERCISES",
]


def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of ``h`` query heads over ``g`` key/value heads: query head ``i`` reads head ``i // (h/g)``.

    Shapes: ``q (B, h, t, d)``, ``k (B, g, m, d)``, ``v (B, g, m, d_v)`` with ``g`` dividing ``h`` and
    ``t <= m`` -> ``(B, h, t, d_v)``. The queries are the ``t`` newest tokens (positions ``m - t .. m - 1``),
    so query ``i`` sees keys ``j <= m - t + i`` (the causal mask aligned at the bottom right).
    """
    h, t, d = q.shape[1], q.shape[2], q.shape[3]
    g, m = k.shape[1], k.shape[2]
    r = h // g  # query heads per key/value head
    k = k.repeat_interleave(r, dim=1)  # (B, h, m, d): heads 0..r-1 read key head 0, ...
    v = v.repeat_interleave(r, dim=1)  # (B, h, m, d_v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, h, t, m)
    pos = torch.arange(m - t, m)[:, None]  # (t, 1): absolute position of each query
    visible = torch.arange(m)[None, :] <= pos  # (t, m), True = may attend
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _gqa_cases(g: torch.Generator) -> list[Case]:
    def qkv(b: int, h: int, kv: int, t: int, m: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
        return (torch.randn(b, h, t, d, generator=g), torch.randn(b, kv, m, d, generator=g),
                torch.randn(b, kv, m, d, generator=g))

    return [
        Case(qkv(2, 4, 4, 5, 5, 8), label="MHA: q (2, 4, 5, 8), k, v (2, 4, 5, 8)"),
        Case(qkv(1, 6, 2, 7, 7, 4), label="GQA: q (1, 6, 7, 4), k, v (1, 2, 7, 4)"),
        Case(qkv(2, 8, 4, 3, 9, 16), label="GQA, 3 new queries after 6 cached tokens: q (2, 8, 3, 16), "
             "k, v (2, 4, 9, 16)"),
        Case(qkv(1, 4, 1, 1, 6, 8), label="MQA, one decoding step: q (1, 4, 1, 8), k, v (1, 1, 6, 8)"),
    ]


def _attend(q: Tensor, k: Tensor, v: Tensor, *, tile: bool = False, scale: bool = True,
            mask: str = "bottom_right") -> Tensor:
    r = q.shape[1] // k.shape[1]
    if tile:
        k, v = k.repeat(1, r, 1, 1), v.repeat(1, r, 1, 1)
    else:
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    s = q @ k.transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    t, m = q.shape[2], k.shape[2]
    if mask == "bottom_right":
        s = s.masked_fill(torch.ones(t, m, dtype=torch.bool).tril(m - t).logical_not(), float("-inf"))
    elif mask == "top_left":
        s = s.masked_fill(torch.ones(t, m, dtype=torch.bool).tril().logical_not(), float("-inf"))
    return torch.softmax(s, -1) @ v


GROUPED_QUERY_ATTENTION = Exercise(
    name="grouped_query_attention",
    chapter=27,
    title="Grouped-query attention",
    solution=grouped_query_attention,
    cases=_gqa_cases,
    grad=True,
    hint="Repeat each key/value head r = h/g times next to itself, then scores, causal mask, softmax, values.",
    mistakes=(
        Mistake("tiled_heads", "the key/value heads are tiled (`repeat`: heads 0, 1, .., g-1, 0, 1, ..), so query "
                "head i reads key/value head i mod g: query heads `j r .. j r + r - 1` must share head j. Use "
                "`k.repeat_interleave(r, dim=1)` (or fold the heads: `q.view(B, g, r, t, d)`).",
                lambda q, k, v: _attend(q, k, v, tile=True)),
        Mistake("no_scale", "the scores are not divided by √d: multiply `q @ kᵀ` by `1 / math.sqrt(d)`.",
                lambda q, k, v: _attend(q, k, v, scale=False)),
        Mistake("causal_top_left", "the causal mask is aligned at the top left (`tril()` of a (t, m) matrix), "
                "which is right only when t = m: with m - t cached tokens, query i sits at position m - t + i "
                "and sees keys j <= m - t + i (`tril(m - t)`, aligned at the bottom right). "
                "`F.scaled_dot_product_attention(..., is_causal=True)` aligns it at the top left too.",
                lambda q, k, v: _attend(q, k, v, mask="top_left")),
        Mistake("no_causal_mask", "there is no causal mask: every query sees the later tokens too. Hide key j "
                "from query i when j > m - t + i (fill those scores with `-inf` before the softmax).",
                lambda q, k, v: _attend(q, k, v, mask="none")),
    ),
)


def mistral_cache_bytes() -> int:
    """KV-cache bytes per token of a Mistral-7B-shaped model: ``2 (K and V) * L * g * d * bytes``.

    ``L = 32`` layers, ``h = 32`` query heads, ``g = 8`` key/value heads of width ``d = 128``, bf16 (2 bytes).
    """
    layers, kv_heads, head_dim, bytes_per_number = 32, 8, 128, 2
    return 2 * layers * kv_heads * head_dim * bytes_per_number


MISTRAL_CACHE_BYTES = Exercise(
    name="mistral_cache_bytes",
    chapter=27,
    title="Cache bytes per token of a GQA model",
    solution=mistral_cache_bytes,
    kind="value",
    atol=0.5,
    rtol=0.0,
    hint="Count, per token: a key and a value, per layer, per key/value head, d numbers of 2 bytes each.",
    mistakes=(
        Mistake("query_heads", "that counts all 32 query heads, as in MHA: only the g = 8 key/value heads are "
                "cached, which is the point of GQA (a factor h/g = 4 less).", lambda: 2 * 32 * 32 * 128 * 2),
        Mistake("keys_only", "that counts the keys only: the cache stores a key *and* a value per head, the "
                "factor 2 of the bytes-per-token formula.", lambda: 32 * 8 * 128 * 2),
        Mistake("fp32", "that counts 4 bytes per number (float32): bf16 numbers take 2 bytes.",
                lambda: 2 * 32 * 8 * 128 * 4),
        Mistake("one_layer", "that is one layer's share: every one of the L = 32 layers caches its own keys "
                "and values.", lambda: 2 * 8 * 128 * 2),
        Mistake("kib", "that is the answer in KiB: give it in bytes (1 KiB = 1024 bytes).",
                lambda: 2 * 32 * 8 * 128 * 2 / 1024),
    ),
)


def decode_step(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor,
                v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One decoding step: append the new token's key and value to the cache, then attend over the whole cache.

    Shapes: ``q (B, h, 1, d)``; ``k_new, v_new (B, g, 1, d)``; ``k_cache, v_cache (B, g, m, d)`` with ``m >= 0``
    cached tokens. Returns ``(out (B, h, 1, d), k_cache' (B, g, m + 1, d), v_cache' (B, g, m + 1, d))``, the new
    token last; query head ``i`` reads key/value head ``i // (h/g)``. The new token sees every cached key and
    itself, so no mask is needed.
    """
    k_all = torch.cat([k_cache, k_new], dim=2)  # (B, g, m + 1, d): the new token at the end
    v_all = torch.cat([v_cache, v_new], dim=2)
    B, h, _, d = q.shape
    g = k_all.shape[1]
    qg = q.reshape(B, g, h // g, d)  # the r query heads of a group as r rows of one head
    w = torch.softmax(qg @ k_all.transpose(-2, -1) / math.sqrt(d), dim=-1)  # (B, g, r, m + 1)
    out = (w @ v_all).reshape(B, h, 1, d)
    return out, k_all, v_all


def _decode_cases(g: torch.Generator) -> list[Case]:
    def step(b: int, h: int, kv: int, m: int, d: int) -> tuple[Tensor, ...]:
        return (torch.randn(b, h, 1, d, generator=g), torch.randn(b, kv, 1, d, generator=g),
                torch.randn(b, kv, 1, d, generator=g), torch.randn(b, kv, m, d, generator=g),
                torch.randn(b, kv, m, d, generator=g))

    return [
        Case(step(2, 4, 2, 5, 8), label="GQA, 5 cached tokens: q (2, 4, 1, 8), caches (2, 2, 5, 8)"),
        Case(step(1, 6, 3, 9, 4), label="GQA, 9 cached tokens: q (1, 6, 1, 4), caches (1, 3, 9, 4)"),
        Case(step(1, 4, 4, 3, 16), label="MHA, 3 cached tokens: q (1, 4, 1, 16), caches (1, 4, 3, 16)"),
        Case(step(2, 4, 1, 0, 8), label="MQA, the first token (empty cache): q (2, 4, 1, 8), caches (2, 1, 0, 8)"),
    ]


def _step(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, *, attend: str = "all",
          prepend: bool = False, scale: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    k_all = torch.cat([k_new, k_cache] if prepend else [k_cache, k_new], 2)
    v_all = torch.cat([v_new, v_cache] if prepend else [v_cache, v_new], 2)
    k_read, v_read = {"all": (k_all, v_all), "old": (k_cache, v_cache), "new": (k_new, v_new)}[attend]
    r = q.shape[1] // k_all.shape[1]
    k_read, v_read = k_read.repeat_interleave(r, 1), v_read.repeat_interleave(r, 1)
    s = q @ k_read.transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    return torch.softmax(s, -1) @ v_read, k_all, v_all


DECODE_STEP = Exercise(
    name="decode_step",
    chapter=27,
    title="One cached decoding step",
    solution=decode_step,
    cases=_decode_cases,
    hint="Append first (`torch.cat` along the sequence dimension, 2), then attend over everything stored.",
    mistakes=(
        Mistake("attend_before_append", "the query attends over the old cache only, before its own key and value "
                "are appended: the new token must see itself (key j <= t), so append first, then attend over "
                "the m + 1 stored tokens (on an empty cache your step returns zeros).",
                lambda *a: _step(*a, attend="old")),
        Mistake("cache_ignored", "the query attends only to the new token's own key and value: the cache is "
                "there to be read. Attend over the cached keys and the new one together.",
                lambda *a: _step(*a, attend="new")),
        Mistake("prepended", "the output is right but the new key and value are stored *before* the cached ones: "
                "the cache must keep the tokens in order, newest last (`torch.cat([k_cache, k_new], dim=2)`), "
                "or later steps with positions or a causal mask read the wrong tokens.",
                lambda *a: _step(*a, prepend=True)),
        Mistake("no_scale", "the scores are not divided by √d: the cached step must compute exactly what the full "
                "pass computes, `q kᵀ / √d`.", lambda *a: _step(*a, scale=False)),
    ),
)

check_grouped_query_attention = GROUPED_QUERY_ATTENTION.checker()
check_mistral_cache_bytes = MISTRAL_CACHE_BYTES.checker()
check_decode_step = DECODE_STEP.checker()

EXERCISES = (GROUPED_QUERY_ATTENTION, MISTRAL_CACHE_BYTES, DECODE_STEP)
