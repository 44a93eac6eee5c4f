"""Chapter 16: hierarchical attention (HAN) against explicit GRU + attention equations, masking, bad input."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from attn import registry
from attn.experiments import own_tasks
from attn.experiments.hierarchical import (
    FlatAttentionNetwork,
    PlantedWordDocuments,
    TriggeredCueDocuments,
    document_accuracy,
    han_loss,
    make_task,
    planted_mass,
    train_document_model,
)
from attn.hierarchical import ContextAttention, HierarchicalAttentionNetwork, pad_documents
from attn.train import cpu_threads, set_seed, train

DOCS = [  # three ragged documents: sentences of different lengths, different sentence counts
    [[3, 5, 7], [2, 9], [4, 4, 8, 1, 6]],
    [[1, 2, 3, 4, 5, 6]],
    [[7], [8, 9, 2], [3, 1], [5, 6, 7, 8]],
]


def gru_reference(gru: torch.nn.GRU, xs: torch.Tensor) -> torch.Tensor:
    """The GRU equations, one step at a time, both directions: xs (L, D) -> (L, 2h)."""
    def run(suffix, seq):
        w_ih, w_hh = getattr(gru, f"weight_ih_l0{suffix}"), getattr(gru, f"weight_hh_l0{suffix}")
        b_ih, b_hh = getattr(gru, f"bias_ih_l0{suffix}"), getattr(gru, f"bias_hh_l0{suffix}")
        h = xs.new_zeros(gru.hidden_size)
        out = []
        for x in seq:
            gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
            i_r, i_z, i_n = gi.chunk(3)
            h_r, h_z, h_n = gh.chunk(3)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
            out.append(h)
        return torch.stack(out)

    fwd = run("", xs)
    bwd = run("_reverse", xs.flip(0)).flip(0)
    return torch.cat([fwd, bwd], -1)


def attention_reference(level: ContextAttention, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u = torch.tanh(h @ level.proj.weight.T + level.proj.bias)
    a = torch.softmax(u @ level.context, 0)
    return a @ h, a


def han_reference(model: HierarchicalAttentionNetwork, doc):
    """One document, as lists: no padding anywhere. Returns logits, sentence weights, word weights (list)."""
    sents, word_w = [], []
    for sentence in doc:
        h = gru_reference(model.word_encoder, model.embed.weight[torch.tensor(sentence)])
        s, a = attention_reference(model.word_attention, h)
        sents.append(s)
        word_w.append(a)
    h = gru_reference(model.sentence_encoder, torch.stack(sents))
    v, a_s = attention_reference(model.sentence_attention, h)
    return model.classifier.weight @ v + model.classifier.bias, a_s, word_w


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny GRUs: one CPU thread is faster than two competing ones (see attn.train.cpu_threads)."""
    with cpu_threads(1):
        yield


def make_model(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return HierarchicalAttentionNetwork(10, 3, embed_dim=5, hidden=4, **kw).to(dtype)


# ----------------------------------------------------------------------------- the reference


def test_matches_explicit_equations_forward_and_gradients():
    model = make_model()
    ids, mask = pad_documents(DOCS)
    out = model(ids, word_mask=mask, need_weights=True)
    params = list(model.parameters())
    up = torch.randn_like(out.logits)
    ours = torch.autograd.grad((out.logits * up).sum(), params)
    ref_loss = 0.0
    for b, doc in enumerate(DOCS):
        logits, a_s, a_w = han_reference(model, doc)
        torch.testing.assert_close(out.logits[b], logits, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(out.sentence_weights[b, : len(doc)], a_s, atol=1e-12, rtol=1e-10)
        assert (out.sentence_weights[b, len(doc):] == 0).all()
        for i, a in enumerate(a_w):
            torch.testing.assert_close(out.word_weights[b, i, : len(a)], a, atol=1e-12, rtol=1e-10)
            assert (out.word_weights[b, i, len(a):] == 0).all()
        ref_loss = ref_loss + (logits * up[b]).sum()
    ref = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for (name, _), a, r in zip(model.named_parameters(), ours, ref, strict=True):
        r = torch.zeros_like(a) if r is None else r
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-9, msg=name)
    assert ours[0][0].abs().max() == 0  # padding embedding row gets no gradient


def test_gradcheck_float64():
    model = make_model()
    ids, mask = pad_documents([[[3, 5], [2]], [[1, 2, 3]]])
    emb = model.embed.weight.detach().clone().requires_grad_()
    ctx = model.word_attention.context.detach().clone().requires_grad_()
    fn = lambda e, c: functional_call(model, {"embed.weight": e, "word_attention.context": c}, (ids,), {"word_mask": mask}).logits  # noqa: E731
    assert torch.autograd.gradcheck(fn, (emb, ctx), fast_mode=True)
    level = ContextAttention(3).double()
    h = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert torch.autograd.gradcheck(lambda h: level(h, key_mask=m).output, (h,))


def test_context_attention_formula_and_fully_masked_row():
    level = ContextAttention(6, attn_dim=4)
    h = torch.randn(3, 5, 6)
    m = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    out, w = level(h, key_mask=m)
    u = torch.tanh(h @ level.proj.weight.T + level.proj.bias)
    s = (u @ level.context).masked_fill(~m, float("-inf"))
    expected = s[:2].softmax(-1)
    torch.testing.assert_close(w[:2], expected)
    torch.testing.assert_close(out[:2], torch.einsum("bn,bnd->bd", expected, h[:2]))
    assert torch.isfinite(out).all() and (w[2] == 0).all() and (out[2] == 0).all()


# ----------------------------------------------------------------------------- masking and batching


def test_padding_changes_nothing():
    model = make_model(torch.float32)
    ids, mask = pad_documents(DOCS)
    ref = model(ids, word_mask=mask, need_weights=True)
    # garbage in every padded slot, and two more padded sentences and words
    big_ids = torch.randint(0, 10, (3, ids.shape[1] + 2, ids.shape[2] + 2))
    big_mask = torch.zeros(big_ids.shape, dtype=torch.bool)
    big_ids[:, : ids.shape[1], : ids.shape[2]] = torch.where(mask, ids, big_ids[:, : ids.shape[1], : ids.shape[2]])
    big_mask[:, : ids.shape[1], : ids.shape[2]] = mask
    out = model(big_ids, word_mask=big_mask, need_weights=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sentence_weights[:, : ids.shape[1]], ref.sentence_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.word_weights[:, : ids.shape[1], : ids.shape[2]], ref.word_weights, atol=1e-6, rtol=1e-5)
    assert (out.word_weights[~big_mask] == 0).all()


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_batched_equals_one_document_at_a_time(pooling):
    model = make_model(torch.float32, pooling=pooling)
    ids, mask = pad_documents(DOCS)
    batched = model(ids, word_mask=mask, need_weights=True)
    for b, doc in enumerate(DOCS):
        one_ids, one_mask = pad_documents([doc])
        single = model(one_ids, word_mask=one_mask if not one_mask.all() else None, need_weights=True)
        s, t = one_ids.shape[1:]
        torch.testing.assert_close(batched.logits[b], single.logits[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(batched.sentence_weights[b, :s], single.sentence_weights[0])
        torch.testing.assert_close(batched.word_weights[b, :s, :t], single.word_weights[0])
    if pooling == "mean":  # uniform over real positions
        torch.testing.assert_close(batched.sentence_weights[2], torch.full((4,), 0.25, dtype=torch.float32))
        torch.testing.assert_close(batched.word_weights[0, 1, :2], torch.full((2,), 0.5, dtype=torch.float32))


def test_weights_are_distributions_and_word_order_matters():
    model = make_model(torch.float32)
    ids, mask = pad_documents(DOCS)
    out = model(ids, word_mask=mask, need_weights=True)
    torch.testing.assert_close(out.sentence_weights.sum(-1), torch.ones(3))
    torch.testing.assert_close(out.word_weights.sum(-1), mask.any(-1).float())
    swapped = ids.clone()
    swapped[0, 2, [2, 3]] = swapped[0, 2, [3, 2]]  # the GRU reads order: logits change
    assert (model(swapped, word_mask=mask).logits[0] - out.logits[0]).abs().max() > 1e-6


# ----------------------------------------------------------------------------- bad input


def test_bad_input():
    model = make_model(torch.float32)
    ids, mask = pad_documents(DOCS)
    cases = [
        ((DOCS, None), TypeError, r"torch.Tensor of token ids .*pad_documents"),
        ((ids.float(), mask), TypeError, r"integer tensor of token ids with shape \(batch, sentences, words\)"),
        ((ids[0], mask[0]), ValueError, r"shape \(batch, sentences, words\), got 2-D"),
        ((ids, None), ValueError, r"padding id 0 but no word_mask.*word_mask \(batch, sentences, words\)"),
        ((ids + 20, mask), ValueError, r"ids must be token ids in \[0, 10\), got values in \[2\d, 2\d\]"),
        ((ids - 5, mask), ValueError, r"ids must be token ids in \[0, 10\), got values in \[-5, "),
        ((ids.double(), mask), TypeError, r"integer tensor of token ids"),
        ((ids.bool(), mask), TypeError, r"integer tensor of token ids"),
        ((ids, mask.long()), TypeError, r"torch.bool"),
        ((ids, mask[:, :2]), ValueError, r"mask must have shape \(batch, sentences, words\)"),
        ((ids, mask.flip(-1)), ValueError, r"real words of each sentence first"),
        ((ids, mask.flip(1)), ValueError, r"real sentences of each document first"),
        ((ids, mask & torch.tensor([True, False, True])[:, None, None]), ValueError, r"document 1 has none"),
        ((ids[:, :0], mask[:, :0]), ValueError, r"at least one sentence of one word"),
    ]
    for (i, m), err, match in cases:
        with pytest.raises(err, match=match):
            model(i, word_mask=m)
    with pytest.raises(ValueError, match="sentence 1 of document 0 is empty"):
        pad_documents([[[1], []]])
    with pytest.raises(ValueError, match="document 0 is empty"):
        pad_documents([[]])
    with pytest.raises(ValueError, match="h must have shape"):
        ContextAttention(4)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="pooling"):
        HierarchicalAttentionNetwork(10, 2, pooling="max")


def test_empty_batch():
    model = make_model(torch.float32)
    out = model(torch.zeros(0, 3, 4, dtype=torch.long), word_mask=torch.zeros(0, 3, 4, dtype=torch.bool), need_weights=True)
    assert out.logits.shape == (0, 3) and out.sentence_weights.shape == (0, 3) and out.word_weights.shape == (0, 3, 4)
    assert model(torch.zeros(0, 3, 4, dtype=torch.long)).logits.shape == (0, 3)


# ----------------------------------------------------------------------------- the task and the registry


def test_planted_word_documents():
    docs = PlantedWordDocuments()
    a = docs.sample(64, torch.Generator().manual_seed(1))
    b = docs.sample(64, torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids, mask = a["ids"], a["mask"]
    assert ids.shape == mask.shape == (64, 6, 9)
    assert (ids[~mask] == 0).all() and (ids[mask] > 0).all()
    for n in range(64):
        cues = [(i, t) for i in range(6) for t in range(9) if docs.cue_class(int(ids[n, i, t])) is not None]
        assert cues == [(int(a["sentence"][n]), int(a["word"][n]))]  # exactly one cue word, where the batch says
        assert docs.cue_class(int(ids[n, a["sentence"][n], a["word"][n]])) == int(a["y"][n])
    n_sent = mask.any(-1).sum(-1)
    assert n_sent.min() >= 3 and n_sent.max() <= 6
    check = HierarchicalAttentionNetwork(docs.vocab_size, docs.n_classes)
    assert check(ids, word_mask=mask).logits.shape == (64, 4)
    with pytest.raises(ValueError, match="range"):
        PlantedWordDocuments(words=(5, 2))


def test_han_learns_and_attends_to_the_planted_word():
    docs = PlantedWordDocuments()
    set_seed(0)
    model = HierarchicalAttentionNetwork(docs.vocab_size, docs.n_classes, embed_dim=16, hidden=16)
    train(model, docs.sample, han_loss, steps=60, batch_size=32, lr=1e-2, progress=False)
    res = planted_mass(model, docs.sample(256, torch.Generator().manual_seed(7)))
    assert res["acc"] >= 0.9
    assert res["sentence mass"] >= 0.5 and res["word mass"] >= 0.5  # uniform would be about 0.24 and 0.17


def test_registry_and_own_task():
    m = registry.get("hierarchical")
    assert m.chapter == 16 and m.data == "document" and m.build is None and m.cls is HierarchicalAttentionNetwork
    assert registry.chapter(16).slug == "hierarchical_attention"
    assert m.own_task is make_task and own_tasks()["hierarchical"] is make_task  # the own task lives in attn.experiments
    task = make_task("quick")
    hist = train(task.model, task.sample, task.loss, steps=3, batch_size=8, progress=False, log_every=1)
    assert len(hist.loss) == 3
    g = torch.Generator().manual_seed(0)
    for size in task.sizes:
        out = task.layer(*task.inputs(size, g))
        assert out.logits.shape == (8, 4)
    batch = task.sample(5, g)
    w = task.weights(task.model, batch)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    with pytest.raises(ValueError, match="unknown task size 'huge'"):
        make_task("huge")


def test_a_real_word_with_the_padding_id_is_an_error():
    """The padding id embeds to zero: on the original code a real word with id 0 was silently blank."""
    model = make_model(torch.float32)
    ids, mask = pad_documents(DOCS)
    ids[0, 0, 2] = 0  # the last word of the first sentence (mask True) gets the padding id
    with pytest.raises(ValueError, match=r"padding id 0 at 1 real word.*document 0, sentence 0, word 2.*padding_idx=None"):
        model(ids, word_mask=mask)
    mask2 = mask.clone()
    mask2[0, 0, 2] = False  # the same id where the mask says padding is fine
    assert torch.isfinite(model(ids, word_mask=mask2).logits).all()
    # no reserved id: id 0 is a word like any other, with a trained embedding
    torch.manual_seed(0)
    free = HierarchicalAttentionNetwork(10, 3, embed_dim=6, hidden=5, padding_idx=None)
    out = free(ids, word_mask=mask).logits
    out.sum().backward()
    assert float(free.embed.weight.grad[0].abs().max()) > 0
    with pytest.raises(ValueError, match=r"padding_idx must be None or an int in \[0, vocab_size=10\)"):
        HierarchicalAttentionNetwork(10, 3, padding_idx=10)


def test_word_mask_is_named_and_keyword_only():
    """``forward(ids, *, word_mask=None, need_weights=False)``: the mask says what it masks, and a positional mask
    (``model(ids, mask)``, which read as the word mask before while pools read it as a key mask) is refused."""
    import inspect

    params = inspect.signature(HierarchicalAttentionNetwork.forward).parameters
    assert params["word_mask"].kind is inspect.Parameter.KEYWORD_ONLY and "mask" not in params
    assert params["need_weights"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(ContextAttention.forward).parameters["key_mask"].kind is inspect.Parameter.KEYWORD_ONLY
    model = make_model(torch.float32)
    ids, mask = pad_documents(DOCS)
    with pytest.raises(TypeError):
        model(ids, mask)
    with pytest.raises(ValueError, match=r"word_mask must put the real words of each sentence first"):
        model(ids, word_mask=mask.flip(-1))
    with pytest.raises(TypeError, match=r"key_mask must be a torch.bool tensor"):
        ContextAttention(4)(torch.randn(2, 3, 4), key_mask=torch.ones(2, 3))


# ----------------------------------------------------------------------------- the selection task and its arms


def test_triggered_cue_documents_need_selection():
    docs = TriggeredCueDocuments()
    b = docs.sample(64, torch.Generator().manual_seed(0))
    ids, mask, y = b["ids"], b["mask"], b["y"]
    rows = torch.arange(64)
    for n in range(64):
        cues = [(i, docs.cue_class(int(t))) for i in range(ids.shape[1]) for t in ids[n, i][mask[n, i]]
                if docs.cue_class(int(t)) is not None]
        classes = [c for _, c in cues]
        # three cue sentences, three different classes: the wrong classes outnumber the right one
        assert len(cues) == docs.cue_sentences and len(set(classes)) == docs.cue_sentences
        assert len({i for i, _ in cues}) == docs.cue_sentences
        # exactly one trigger, in the sentence whose cue is the label
        trig = (ids[n] == docs.trigger) & mask[n]
        assert int(trig.sum()) == 1
        s = int(trig.any(-1).nonzero()[0, 0])
        assert s == int(b["sentence"][n])
        assert dict(cues)[s] == int(y[n])
    # the decisive cue sits at (sentence, word)
    assert all(docs.cue_class(int(t)) == int(c) for t, c in zip(ids[rows, b["sentence"], b["word"]], y, strict=True))
    # every class occurs as a label
    assert set(y.tolist()) == set(range(docs.n_classes))
    with pytest.raises(ValueError):
        TriggeredCueDocuments(cue_sentences=5)


def test_flat_network_pads_nothing_and_weights_sit_on_real_words():
    docs = TriggeredCueDocuments()
    b = docs.sample(4, torch.Generator().manual_seed(1))
    set_seed(0)
    flat = FlatAttentionNetwork(docs.vocab_size, docs.n_classes, embed_dim=8, hidden=8).eval()
    with torch.no_grad():
        logits, w = flat(b["ids"], word_mask=b["mask"], need_weights=True)
        assert w is not None and logits.shape == (4, docs.n_classes)
        assert torch.allclose(w.sum((1, 2)), torch.ones(4)) and (w[~b["mask"]] == 0).all()
        # one document alone, cut to its real words, gives the same logits
        n_s = int(b["mask"][0].any(-1).sum())
        alone, _ = flat(b["ids"][:1, :n_s], word_mask=b["mask"][:1, :n_s])
        assert torch.allclose(alone, logits[:1], atol=1e-6)


def test_train_document_model_arms_are_seeded_and_han_selects():
    docs = TriggeredCueDocuments()
    held = docs.sample(256, torch.Generator().manual_seed(5))
    with cpu_threads(1):
        a, _ = train_document_model("average pooling", docs, seed=2, steps=2)
        b, _ = train_document_model("average pooling", docs, seed=2, steps=2)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
        with pytest.raises(ValueError, match="arm"):
            train_document_model("max pooling", docs, seed=0, steps=1)
        han, hist = train_document_model("HAN", docs, seed=0, steps=50, log_every=10)
    acc = document_accuracy(han, held)
    assert acc > 0.5, acc  # chance 0.25
    assert list(hist.to_frame()["step"])[:2] == [10, 20]
    mass = planted_mass(han, held)
    assert mass["sentence mass"] > 0.4  # uniform: about 0.2
