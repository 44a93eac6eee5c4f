"""Chapter 6: BERT bidirectional self-attention, causal and prefix-LM patterns."""

from __future__ import annotations

import pytest
import torch

from attn.attention import AttentionBase
from attn.bert import PATTERNS, BidirectionalSelfAttention, pattern_mask, prefix_lm_mask, to_bert_mask
from attn.experiments.bert import (
    MaskedTokenEncoder,
    RepeatTask,
    RightContextTask,
    lm_loss,
    masked_token_loss,
    mlm_loss,
    right_context_visible,
    run_mlm_vs_lm,
    second_half_accuracy,
)
from attn.masks import causal_mask, padding_mask
from attn.models import TransformerBlock
from attn.multihead import MultiHeadAttention
from attn.registry import get
from attn.train import evaluate, train

transformers = pytest.importorskip("transformers")
from transformers import BertConfig  # noqa: E402
from transformers.models.bert.modeling_bert import BertSelfAttention, BertSelfOutput  # noqa: E402

E, H, N = 32, 4, 9
LENGTHS = [9, 5, 2]
PREFIX = torch.tensor([4, 0, 9])


def bert_pair(output_projection=False):
    cfg = BertConfig(hidden_size=E, num_attention_heads=H, attention_probs_dropout_prob=0.0,
                     hidden_dropout_prob=0.0, attn_implementation="eager")
    ref = BertSelfAttention(cfg).eval()
    out = BertSelfOutput(cfg).eval()
    ours = BidirectionalSelfAttention(E, H, output_projection=output_projection)
    ours.load_bert_weights(ref, out if output_projection else None)
    return ref, out, ours


def prefix_for(pattern):
    return PREFIX if pattern == "prefix_lm" else None


# ----------------------------------------------------------------------------- reference: transformers


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_matches_transformers_bert_self_attention(pattern, need_weights):
    """Forward, probabilities and gradients equal BertSelfAttention (eager) with the same mask, padding included."""
    ref, _, ours = bert_pair()
    x = torch.randn(3, N, E, requires_grad=True)
    km = padding_mask(LENGTHS, N)
    out, w = ours(x, key_mask=km, prefix_len=prefix_for(pattern), pattern=pattern, need_weights=need_weights)
    r_out, r_w = ref(x, attention_mask=to_bert_mask(pattern_mask(pattern, N, prefix_for(pattern), km)))
    assert out.shape == r_out.shape == (3, N, E)
    assert (out - r_out).abs().max() <= 1e-5
    if need_weights:
        assert w.shape == r_w.shape == (3, H, N, N)
        assert (w - r_w).abs().max() <= 1e-5
        assert w[1, :, :, 5:].abs().max() == 0  # padded keys get exactly zero probability
    up = torch.randn_like(out)
    ours_params = [ours.q_proj.weight, ours.q_proj.bias, ours.k_proj.weight, ours.k_proj.bias, ours.v_proj.weight, ours.v_proj.bias]
    ref_params = [ref.query.weight, ref.query.bias, ref.key.weight, ref.key.bias, ref.value.weight, ref.value.bias]
    g1 = torch.autograd.grad(out, [x, *ours_params], up)
    g2 = torch.autograd.grad(r_out, [x, *ref_params], up)
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2, strict=True)) <= 1e-5


def test_output_projection_is_bert_self_output_dense():
    ref, dense_out, ours = bert_pair(output_projection=True)
    x = torch.randn(2, N, E)
    km = padding_mask([N, 4], N)
    with torch.no_grad():
        expected = dense_out.dense(ref(x, attention_mask=to_bert_mask(pattern_mask("bidirectional", N, key_mask=km)))[0])
        torch.testing.assert_close(ours(x, key_mask=km).output, expected, atol=1e-5, rtol=1e-5)


def test_to_bert_mask_is_transformers_format():
    """Our padding mask converts to exactly what transformers builds for BERT's eager attention."""
    from transformers.masking_utils import create_bidirectional_mask

    cfg = BertConfig(hidden_size=E, num_attention_heads=H, attn_implementation="eager")
    km = padding_mask([5, 3], 5)
    theirs = create_bidirectional_mask(config=cfg, inputs_embeds=torch.randn(2, 5, E), attention_mask=km.long())
    ours = to_bert_mask(pattern_mask("bidirectional", 5, key_mask=km))
    assert ours.shape == theirs.shape == (2, 1, 5, 5) and ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------- mask patterns


def test_prefix_lm_mask_structure():
    n = 7
    for p in range(n + 1):
        m = prefix_lm_mask(n, p)
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        # prefix rows see the whole prefix and nothing after it; later rows see the prefix and their past
        assert torch.equal(m[:p], (j < p)[:p])
        assert torch.equal(m[p:], (j <= i)[p:])
    assert torch.equal(prefix_lm_mask(n, 0), causal_mask(n))
    assert prefix_lm_mask(n, n).all()
    per_example = prefix_lm_mask(n, torch.tensor([0, 3, 7]))
    assert per_example.shape == (3, n, n)
    for b, p in enumerate([0, 3, 7]):
        assert torch.equal(per_example[b], prefix_lm_mask(n, p))


def test_pattern_mask_with_padding():
    km = padding_mask([4, 2], 4)
    bi = pattern_mask("bidirectional", 4, key_mask=km)
    assert torch.equal(bi[1], km[1].expand(4, 4))
    ca = pattern_mask("causal", 4, key_mask=km)
    assert torch.equal(ca, causal_mask(4) & km[:, None, :])
    assert pattern_mask("prefix_lm", 4, 2).shape == (4, 4)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_layer_sees_what_the_pattern_allows(pattern):
    """Perturb tokens and watch which outputs move: bidirectional reads the right, causal never, prefix-LM inside the prefix."""
    torch.manual_seed(1)
    layer = BidirectionalSelfAttention(16, 2, pattern=pattern).double()
    n, p = 8, 4
    x = torch.randn(1, n, 16, dtype=torch.float64)
    pl = torch.tensor([p]) if pattern == "prefix_lm" else None
    y = layer(x, prefix_len=pl).output
    for t in range(n):
        x2 = x.clone()
        x2[:, t] += 3.0
        changed = (layer(x2, prefix_len=pl).output - y).abs().amax(-1)[0] > 1e-9  # (n,)
        allowed = pattern_mask(pattern, n, p)[:, t]  # which queries may read token t
        assert torch.equal(changed, allowed), (t, changed, allowed)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_padded_keys_have_no_influence_and_batch_equals_single(pattern):
    layer = BidirectionalSelfAttention(16, 2, pattern=pattern).double()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    km = padding_mask([6, 4, 3], 6)
    pl = torch.tensor([2, 4, 3]) if pattern == "prefix_lm" else None
    y = layer(x, key_mask=km, prefix_len=pl).output
    x2 = x.clone()
    x2[1, 4:] = 100.0
    torch.testing.assert_close(layer(x2, key_mask=km, prefix_len=pl).output[1, :4], y[1, :4])
    for b in range(3):
        single = layer(x[b : b + 1], key_mask=km[b : b + 1], prefix_len=None if pl is None else pl[b : b + 1]).output
        torch.testing.assert_close(single, y[b : b + 1])


@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_masked_rows_give_zeros(need_weights):
    layer = BidirectionalSelfAttention(8, 2, output_projection=False)
    x = torch.randn(2, 5, 8, requires_grad=True)
    km = padding_mask([5, 0], 5)  # example 1 has no real token at all
    out, w = layer(x, key_mask=km, pattern="prefix_lm", prefix_len=torch.tensor([2, 3]), need_weights=need_weights)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    if need_weights:
        assert w[1].abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_gradcheck(pattern, need_weights):
    layer = BidirectionalSelfAttention(6, 2, pattern=pattern).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    km = padding_mask([5, 3], 5)
    pl = torch.tensor([2, 5]) if pattern == "prefix_lm" else None
    assert torch.autograd.gradcheck(lambda x: layer(x, key_mask=km, prefix_len=pl, need_weights=need_weights).output, (x,))


# ----------------------------------------------------------------------------- bad input and registry


def test_bad_input():
    layer = BidirectionalSelfAttention(8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"prefix_len must lie in \[0, n=5\]"):
        layer(x, pattern="prefix_lm", prefix_len=6)
    with pytest.raises(ValueError, match=r"prefix_len must lie in \[0, n=5\]"):
        layer(x, pattern="prefix_lm", prefix_len=torch.tensor([1, -1]))
    with pytest.raises(ValueError, match=r"prefix_len must have shape \(batch=2,\)"):
        layer(x, pattern="prefix_lm", prefix_len=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"an int or have shape \(batch,\)"):
        layer(x, pattern="prefix_lm", prefix_len=torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        layer(x, pattern="prefix_lm", prefix_len=torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="needs prefix_len"):
        layer(x, pattern="prefix_lm")
    with pytest.raises(ValueError, match="only used by the 'prefix_lm' pattern"):
        layer(x, pattern="causal", prefix_len=2)
    with pytest.raises(ValueError, match="pattern must be one of"):
        layer(x, pattern="sideways")
    with pytest.raises(ValueError, match="pattern must be one of"):
        BidirectionalSelfAttention(8, 2, pattern="sideways")
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, embed_dim=8\)"):
        layer(torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, embed_dim=8\)"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="empty"):
        layer(torch.randn(2, 0, 8))
    with pytest.raises(TypeError, match=r"torch\.bool"):
        layer(x, key_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"key_mask must have shape"):
        layer(x, key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"attn_mask must be a torch\.bool"):
        layer(x, attn_mask=torch.ones(5, 5))
    with pytest.raises(ValueError, match=r"prefix_len must lie"):
        prefix_lm_mask(4, 5)
    with pytest.raises(TypeError, match="boolean"):
        to_bert_mask(torch.zeros(3, 3))
    cfg = BertConfig(hidden_size=16, num_attention_heads=2, attn_implementation="eager")
    with pytest.raises(ValueError, match=r"needs \(8, 8\)"):
        layer.load_bert_weights(BertSelfAttention(cfg))
    with pytest.raises(ValueError, match="no output projection"):
        cfg8 = BertConfig(hidden_size=8, num_attention_heads=2, attn_implementation="eager")
        BidirectionalSelfAttention(8, 2, output_projection=False).load_bert_weights(BertSelfAttention(cfg8), BertSelfOutput(cfg8))
    with pytest.raises(TypeError, match=r"self_output must have nn\.Linear 'dense'"):
        BidirectionalSelfAttention(8, 2).load_bert_weights(BertSelfAttention(cfg8), torch.nn.Identity())


def test_registered_and_build_works():
    mech = get("bert")
    assert mech.chapter == 6 and mech.paper == "Devlin et al. 2019" and mech.cls is BidirectionalSelfAttention
    layer = mech.build(32, 4)
    x = torch.randn(2, 7, 32)
    out = layer(x)
    assert out.output.shape == (2, 7, 32) and out.weights is None
    w = layer(x, need_weights=True).weights
    assert w.shape == (2, 4, 7, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 7))
    # bidirectional by default: the first token reads the last one
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert (layer(x2).output[:, 0] - out.output[:, 0]).abs().max() > 1e-6


# ----------------------------------------------------------------------------- the toy task


def test_right_context_task():
    task = RightContextTask(vocab=10, length=12, min_length=6, n_masks=3)
    b = task.sample(256, torch.Generator().manual_seed(0))
    x, target, km, lengths = b["x"], b["target"], b["key_mask"], b["lengths"]
    blank = target != -100
    assert (blank.sum(1) == 3).all()
    assert (x[blank] == task.MASK).all() and (x[~blank & km] >= 2).all() and (x[~km] == task.PAD).all()
    pos = torch.arange(12)
    assert (pos.expand(256, 12)[blank].view(256, 3) < (lengths - 1)[:, None]).all()  # a right neighbour exists
    assert not (blank[:, 1:] & blank[:, :-1]).any()  # blanks are never adjacent
    rows, cols = blank.nonzero(as_tuple=True)
    assert torch.equal(target[rows, cols], x[rows, cols + 1])  # the answer is the token to the right
    assert ((b["prefix_len"] >= 0) & (b["prefix_len"] <= lengths)).all()
    assert not right_context_visible("causal", b).any()
    assert torch.equal(right_context_visible("bidirectional", b), blank)
    vis = right_context_visible("prefix_lm", b)
    assert torch.equal(vis, blank & (pos[None] + 1 < b["prefix_len"][:, None]))
    with pytest.raises(ValueError, match="n_masks"):
        RightContextTask(length=8, min_length=4, n_masks=3)


def test_bidirectional_beats_causal_on_right_context():
    task = RightContextTask(vocab=8, length=10, min_length=6, n_masks=2)
    acc = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for pattern in ("bidirectional", "causal"):
            torch.manual_seed(0)
            model = MaskedTokenEncoder(task, pattern, embed_dim=32, num_heads=2, num_layers=1)
            train(model, task.sample, masked_token_loss, steps=150, batch_size=32, progress=False)
            acc[pattern] = evaluate(model, task.sample, masked_token_loss)["acc"]
    finally:
        torch.set_num_threads(threads)
    assert acc["bidirectional"] > 0.9, acc
    assert acc["causal"] < 0.3, acc  # chance is 1/8


# ----------------------------------------------------------------------------- one attention interface (issue 23)


def test_is_causal_keyword_selects_the_causal_pattern_and_state_dicts_match_mha():
    torch.manual_seed(0)
    layer = BidirectionalSelfAttention(8, 2).double()
    assert isinstance(layer, AttentionBase) and layer.kernel == "sdpa" and not layer.causal
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    km = padding_mask([6, 4], 6)
    torch.testing.assert_close(layer(x, key_mask=km, is_causal=True).output,
                               layer(x, key_mask=km, pattern="causal").output, atol=0, rtol=0)
    causal = BidirectionalSelfAttention(8, 2, pattern="causal").double()
    causal.load_state_dict(layer.state_dict())
    assert causal.causal
    torch.testing.assert_close(causal(x, is_causal=False).output, layer(x).output, atol=0, rtol=0)
    with pytest.raises(ValueError, match="contradicts"):
        layer(x, is_causal=True, pattern="bidirectional")
    with pytest.raises(TypeError):
        layer(x, km)  # key_mask is keyword-only
    mha = MultiHeadAttention(8, 2).double()
    mha.load_state_dict(layer.state_dict())  # the same parameter names
    torch.testing.assert_close(mha(x, key_mask=km).output, layer(x, key_mask=km).output, atol=1e-12, rtol=1e-12)


def test_encoder_is_transformer_blocks():
    task = RightContextTask(vocab=6, length=8, min_length=4, n_masks=1)
    model = MaskedTokenEncoder(task, "prefix_lm", embed_dim=16, num_heads=2, num_layers=2)
    assert all(isinstance(b, TransformerBlock) and isinstance(b.mixer, BidirectionalSelfAttention) for b in model.layers)
    batch = task.sample(3, torch.Generator().manual_seed(0))
    logits, ws = model(batch["x"], batch["key_mask"], batch["prefix_len"], need_weights=True)
    assert logits.shape == (3, 8, task.n_tokens) and len(ws) == 2 and ws[0].shape == (3, 2, 8, 8)


# ----------------------------------------------------------------------------- masked LM against causal LM


def test_repeat_task_second_half_repeats_and_bert_corruption():
    task = RepeatTask(vocab=16, length=20, mask_rate=0.15)
    assert task.n_masked == 3 and task.half == 10
    b = task.sample(4000, torch.Generator().manual_seed(0))
    tokens, x, target = b["tokens"], b["x"], b["target"]
    assert torch.equal(tokens[:, 10:], tokens[:, :10])  # every second-half token is readable on its left
    assert (tokens >= 2).all() and b["key_mask"].all()
    picked = target != -100
    assert (picked.sum(1) == 3).all()  # exactly k = round(0.15 n) predicted tokens per sequence
    assert torch.equal(target[picked], tokens[picked])
    assert torch.equal(x[~picked], tokens[~picked])  # only the picked tokens are corrupted
    # both halves are picked (the first half is learnable from the right, bidirectionally)
    assert picked[:, :10].any() and picked[:, 10:].any()
    # BERT's 80/10/10: [MASK], a random token, unchanged
    masked = (x[picked] == task.MASK).float().mean()
    kept = (x[picked] == tokens[picked]).float().mean()
    assert 0.77 < masked < 0.83 and 0.08 < kept < 0.13, (masked, kept)  # kept: 10% + random hits 10%/16
    h = task.held_out(500, torch.Generator().manual_seed(1))
    hp = h["target"] != -100
    assert not hp[:, :10].any() and (hp.sum(1) == 3).all()  # held-out blanks only in the second half
    assert (h["x"][hp] == task.MASK).all() and torch.equal(h["x"][:, :10], h["tokens"][:, :10])
    with pytest.raises(ValueError, match="even"):
        RepeatTask(length=7)


def test_losses_predict_what_they_should():
    """Both losses are finite scalars, and the causal LM's prediction at i never reads a later token."""
    task = RepeatTask(vocab=8, length=8)
    b = task.sample(4, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    enc = MaskedTokenEncoder(task, "bidirectional", embed_dim=16, num_heads=2, num_layers=1)
    lm = MaskedTokenEncoder(task, "causal", embed_dim=16, num_heads=2, num_layers=1)
    for model, loss_fn in ((enc, mlm_loss), (lm, lm_loss)):
        loss, metrics = loss_fn(model, b)
        assert loss.ndim == 0 and torch.isfinite(loss) and 0.0 <= metrics["acc"] <= 1.0
    # the LM's prediction at position i must not depend on tokens after i (else next-token loss leaks)
    tokens = b["tokens"].clone()
    before, _ = lm(tokens, b["key_mask"])
    tokens[:, 5:] = 2
    after, _ = lm(tokens, b["key_mask"])
    torch.testing.assert_close(before[:, :5], after[:, :5])
    h = task.held_out(16, torch.Generator().manual_seed(2))
    for model, objective in ((enc, "masked LM"), (lm, "causal LM")):
        assert 0.0 <= second_half_accuracy(model, objective, h) <= 1.0
    with pytest.raises(ValueError, match="objective"):
        second_half_accuracy(lm, "span LM", h)


def test_run_mlm_vs_lm_one_curve_per_seed_and_censoring():
    task = RepeatTask(vocab=6, length=8)
    r = run_mlm_vs_lm(task, seeds=[0, 1, 2], steps=20, eval_every=10, embed_dim=16, num_heads=2, num_layers=1,
                      n_held_out=32)
    assert r.steps == [10, 20] and r.seeds == [0, 1, 2]
    for o in ("masked LM", "causal LM"):
        assert len(r.curves[o]) == 3 and all(len(c) == 2 for c in r.curves[o])
        assert len(r.final(o)) == 3 and len(r.steps_to(o, 2.0)) == 3
        assert r.steps_to(o, 2.0) == [None, None, None]  # never reached: censored, not dropped
        assert r.steps_to(o, 0.0) == [10, 10, 10]
    assert r.tokens_per_step == 32 * 8
    assert r.predicted_per_step == {"masked LM": 32 * 1, "causal LM": 32 * 7}
    assert r.tokens_to("causal LM", 0.0, predicted=True) == [10.0 * 32 * 7] * 3
    with pytest.raises(ValueError, match="multiple"):
        run_mlm_vs_lm(task, seeds=[0], steps=15, eval_every=10)
    # equal predicted tokens: n = 20, k = 3 -> the masked LM's step 190 matches the causal LM's step 30
    r.steps = list(range(10, 201, 10))
    r.predicted_per_step = {"masked LM": 32 * 3, "causal LM": 32 * 19}
    assert r.matched_predicted() == (190, 30)
    r.predicted_per_step = {"masked LM": 32 * 2, "causal LM": 32 * 7}
    sm, sc = r.matched_predicted()
    assert (sm, sc) == (140, 40) and sm * 2 == sc * 7


@pytest.mark.slow
def test_both_objectives_learn_the_repeat():
    task = RepeatTask(vocab=8, length=12)
    r = run_mlm_vs_lm(task, seeds=[0], steps=200, eval_every=50, n_held_out=256)
    assert r.final("masked LM")[0] > 0.9 and r.final("causal LM")[0] > 0.9, r.curves
