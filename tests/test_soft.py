"""Chapter 1 (soft attention): bad input meets a clear error naming the argument (issue 15, section 4).

The equations themselves are checked in ``test_mechanisms.py``; this file holds the input checks of
:class:`AdditiveAttention`, :class:`MultiplicativeAttention` and :class:`Seq2SeqAttention`.
"""

from __future__ import annotations

import pytest
import torch

from attn.soft import AdditiveAttention, MultiplicativeAttention, Seq2SeqAttention

SCORES = [lambda: AdditiveAttention(4, 6), lambda: MultiplicativeAttention(4, 6)]
q, K = torch.randn(2, 4), torch.randn(2, 5, 6)

BAD_CALLS = [  # (case, call(att), exception, message)
    ("query as a list", lambda a: a(q.tolist(), K), TypeError, r"^query must be a torch\.Tensor of shape \(batch, 4\) or \(batch, n_queries, 4\), got list$"),
    ("keys as a list", lambda a: a(q, K.tolist()), TypeError, r"^keys must be a torch\.Tensor of shape \(batch=2, n_keys, 6\), got list$"),
    ("values as a list", lambda a: a(q, K, K.tolist()), TypeError, r"^values must be a torch\.Tensor of shape \(batch=2, n_keys=5, d_v\), got list$"),
    ("int query", lambda a: a(q.long(), K), TypeError, r"^query must be a floating-point tensor .* got dtype torch\.int64"),
    ("int keys", lambda a: a(q, K.long()), TypeError, r"^keys must be a floating-point tensor .* got dtype torch\.int64"),
    ("float64 keys", lambda a: a(q, K.double()), TypeError, r"^dtypes must match \(query: torch\.float32, keys: torch\.float64\)"),
    ("float64 values", lambda a: a(q, K, K.double()), TypeError, r"^dtypes must match \(query: torch\.float32, keys: torch\.float32, values: torch\.float64\)"),
    ("values of another length", lambda a: a(q, K, torch.randn(2, 3, 7)), ValueError, r"^values must have shape \(batch=2, n_keys=5, d_v\), got \(2, 3, 7\)$"),
    ("values of another batch", lambda a: a(q, K, torch.randn(1, 5, 7)), ValueError, r"^values must have shape \(batch=2, n_keys=5, d_v\), got \(1, 5, 7\)$"),
    ("2-D values", lambda a: a(q, K, torch.randn(2, 5)), ValueError, r"^values must have shape \(batch=2, n_keys=5, d_v\), got 2-D shape \(2, 5\)$"),
    ("4-D query", lambda a: a(q[:, None, None], K), ValueError, r"^query must have shape \(batch, 4\) or \(batch, n_queries, 4\), got 4-D"),
]


@pytest.mark.parametrize("make", SCORES, ids=["additive", "multiplicative"])
@pytest.mark.parametrize("case,call,exc,match", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_score_attention_bad_input(make, case, call, exc, match):
    with pytest.raises(exc, match=match):
        call(make())


@pytest.mark.parametrize("make", SCORES, ids=["additive", "multiplicative"])
def test_good_edge_input_still_works(make):
    att = make()
    ctx, w = att(q, K, torch.randn(2, 5, 3))  # values of their own width
    assert ctx.shape == (2, 3) and w.shape == (2, 5)
    ctx, w = att(q[:0], K[:0])  # empty batch: empty output
    assert ctx.shape == (0, 6) and w.shape == (0, 5)
    ctx, w = att.double()(q.double()[:, None].expand(2, 3, 4), K.double())
    assert ctx.shape == (2, 3, 6) and ctx.dtype == torch.float64


@pytest.mark.parametrize("args,exc,match", [
    ((-1, 6), ValueError, r"^query_dim must be >= 1, got -1$"),
    ((2.5, 6), TypeError, r"^query_dim must be an int, got float$"),
    ((4, 0), ValueError, r"^key_dim must be >= 1, got 0$"),
])
def test_score_attention_bad_sizes(args, exc, match):
    with pytest.raises(exc, match=match):
        AdditiveAttention(*args)
    with pytest.raises(exc, match=match):
        MultiplicativeAttention(*args)
    with pytest.raises(ValueError, match=r"^hidden must be >= 1, got 0$"):
        AdditiveAttention(4, 6, hidden=0)


SRC, TGT = torch.arange(10).view(2, 5), torch.arange(8).view(2, 4)  # ids 0..9 and 0..7

BAD_IDS = [  # (case, src, tgt_in, exception, message)
    ("src out of range", SRC + 10, TGT, ValueError, r"^src must be token ids in \[0, 10\), got values in \[10, 19\]$"),
    ("negative src", SRC - 20, TGT, ValueError, r"^src must be token ids in \[0, 10\), got values in \[-20, -11\]$"),
    ("tgt_in out of range", SRC, TGT + 10, ValueError, r"^tgt_in must be token ids in \[0, 10\)"),
    ("float src", SRC.float(), TGT, TypeError, r"^src must hold integer token ids \(batch, seq\), got dtype torch\.float32$"),
    ("bool tgt_in", SRC, TGT.bool(), TypeError, r"^tgt_in must hold integer token ids"),
    ("src as a list", SRC.tolist(), TGT, TypeError, r"^src must be a torch\.Tensor of integer token ids \(batch, seq\), got list$"),
    ("empty source", SRC[:, :0], TGT, ValueError, r"^src is an empty sequence: shape \(batch, seq\) needs seq >= 1, got \(2, 0\)$"),
    ("empty target", SRC, TGT[:, :0], ValueError, r"^tgt_in is an empty sequence: shape \(batch, seq\) needs seq >= 1, got \(2, 0\)$"),
    ("1-D src", SRC[0], TGT, ValueError, r"^src must have shape \(batch, seq\), got 1-D shape \(5,\)$"),
    ("batches differ", SRC[:1], TGT, ValueError, r"^batch sizes differ: src=1, tgt_in=2$"),
]


@pytest.mark.parametrize("case,src,tgt,exc,match", BAD_IDS, ids=[b[0] for b in BAD_IDS])
def test_seq2seq_bad_token_ids(case, src, tgt, exc, match):
    model = Seq2SeqAttention(10, 8, 8)
    with pytest.raises(exc, match=match):
        model(src, tgt)


def test_seq2seq_masks_sizes_and_empty_batch():
    model = Seq2SeqAttention(10, 8, 8)
    with pytest.raises(ValueError, match=r"^key_mask must have shape \(batch=2, source_len=5\), got \(2, 4\)$"):
        model(SRC, TGT, key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^vocab must be >= 1, got 0$"):
        Seq2SeqAttention(0)
    with pytest.raises(TypeError, match=r"^hidden must be an int, got float$"):
        Seq2SeqAttention(10, hidden=8.0)
    logits, align = model(SRC[:0], TGT[:0])
    assert logits.shape == (0, 4, 10) and align.shape == (0, 4, 5)


# ----------------------------------------------------------------------------- one interface (issue 23)


def test_additive_self_attention_is_a_sequence_mixer():
    """Registered under its own class, weights (B, 1, n, n), is_causal honoured with the explicit formula."""
    import inspect

    from attn import registry
    from attn.soft import AdditiveSelfAttention

    assert registry.get("additive").cls is AdditiveSelfAttention
    params = inspect.signature(AdditiveSelfAttention.forward).parameters
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in ("key_mask", "is_causal", "need_weights"))
    torch.manual_seed(0)
    layer = AdditiveSelfAttention(6, hidden=5).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    out, w = layer(x, is_causal=True, need_weights=True)
    att = layer.score
    e = att.v(torch.tanh(att.w_q(x)[:, :, None] + att.w_k(x)[:, None])).squeeze(-1)  # (B, n, n)
    e = e.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(w, e.softmax(-1)[:, None])
    torch.testing.assert_close(out, e.softmax(-1) @ layer.value(x))


def test_seq2seq_own_task_lives_in_experiments():
    import attn.soft
    from attn.experiments import own_task
    from attn.experiments.soft import permutation_loss

    assert not hasattr(attn.soft, "permutation_loss") and not hasattr(attn.soft, "_seq2seq_task")
    task = own_task("seq2seq", "quick")
    assert isinstance(task.model, Seq2SeqAttention) and task.steps == 20 and task.sizes == (16, 32, 64)
    batch = task.sample(4, torch.Generator().manual_seed(0))
    loss, metrics = task.loss(task.model, batch)
    assert torch.isfinite(loss) and set(metrics) == {"acc", "align_acc"}
    assert callable(permutation_loss)
    with pytest.raises(ValueError, match="unknown task size 'default'"):
        own_task("seq2seq", "default")
