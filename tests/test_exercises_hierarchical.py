"""Chapter 16's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn.exercises import hierarchical as ex
from attn.hierarchical import ContextAttention


def _library_level(w, b, c):  # type: ignore[no-untyped-def]
    """A :class:`ContextAttention` holding the parameters ``(w, b, c)``."""
    layer = ContextAttention(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.proj.weight.copy_(w)
        layer.proj.bias.copy_(b)
        layer.context.copy_(c)
    return layer


def _my_pool(h, w, b, c, mask=None, dim=-1, scale=1.0):  # type: ignore[no-untyped-def]
    s = torch.einsum("...na,a->...n", torch.tanh(torch.einsum("...nd,ad->...na", h, w) + b), c) * scale
    e = torch.exp(s - s.amax(dim, keepdim=True))
    if mask is not None:
        e = torch.where(mask, e, torch.zeros(()))
    alpha = e / e.sum(dim, keepdim=True)
    return torch.einsum("...n,...nd->...d", alpha, h), alpha


def test_context_pool_written_another_way_passes_and_matches_the_library() -> None:
    assert ex.check_context_pool(_my_pool).passed
    case = ex.CONTEXT_POOL.inputs()[0]
    h, w, b, c, mask = case.args
    out, alpha = ex.context_pool(*case.args)
    want = _library_level(w, b, c)(h, key_mask=mask)
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(alpha, want[1])


def test_context_pool_wrong_answers_get_their_diagnosis() -> None:
    table = {
        (lambda h, w, b, c, mask=None: _my_pool(h, w, b, c)): "padding_weighted",
        (lambda h, w, b, c, mask=None: _my_pool(h, w, b, c, mask, dim=0)): "softmax_over_batch",
        (lambda h, w, b, c, mask=None: _my_pool(h, w, b, c, mask, scale=c.numel() ** -0.5)): "scaled",
    }
    for fn, name in table.items():
        report = ex.check_context_pool(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def _loop_han(h, word_mask, word_level, sentence_level, mask_sentences=True):  # type: ignore[no-untyped-def]
    """Document by document, sentence by sentence: only real words and real sentences."""
    B, S, T, _ = h.shape
    vs, a_s, a_w = [], torch.zeros(B, S), torch.zeros(B, S, T)
    for d in range(B):
        n_s = int(word_mask[d].any(-1).sum())
        sents = []
        for i in range(n_s):
            n_t = int(word_mask[d, i].sum())
            s_i, w_i = _my_pool(h[d, i, :n_t], *word_level)
            sents.append(s_i)
            a_w[d, i, :n_t] = w_i
        if not mask_sentences:  # the padded sentences enter the sentence level as zero vectors
            sents += [h.new_zeros(h.shape[-1])] * (S - n_s)
        v, w_s = _my_pool(torch.stack(sents), *sentence_level)
        vs.append(v)
        a_s[d, : len(sents)] = w_s
    return torch.stack(vs), a_s, a_w


def test_han_pool_written_another_way_passes_and_matches_the_library() -> None:
    assert ex.check_han_pool(_loop_han).passed
    h, word_mask, wl, sl = ex.HAN_POOL.inputs()[1].args
    B, S, T, dim = h.shape
    s, a_w = _library_level(*wl)(h.reshape(B * S, T, dim), key_mask=word_mask.reshape(B * S, T))
    v, a_s = _library_level(*sl)(s.reshape(B, S, dim), key_mask=word_mask.any(-1))
    got = ex.han_pool(h, word_mask, wl, sl)
    for g, w in zip(got, (v, a_s, a_w.reshape(B, S, T)), strict=True):
        torch.testing.assert_close(g, w)


def test_han_pool_wrong_answers_get_their_diagnosis() -> None:
    def nan_sentences(h, word_mask, word_level, sentence_level):  # type: ignore[no-untyped-def]
        w, b, c = word_level
        scores = torch.where(word_mask, torch.tanh(h @ w.T + b) @ c, float("-inf"))
        alpha = scores.softmax(-1)  # NaN rows for the padded sentences
        s = torch.einsum("bst,bstd->bsd", alpha, h)
        w, b, c = sentence_level
        scores = torch.where(word_mask.any(-1), torch.tanh(s @ w.T + b) @ c, float("-inf"))
        a_s = scores.softmax(-1)  # finite: the NaN scores of padded sentences are replaced
        return torch.einsum("bs,bsd->bd", a_s, s), a_s, alpha

    table = {
        nan_sentences: "empty_sentence_nan",
        (lambda *a: _loop_han(*a, mask_sentences=False)): "padded_sentences_weighted",
        (lambda h, m, wl, sl: _loop_han(h, m, wl, wl)): "one_context_vector",
    }
    for fn, name in table.items():
        report = ex.check_han_pool(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_han_shapes_values() -> None:
    assert ex.check_han_shapes([(4, 6, 10), torch.Size([4, 6, 64]), (4, 6), (4, 64)]).passed
    assert ex.check_han_shapes(((4, 6, 10), (4, 6, 32), (4, 6), (4, 32))).mistake == "one_direction"
    assert ex.check_han_shapes(((4, 6, 10), (4, 64), (4, 6), (4, 64))).mistake == "generic"
