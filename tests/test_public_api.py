"""Bad and edge input through every public entry point of ``attn`` (``attn.__all__``).

``tests/test_inputs.py`` tries one table of bad inputs on every *registered* token mixer
(``build(32, 4)``). This file extends that to every public name, whatever its signature:
one table per name in ``attn.__all__`` (a module such as :mod:`attn.masks` counts through
its public functions). A table says how to construct the entry point, then lists calls:

* ``good``: must succeed (and pass its check): the checks refuse nothing valid;
* ``bad``: must raise the given ``TypeError``/``ValueError`` (or another named exception
  where that is the right one, e.g. ``KeyError`` for an unknown registry name) whose
  message matches a regex naming the argument or what was expected;
* ``edge``: a clear ``TypeError``/``ValueError`` matching the regex, *or* a correct output
  (the check passes): an empty batch, for instance, may be returned or refused.

:func:`test_every_public_name_has_a_table` fails when a name is exported without a table,
so a new public class or function comes with its bad-input rows.

Sizes are tiny (width 8, 2 heads, 5 tokens): the whole file runs in seconds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import attn
from attn import masks
from attn.experiments.distillation import RecallTransformer
from attn.tasks import AssociativeRecall

E, H, N = 8, 2, 5  # width, heads, tokens
CLEAR = (TypeError, ValueError)
F64, BF16, LONG = torch.float64, torch.bfloat16, torch.long


@dataclass(frozen=True)
class Call:
    """One call ``run(obj)`` on the constructed entry point, and what must come of it."""

    case: str
    run: Callable[[Any], Any]
    kind: str  # "good", "bad" or "edge"
    error: type[BaseException] | tuple[type[BaseException], ...] | None = None
    match: str = ""
    check: Callable[[Any], bool] | None = None


def good(case: str, run: Callable[[Any], Any], check: Callable[[Any], bool] | None = None) -> Call:
    return Call(case, run, "good", check=check)


def bad(case: str, run: Callable[[Any], Any], error: Any, match: str) -> Call:
    return Call(case, run, "bad", error, match)




def edge(case: str, run: Callable[[Any], Any], check: Callable[[Any], bool], match: str = "") -> Call:
    return Call(case, run, "edge", CLEAR, match, check)


# ----------------------------------------------------------------------------- inputs


def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


def ints(*shape: int, high: int = 5) -> torch.Tensor:
    return torch.randint(0, high, shape)


def x(b: int = 2, n: int = N, e: int = E, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, n, e, dtype=dtype)


def km(*lengths: int, n: int = N) -> torch.Tensor:
    return masks.padding_mask(list(lengths), n)


def first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def shaped(*shape: int, dtype: torch.dtype | None = None) -> Callable[[Any], bool]:
    """The (first) output has this shape (and dtype), and is finite."""

    def check(out: Any) -> bool:
        t = first(out)
        return tuple(t.shape) == shape and (dtype is None or t.dtype == dtype) and bool(torch.isfinite(t.float()).all())

    return check


def finite(out: Any) -> bool:
    return bool(torch.isfinite(first(out).float()).all())


def mixer_rows(width: int = E, empty_ok: bool = True, mask: bool = True) -> list[Call]:
    """The rows every ``(B, n, E) -> (B, n, E)`` token mixer shares (as in tests/test_inputs.py)."""
    w = width
    rows = [
        good("good (2, 5, E)", lambda m: m(x(e=w)), shaped(2, N, w)),
        good("batch 1, one token", lambda m: m(x(1, 1, w)), lambda o: first(o).shape[:2] == (1, 1)),
        bad("python list", lambda m: m(x(e=w).tolist()), TypeError, r"torch\.Tensor.*got list"),
        bad("integer tensor", lambda m: m(ints(2, N, w)), TypeError, r"floating-point.*torch\.int64"),
        bad("2-D (no batch)", lambda m: m(rand(N, w)), ValueError, r"shape \(batch, seq, .*got 2-D"),
        bad("wrong width", lambda m: m(x(e=w + 1)), ValueError, rf"embed_dim={w}\)?.*{w + 1}"),
        bad("empty sequence", lambda m: m(x(2, 0, w)), ValueError, r"empty sequence"),
    ]
    if empty_ok:
        rows.append(edge("empty batch", lambda m: m(x(0, N, w)), lambda o: first(o).shape[0] == 0))
    if mask:
        rows += [
            good("key_mask", lambda m: m(x(e=w), key_mask=km(5, 3)), lambda o: first(o).shape[:2] == (2, N)),
            bad("key_mask as list", lambda m: m(x(e=w), key_mask=km(5, 3).tolist()), TypeError, r"key_mask.*torch\.bool"),
            bad("key_mask 0/1 ints", lambda m: m(x(e=w), key_mask=km(5, 3).long()), TypeError, r"key_mask.*torch\.bool"),
            bad("key_mask wrong length", lambda m: m(x(e=w), key_mask=km(5, 3, n=N + 1)), ValueError, r"key_mask.*shape"),
        ]
    return rows


# ----------------------------------------------------------------------------- tables

TABLES: dict[str, tuple[Callable[[], Any], list[Call]]] = {}


def table(name: str, make: Callable[[], Any], *rows: Call) -> None:
    assert name not in TABLES, name
    TABLES[name] = (make, list(rows))


def _q(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return rand(*shape, dtype=dtype)


# --- attn.core ---------------------------------------------------------------

table(
    "AttentionOutput", lambda: attn.AttentionOutput,
    good("two fields", lambda c: c(torch.zeros(1), None), lambda o: o.weights is None and o.output.shape == (1,)),
    bad("missing weights", lambda c: c(torch.zeros(1)), TypeError, r"weights"),
)

table(
    "masked_softmax", lambda: attn.masked_softmax,
    good("bool mask", lambda f: f(rand(2, 3), torch.tensor([True, False, True])), shaped(2, 3)),
    good("no mask", lambda f: f(rand(2, 3), None), shaped(2, 3)),
    good("fully masked row -> zeros", lambda f: f(rand(1, 3), torch.zeros(1, 3, dtype=torch.bool)), lambda o: bool((o == 0).all())),
    bad("int 0/1 mask", lambda f: f(rand(2, 3), torch.ones(2, 3, dtype=LONG)), TypeError, r"mask must be a torch\.bool"),
    bad("float mask", lambda f: f(rand(2, 3), torch.ones(2, 3)), TypeError, r"mask must be a torch\.bool"),
    bad("list mask", lambda f: f(rand(2, 3), [[True] * 3] * 2), TypeError, r"mask must be a torch\.bool.*list"),
    bad("integer scores", lambda f: f(torch.ones(2, 3, dtype=LONG), torch.ones(2, 3, dtype=torch.bool)), TypeError, r"scores must be a floating-point"),
    bad("integer scores, no mask", lambda f: f(torch.ones(2, 3, dtype=LONG), None), TypeError, r"scores must be a floating-point"),
    bad("list scores", lambda f: f([[1.0, 2.0]], None), TypeError, r"scores must be a torch\.Tensor"),
    bad("non-broadcastable mask", lambda f: f(rand(2, 3), torch.ones(4, dtype=torch.bool)), ValueError, r"mask of shape \(4,\).*scores of shape \(2, 3\)"),
    bad("mask larger than scores", lambda f: f(rand(3), torch.ones(2, 3, dtype=torch.bool)), ValueError, r"mask of shape \(2, 3\).*\(3,\)"),
    bad("dim out of range", lambda f: f(rand(2, 3), None, dim=5), ValueError, r"dim must be in"),
)

table(
    "scaled_dot_product_attention", lambda: attn.scaled_dot_product_attention,
    good("3-D", lambda f: f(_q(2, 3, 4), _q(2, 5, 4), _q(2, 5, 6)), shaped(2, 3, 6)),
    good("4-D with weights", lambda f: f(_q(2, 2, 3, 4), _q(2, 2, 5, 4), _q(2, 2, 5, 4), need_weights=True), shaped(2, 2, 3, 4)),
    good("float64 additive mask with float64 q", lambda f: f(_q(1, 3, 4, dtype=F64), _q(1, 5, 4, dtype=F64), _q(1, 5, 4, dtype=F64),
                                                           attn_mask=torch.zeros(3, 5, dtype=F64)), shaped(1, 3, 4, dtype=F64)),
    bad("int queries", lambda f: f(ints(2, 3, 4), _q(2, 5, 4), _q(2, 5, 4)), TypeError, r"query must be a floating-point"),
    bad("int keys", lambda f: f(_q(2, 3, 4), ints(2, 5, 4), _q(2, 5, 4)), TypeError, r"key must be a floating-point"),
    bad("list query", lambda f: f(_q(2, 3, 4).tolist(), _q(2, 5, 4), _q(2, 5, 4)), TypeError, r"query must be a torch\.Tensor"),
    bad("float64 key", lambda f: f(_q(2, 3, 4), _q(2, 5, 4, dtype=F64), _q(2, 5, 4)), TypeError, r"dtypes must match.*key: torch\.float64"),
    bad("bf16 value", lambda f: f(_q(2, 3, 4), _q(2, 5, 4), _q(2, 5, 4, dtype=BF16)), TypeError, r"dtypes must match.*value: torch\.bfloat16"),
    bad("float64 additive mask, float32 q", lambda f: f(_q(2, 3, 4), _q(2, 5, 4), _q(2, 5, 4), attn_mask=torch.zeros(3, 5, dtype=F64)),
        TypeError, r"dtypes must match.*attn_mask: torch\.float64"),
    bad("int attn_mask", lambda f: f(_q(2, 3, 4), _q(2, 5, 4), _q(2, 5, 4), attn_mask=torch.ones(3, 5, dtype=LONG)), TypeError, r"attn_mask must be torch\.bool"),
    bad("attn_mask wrong shape", lambda f: f(_q(2, 3, 4), _q(2, 5, 4), _q(2, 5, 4), attn_mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, r"attn_mask of shape \(3, 4\)"),
    bad("key_mask wrong shape", lambda f: f(_q(2, 3, 4), _q(2, 5, 4), _q(2, 5, 4), key_mask=km(4, 3, n=4)), ValueError, r"key_mask must have shape"),
    bad("d_k differs", lambda f: f(_q(2, 3, 4), _q(2, 5, 3), _q(2, 5, 4)), ValueError, r"share d_k"),
    bad("2-D query", lambda f: f(_q(3, 4), _q(5, 4), _q(5, 4)), ValueError, r"query must have shape"),
    bad("empty keys", lambda f: f(_q(2, 3, 4), _q(2, 0, 4), _q(2, 0, 4)), ValueError, r"empty sequence"),
    bad("dropout_p 1", lambda f: f(_q(2, 3, 4), _q(2, 5, 4), _q(2, 5, 4), dropout_p=1.0), ValueError, r"dropout_p"),
    bad("scale nan", lambda f: f(_q(2, 3, 4), _q(2, 5, 4), _q(2, 5, 4), scale=math.nan), ValueError, r"scale must be a finite"),
    bad("scale 1e40 (temperature 1e-40)", lambda f: f(_q(2, 3, 4), _q(2, 5, 4), _q(2, 5, 4), scale=1e40), ValueError, r"scale must be a finite"),
)

# --- attn.masks: every public function, through the module ----------------------

table(
    "masks", lambda: masks,
    good("causal_mask", lambda m: m.causal_mask(3, 4), lambda o: o.shape == (3, 4) and o.dtype == torch.bool),
    good("padding_mask", lambda m: m.padding_mask([3, 1], 4), lambda o: o.sum().item() == 4),
    good("padding_mask([]) is empty", lambda m: m.padding_mask([]), lambda o: o.shape == (0, 0) and o.dtype == torch.bool),
    good("band_mask", lambda m: m.band_mask(4, 1), lambda o: o.sum().item() == 10),
    good("block_mask", lambda m: m.block_mask(4, 2), lambda o: o.sum().item() == 8),
    good("key_mask_to_attn_mask", lambda m: m.key_mask_to_attn_mask(km(5, 3)), lambda o: o.shape == (2, 1, 1, N)),
    good("combine_masks", lambda m: m.combine_masks(m.causal_mask(3), None, m.band_mask(3, 1)), lambda o: o.sum().item() == 5),
    good("mha_convention bool", lambda m: m.mha_convention(m.causal_mask(2)), lambda o: o.tolist() == [[False, True], [False, False]]),
    good("mha_convention float passes", lambda m: m.mha_convention(torch.zeros(2, 2)), lambda o: o.dtype == torch.float32),
    good("to_additive float64", lambda m: m.to_additive(m.causal_mask(2), F64), lambda o: o.dtype == F64 and o[0, 1] == -math.inf),
    good("check_mask", lambda m: m.check_mask(m.causal_mask(3), (2, 3, 3)), lambda o: o is None),
    good("check_key_mask", lambda m: m.check_key_mask(km(5, 3), 2, N), lambda o: o is None),
    bad("causal_mask(-1)", lambda m: m.causal_mask(-1), ValueError, r"n_queries must be >= 0"),
    bad("causal_mask(2.5)", lambda m: m.causal_mask(2.5), TypeError, r"n_queries must be an int"),
    bad("padding_mask([-1, 2])", lambda m: m.padding_mask([-1, 2]), ValueError, r"lengths must be >= 0"),
    bad("padding_mask floats", lambda m: m.padding_mask([1.5, 2.0]), TypeError, r"lengths must hold integers"),
    bad("padding_mask 2-D", lambda m: m.padding_mask([[1, 2]]), ValueError, r"lengths must be 1-D"),
    bad("padding_mask longer than max_len", lambda m: m.padding_mask([5], 3), ValueError, r"lengths must be <= max_len=3"),
    bad("band_mask window -1", lambda m: m.band_mask(4, -1), ValueError, r"window must be >= 0"),
    bad("block_mask block 0", lambda m: m.block_mask(4, 0), ValueError, r"block must be"),
    bad("key_mask_to_attn_mask([[True]])", lambda m: m.key_mask_to_attn_mask([[True]]), TypeError, r"key_mask must be a torch\.bool.*list"),
    bad("key_mask_to_attn_mask ints", lambda m: m.key_mask_to_attn_mask(km(5, 3).long()), TypeError, r"key_mask must be (a )?torch\.bool.*int64"),
    bad("key_mask_to_attn_mask 3-D", lambda m: m.key_mask_to_attn_mask(torch.ones(1, 2, 3, dtype=torch.bool)), ValueError, r"key_mask must have shape"),
    bad("combine_masks([[True]])", lambda m: m.combine_masks(m.causal_mask(1), [[True]]), TypeError, r"mask 1 must be a torch\.bool.*list"),
    bad("combine_masks float", lambda m: m.combine_masks(torch.zeros(2, 2)), TypeError, r"combine_masks.*bool"),
    bad("combine_masks shapes", lambda m: m.combine_masks(m.causal_mask(2), m.causal_mask(3)), ValueError, r"does not broadcast"),
    bad("mha_convention([[True]])", lambda m: m.mha_convention([[True]]), TypeError, r"mask must be a torch\.bool.*list"),
    bad("mha_convention HF int mask", lambda m: m.mha_convention(torch.ones(2, 2, dtype=LONG)), TypeError, r"mask\.bool\(\)"),
    bad("to_additive([[True]])", lambda m: m.to_additive([[True]]), TypeError, r"mask must be a torch\.bool.*list"),
    bad("to_additive(m, torch.long)", lambda m: m.to_additive(m.causal_mask(2), LONG), TypeError, r"dtype must be a floating-point"),
    bad("check_mask list", lambda m: m.check_mask([[True]], (1, 1, 1)), TypeError, r"attn_mask must be a torch\.Tensor"),
    bad("check_mask shape", lambda m: m.check_mask(m.causal_mask(3), (2, 4, 4)), ValueError, r"does not broadcast"),
    bad("check_key_mask ints", lambda m: m.check_key_mask(km(5, 3).int(), 2, N), TypeError, r"key_mask must be a torch\.bool"),
)

# --- layers on (B, n, E) -----------------------------------------------------------

table(
    "MultiHeadAttention", lambda: attn.MultiHeadAttention(E, H).eval(),
    *mixer_rows(),
    good("cross-attention", lambda m: m(x(), x(n=7)), shaped(2, N, E)),
    bad("int queries", lambda m: m(ints(2, N, E)), TypeError, r"query must be a floating-point"),
    bad("float64 key", lambda m: m(x(), x(dtype=F64), x()), TypeError, r"dtypes must match.*key: torch\.float64"),
    bad("temperature 1e-40", lambda m: m(x(), temperature=1e-40), ValueError, r"temperature must be >= 1e-30"),
    bad("temperature 0", lambda m: m(x(), temperature=0), ValueError, r"temperature must be > 0"),
    bad("temperature nan", lambda m: m(x(), temperature=math.nan), ValueError, r"temperature must be finite"),
    bad("attn_mask wrong shape", lambda m: m(x(), attn_mask=torch.ones(N, N + 1, dtype=torch.bool)), ValueError, r"attn_mask"),
    bad("embed_dim not divisible", lambda m: attn.MultiHeadAttention(7, 2), ValueError, r"divisible by num_heads"),
    bad("embed_dim float", lambda m: attn.MultiHeadAttention(8.0, 2), TypeError, r"embed_dim must be an int"),
)

table(
    "Attention", lambda: attn.Attention(E, H, num_kv_heads=1, position="rope", causal=True).eval(),
    *mixer_rows(),
    good("cached decoding", lambda m: m(x(), cache=m.new_cache(2, N)), shaped(2, N, E)),
    good("is_causal=False over the layer's causal=True", lambda m: m(x(), is_causal=False), shaped(2, N, E)),
    bad("is_causal 1", lambda m: m(x(), is_causal=1), TypeError, r"is_causal must be a bool"),
    bad("cache full", lambda m: m(x(), cache=m.new_cache(2, N - 1)), ValueError, r"KV cache is full"),
    bad("unknown kernel", lambda m: attn.Attention(E, H, kernel="nope"), KeyError, r"unknown attention kernel 'nope'"),
    bad("num_kv_heads 3 of 2", lambda m: attn.Attention(E, 2, num_kv_heads=3), ValueError, r"must divide num_heads"),
    bad("position 'learned'", lambda m: attn.Attention(E, H, position="learned"), ValueError, r"position must be"),
    bad("dropout 1", lambda m: attn.Attention(E, H, dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
)
table(
    "SequenceMixer", lambda: attn.SequenceMixer,
    good("Attention is one", lambda p: isinstance(attn.Attention(E, H), p), lambda o: o is True),
    edge("isinstance sees only __call__: any callable passes", lambda p: isinstance(len, p), lambda o: o is True),
)
table(
    "KERNELS", lambda: attn.KERNELS,
    good("sdpa", lambda k: k["sdpa"], lambda o: o.name == "sdpa"),
    bad("unknown name", lambda k: k["nope"], KeyError, r"nope"),
)
table(
    "get_kernel", lambda: attn.get_kernel,
    good("sdpa", lambda f: f("sdpa"), lambda o: o.name == "sdpa" and not o.grouped),
    bad("unknown", lambda f: f("nope"), KeyError, r"unknown attention kernel 'nope'; registered: .*sdpa"),
)
table(
    "register_kernel", lambda: attn.register_kernel,
    good("a new name (removed again)",
         lambda f: (f("test-only-kernel", summary="x")(attn.attention.sdpa_kernel), attn.KERNELS.pop("test-only-kernel")),
         lambda o: o[0] is attn.attention.sdpa_kernel and o[1].name == "test-only-kernel"),
    bad("a taken name", lambda f: f("sdpa")(lambda *a, **k: None), ValueError, r"kernel 'sdpa' is already registered"),
)

table(
    "SelfAttention", lambda: attn.SelfAttention(E).eval(),
    *mixer_rows(),
    good("causal with weights", lambda m: m(x(), is_causal=True, need_weights=True), lambda o: o.weights.shape == (2, 1, N, N)),
    bad("int queries", lambda m: m(ints(2, N, E)), TypeError, r"x must be a floating-point"),
    bad("temperature 1e-40", lambda m: m(x(), temperature=1e-40), ValueError, r"temperature must be >= 1e-30"),
    bad("temperature -1", lambda m: m(x(), temperature=-1.0), ValueError, r"temperature must be > 0"),
    bad("d_model 0", lambda m: attn.SelfAttention(0), ValueError, r"d_model must be"),
)

table(
    "CrossAttention", lambda: attn.CrossAttention(E, H).eval(),
    good("query and memory", lambda m: m(x(), x(n=7)), shaped(2, N, E)),
    good("encode_memory then attend", lambda m: m(x(), cache=m.encode_memory(x(n=7))), shaped(2, N, E)),
    bad("python list query", lambda m: m(x().tolist(), x(n=7)), TypeError, r"query|torch\.Tensor"),
    bad("encode_memory list names key", lambda m: m.encode_memory(x(n=7).tolist()), CLEAR, r"^key must be a torch\.Tensor"),
    bad("memory wrong width names key", lambda m: m(x(), x(n=7, e=E + 1)), CLEAR, r"^key must have shape"),
    bad("memory 2-D names key", lambda m: m(x(), rand(7, E)), CLEAR, r"^key must have shape"),
    bad("memory float64", lambda m: m(x(), x(n=7, dtype=F64)), CLEAR, r"key|dtype"),
    bad("key_mask ints", lambda m: m(x(), x(n=7), key_mask=km(7, 3, n=7).long()), TypeError, r"^key_mask must be a torch\.bool"),
    bad("temperature 1e-40", lambda m: m(x(), x(n=7), temperature=1e-40), ValueError, r"temperature"),
)

table(
    "LatentCrossAttention", lambda: attn.LatentCrossAttention(E, H, num_latents=3).eval(),
    good("good", lambda m: m(x()), lambda o: first(o).shape[0] == 2 and finite(o)),
    good("key_mask", lambda m: m(x(), key_mask=km(5, 3)), lambda o: first(o).shape[0] == 2),
    bad("python list", lambda m: m(x().tolist()), TypeError, r"torch\.Tensor"),
    bad("integer tensor", lambda m: m(ints(2, N, E)), TypeError, r"floating-point"),
    bad("wrong width", lambda m: m(x(e=E + 1)), ValueError, r"embed_dim"),
    bad("key_mask wrong shape names key_mask", lambda m: m(x(), key_mask=km(5, 3, n=N + 1)), CLEAR, r"\bkey_mask"),
    bad("key_mask ints names key_mask", lambda m: m(x(), key_mask=km(5, 3).long()), CLEAR, r"\bkey_mask"),
)

def _same_globals(layer: attn.GlobalTokenAttention) -> bool:
    """A boolean ``global_idx`` mask (documented) selects the same tokens as their positions."""
    inp = x()
    by_mask = layer(inp, global_idx=torch.tensor([True, False, True, False, False]))[0]
    return bool(torch.equal(by_mask, layer(inp, global_idx=torch.tensor([0, 2]))[0]))


table(
    "GlobalTokenAttention", lambda: attn.GlobalTokenAttention(E, H, window=1, global_idx=(0,)).eval(),
    *mixer_rows(),
    good("global_idx list", lambda m: m(x(), global_idx=[0, 2]), shaped(2, N, E)),
    good("global_idx long tensor", lambda m: m(x(), global_idx=torch.tensor([0, 2])), shaped(2, N, E)),
    good("global_idx bool mask = its positions", lambda m: _same_globals(m), lambda same: same is True),
    bad("global_idx bool mask of the wrong length", lambda m: m(x(), global_idx=torch.tensor([True, False])), CLEAR, r"global_idx"),
    bad("global_idx floats", lambda m: m(x(), global_idx=torch.tensor([0.0, 2.0])), CLEAR, r"global_idx"),
    bad("global_idx out of range", lambda m: m(x(), global_idx=[0, 9]), CLEAR, r"global_idx"),
    bad("window 0", lambda m: attn.GlobalTokenAttention(E, H, window=-1), CLEAR, r"window"),
)

table(
    "LuongGlobalAttention", lambda: attn.LuongGlobalAttention(E, 6).eval(),
    good("one step", lambda m: m(rand(2, E), x(e=6)), shaped(2, E)),
    good("all steps", lambda m: m(rand(2, 3, E), x(e=6)), shaped(2, 3, E)),
    bad("python list query", lambda m: m(rand(2, E).tolist(), x(e=6)), CLEAR, r"query"),
    bad("int query", lambda m: m(ints(2, E), x(e=6)), CLEAR, r"query"),
    bad("memory wrong width names memory", lambda m: m(rand(2, E), x(e=7)), CLEAR, r"memory"),
    bad("memory list names memory", lambda m: m(rand(2, E), x(e=6).tolist()), CLEAR, r"memory"),
    bad("memory float64", lambda m: m(rand(2, E), x(e=6, dtype=F64)), CLEAR, r"memory|dtype"),
    bad("unknown score", lambda m: attn.LuongGlobalAttention(E, 6, score="cosine"), ValueError, r"score"),
)

SEQ_VOCAB = 11


def _seq_rows() -> list[Call]:
    src, tgt = ints(2, 4, high=SEQ_VOCAB), ints(2, 3, high=SEQ_VOCAB)
    return [
        good("teacher forcing", lambda m: m(src, tgt), lambda o: o[0].shape == (2, 3, SEQ_VOCAB)),
        good("key_mask", lambda m: m(src, tgt, key_mask=km(4, 2, n=4)), lambda o: o[0].shape == (2, 3, SEQ_VOCAB)),
        bad("src ids out of range", lambda m: m(src + SEQ_VOCAB, tgt), CLEAR, r"src"),
        bad("src ids negative", lambda m: m(src - SEQ_VOCAB, tgt), CLEAR, r"src"),
        bad("src float", lambda m: m(src.float(), tgt), CLEAR, r"src"),
        bad("tgt_in ids out of range", lambda m: m(src, tgt + SEQ_VOCAB), CLEAR, r"tgt"),
        bad("tgt_in float", lambda m: m(src, tgt.float()), CLEAR, r"tgt"),
        bad("src list", lambda m: m(src.tolist(), tgt), CLEAR, r"src"),
        bad("empty source", lambda m: m(src[:, :0], tgt), CLEAR, r"src|empty"),
        bad("empty target", lambda m: m(src, tgt[:, :0]), CLEAR, r"tgt|empty"),
        bad("batch sizes differ", lambda m: m(src, tgt[:1]), ValueError, r"batch|\(2, 4\) and \(1, 3\)"),
    ]


table("LuongSeq2Seq", lambda: attn.LuongSeq2Seq(SEQ_VOCAB, embed=4, hidden=4).eval(), *_seq_rows())
table("Seq2SeqAttention", lambda: attn.Seq2SeqAttention(SEQ_VOCAB, embed=4, hidden=4).eval(), *_seq_rows())

table(
    "LocalAttention", lambda: attn.LocalAttention(E, H, window=2).eval(),
    *mixer_rows(),
    good("window larger than n", lambda m: attn.LocalAttention(E, H, window=64).eval()(x()), shaped(2, N, E)),
    bad("window -1", lambda m: attn.LocalAttention(E, H, window=-1), ValueError, r"window"),
)

table(
    "LocalPAttention", lambda: attn.LocalPAttention(E, 6, half_window=1).eval(),
    good("one step", lambda m: m(rand(2, E), x(e=6)), lambda o: first(o).shape == (2, 6)),
    good("all steps", lambda m: m(rand(2, 3, E), x(e=6)), lambda o: first(o).shape == (2, 3, 6)),
    bad("query list", lambda m: m(rand(2, E).tolist(), x(e=6)), TypeError, r"query"),
    bad("int query", lambda m: m(ints(2, E), x(e=6)), TypeError, r"query"),
    bad("keys wrong width", lambda m: m(rand(2, E), x(e=7)), ValueError, r"keys"),
    bad("keys float64", lambda m: m(rand(2, E), x(e=6, dtype=F64)), CLEAR, r"keys|dtype"),
    bad("key_mask ints", lambda m: m(rand(2, E), x(e=6), key_mask=km(5, 3).long()), TypeError, r"key_mask"),
    bad("half_window -1", lambda m: attn.LocalPAttention(E, 6, half_window=-1), ValueError, r"half_window"),
)


def _qkv4(b: int = 2, n: int = 6, d: int = 4, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(b, H, n, d, dtype=dtype) for _ in range(3))


table(
    "local_attention", lambda: attn.local_attention,
    good("window 2", lambda f: f(*_qkv4(), window=2), shaped(2, H, 6, 4)),
    good("3-D", lambda f: f(_q(2, 6, 4), _q(2, 6, 4), _q(2, 6, 4), window=1), shaped(2, 6, 4)),
    edge("batch 0", lambda f: f(*_qkv4(b=0), window=2), lambda o: first(o).shape == (0, H, 6, 4), r"batch|empty"),
    bad("list q", lambda f: f(_q(2, 6, 4).tolist(), _q(2, 6, 4), _q(2, 6, 4), window=1), TypeError, r"q|query"),
    bad("int q", lambda f: f(ints(2, 6, 4), _q(2, 6, 4), _q(2, 6, 4), window=1), TypeError, r"q|query"),
    bad("mixed dtypes", lambda f: f(_q(2, 6, 4), _q(2, 6, 4, dtype=F64), _q(2, 6, 4), window=1), TypeError, r"dtype"),
    bad("window -1", lambda f: f(*_qkv4(), window=-1), ValueError, r"window"),
    bad("window float", lambda f: f(*_qkv4(), window=1.5), TypeError, r"window"),
    bad("keys of another length", lambda f: f(_q(2, 6, 4), _q(2, 7, 4), _q(2, 7, 4), window=1), ValueError, r"same|length|n"),
)

table(
    "BidirectionalSelfAttention", lambda: attn.BidirectionalSelfAttention(E, H).eval(),
    *mixer_rows(),
    good("prefix-LM", lambda m: m(x(), pattern="prefix_lm", prefix_len=2), shaped(2, N, E)),
    bad("unknown pattern", lambda m: m(x(), pattern="sideways"), ValueError, r"pattern"),
    bad("prefix_len -1", lambda m: m(x(), pattern="prefix_lm", prefix_len=-1), ValueError, r"prefix_len"),
    bad("temperature 1e-40", lambda m: m(x(), temperature=1e-40), ValueError, r"temperature"),
)

table(
    "SparseAttention", lambda: attn.SparseAttention(E, H, stride=2).eval(),
    *mixer_rows(),
    good("stride larger than n", lambda m: attn.SparseAttention(E, H, stride=512).eval()(x()), shaped(2, N, E)),
    bad("unknown pattern", lambda m: attn.SparseAttention(E, H, pattern="zigzag"), ValueError, r"pattern"),
    bad("stride 0", lambda m: attn.SparseAttention(E, H, stride=0), ValueError, r"stride"),
)

for _name, _make in (
    ("TopKAttention", lambda: attn.TopKAttention(E, H, topk=2).eval()),
    ("EntmaxAttention", lambda: attn.EntmaxAttention(E, H).eval()),
    ("SparsemaxAttention", lambda: attn.SparsemaxAttention(E, H).eval()),
):
    table(
        _name, _make,
        *mixer_rows(),
        good("weights sum to one", lambda m: m(x(), need_weights=True), lambda o: torch.allclose(o.weights.sum(-1), torch.ones(2, H, N), atol=1e-5)),
        bad("int queries", lambda m: m(ints(2, N, E)), TypeError, r"query must be a floating-point"),
        bad("float64 key", lambda m: m(x(), x(dtype=F64), x()), TypeError, r"dtypes must match"),
        bad("temperature 1e-40", lambda m: m(x(), temperature=1e-40), ValueError, r"temperature"),
    )
TABLES["TopKAttention"][1].append(bad("topk 0", lambda m: attn.TopKAttention(E, H, topk=0), ValueError, r"topk"))
TABLES["EntmaxAttention"][1].append(bad("alpha 1", lambda m: attn.EntmaxAttention(E, H, alpha=0.5), ValueError, r"alpha"))


def _pair_rows(widths: tuple[int, int], second: str, mask2: str) -> list[Call]:
    """Rows for (B, T, d_q) x (B, N, d_v) pairs: soft/additive/co-attention."""
    dq, dv = widths
    return [
        bad("question list", lambda m: m(x(e=dq).tolist(), x(n=6, e=dv)), TypeError, r"question"),
        bad(f"{second} int", lambda m: m(x(e=dq), ints(2, 6, dv)), TypeError, second),
        bad(f"{second} wrong width", lambda m: m(x(e=dq), x(n=6, e=dv + 1)), ValueError, second),
        bad(f"{second} float64", lambda m: m(x(e=dq), x(n=6, e=dv, dtype=F64)), CLEAR, rf"{second}|dtype"),
        bad("question float64", lambda m: m(x(e=dq, dtype=F64), x(n=6, e=dv)), CLEAR, r"question|dtype"),
        bad("batch sizes differ", lambda m: m(x(e=dq), x(1, 6, dv)), ValueError, r"batch"),
        bad(f"{mask2} ints", lambda m: m(x(e=dq), x(n=6, e=dv), **{mask2: km(6, 3, n=6).long()}), TypeError, mask2),
    ]


table(
    "ParallelCoAttention", lambda: attn.ParallelCoAttention(E, 6, hidden=4).eval(),
    good("good", lambda m: m(x(), x(n=6, e=6)), lambda o: all(torch.isfinite(t).all() for t in o if isinstance(t, torch.Tensor))),
    *_pair_rows((E, 6), "passage", "passage_mask"),
)
table(
    "AlternatingCoAttention", lambda: attn.AlternatingCoAttention(E, 6, hidden=4).eval(),
    good("good", lambda m: m(x(), x(n=6, e=6)), lambda o: all(torch.isfinite(t).all() for t in o if isinstance(t, torch.Tensor))),
    *_pair_rows((E, 6), "passage", "passage_mask"),
)
table(
    "DCNCoAttention", lambda: attn.DCNCoAttention(E, E).eval(),
    good("good", lambda m: m(x(), x(n=6)), lambda o: all(torch.isfinite(t).all() for t in o if isinstance(t, torch.Tensor))),
    *_pair_rows((E, E), "passage", "passage_mask"),
)

table(
    "AdditiveAttention", lambda: attn.AdditiveAttention(E, 6, hidden=4).eval(),
    good("one query", lambda m: m(rand(2, E), x(e=6)), shaped(2, 6)),
    good("values of another width", lambda m: m(rand(2, 3, E), x(e=6), x(e=3)), shaped(2, 3, 3)),
    bad("query list", lambda m: m(rand(2, E).tolist(), x(e=6)), CLEAR, r"query"),
    bad("int query", lambda m: m(ints(2, E), x(e=6)), CLEAR, r"query"),
    bad("keys wrong width", lambda m: m(rand(2, E), x(e=7)), ValueError, r"keys"),
    bad("values of another length", lambda m: m(rand(2, E), x(e=6), x(n=N + 1, e=3)), CLEAR, r"values"),
    bad("values 2-D", lambda m: m(rand(2, E), x(e=6), rand(2, 3)), CLEAR, r"values"),
    bad("keys float64", lambda m: m(rand(2, E), x(e=6, dtype=F64)), CLEAR, r"keys|dtype"),
    bad("key_mask ints", lambda m: m(rand(2, E), x(e=6), key_mask=km(5, 3).long()), TypeError, r"key_mask"),
)

table(
    "MultiplicativeAttention", lambda: attn.MultiplicativeAttention(E, 6).eval(),
    good("one query", lambda m: m(rand(2, E), x(e=6)), shaped(2, 6)),
    bad("query list", lambda m: m(rand(2, E).tolist(), x(e=6)), CLEAR, r"query"),
    bad("int query", lambda m: m(ints(2, E), x(e=6)), CLEAR, r"query"),
    bad("keys wrong width", lambda m: m(rand(2, E), x(e=7)), ValueError, r"keys"),
    bad("values of another length", lambda m: m(rand(2, E), x(e=6), x(n=N + 1, e=3)), ValueError, r"values"),
    bad("dot with unequal widths", lambda m: attn.MultiplicativeAttention(E, 6, kind="dot"), ValueError, r"dot"),
)

table(
    "BigBirdAttention", lambda: attn.BigBirdAttention(E, H, block_size=2).eval(),
    *mixer_rows(),
    good("block larger than n", lambda m: attn.BigBirdAttention(E, H, block_size=512).eval()(x()), shaped(2, N, E)),
    bad("block_size 0", lambda m: attn.BigBirdAttention(E, H, block_size=0), ValueError, r"block_size"),
)

table(
    "AxialAttention", lambda: attn.AxialAttention(E, H).eval(),
    good("grid (B, H, W, C)", lambda m: m(rand(2, 3, 4, E)), shaped(2, 3, 4, E)),
    good("flat with grid", lambda m: m(rand(2, 12, E), grid=(3, 4)), shaped(2, 12, E)),
    bad("list", lambda m: m(rand(2, 3, 4, E).tolist()), TypeError, r"torch\.Tensor"),
    bad("int", lambda m: m(ints(2, 3, 4, E)), TypeError, r"floating-point"),
    bad("wrong channels", lambda m: m(rand(2, 3, 4, E + 1)), ValueError, rf"{E}"),
    bad("grid does not multiply to n", lambda m: m(rand(2, 12, E), grid=(5, 4)), ValueError, r"grid"),
    bad("flat without grid", lambda m: m(rand(2, 12, E)), ValueError, r"grid|shape"),
)

table(
    "FourierMixing", lambda: attn.FourierMixing(E).eval(),
    *mixer_rows(),
    good("bf16 in, bf16 out", lambda m: m(x(dtype=BF16)), shaped(2, N, E, dtype=BF16)),
    bad("unknown norm", lambda m: attn.FourierMixing(E, norm="loud"), ValueError, r"norm"),
)

for _name, _cls in (("FrequencyEnhancedBlock", attn.FrequencyEnhancedBlock), ("FrequencyEnhancedAttention", attn.FrequencyEnhancedAttention)):
    table(
        _name, (lambda c: lambda: c(E, H, modes=2).eval())(_cls),
        *mixer_rows(),
        good("bf16 layer, bf16 in", (lambda c: lambda m: c(E, H, modes=2).eval().to(BF16)(x(dtype=BF16)))(_cls), shaped(2, N, E, dtype=BF16)),
        bad("modes 0", (lambda c: lambda m: c(E, H, modes=0))(_cls), ValueError, r"modes"),
        bad("unknown mode_select", (lambda c: lambda m: c(E, H, mode_select="best"))(_cls), ValueError, r"mode_select"),
    )

table(
    "AdaptiveSpanAttention", lambda: attn.AdaptiveSpanAttention(E, H, max_span=4, ramp=2).eval(),
    *mixer_rows(),
    bad("max_span 0", lambda m: attn.AdaptiveSpanAttention(E, H, max_span=0), ValueError, r"max_span"),
    bad("init_span 2", lambda m: attn.AdaptiveSpanAttention(E, H, max_span=4, ramp=2, init_span=2.0), ValueError, r"init_span"),
)

table(
    "SentinelAttention", lambda: attn.SentinelAttention(E).eval(),
    good("good", lambda m: m(x(), rand(2, E), rand(2, E)), lambda o: o.output.shape == (2, E) and o.weights.shape == (2, N + 1)),
    good("float64 layer, float64 inputs", lambda m: m.double()(x(dtype=F64), rand(2, E, dtype=F64), rand(2, E, dtype=F64)), shaped(2, E, dtype=F64)),
    bad("features float64", lambda m: m(x(dtype=F64), rand(2, E), rand(2, E)), TypeError, r"dtypes must match.*features: torch\.float64"),
    bad("sentinel bf16", lambda m: m(x(), rand(2, E), rand(2, E, dtype=BF16)), TypeError, r"dtypes must match.*sentinel: torch\.bfloat16"),
    bad("features list", lambda m: m(x().tolist(), rand(2, E), rand(2, E)), TypeError, r"features must be a torch\.Tensor"),
    bad("h wrong batch", lambda m: m(x(), rand(3, E), rand(2, E)), ValueError, r"h must have shape"),
    bad("sentinel int", lambda m: m(x(), rand(2, E), ints(2, E)), TypeError, r"sentinel must be a floating-point"),
    bad("key_mask ints", lambda m: m(x(), rand(2, E), rand(2, E), key_mask=km(5, 3).long()), TypeError, r"key_mask"),
)

table(
    "TransformerXLAttention", lambda: attn.TransformerXLAttention(E, H, segment=2, mem_len=2).eval(),
    *mixer_rows(mask=False),
    good("attend_segment with memory", lambda m: m.attend_segment(x(n=2), memory=x(n=3)), shaped(2, 2, E)),
    good("segment larger than n", lambda m: attn.TransformerXLAttention(E, H, segment=512, mem_len=2).eval()(x()), shaped(2, N, E)),
    bad("attend_segment float64 memory", lambda m: m.attend_segment(x(n=2), memory=x(n=3, dtype=F64)), CLEAR, r"memory|dtype"),
    bad("attend_segment memory list", lambda m: m.attend_segment(x(n=2), memory=x(n=3).tolist()), TypeError, r"memory"),
    bad("attend_segment memory wrong width", lambda m: m.attend_segment(x(n=2), memory=x(n=3, e=E + 1)), ValueError, r"memory"),
    bad("segment 0", lambda m: attn.TransformerXLAttention(E, H, segment=0), ValueError, r"segment"),
)

table(
    "PersistentMemoryAttention", lambda: attn.PersistentMemoryAttention(E, H, slots=2).eval(),
    *mixer_rows(),
    good("no slots", lambda m: attn.PersistentMemoryAttention(E, H, slots=0).eval()(x()), shaped(2, N, E)),
    bad("slots -1", lambda m: attn.PersistentMemoryAttention(E, H, slots=-1), ValueError, r"slots"),
)


def _bank(dtype: torch.dtype = torch.float32) -> attn.KNNMemory:
    mem = attn.KNNMemory(8)
    mem.add(torch.randn(2, H, 3, E // H, dtype=dtype), torch.randn(2, H, 3, E // H, dtype=dtype), torch.arange(3))
    return mem


table(
    "MemorizingAttention", lambda: attn.MemorizingAttention(E, H, segment=2, top_k=2, capacity=8).eval(),
    *mixer_rows(mask=False),
    good("with a bank", lambda m: m(x(), memory=_bank()), shaped(2, N, E)),
    good("segment larger than n", lambda m: attn.MemorizingAttention(E, H, segment=512, top_k=2, capacity=8).eval()(x()), shaped(2, N, E)),
    bad("float64 bank", lambda m: m(x(), memory=_bank(F64)), CLEAR, r"memory|dtype|bank"),
    bad("memory not a KNNMemory", lambda m: m(x(), memory=x()), TypeError, r"memory"),
    bad("top_k -1", lambda m: attn.MemorizingAttention(E, H, top_k=-1), ValueError, r"top_k"),
)

table(
    "KNNMemory", lambda: attn.KNNMemory(4),
    good("add", lambda m: m.add(torch.randn(2, H, 3, 4), torch.randn(2, H, 3, 4), torch.arange(3)), lambda o: o is None),
    bad("capacity 0", lambda m: attn.KNNMemory(0), ValueError, r"capacity"),
    bad("keys list", lambda m: m.add(torch.randn(2, H, 3, 4).tolist(), torch.randn(2, H, 3, 4), torch.arange(3)), TypeError, r"keys"),
    bad("positions list", lambda m: m.add(torch.randn(2, H, 3, 4), torch.randn(2, H, 3, 4), [0, 1, 2]), CLEAR, r"positions|ids"),
    bad("positions float", lambda m: m.add(torch.randn(2, H, 3, 4), torch.randn(2, H, 3, 4), torch.arange(3.0)), TypeError, r"positions"),
    bad("positions wrong length", lambda m: m.add(torch.randn(2, H, 3, 4), torch.randn(2, H, 3, 4), torch.arange(4)), ValueError, r"positions"),
    bad("values of another length", lambda m: m.add(torch.randn(2, H, 3, 4), torch.randn(2, H, 2, 4), torch.arange(3)), ValueError, r"values"),
    bad("values float64", lambda m: m.add(torch.randn(2, H, 3, 4), torch.randn(2, H, 3, 4, dtype=F64), torch.arange(3)), CLEAR, r"values|dtype"),
)

table(
    "ContextAttention", lambda: attn.ContextAttention(E).eval(),
    good("good", lambda m: m(x()), lambda o: o.output.shape == (2, E) and o.weights.shape == (2, N)),
    good("key_mask", lambda m: m(x(), key_mask=km(5, 3)), lambda o: float(o.weights[1, 3:].detach().abs().sum()) == 0.0),
    bad("list", lambda m: m(x().tolist()), TypeError, r"h"),
    bad("int", lambda m: m(ints(2, N, E)), TypeError, r"h"),
    bad("wrong width", lambda m: m(x(e=E + 1)), ValueError, r"h"),
    bad("key_mask ints", lambda m: m(x(), key_mask=km(5, 3).long()), TypeError, r"key_mask"),
    bad("mask positional", lambda m: m(x(), km(5, 3)), TypeError, r"positional"),
)

table(
    "HierarchicalAttentionNetwork", lambda: attn.HierarchicalAttentionNetwork(12, 3, embed_dim=4, hidden=4).eval(),
    good("good", lambda m: m(torch.randint(1, 12, (2, 3, 4))), lambda o: o.logits.shape == (2, 3)),
    bad("ids float", lambda m: m(torch.randint(1, 12, (2, 3, 4)).float()), TypeError, r"ids"),
    bad("ids out of range", lambda m: m(torch.randint(1, 12, (2, 3, 4)) + 12), ValueError, r"ids"),
    bad("ids negative", lambda m: m(-torch.randint(1, 12, (2, 3, 4))), ValueError, r"ids"),
    bad("ids 2-D", lambda m: m(torch.randint(1, 12, (2, 3))), ValueError, r"ids"),
    bad("word_mask ints", lambda m: m(torch.randint(1, 12, (2, 3, 4)), word_mask=torch.ones(2, 3, 4, dtype=LONG)), TypeError, r"word_mask"),
)

table(
    "NadarayaWatson", lambda: attn.NadarayaWatson(0.5).eval(),
    good("good", lambda m: m(rand(2, 3, 1), rand(2, 6, 1), rand(2, 6, 2)), shaped(2, 3, 2)),
    good("float32 far from the origin", lambda m: m(rand(1, 3, 1) + 1e3, rand(1, 6, 1) + 1e3, rand(1, 6, 1)), finite),
    edge("bandwidth 1e-20", lambda m: attn.NadarayaWatson(1e-20)(rand(2, 3, 1), rand(2, 6, 1), rand(2, 6, 1)), finite, r"bandwidth"),
    bad("bandwidth 0", lambda m: attn.NadarayaWatson(0.0), ValueError, r"bandwidth"),
    bad("bandwidth nan", lambda m: attn.NadarayaWatson(math.nan), ValueError, r"bandwidth"),
    bad("queries list", lambda m: m(rand(2, 3, 1).tolist(), rand(2, 6, 1), rand(2, 6, 2)), TypeError, r"queries"),
    bad("keys width differs", lambda m: m(rand(2, 3, 1), rand(2, 6, 2), rand(2, 6, 2)), ValueError, r"keys|queries"),
    bad("values of another length", lambda m: m(rand(2, 3, 1), rand(2, 6, 1), rand(2, 5, 2)), ValueError, r"values"),
)

for _name, _make in (("PMA", lambda: attn.PMA(E, H).eval()), ("AttentionPool", lambda: attn.AttentionPool(E, H).eval())):
    table(
        _name, _make,
        good("good", lambda m: m(x()), lambda o: first(o).shape[0] == 2 and finite(o)),
        good("key_mask", lambda m: m(x(), key_mask=km(5, 3)), lambda o: first(o).shape[0] == 2),
        bad("list", lambda m: m(x().tolist()), TypeError, r"torch\.Tensor"),
        bad("int", lambda m: m(ints(2, N, E)), TypeError, r"floating-point"),
        bad("wrong width", lambda m: m(x(e=E + 1)), ValueError, rf"{E}"),
        bad("key_mask ints", lambda m: m(x(), key_mask=km(5, 3).long()), TypeError, r"key_mask"),
    )

_EDGES = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
for _name, _cls in (("GraphAttention", attn.GraphAttention), ("GraphAttentionV2", attn.GraphAttentionV2)):
    table(
        _name, (lambda c: lambda: c(E, 3, heads=H).eval())(_cls),
        good("good", lambda m: m(rand(4, E), _EDGES), lambda o: first(o).shape == (4, 3 * H)),
        bad("x list", lambda m: m(rand(4, E).tolist(), _EDGES), TypeError, r"x"),
        bad("x wrong width", lambda m: m(rand(4, E + 1), _EDGES), ValueError, r"x|in_channels"),
        bad("edge_index float", lambda m: m(rand(4, E), _EDGES.float()), TypeError, r"edge_index"),
        bad("edge_index node out of range", lambda m: m(rand(4, E), _EDGES + 4), ValueError, r"edge_index"),
        bad("edge_index negative", lambda m: m(rand(4, E), _EDGES - 1), ValueError, r"edge_index"),
        bad("edge_index shape (E, 2)", lambda m: m(rand(4, E), _EDGES.T.contiguous()), ValueError, r"edge_index"),
    )

table(
    "CBAM", lambda: attn.CBAM(8, reduction=2, kernel_size=3).eval(),
    good("good", lambda m: m(rand(2, 8, 5, 5)), lambda o: first(o).shape == (2, 8, 5, 5)),
    bad("list", lambda m: m(rand(2, 8, 5, 5).tolist()), TypeError, r"x"),
    bad("wrong channels", lambda m: m(rand(2, 7, 5, 5)), ValueError, r"8|channels"),
    bad("3-D", lambda m: m(rand(8, 5, 5)), ValueError, r"x|shape"),
    bad("even kernel", lambda m: attn.CBAM(8, kernel_size=4), ValueError, r"kernel_size"),
)

table("MultiDConvHeadAttention", lambda: attn.MultiDConvHeadAttention(E, H).eval(), *mixer_rows())
table("GatedAttention", lambda: attn.GatedAttention(E, H).eval(), *mixer_rows(),
      bad("unknown gate", lambda m: attn.GatedAttention(E, H, gate="door"), ValueError, r"gate"))
table("GatedAttentionUnit", lambda: attn.GatedAttentionUnit(E).eval(), *mixer_rows())

table(
    "GatedMILPooling", lambda: attn.GatedMILPooling(E, hidden_dim=4).eval(),
    good("good", lambda m: m(x()), lambda o: o.output.shape == (2, E) and o.weights.shape == (2, N)),
    good("empty bag pools to zeros", lambda m: m(x(), key_mask=torch.zeros(2, N, dtype=torch.bool)), lambda o: float(o.output.detach().abs().sum()) == 0.0),
    bad("list", lambda m: m(x().tolist()), TypeError, r"h"),
    bad("wrong width", lambda m: m(x(e=E + 1)), ValueError, r"h"),
    bad("mask ints", lambda m: m(x(), key_mask=km(5, 3).long()), TypeError, r"key_mask"),
    bad("mask positional", lambda m: m(x(), km(5, 3)), TypeError, r"positional"),
)

table(
    "HardAttention", lambda: attn.HardAttention(E, 6, attn_dim=4).eval(),
    good("good", lambda m: m(rand(2, 3, E), x(e=6), x(e=3)), lambda o: o.output.shape[0] == 2),  # a HardAttentionOutput dataclass (issue 23)
    bad("query list", lambda m: m(rand(2, 3, E).tolist(), x(e=6), x(e=3)), TypeError, r"query"),
    bad("keys wrong width", lambda m: m(rand(2, 3, E), x(e=7), x(e=3)), ValueError, r"keys"),
    bad("values of another length", lambda m: m(rand(2, 3, E), x(e=6), x(n=N + 1, e=3)), ValueError, r"values"),
    bad("unknown estimator", lambda m: attn.HardAttention(E, 6, estimator="guess"), ValueError, r"estimator"),
    bad("tau 0", lambda m: attn.HardAttention(E, 6, tau=0.0), ValueError, r"tau"),
)
table("HardSelfAttention", lambda: attn.HardSelfAttention(E, H).eval(), *mixer_rows(),
      bad("tau nan", lambda m: attn.HardSelfAttention(E, H, tau=math.nan), ValueError, r"tau"))

table(
    "AttentionClassifier", lambda: attn.AttentionClassifier(12, embed_dim=4, hidden=4).eval(),
    good("good", lambda m: m(torch.randint(1, 12, (2, N))), lambda o: o[0].shape == (2, 2)),
    bad("tokens float", lambda m: m(torch.randint(1, 12, (2, N)).float()), TypeError, r"tokens"),
    bad("tokens out of range", lambda m: m(torch.randint(1, 12, (2, N)) + 12), ValueError, r"tokens|token ids"),
    bad("tokens negative", lambda m: m(-torch.randint(1, 12, (2, N))), ValueError, r"tokens|token ids"),
    bad("tokens list", lambda m: m(torch.randint(1, 12, (2, N)).tolist()), TypeError, r"tokens"),
    bad("key_mask ints", lambda m: m(torch.randint(1, 12, (2, N)), key_mask=km(5, 3).long()), TypeError, r"key_mask"),
    bad("key_mask positional", lambda m: m(torch.randint(1, 12, (2, N)), km(5, 3)), TypeError, r"positional argument"),
)

table(
    "AttentionPooling", lambda: attn.AttentionPooling(E).eval(),
    good("good", lambda m: m(x()), lambda o: first(o).shape == (2, E)),
    good("weights", lambda m: m(x(), key_mask=km(5, 3), need_weights=True), lambda o: o.weights.shape == (2, N)),
    bad("python list", lambda m: m(x().tolist()), TypeError, r"x must be a torch\.Tensor"),
    bad("wrong width", lambda m: m(x(e=E + 1)), ValueError, rf"embed_dim={E}"),
    bad("empty sequence", lambda m: m(x(2, 0)), ValueError, r"empty sequence"),
    bad("key_mask ints", lambda m: m(x(), key_mask=km(5, 3).long()), TypeError, r"key_mask.*torch\.bool"),
    bad("key_mask positional", lambda m: m(x(), km(5, 3)), TypeError, r"positional argument"),
    bad("score_delta shape", lambda m: m(x(), score_delta=rand(2, N + 1)), ValueError, r"score_delta must have shape"),
    bad("embed_dim 0", lambda m: attn.AttentionPooling(0), ValueError, r"embed_dim must be a positive int"),
)
table("RecordingAttention", lambda: attn.RecordingAttention(E, H).eval(), *mixer_rows(),
      bad("heads do not divide", lambda m: attn.RecordingAttention(E, 3), ValueError, r"divisible by num_heads"))

_RECALL = AssociativeRecall(n_pairs=2, n_keys=4, n_values=4)
_RECALL_X = torch.tensor([[0, 4, 1, 5, 1], [2, 6, 3, 7, 2]])
table(
    "Distiller", lambda: attn.Distiller(RecallTransformer(_RECALL, 4, 2), RecallTransformer(_RECALL, 8, 2)).eval(),
    good("good", lambda m: m(_RECALL_X), lambda o: o.shape == (2, 4)),
    bad("weight nan", lambda m: attn.Distiller(m.student, m.teacher, weight=math.nan), ValueError, r"weight must be finite"),
    bad("weight -1", lambda m: attn.Distiller(m.student, m.teacher, weight=-1.0), ValueError, r"weight must be >= 0"),
    bad("unknown kind", lambda m: attn.Distiller(m.student, m.teacher, kind="hint"), ValueError, r"kind"),
    bad("ids out of range", lambda m: m(_RECALL_X + 8), ValueError, r"token ids.*\[0, 8\)"),
    bad("ids negative", lambda m: m(_RECALL_X - 8), ValueError, r"token ids.*\[0, 8\)"),
    bad("ids float", lambda m: m(_RECALL_X.float()), TypeError, r"x must hold integer token ids"),
    bad("key id at a value position", lambda m: m(torch.zeros(2, 5, dtype=LONG)), ValueError, r"value ids in \[4, 8\)"),
    bad("ids list", lambda m: m(_RECALL_X.tolist()), TypeError, r"x must be a torch\.Tensor"),
    bad("wrong length", lambda m: m(_RECALL_X[:, :3]), ValueError, r"x must have shape \(batch, 5\)"),
)

table(
    "FlashAttention", lambda: attn.FlashAttention(E, H, block_q=2, block_k=2).eval(),
    *mixer_rows(),
    bad("block_q 0", lambda m: attn.FlashAttention(E, H, block_q=0), ValueError, r"block_q"),
)

table(
    "flash_attention", lambda: attn.flash_attention,
    good("good", lambda f: f(*_qkv4(), block_q=2, block_k=2), shaped(2, H, 6, 4)),
    good("return_lse", lambda f: f(*_qkv4(), return_lse=True), lambda o: o[1].shape == (2, H, 6)),
    bad("mixed dtypes", lambda f: f(_q(2, 6, 4), _q(2, 6, 4, dtype=F64), _q(2, 6, 4)), CLEAR, r"dtype"),
    bad("list q", lambda f: f(_q(2, 6, 4).tolist(), _q(2, 6, 4), _q(2, 6, 4)), TypeError, r"q|query"),
    bad("int q", lambda f: f(ints(2, 6, 4), _q(2, 6, 4), _q(2, 6, 4)), TypeError, r"q|query"),
    bad("d_k differs", lambda f: f(_q(2, 6, 4), _q(2, 6, 3), _q(2, 6, 4)), ValueError, r"d_k|d|width|shape"),
    bad("block_q 0", lambda f: f(*_qkv4(), block_q=0), ValueError, r"block_q"),
    bad("key_mask ints", lambda f: f(*_qkv4(), key_mask=km(6, 3, n=6).long()), TypeError, r"key_mask"),
)

def _fixed_qkv() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(2, H, 6, 4, generator=g) for _ in range(3))


def _partials(dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two chunks of 3 keys each for 6 queries: outputs (2, H, 6, 4) and log-sum-exps (2, H, 6)."""
    q, k, v = (t.to(dtype) for t in _fixed_qkv())
    parts = [attn.flash_attention(q, k[..., i : i + 3, :], v[..., i : i + 3, :], return_lse=True) for i in (0, 3)]
    return [o for o, _ in parts], [lse for _, lse in parts]


table(
    "merge_partial_attention", lambda: attn.merge_partial_attention,
    good("two chunks equal one pass", lambda f: f(*_partials()),
         lambda o: bool(torch.allclose(o[0], attn.flash_attention(*_fixed_qkv()), atol=1e-5))),
    good("float64", lambda f: f(*_partials(F64)), lambda o: o[0].dtype == F64),
    bad("tensor instead of a list", lambda f: f(_partials()[0][0], _partials()[1][0]), TypeError, r"outputs|list|sequence"),
    bad("no chunks", lambda f: f([], []), ValueError, r"outputs|empty|at least"),
    bad("unequal counts", lambda f: f(_partials()[0], _partials()[1][:1]), ValueError, r"lses|outputs|same number|count"),
    bad("mixed dtypes", lambda f: f([_partials()[0][0], _partials()[0][1].double()], _partials()[1]), TypeError, r"dtype"),
    bad("int lse", lambda f: f(_partials()[0], [t.long() for t in _partials()[1]]), TypeError, r"lse"),
    bad("lse of the wrong shape", lambda f: f(_partials()[0], [t[..., :2] for t in _partials()[1]]), ValueError, r"lse|shape"),
    bad("nan lse", lambda f: f(_partials()[0], [torch.full_like(t, math.nan) for t in _partials()[1]]), ValueError, r"lse|nan|NaN"),
)

table("LinearAttention", lambda: attn.LinearAttention(E, H, chunk=2).eval(), *mixer_rows(),
      bad("chunk 0", lambda m: attn.LinearAttention(E, H, chunk=0), ValueError, r"chunk"))
table("PerformerAttention", lambda: attn.PerformerAttention(E, H, num_features=8, chunk=2).eval(), *mixer_rows(),
      bad("num_features 0", lambda m: attn.PerformerAttention(E, H, num_features=0), ValueError, r"num_features"))

table(
    "linear_attention", lambda: attn.linear_attention,
    good("good", lambda f: f(*_qkv4(), chunk=2), shaped(2, H, 6, 4)),
    good("causal", lambda f: f(*_qkv4(), causal=True, chunk=4), shaped(2, H, 6, 4)),
    bad("mixed dtypes", lambda f: f(_q(2, 6, 4), _q(2, 6, 4, dtype=F64), _q(2, 6, 4)), CLEAR, r"dtype"),
    bad("list q", lambda f: f(_q(2, 6, 4).tolist(), _q(2, 6, 4), _q(2, 6, 4)), TypeError, r"q|query"),
    bad("int q", lambda f: f(ints(2, 6, 4), _q(2, 6, 4), _q(2, 6, 4)), TypeError, r"q|query"),
    bad("chunk 0", lambda f: f(*_qkv4(), chunk=0), ValueError, r"chunk"),
    bad("eps -1", lambda f: f(*_qkv4(), eps=-1.0), ValueError, r"eps"),
)


def _gqa() -> attn.GroupedQueryAttention:
    return attn.GroupedQueryAttention(E, 4, num_kv_heads=2).eval()


table(
    "GroupedQueryAttention", _gqa,
    *mixer_rows(mask=False),
    good("decoding with a cache", lambda m: m(x(n=1), cache=m.new_cache(2, 4)), shaped(2, 1, E)),
    good("bf16 layer, bf16 cache from new_cache", lambda m: m.to(BF16)(x(n=1, dtype=BF16), cache=m.new_cache(2, 4)), shaped(2, 1, E, dtype=BF16)),
    bad("bf16 layer, default float32 KVCache", lambda m: m.to(BF16)(x(n=1, dtype=BF16), cache=attn.KVCache(2, 2, E // 4, 4)), CLEAR, r"cache|dtype"),
    bad("cache of another batch", lambda m: m(x(n=1), cache=m.new_cache(3, 4)), ValueError, r"batch|cache"),
    bad("num_kv_heads does not divide", lambda m: attn.GroupedQueryAttention(E, 4, num_kv_heads=3), ValueError, r"num_kv_heads"),
)

table(
    "KVCache", lambda: attn.KVCache(2, 2, 4, 4),
    good("append", lambda c: c.append(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)), lambda o: o[0].shape == (2, 2, 1, 4)),
    bad("bf16 into a float32 cache", lambda c: c.append(torch.randn(2, 2, 1, 4, dtype=BF16), torch.randn(2, 2, 1, 4, dtype=BF16)), CLEAR, r"dtype"),
    bad("past max_len", lambda c: c.append(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)), ValueError, r"max_len|full|capacity"),
    bad("k list", lambda c: c.append(torch.randn(2, 2, 1, 4).tolist(), torch.randn(2, 2, 1, 4)), TypeError, r"k"),
    bad("wrong head count", lambda c: c.append(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)), ValueError, r"k|shape"),
    bad("max_len 0", lambda c: attn.KVCache(2, 2, 4, 0), ValueError, r"max_len"),
)

table(
    "PositionalAttention", lambda: attn.PositionalAttention(E, H).eval(),
    *mixer_rows(mask=False),
    good("alibi", lambda m: attn.PositionalAttention(E, H, position="alibi").eval()(x()), shaped(2, N, E)),
    bad("num_heads 0", lambda m: attn.PositionalAttention(16, 0), CLEAR, r"num_heads"),
    bad("unknown position", lambda m: attn.PositionalAttention(E, H, position="learned-ish"), ValueError, r"position"),
    bad("offset -1", lambda m: m(x(), offset=-1), ValueError, r"offset"),
)

table(
    "RotaryEmbedding", lambda: attn.RotaryEmbedding(4),
    good("good", lambda r: r(torch.randn(2, H, N, 4), torch.arange(N)), shaped(2, H, N, 4)),
    good("float64 in, float64 out", lambda r: r(torch.randn(2, H, N, 4, dtype=F64), torch.arange(N)), shaped(2, H, N, 4, dtype=F64)),
    bad("positions list", lambda r: r(torch.randn(2, H, N, 4), list(range(N))), CLEAR, r"positions"),
    bad("positions of another length", lambda r: r(torch.randn(2, H, N, 4), torch.arange(N + 1)), ValueError, r"positions"),
    bad("x list", lambda r: r(torch.randn(2, H, N, 4).tolist(), torch.arange(N)), TypeError, r"x"),
    bad("odd head_dim", lambda r: attn.RotaryEmbedding(3), ValueError, r"head_dim"),
)

table(
    "alibi_bias", lambda: attn.alibi_bias,
    good("good", lambda f: f(3, 5, torch.tensor([0.5, 0.25])), lambda o: o.shape == (2, 3, 5)),
    bad("slopes list", lambda f: f(3, 5, [0.5, 0.25]), CLEAR, r"slopes"),
    bad("slopes (H, 1)", lambda f: f(3, 5, torch.tensor([[0.5], [0.25]])), CLEAR, r"slopes"),
    bad("n_queries -1", lambda f: f(-1, 5, torch.tensor([0.5])), CLEAR, r"n_queries"),
    bad("n_keys float", lambda f: f(3, 5.0, torch.tensor([0.5])), TypeError, r"n_keys"),
)


def _mla() -> attn.MultiHeadLatentAttention:
    return attn.MultiHeadLatentAttention(E, H, kv_rank=4, head_dim=4, rope_dim=2).eval()


table(
    "MultiHeadLatentAttention", _mla,
    *mixer_rows(mask=False),
    good("decoding with a cache", lambda m: m(x(n=1), cache=m.new_cache(2, 4)), shaped(2, 1, E)),
    bad("bf16 layer, default float32 LatentCache", lambda m: m.to(BF16)(x(n=1, dtype=BF16), cache=attn.LatentCache(2, 4, 2, 4)), CLEAR, r"cache|dtype"),
    bad("cache of another batch", lambda m: m(x(n=1), cache=m.new_cache(3, 4)), ValueError, r"batch|cache"),
)

table(
    "LatentCache", lambda: attn.LatentCache(2, 4, 2, 4),
    good("append", lambda c: c.append(torch.randn(2, 1, 4), torch.randn(2, 1, 2)), lambda o: o[0].shape == (2, 1, 4)),
    bad("bf16 into a float32 cache", lambda c: c.append(torch.randn(2, 1, 4, dtype=BF16), torch.randn(2, 1, 2, dtype=BF16)), CLEAR, r"dtype"),
    bad("past max_len", lambda c: c.append(torch.randn(2, 5, 4), torch.randn(2, 5, 2)), ValueError, r"max_len|full|capacity"),
    bad("c list", lambda c: c.append(torch.randn(2, 1, 4).tolist(), torch.randn(2, 1, 2)), TypeError, r"c"),
    bad("c wrong width", lambda c: c.append(torch.randn(2, 1, 5), torch.randn(2, 1, 2)), ValueError, r"c|kv_rank"),
)

table(
    "DifferentialAttention", lambda: attn.DifferentialAttention(E, H).eval(),
    *mixer_rows(),
    bad("lambda_init inf", lambda m: attn.DifferentialAttention(E, H, lambda_init_value=math.inf), CLEAR, r"lambda"),
    bad("lambda_init nan", lambda m: attn.DifferentialAttention(E, H, lambda_init_value=math.nan), CLEAR, r"lambda"),
    bad("lambda_init 1.0 (output exactly zero)", lambda m: attn.DifferentialAttention(E, H, lambda_init_value=1.0), CLEAR, r"lambda"),
    bad("layer_index 0", lambda m: attn.DifferentialAttention(E, H, layer_index=0), ValueError, r"layer_index"),
)


def _kv(b: int = 2, h: int = H, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, h, 1, 4, dtype=dtype), torch.randn(b, h, 1, 4, dtype=dtype)


def _after_one(cache: attn.SinkCache, **kw: Any) -> Any:
    cache.append(0, *_kv())
    return cache.append(0, *_kv(**kw))


table(
    "SinkCache", lambda: attn.SinkCache(2, window=3, sinks=1),
    good("append", lambda c: c.append(0, *_kv()), lambda o: o[0].shape == (2, H, 1, 4)),
    good("evicts to sinks + window", lambda c: [c.append(0, *_kv()) for _ in range(6)][-1], lambda o: o[0].shape == (2, H, 3, 4)),
    bad("keys list", lambda c: c.append(0, _kv()[0].tolist(), _kv()[1]), CLEAR, r"k"),
    bad("new batch mid-decoding", lambda c: _after_one(c, b=3), CLEAR, r"batch"),
    bad("new head count mid-decoding", lambda c: _after_one(c, h=H + 1), CLEAR, r"head"),
    bad("float64 mid-decoding", lambda c: _after_one(c, dtype=F64), CLEAR, r"dtype"),
    bad("layer past the cache", lambda c: c.append(2, *_kv()), CLEAR, r"layer"),
    bad("layer -1", lambda c: c.append(-1, *_kv()), ValueError, r"layer"),
    bad("per-row sinks of the wrong batch", lambda c: attn.SinkCache(1, window=3, sinks=torch.tensor([1, 1, 1])).append(0, *_kv()), CLEAR, r"sinks|batch"),
    bad("num_layers 0", lambda c: attn.SinkCache(0, window=3), ValueError, r"num_layers"),
)

# --- the registry --------------------------------------------------------------------

table(
    "CHAPTERS", lambda: attn.CHAPTERS,
    good("thirty chapters, numbered 1..30", lambda c: [ch.number for ch in c], lambda o: o == list(range(1, 31))),
)
table(
    "MECHANISMS", lambda: attn.MECHANISMS,
    good("a name -> Mechanism mapping", lambda m: m["multihead"], lambda o: o.name == "multihead"),
    bad("unknown name", lambda m: m["nope"], KeyError, r"nope"),
)
table(
    "chapter", lambda: attn.chapter,
    good("chapter 2", lambda f: f(2), lambda o: o.number == 2),
    bad("chapter 999", lambda f: f(999), KeyError, r"no chapter 999"),
    bad("chapter 0", lambda f: f(0), KeyError, r"no chapter 0"),
)
table(
    "get", lambda: attn.get,
    good("get('multihead')", lambda f: f("multihead"), lambda o: o.cls is attn.MultiHeadAttention),
    bad("unknown name", lambda f: f("nope"), KeyError, r"unknown mechanism 'nope'; registered"),
)
table(
    "mechanisms", lambda: attn.mechanisms,
    good("all", lambda f: f(), lambda o: len(o) == len(attn.MECHANISMS)),
    good("chapter 3", lambda f: f(3), lambda o: all(m.chapter == 3 for m in o) and len(o) >= 1),
    edge("chapter 999", lambda f: f(999), lambda o: o == [], r"chapter"),
)


# ----------------------------------------------------------------------------- the tests

ROWS = [(name, row) for name, (_, rows) in TABLES.items() for row in rows]
PARAMS = [
    pytest.param(name, row, id=f"{name}-{row.case}")
    for name, row in ROWS
]


def test_every_public_name_has_a_table():
    """A name exported in attn.__all__ without a table here fails: add its rows with the export."""
    missing = sorted(set(attn.__all__) - set(TABLES))
    assert not missing, f"public names without a bad-input table in tests/test_public_api.py: {missing}"
    stale = sorted(set(TABLES) - set(attn.__all__))
    assert not stale, f"tables for names that are no longer public: {stale}"


def test_every_table_has_a_good_call_and_a_bad_or_edge_one():
    for name, (_, rows) in TABLES.items():
        kinds = {r.kind for r in rows}
        assert "good" in kinds, f"{name}: no call that must succeed"
        if name not in ("CHAPTERS", "KERNELS", "SequenceMixer"):  # data or a protocol, not a callable
            assert kinds & {"bad", "edge"}, f"{name}: no bad or edge call"


def test_every_masks_function_is_exercised():
    """``masks`` counts through its public functions: each one appears in a row's case or code."""
    import inspect

    rows = TABLES["masks"][1]
    source = "\n".join(inspect.getsource(r.run) for r in rows)
    missing = [f for f in masks.__all__ if f not in source]
    assert not missing, f"attn.masks functions without a row: {missing}"


@pytest.mark.parametrize("name,row", PARAMS)
def test_public_entry_point(name, row):
    make = TABLES[name][0]
    torch.manual_seed(0)
    obj = make()
    if row.kind == "good":
        out = row.run(obj)
        assert row.check is None or row.check(out), f"{name}: {row.case}: unexpected output"
    elif row.kind == "bad":
        with pytest.raises(row.error) as info:
            row.run(obj)
        assert re.search(row.match, str(info.value)), f"{name}: {row.case}: message {str(info.value)!r} does not match {row.match!r}"
    else:  # edge: a clear error naming what was expected, or a correct output
        try:
            out = row.run(obj)
        except CLEAR as e:
            assert re.search(row.match, str(e)), f"{name}: {row.case}: message {str(e)!r} does not match {row.match!r}"
        else:
            assert row.check(out), f"{name}: {row.case}: accepted, but the output is wrong"
