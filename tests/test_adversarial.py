"""Chapter 22: adversarial attention (FGM on embeddings, Attention AT on scores) against explicit references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attn
from attn import registry
from attn.adversarial import AttentionPooling, fgm_perturbation, js_distance, kl_logits, tv_distance, vat_perturbation
from attn.experiments import own_task, own_tasks
from attn.experiments.adversarial import (
    Arm,
    AttentionClassifier,
    CueSentiment,
    adversarial_loss,
    attack,
    cue_ranking,
    make_task,
    robust_auc,
    robustness,
    score_scale,
    train_arms,
)
from attn.masks import padding_mask
from attn.train import cpu_threads, set_seed, train


def small_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return AttentionClassifier(CueSentiment().vocab, embed_dim=8, hidden=8).to(dtype)


def batch(n=16, seed=0):
    return CueSentiment().sample(n, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the attention layer against SDPA


@pytest.mark.parametrize("with_delta", [False, True])
def test_pooling_matches_sdpa_forward_and_gradients(with_delta):
    torch.manual_seed(0)
    pool = AttentionPooling(8)
    x = torch.randn(3, 7, 8, requires_grad=True)
    km = padding_mask([7, 4, 1], 7)
    delta = torch.randn(3, 7, requires_grad=True) if with_delta else None
    out, w = pool(x, key_mask=km, score_delta=delta, need_weights=True)
    # reference: F.scaled_dot_product_attention with the query as one token, delta and padding as an additive mask
    q = pool.query.expand(3, 1, 8)
    k, v = pool.key(x), pool.value(x)
    additive = (delta if with_delta else torch.zeros(3, 7)).masked_fill(~km, float("-inf"))[:, None, :]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)[:, 0]
    ref_w = ((q @ k.transpose(1, 2))[:, 0] / math.sqrt(8) + additive[:, 0]).softmax(-1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)
    up = torch.randn_like(out)
    inputs = [x, *pool.parameters()] + ([delta] if with_delta else [])
    for a, b in zip(torch.autograd.grad(out, inputs, up), torch.autograd.grad(ref, inputs, up), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    model = small_model(torch.float64)
    b = batch(3)
    s = model.embed(b["x"], b["mask"]).detach().requires_grad_()
    delta = torch.randn(3, s.shape[1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, d: model.classify(s, key_mask=b["mask"], score_delta=d)[0], (s, delta), fast_mode=True)
    pool = AttentionPooling(4).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: pool(x, key_mask=padding_mask([5, 3], 5), need_weights=True).weights, (x,))


def test_normalised_embeddings_have_unit_variance():
    model = small_model()
    t = model.normalised_table()
    torch.testing.assert_close(t.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(0, unbiased=False), torch.ones(8), atol=1e-4, rtol=0)
    with torch.no_grad():
        model.embedding.weight.mul_(100.0)  # inflating the table changes nothing
    torch.testing.assert_close(model.normalised_table(), t, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- the perturbation


def test_fgm_perturbation_norm_direction_and_zero_gradient():
    g = torch.randn(4, 5, 3)
    g[2] = 0.0
    r = fgm_perturbation(g, 0.7)
    norms = r.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms[[0, 1, 3]], torch.full((3,), 0.7))
    assert norms[2] == 0 and torch.isfinite(r).all()
    cos = F.cosine_similarity(r.flatten(1)[[0, 1, 3]], g.flatten(1)[[0, 1, 3]], dim=1)
    torch.testing.assert_close(cos, torch.ones(3))
    assert fgm_perturbation(g, 0.0).abs().max() == 0


def test_fgm_is_the_worst_case_for_a_linear_loss():
    """For L(s) = <w, s> the best L2 step of size eps raises L by exactly eps ||w||; no random direction does better."""
    w = torch.randn(1, 6, 4, dtype=torch.float64)
    s = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((w * s).sum(), s)
    r = fgm_perturbation(g, 0.3)
    gain = float((w * r).sum())
    assert abs(gain - 0.3 * float(w.norm())) < 1e-12
    u = torch.randn(200, 6, 4, dtype=torch.float64)
    u = 0.3 * u / u.flatten(1).norm(dim=1)[:, None, None]
    assert float((w * u).sum((1, 2)).max()) < gain


@pytest.mark.parametrize("target", ["embedding", "attention"])
def test_first_order_loss_increase(target):
    """L(s + r) - L(s) = eps ||g|| + O(eps^2): the relative error shrinks in proportion to eps."""
    model = small_model(torch.float64)
    b = batch(1, seed=3)
    s = model.embed(b["x"], b["mask"]).detach().requires_grad_()
    zero = torch.zeros(s.shape[:2], dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(model.classify(s, key_mask=b["mask"], score_delta=zero)[0], b["y"])
    wrt = s if target == "embedding" else zero
    (g,) = torch.autograd.grad(loss, wrt)
    errors = []
    with torch.no_grad():
        for eps in (1e-2, 1e-3, 1e-4):
            r = fgm_perturbation(g, eps)
            logits = model.classify(s + r, key_mask=b["mask"])[0] if target == "embedding" else model.classify(s, key_mask=b["mask"], score_delta=r)[0]
            measured = float(F.cross_entropy(logits, b["y"]) - loss)
            predicted = eps * float(g.norm())
            errors.append(abs(measured / predicted - 1))
    assert errors[-1] < 1e-3
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5


# ----------------------------------------------------------------------------- the training loss and the attack


def test_loss_none_is_cross_entropy_and_embedding_loss_matches_formula():
    model = small_model(torch.float64)
    b = batch(8)
    loss, m = adversarial_loss(model, b, target="none")
    logits = model(b["x"], key_mask=b["mask"])[0]
    torch.testing.assert_close(loss, F.cross_entropy(logits, b["y"]))
    assert m["acc"] == m["robust_acc"]
    # embedding AT by hand: r from the clean gradient, held constant
    params = list(model.parameters())
    total, _ = adversarial_loss(model, b, target="embedding", epsilon=0.5, alpha=0.3)
    s = model.embed(b["x"], b["mask"])
    clean = F.cross_entropy(model.classify(s, key_mask=b["mask"])[0], b["y"])
    (g,) = torch.autograd.grad(clean, s, retain_graph=True)
    r = (0.5 * g / g.flatten(1).norm(dim=1)[:, None, None]).detach()
    ref = clean + 0.3 * F.cross_entropy(model.classify(s + r, key_mask=b["mask"])[0], b["y"])
    torch.testing.assert_close(total, ref)
    for a, c in zip(torch.autograd.grad(total, params), torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(a, c)


def test_attention_loss_matches_formula():
    model = small_model(torch.float64)
    b = batch(8)
    params = list(model.parameters())
    total, _ = adversarial_loss(model, b, target="attention", epsilon=0.5)
    s = model.embed(b["x"], b["mask"])
    scores = model.pool.scores(s)
    # explicit: softmax over real tokens of (scores + r), r = eps * dL/dscores / ||dL/dscores||
    def loss_at(delta):
        a = (scores + delta).masked_fill(~b["mask"], float("-inf")).softmax(-1)
        c = torch.einsum("bn,bne->be", a, model.pool.value(s))
        return F.cross_entropy(model.mlp(c), b["y"])

    d0 = torch.zeros_like(scores, requires_grad=True)
    clean = loss_at(d0)
    (g,) = torch.autograd.grad(clean, d0, retain_graph=True)
    assert (g[~b["mask"]] == 0).all()  # padding gets no perturbation
    r = (0.5 * g / g.norm(dim=1, keepdim=True)).detach()
    ref = clean + loss_at(r)
    torch.testing.assert_close(total, ref)
    for a, c in zip(torch.autograd.grad(total, params), torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(a, c)


def test_loss_works_under_no_grad_for_evaluation():
    model = small_model()
    with torch.no_grad():
        loss, m = adversarial_loss(model, batch(8), target="attention", epsilon=1.0)
    assert torch.isfinite(loss) and 0 <= m["robust_acc"] <= 1


@pytest.mark.parametrize("target", ["embedding", "attention"])
def test_attack_norms_and_first_step_is_fgm(target):
    model = small_model()
    b = batch(32)
    fgm = attack(model, b, 0.8, target, steps=1)
    pgd = attack(model, b, 0.8, target, steps=5)
    for out in (fgm, pgd):
        norms = out["delta"].flatten(1).norm(dim=1)
        assert (norms <= 0.8 + 1e-5).all()
        torch.testing.assert_close(out["clean_weights"].sum(-1), torch.ones(32))
        torch.testing.assert_close(out["adv_weights"].sum(-1), torch.ones(32))
        assert (out["adv_weights"][~b["mask"]] == 0).all()
    torch.testing.assert_close(fgm["delta"].flatten(1).norm(dim=1), torch.full((32,), 0.8))
    assert pgd["adv_loss"] >= fgm["clean_loss"]
    assert model.training  # restored


def test_attack_epsilon_zero_changes_nothing():
    model = small_model()
    out = attack(model, batch(8), 0.0, "embedding", steps=3)
    assert torch.equal(out["clean_pred"], out["adv_pred"])
    assert out["js"].max() < 1e-6 and out["tv"].max() < 1e-6


def test_distances_against_scipy():
    from scipy.spatial.distance import jensenshannon

    p = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.5, 0.5], [0.3, 0.3, 0.4]], dtype=torch.float64)
    for i in range(2):
        assert abs(float(js_distance(p[i], q[i])) - jensenshannon(p[i].numpy(), q[i].numpy())) < 1e-12
    torch.testing.assert_close(tv_distance(p, q), 0.5 * (p - q).abs().sum(-1))
    assert float(js_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(math.sqrt(math.log(2)))


# ----------------------------------------------------------------------------- properties


def test_padding_has_no_effect_and_batched_equals_per_example():
    model = small_model()
    b = batch(5)
    logits, w = model(b["x"], key_mask=b["mask"], need_weights=True)
    x2 = b["x"].clone()
    x2[~b["mask"]] = 7  # other ids under the padding
    torch.testing.assert_close(model(x2, key_mask=b["mask"])[0], logits)
    assert (w[~b["mask"]] == 0).all()
    per = torch.cat([model(b["x"][i : i + 1], key_mask=b["mask"][i : i + 1])[0] for i in range(5)])
    torch.testing.assert_close(per, logits)


def test_fully_masked_row_gives_zeros_not_nan():
    pool = AttentionPooling(4)
    x = torch.randn(2, 3, 4, requires_grad=True)
    km = torch.tensor([[True, True, False], [False, False, False]])
    out, w = pool(x, key_mask=km, need_weights=True)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0 and w[1].abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_task_labels_follow_the_cues():
    task = CueSentiment()
    b = task.sample(500, torch.Generator().manual_seed(1))
    pos = ((b["x"] >= 1) & (b["x"] <= task.n_cues)).sum(-1)
    neg = ((b["x"] > task.n_cues) & (b["x"] <= 2 * task.n_cues)).sum(-1)
    assert torch.equal(b["y"], (pos > neg).long())
    assert torch.equal(b["cue"].sum(-1), pos + neg) and set((pos + neg).tolist()) == {1, 3}
    assert not (b["cue"] & ~b["mask"]).any() and (b["x"][~b["mask"]] == 0).all() and (b["x"][b["mask"]] > 0).all()
    assert torch.equal(task.sample(4, torch.Generator().manual_seed(2))["x"], task.sample(4, torch.Generator().manual_seed(2))["x"])


def test_training_is_seeded_and_deterministic():
    task = CueSentiment()

    def run(seed):
        set_seed(seed)
        model = AttentionClassifier(task.vocab, embed_dim=8, hidden=8)
        train(model, task.sample, lambda m, b: adversarial_loss(m, b, "attention", 1.0), steps=5, batch_size=16, seed=seed, progress=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_empty_batch():
    model = small_model()
    logits, w = model(torch.zeros(0, 6, dtype=torch.long), key_mask=torch.zeros(0, 6, dtype=torch.bool), need_weights=True)
    assert logits.shape == (0, 2) and w.shape == (0, 6)
    out = AttentionPooling(8)(torch.zeros(0, 5, 8))
    assert out.output.shape == (0, 8) and out.weights is None
    assert fgm_perturbation(torch.zeros(0, 5, 8), 1.0).shape == (0, 5, 8)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m([[1, 2, 3]]), TypeError, r"tokens must be a torch.Tensor of shape \(batch, n\)"),
        (lambda m: m(torch.ones(2, 3)), TypeError, "integer ids"),
        (lambda m: m(torch.ones(2, 3, 4, dtype=torch.long)), ValueError, r"tokens must have shape \(batch, n\)"),
        (lambda m: m(torch.full((2, 3), 99)), ValueError, r"\[0, vocab=24\)"),
        (lambda m: m(torch.ones(2, 0, dtype=torch.long)), ValueError, "empty sequence"),
        (lambda m: m(torch.ones(2, 3, dtype=torch.long), key_mask=torch.ones(2, 3)), TypeError, "key_mask must be a torch.bool"),
        (lambda m: m(torch.ones(2, 3, dtype=torch.long), key_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"key_mask must have shape \(batch=2, n=3\)"),
        (lambda m: m(torch.ones(2, 3, dtype=torch.long), embed_delta=torch.zeros(2, 3, 5)), ValueError, r"embed_delta must be a tensor of shape \(batch, n, embed_dim\)"),
        (lambda m: m(torch.ones(2, 3, dtype=torch.long), score_delta=torch.zeros(2, 4)), ValueError, r"score_delta must have shape \(batch, n\)"),
        (lambda m: m(torch.ones(2, 3, dtype=torch.long), score_delta=torch.zeros(2, 3, dtype=torch.long)), TypeError, "score_delta must be a floating-point"),
        (lambda m: m.pool(torch.randn(2, 3, 5)), ValueError, r"x must have shape \(batch, seq, embed_dim=8\)"),
        (lambda m: m.pool(torch.randn(3, 8)), ValueError, r"x must have shape \(batch, seq, embed_dim=8\)"),
        (lambda m: m.pool([[0.0] * 8]), TypeError, "x must be a torch.Tensor"),
        (lambda m: fgm_perturbation([1.0, 2.0], 1.0), TypeError, "grad must be a floating-point tensor"),
        (lambda m: fgm_perturbation(torch.ones(2, 3), -1.0), ValueError, "epsilon must be a finite number >= 0"),
        (lambda m: adversarial_loss(m, batch(4), target="input"), ValueError, "target must be one of"),
        (lambda m: attack(m, batch(4), 1.0, steps=0), ValueError, "steps must be an int >= 1"),
        (lambda m: AttentionClassifier(0), ValueError, "vocab must be a positive int"),
        (lambda m: AttentionPooling(-2), ValueError, "embed_dim must be a positive int"),
        (lambda m: CueSentiment(length=4), ValueError, "length must be >= 6"),
        (lambda m: make_task("huge"), ValueError, "unknown task size 'huge'; one of quick, book, full, large"),
        (lambda m: make_task("default"), ValueError, "unknown task size 'default'"),
        (lambda m: make_task("quick", target="input"), ValueError, "target must be one of"),
        (lambda m: m.pool(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)), TypeError, "positional argument"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(small_model())


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name, target", [("adversarial_embedding", "embedding"), ("adversarial_attention", "attention")])
def test_registry_own_task(name, target):
    mech = registry.get(name)
    assert mech.chapter == 22 and mech.cls is AttentionPooling and mech.build is None and mech.data == "text"
    own = own_task(name, "quick")
    assert own.layer is own.model.pool
    assert target in own.description
    hist = train(own.model, own.sample, own.loss, steps=3, batch_size=own.batch_size, seed=0, progress=False)
    assert len(hist.loss) == 1 and "robust_acc" in hist.metrics
    gen = torch.Generator().manual_seed(0)
    out = own.layer(*own.inputs(own.sizes[0], gen))
    assert out.output.shape == (8, 32)
    b = own.sample(6, gen)
    w = own.weights(own.model, b)
    torch.testing.assert_close(w.sum(-1), torch.ones(6))
    assert registry.chapter(22).slug == "adversarial_attention"


# ----------------------------------------------------------------------------- the layer apart from the experiment


def test_mechanism_module_holds_the_layer_and_the_experiment_its_classifier():
    """attn.adversarial: the pooling layer, FGM and the distances; the classifier, task and losses are experiments."""
    import attn.adversarial as mech

    assert not {"AttentionClassifier", "CueSentiment", "adversarial_loss", "attack", "make_task"} & set(vars(mech))
    assert AttentionClassifier.__module__ == "attn.experiments.adversarial" and attn.AttentionClassifier is AttentionClassifier
    assert attn.AttentionPooling is AttentionPooling
    assert {"adversarial_embedding", "adversarial_attention"} <= set(own_tasks())
    assert registry.get("adversarial_attention").own_task is not None  # found in attn.experiments, by size


def test_options_are_keyword_only():
    import inspect

    for fn in (AttentionPooling.forward, AttentionClassifier.forward, AttentionClassifier.classify):
        params = inspect.signature(fn).parameters
        for name in ("key_mask", "score_delta", "need_weights"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, f"{fn.__qualname__}: {name}"


# ----------------------------------------------------------------------------- issue 17: VAT, bounded scores, random budgets, the runner


def test_vat_direction_raises_the_kl_more_than_a_random_direction():
    """The virtual adversarial step (one power iteration) beats a random step of the same norm, sentence by sentence."""
    model = small_model(torch.float64)
    b = batch(32)
    s = model.embed(b["x"], b["mask"]).detach()

    def logits_at(r):
        return model.classify(s + r, key_mask=b["mask"])[0]

    clean = logits_at(torch.zeros_like(s))
    rand = torch.randn(s.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * b["mask"][..., None]
    for eps in (1e-2, 1e-1):
        r = vat_perturbation(logits_at, clean, s, eps, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(r.flatten(1).norm(dim=1), torch.full((32,), eps, dtype=torch.float64))
        with torch.no_grad():
            kl_vat = kl_logits(clean, logits_at(r))
            kl_rand = kl_logits(clean, logits_at(fgm_perturbation(rand, eps)))
        assert (kl_vat > kl_rand).all()
        assert (r[~b["mask"]] == 0).all()  # padding cannot move the prediction: no perturbation there


def test_vat_power_iteration_converges_to_the_top_eigenvector_of_the_kl_hessian():
    """For logits = W z the Hessian of KL(p(z0) || p(z0 + r)) at r = 0 is W^T (diag p - p p^T) W."""
    torch.manual_seed(0)
    W = torch.randn(4, 6, dtype=torch.float64)
    z0 = torch.randn(1, 6, dtype=torch.float64)

    def logits_at(r):
        return (z0 + r) @ W.T

    clean = logits_at(torch.zeros_like(z0))
    p = clean.softmax(-1)[0]
    H = W.T @ (torch.diag(p) - p[:, None] * p[None, :]) @ W
    top = torch.linalg.eigh(H).eigenvectors[:, -1]
    r = vat_perturbation(logits_at, clean, z0, 1.0, xi=1e-4, iterations=30, generator=torch.Generator().manual_seed(0))
    assert abs(float(r[0] @ top)) > 0.999
    r1 = vat_perturbation(logits_at, clean, z0, 1.0, xi=1e-4, iterations=1, generator=torch.Generator().manual_seed(0))
    d0 = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(float(r1[0] @ top)) > abs(float(d0[0] @ top) / d0.norm())  # one step already turns towards it


def test_vat_loss_matches_formula():
    model = small_model(torch.float64)
    b = batch(8)
    torch.manual_seed(5)
    loss, metrics = adversarial_loss(model, b, "virtual", 0.5)
    s = model.embed(b["x"], b["mask"])
    logits, _ = model.classify(s, key_mask=b["mask"])
    torch.manual_seed(5)
    r = vat_perturbation(lambda d: model.classify(s.detach() + d, key_mask=b["mask"])[0], logits, s, 0.5)
    adv_logits, _ = model.classify(s + r, key_mask=b["mask"])
    expected = F.cross_entropy(logits, b["y"]) + kl_logits(logits.detach(), adv_logits).mean()
    torch.testing.assert_close(loss, expected)
    assert set(metrics) == {"acc", "robust_acc"}
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_qk_norm_bounds_the_scores_and_ignores_their_scale():
    torch.manual_seed(0)
    pool = AttentionPooling(8, qk_norm=True)
    x = torch.randn(4, 6, 8) * 10
    s = pool.scores(x)
    assert s.abs().max() <= math.sqrt(8) + 1e-5
    with torch.no_grad():  # growing ||q|| ||W_k|| changes nothing: the loophole is closed
        pool.query.mul_(50.0)
        pool.key.weight.mul_(50.0)
        pool.key.bias.mul_(50.0)
    torch.testing.assert_close(pool.scores(x), s, atol=1e-4, rtol=1e-4)
    free = AttentionPooling(8)
    before = free.scores(x)
    with torch.no_grad():
        free.query.mul_(3.0)
    torch.testing.assert_close(free.scores(x), 3 * before)  # without the bound the scores scale


def test_fgm_with_one_budget_per_example():
    g = torch.randn(3, 4, 2)
    eps = torch.tensor([0.0, 0.5, 2.0])
    r = fgm_perturbation(g, eps)
    torch.testing.assert_close(r.flatten(1).norm(dim=1), eps)
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        fgm_perturbation(g, torch.ones(2))
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        fgm_perturbation(g, torch.tensor([1.0, -1.0, 1.0]))


def test_random_epsilon_draws_one_budget_per_sentence_from_the_global_seed():
    model = small_model(torch.float64)
    b = batch(8)
    torch.manual_seed(11)
    loss, _ = adversarial_loss(model, b, "embedding", 2.0, random_epsilon=True)
    torch.manual_seed(11)
    eps = 2.0 * torch.rand(8)
    s = model.embed(b["x"], b["mask"]).detach().requires_grad_()
    logits, _ = model.classify(s, key_mask=b["mask"])
    clean = F.cross_entropy(logits, b["y"])
    (g,) = torch.autograd.grad(clean, s)
    r = fgm_perturbation(g, eps.double())
    expected = clean + F.cross_entropy(model.classify(s + r, key_mask=b["mask"])[0], b["y"])
    torch.testing.assert_close(loss, expected)
    fixed, _ = adversarial_loss(model, b, "embedding", 2.0)
    assert not torch.isclose(loss, fixed)


def test_cue_ranking_depends_on_the_order_only():
    cue = torch.tensor([[False, True, False, True, False]])
    mask = torch.tensor([[True, True, True, True, False]])
    scores = torch.tensor([[0.0, 1.0, 0.5, 0.2, 9.0]])
    for c in (0.5, 1.0, 20.0):  # sharper softmax, same order
        w = (c * scores).masked_fill(~mask, -torch.inf).softmax(-1)
        out = cue_ranking(w, cue, mask)
        assert out["top_is_cue"].tolist() == [1.0]
        assert out["auc"].tolist() == pytest.approx([0.75])  # cue 1 beats both neutrals, cue 3 beats one of two
    flat = torch.full((1, 5), 0.25).masked_fill(~mask, 0)
    assert cue_ranking(flat, cue, mask)["auc"].tolist() == [0.5]


def test_score_scale_follows_the_query_norm_only_without_the_bound():
    b = batch(16)
    free = small_model()
    bounded = AttentionClassifier(CueSentiment().vocab, embed_dim=8, hidden=8, qk_norm=True)
    a_free, a_bounded = score_scale(free, b), score_scale(bounded, b)
    assert a_bounded["qk_norm_product"] == pytest.approx(math.sqrt(8), rel=1e-4)
    with torch.no_grad():
        free.pool.query.mul_(3.0)
        bounded.pool.query.mul_(3.0)
    assert score_scale(free, b)["score_std"] == pytest.approx(3 * a_free["score_std"], rel=1e-4)
    assert score_scale(bounded, b)["score_std"] == pytest.approx(a_bounded["score_std"], rel=1e-4)


def test_train_arms_share_weights_and_batches_per_seed_and_the_runner_shapes():
    arms = {"plain": Arm("none"), "plain again": Arm("none"), "VAT": Arm("virtual"), "free": Arm("none", qk_norm=False)}
    models, hist = train_arms(arms, [0, 1], steps=3, batch_size=8, embed_dim=8)
    assert set(models) == {(a, s) for a in arms for s in (0, 1)} and set(hist) == set(models)
    flat = {k: torch.cat([p.detach().flatten() for p in m.parameters()]) for k, m in models.items()}
    assert torch.equal(flat["plain", 0], flat["plain again", 0])  # same init, same batches, same loss
    assert not torch.equal(flat["plain", 0], flat["plain", 1])
    assert not torch.equal(flat["plain", 0], flat["VAT", 0])
    assert models["free", 0].pool.qk_norm is False and models["VAT", 0].pool.qk_norm is True
    test = batch(16, seed=7)
    some = {k: models[k] for k in (("plain", 0), ("VAT", 1), ("free", 1))}
    with cpu_threads(1):  # tiny tensors: extra threads only cost on a shared CPU
        res, kept = robustness(some, test, [0.5, 0.25, 2.0], attack_steps=2, keep_seed=1)
    assert len(res) == len(some) * 2 * 3
    assert set(kept) == {(e, a, t) for e in (0.25, 0.5, 2.0) for a in ("VAT", "free") for t in ("embedding", "attention")}
    for _, g in res.groupby(["method", "seed", "attack"]):
        acc = g.sort_values("epsilon")["robust acc"].to_numpy()
        assert (acc[1:] <= acc[:-1] + 1e-12).all() and acc[0] <= g["clean acc"].iloc[0]
    auc = robust_auc(res)
    assert len(auc) == len(some) * 2 and auc["auc"].between(0, 1).all()


def test_robust_auc_is_the_normalised_trapezoid():
    import pandas as pd

    rows = [{"method": "m", "seed": 0, "attack": "embedding", "epsilon": e, "clean acc": 1.0, "robust acc": a}
            for e, a in ((1.0, 0.5), (2.0, 0.0))]
    auc = robust_auc(pd.DataFrame(rows))
    # area: [0, 1] trapezoid (1 + 0.5) / 2 = 0.75, [1, 2] (0.5 + 0) / 2 = 0.25; divided by 2
    assert auc["auc"].tolist() == pytest.approx([0.5])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: vat_perturbation(lambda r: r, torch.zeros(2, 3), torch.zeros(2, 3), 1.0, iterations=0), "iterations must be an int >= 1"),
        (lambda: vat_perturbation(lambda r: r, torch.zeros(2, 3), torch.zeros(2, 3), 1.0, xi=0.0), "xi must be a number > 0"),
        (lambda: vat_perturbation(lambda r: r, torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3)), r"shape \(batch,\)"),
        (lambda: train_arms({"x": Arm("input")}, [0], steps=1), "target must be one of"),
    ],
)
def test_bad_input_new(call, match):
    with pytest.raises(ValueError, match=match):
        call()
