"""Chapter 7: co-attention (Lu et al. parallel and alternating, Xiong et al. DCN) against the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from attn import registry
from attn.co_attention import AlternatingCoAttention, BiDAFAttention, DCNCoAttention, ParallelCoAttention
from attn.experiments import own_tasks
from attn.experiments.co_attention import (
    CoAttentionPointer,
    MatchingPairs,
    TwoWayCrossAttention,
    first_step_entropy,
    make_co_attention_task,
    pointer_loss,
    steps_to_target,
    train_pointers,
)
from attn.masks import padding_mask
from attn.train import History, train

DQ, DV = 5, 7  # different widths


def softmax_cols(x: torch.Tensor) -> torch.Tensor:
    """Softmax of a vector written as exp / sum (no torch.softmax)."""
    e = torch.exp(x - x.max())
    return e / e.sum()


def parallel_reference(mod: ParallelCoAttention, question, passage, t_len, n_len):
    """Lu et al. eqs. (3)-(4) in the paper's column convention, one example at a time, real positions only."""
    outs = []
    for i in range(question.shape[0]):
        Q = question[i, : t_len[i]].T  # (d_q, T)
        V = passage[i, : n_len[i]].T  # (d_v, N)
        C = torch.tanh(Q.T @ mod.w_b @ V)  # (T, N)
        Wv, Wq = mod.w_v.weight, mod.w_q.weight  # (k, d_v), (k, d_q)
        Hv = torch.tanh(Wv @ V + (Wq @ Q) @ C)  # (k, N)
        Hq = torch.tanh(Wq @ Q + (Wv @ V) @ C.T)  # (k, T)
        av = softmax_cols((mod.w_hv.weight @ Hv)[0])
        aq = softmax_cols((mod.w_hq.weight @ Hq)[0])
        outs.append((Q @ aq, V @ av, aq, av, C))
    return outs


def alternating_reference(mod: AlternatingCoAttention, question, passage, t_len, n_len):
    def A(step, X, g):  # x^ = A(X; g), X (d, L)
        H = step.w_x.weight @ X
        if g is not None:
            H = H + (step.w_g.weight @ g)[:, None]
        a = softmax_cols((step.w_hx.weight @ torch.tanh(H))[0])
        return X @ a, a

    outs = []
    for i in range(question.shape[0]):
        Q, V = question[i, : t_len[i]].T, passage[i, : n_len[i]].T
        s, a_s = A(mod.step1, Q, None)
        v, a_v = A(mod.step2, V, s)
        if mod.step3 is None:
            outs.append((s, v, a_s, a_v))
        else:
            q, a_q = A(mod.step3, Q, v)
            outs.append((q, v, a_q, a_v))
    return outs


def dcn_reference(mod: DCNCoAttention, question, document, n_len, m_len):
    """Xiong et al. eqs. (1)-(4): L = D^T Q, A^Q column softmax, A^D = softmax(L^T), C^Q = D A^Q, C^D = [Q; C^Q] A^D."""
    outs = []
    for i in range(question.shape[0]):
        Qp = torch.cat([question[i, : n_len[i]].T, mod.q_sentinel[:, None]], 1)  # Q' with q_∅ appended: (d_q, n+1)
        Q = torch.tanh(mod.q_proj.weight @ Qp + mod.q_proj.bias[:, None])  # the sentinel goes through W^(Q) too: (ℓ, n+1)
        D = torch.cat([document[i, : m_len[i]].T, mod.doc_sentinel[:, None]], 1)  # (ℓ, m+1)
        L = D.T @ Q  # (m+1, n+1)
        AQ = torch.stack([softmax_cols(L[:, j]) for j in range(L.shape[1])], 1)  # softmax over the document, per column
        AD = torch.stack([softmax_cols(L.T[:, j]) for j in range(L.shape[0])], 1)  # (n+1, m+1)
        CQ = D @ AQ  # (ℓ, n+1)
        CD = torch.cat([Q, CQ], 0) @ AD  # (2ℓ, m+1)
        outs.append((CD, CQ, L, AD, AQ))
    return outs


def pair(b=3, t=6, n=9, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, DQ, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(b, n, DV, generator=g, dtype=dtype, requires_grad=True)
    return q, v


LENS = ([6, 4, 2], [9, 5, 7])  # question lengths T, passage lengths N per example


def _grads(out_terms, ref_terms, params):
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in out_terms]
    total = sum((u * t).sum() for u, t in zip(ups, out_terms, strict=True))
    total_ref = sum((u * t).sum() for u, t in zip(ups, ref_terms, strict=True))
    return torch.autograd.grad(total, params, allow_unused=True), torch.autograd.grad(total_ref, params, allow_unused=True)


@pytest.mark.parametrize("masked", [False, True])
def test_parallel_matches_lu_equations(masked):
    torch.manual_seed(0)
    mod = ParallelCoAttention(DQ, DV, hidden=8).double()
    q, v = pair()
    t_len, n_len = LENS if masked else ([6] * 3, [9] * 3)
    qm, vm = (padding_mask(t_len, 6), padding_mask(n_len, 9)) if masked else (None, None)
    out = mod(q, v, question_mask=qm, passage_mask=vm)
    refs = parallel_reference(mod, q, v, t_len, n_len)
    mine, theirs = [], []
    for i, (q_hat, v_hat, aq, av, C) in enumerate(refs):
        t, n = t_len[i], n_len[i]
        mine += [out.question_summary[i], out.passage_summary[i], out.question_weights[i, :t], out.passage_weights[i, :n], out.affinity[i, :t, :n]]
        theirs += [q_hat, v_hat, aq, av, C]
        assert (out.question_weights[i, t:] == 0).all() and (out.passage_weights[i, n:] == 0).all()
    for a, b in zip(mine, theirs, strict=True):
        assert (a - b).abs().max() <= 1e-12
    params = [q, v, *mod.parameters()]
    for a, b in zip(*_grads(mine, theirs, params), strict=True):
        assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("third_step", [True, False])
def test_alternating_matches_lu_equations(third_step):
    torch.manual_seed(0)
    mod = AlternatingCoAttention(DQ, DV, hidden=8, third_step=third_step).double()
    q, v = pair()
    t_len, n_len = LENS
    out = mod(q, v, question_mask=padding_mask(t_len, 6), passage_mask=padding_mask(n_len, 9))
    assert out.affinity is None
    mine, theirs = [], []
    for i, (q_hat, v_hat, aq, av) in enumerate(alternating_reference(mod, q, v, t_len, n_len)):
        mine += [out.question_summary[i], out.passage_summary[i], out.question_weights[i, : t_len[i]], out.passage_weights[i, : n_len[i]]]
        theirs += [q_hat, v_hat, aq, av]
    for a, b in zip(mine, theirs, strict=True):
        assert (a - b).abs().max() <= 1e-12
    params = [q, v, *mod.parameters()]
    for a, b in zip(*_grads(mine, theirs, params), strict=True):
        assert (a - b).abs().max() <= 1e-10


def test_one_way_question_weights_ignore_the_passage():
    """Without the third step the question is attended blind; with it, the passage changes the question weights."""
    torch.manual_seed(0)
    q, v = pair(dtype=torch.float32)
    v2 = torch.randn_like(v)
    one_way = AlternatingCoAttention(DQ, DV, third_step=False)
    torch.testing.assert_close(one_way(q, v).question_weights, one_way(q, v2).question_weights)
    full = AlternatingCoAttention(DQ, DV)
    assert (full(q, v).question_weights - full(q, v2).question_weights).abs().max() > 1e-4
    par = ParallelCoAttention(DQ, DV)
    assert (par(q, v).question_weights - par(q, v2).question_weights).abs().max() > 1e-4


@pytest.mark.parametrize("masked", [False, True])
def test_dcn_matches_xiong_equations(masked):
    torch.manual_seed(0)
    mod = DCNCoAttention(DQ, DV, fusion=False).double()
    q, d = pair()
    n_len, m_len = LENS if masked else ([6] * 3, [9] * 3)
    qm, dm = (padding_mask(n_len, 6), padding_mask(m_len, 9)) if masked else (None, None)
    out = mod(q, d, question_mask=qm, passage_mask=dm)
    assert out.context.shape == (3, 10, 2 * DV) and out.affinity.shape == (3, 10, 7) and out.encoding is None
    mine, theirs = [], []
    for i, (CD, CQ, L, AD, AQ) in enumerate(dcn_reference(mod, q, d, n_len, m_len)):
        n, m = n_len[i], m_len[i]
        rows_d = [*range(m), 9]  # real document positions and the sentinel (last index)
        rows_q = [*range(n), 6]
        mine += [out.context[i, rows_d], out.question_context[i, rows_q], out.affinity[i][rows_d][:, rows_q],
                 out.passage_weights[i][rows_d][:, rows_q], out.question_weights[i][rows_q][:, rows_d]]
        theirs += [CD.T, CQ.T, L, AD.T, AQ.T]
        assert (out.passage_weights[i, :, n:6] == 0).all() and (out.question_weights[i, :, m:9] == 0).all()
        assert (out.context[i, m:9] == 0).all()  # padded document rows
    for a, b in zip(mine, theirs, strict=True):
        assert (a - b).abs().max() <= 1e-12
    params = [q, d, *mod.parameters()]
    for a, b in zip(*_grads(mine, theirs, params), strict=True):
        if a is not None or b is not None:
            assert (a - b).abs().max() <= 1e-10


def test_dcn_fusion_is_a_bilstm_over_document_and_context():
    torch.manual_seed(0)
    mod = DCNCoAttention(DQ, DV, fusion=True).double()
    q, d = pair()
    n_len, m_len = LENS
    out = mod(q, d, question_mask=padding_mask(n_len, 6), passage_mask=padding_mask(m_len, 9))
    assert out.encoding.shape == (3, 9, 2 * DV)
    for i in range(3):  # each example alone through the same LSTM, real positions only
        m = m_len[i]
        x = torch.cat([d[i, :m], out.context[i, :m]], -1)[None]
        ref, _ = mod.lstm(x)
        torch.testing.assert_close(out.encoding[i, :m], ref[0])
        assert (out.encoding[i, m:] == 0).all()


def random_mask(kind: str, b: int, n: int, g: torch.Generator) -> torch.Tensor:
    """``(b, n)`` bool masks with at least one real position per row: right-padded, left-padded or with holes."""
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    right = torch.arange(n)[None] < lengths[:, None]
    if kind == "right":
        return right
    if kind == "left":
        return right.flip(-1)
    mask = torch.rand(b, n, generator=g) < 0.6  # holes anywhere
    mask[torch.arange(b), torch.randint(0, n, (b,), generator=g)] = True
    return mask


@pytest.mark.parametrize("kind", ["right", "left", "holes"])
@pytest.mark.parametrize("seed", [0, 1])
def test_dcn_any_mask_equals_the_real_words_alone(kind, seed):
    """U (and C^D, A^D) at real rows equal the layer run on the real words alone; padded rows are zero; gradients too.

    Before the fix the BiLSTM was packed by lengths = mask.sum(), which reads the first positions, padded or not:
    with left padding or holes U was wrong at real rows and non-zero at padded ones.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mod = DCNCoAttention(DQ, DV, fusion=True).double()
    b, n, m = 4, 5, 8
    q = torch.randn(b, n, DQ, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(b, m, DV, generator=g, dtype=torch.float64, requires_grad=True)
    qm, dm = random_mask(kind, b, n, g), random_mask(kind, b, m, g)
    if kind != "right":
        assert not all(bool(r[: int(r.sum())].all()) for r in dm)  # at least one document is not right-padded
    out = mod(q, d, question_mask=qm, passage_mask=dm)
    up = torch.randn(out.encoding.shape, generator=g, dtype=torch.float64)
    up_c = torch.randn(out.context.shape, generator=g, dtype=torch.float64)
    params = list(mod.parameters())
    grads = torch.autograd.grad((up * out.encoding).sum() + (up_c * out.context).sum(), [q, d, *params])
    param_grads_alone = [torch.zeros_like(p) for p in params]
    for i in range(b):
        qi, di = q[i, qm[i]].detach().requires_grad_(), d[i, dm[i]].detach().requires_grad_()
        alone = mod(qi[None], di[None])  # the real words only, no mask
        enc = out.encoding[i][dm[i]]
        assert (enc - alone.encoding[0]).abs().max() <= 1e-12
        assert (out.encoding[i][~dm[i]] == 0).all()  # padded rows of U are zero
        rows = torch.cat([dm[i], torch.tensor([True])])  # real document rows and the sentinel
        cols = torch.cat([qm[i], torch.tensor([True])])
        assert (out.context[i][rows] - alone.context[0]).abs().max() <= 1e-12
        assert (out.passage_weights[i][rows][:, cols] - alone.passage_weights[0]).abs().max() <= 1e-12
        loss_i = (up[i][dm[i]] * alone.encoding[0]).sum() + (up_c[i][rows] * alone.context[0]).sum()
        g_alone = torch.autograd.grad(loss_i, [qi, di, *params])
        assert (grads[0][i][qm[i]] - g_alone[0]).abs().max() <= 1e-12
        assert (grads[1][i][dm[i]] - g_alone[1]).abs().max() <= 1e-12
        assert (grads[0][i][~qm[i]] == 0).all() and (grads[1][i][~dm[i]] == 0).all()  # padded inputs get no gradient
        for acc, ga in zip(param_grads_alone, g_alone[2:], strict=True):
            acc += ga
    for a, b_ in zip(grads[2:], param_grads_alone, strict=True):
        assert (a - b_).abs().max() <= 1e-10


@pytest.mark.parametrize("cls", [ParallelCoAttention, AlternatingCoAttention, DCNCoAttention])
def test_batched_equals_per_example_and_padding_has_no_effect(cls):
    torch.manual_seed(0)
    mod = cls(DQ, DV) if cls is not DCNCoAttention else cls(DQ, DV, fusion=True)
    q, v = (t.detach().float() for t in pair())
    t_len, n_len = LENS
    qm, vm = padding_mask(t_len, 6), padding_mask(n_len, 9)
    out = mod(q, v, question_mask=qm, passage_mask=vm)
    q2, v2 = q.clone(), v.clone()
    q2[~qm] = 50.0
    v2[~vm] = -50.0
    out2 = mod(q2, v2, question_mask=qm, passage_mask=vm)
    for i in range(3):
        t, n = t_len[i], n_len[i]
        alone = mod(q[i : i + 1, :t], v[i : i + 1, :n])
        if cls is DCNCoAttention:
            torch.testing.assert_close(out.context[i, :n], alone.context[0, :n])
            torch.testing.assert_close(out.context[i, -1], alone.context[0, -1])  # the sentinel row
            torch.testing.assert_close(out.encoding[i, :n], alone.encoding[0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(out2.context, out.context)
        else:
            torch.testing.assert_close(out.question_summary[i], alone.question_summary[0])
            torch.testing.assert_close(out.passage_summary[i], alone.passage_summary[0])
            torch.testing.assert_close(out.passage_weights[i, :n], alone.passage_weights[0])
            torch.testing.assert_close(out2.question_summary, out.question_summary)
            torch.testing.assert_close(out2.passage_weights, out.passage_weights)


def test_gradcheck_float64():
    torch.manual_seed(0)
    q, v = pair(b=2, t=3, n=4)
    qm, vm = padding_mask([3, 2], 3), padding_mask([4, 3], 4)
    par = ParallelCoAttention(DQ, DV, hidden=4).double()
    assert torch.autograd.gradcheck(lambda q, v: par(q, v, question_mask=qm, passage_mask=vm)[:4], (q, v), fast_mode=True)
    alt = AlternatingCoAttention(DQ, DV, hidden=4).double()
    assert torch.autograd.gradcheck(lambda q, v: alt(q, v, question_mask=qm, passage_mask=vm)[:4], (q, v), fast_mode=True)
    dcn = DCNCoAttention(DQ, DV, fusion=False).double()
    assert torch.autograd.gradcheck(lambda q, v: dcn(q, v, question_mask=qm, passage_mask=vm)[:2], (q, v), fast_mode=True)


@pytest.mark.parametrize("cls", [ParallelCoAttention, AlternatingCoAttention, DCNCoAttention])
@pytest.mark.parametrize(
    "args, error, match",
    [
        (([[1.0] * DQ], torch.ones(1, 2, DV)), TypeError, r"question must be a torch.Tensor of shape \(batch, T, question_dim=5\)"),
        ((torch.ones(1, 2, DQ, dtype=torch.long), torch.ones(1, 2, DV)), TypeError, "floating-point"),
        ((torch.ones(2, DQ), torch.ones(1, 2, DV)), ValueError, r"question must have shape \(batch, T, question_dim=5\), got 2-D"),
        ((torch.ones(1, 2, DQ), torch.ones(1, 2, DV + 1)), ValueError, r"width 8 != 7"),
        ((torch.ones(1, 2, DQ), torch.ones(2, 3, DV)), ValueError, "batch sizes differ"),
        ((torch.ones(1, 0, DQ), torch.ones(1, 3, DV)), ValueError, r"at least one position"),
        ((torch.ones(1, 2, DQ), torch.ones(1, 3, DV), torch.ones(1, 3, dtype=torch.bool)), ValueError, r"question_mask must have shape \(batch=1, T=2\)"),
        ((torch.ones(1, 2, DQ), torch.ones(1, 3, DV), None, torch.ones(1, 3)), TypeError, "torch.bool"),
        ((torch.ones(1, 2, DQ), torch.ones(1, 3, DV), torch.zeros(1, 2, dtype=torch.bool)), ValueError, "at least one real position"),
        # mixed dtypes between the two sequences, or against the layer (RuntimeErrors deep in a matmul before)
        ((torch.ones(1, 2, DQ), torch.ones(1, 3, DV, dtype=torch.float64)), TypeError,
         r"dtypes must match \(question: torch.float32, passage: torch.float64\)"),
        ((torch.ones(1, 2, DQ, dtype=torch.bfloat16), torch.ones(1, 3, DV)), TypeError, r"question: torch.bfloat16"),
        ((torch.ones(1, 2, DQ, dtype=torch.float64), torch.ones(1, 3, DV, dtype=torch.float64)), TypeError,
         r"torch.float64 but the layer's parameters are torch.float32"),
        ((torch.ones(1, 2, DQ, dtype=torch.complex64), torch.ones(1, 3, DV)), TypeError, "question must be a real floating-point"),
        # the other bad inputs of the public forwards
        ((torch.ones(1, 2, DQ), [[[1.0] * DV]]), TypeError, r"passage must be a torch.Tensor of shape \(batch, N, passage_dim=7\)"),
        ((torch.ones(1, 2, DQ), torch.ones(1, 1, 3, DV)), ValueError, r"passage must have shape \(batch, N, passage_dim=7\), got 4-D"),
        ((torch.ones(1, 2, DQ + 1), torch.ones(1, 3, DV)), ValueError, r"width 6 != 5"),
        ((torch.ones(1, 2, DQ), torch.ones(1, 0, DV)), ValueError, r"passage must hold at least one position"),
        ((torch.ones(1, 2, DQ), torch.ones(1, 3, DV), [[True, True]]), TypeError, "question_mask must be a torch.bool tensor"),
        ((torch.ones(1, 2, DQ), torch.ones(1, 3, DV), None, torch.ones(1, 3, dtype=torch.long)), TypeError,
         "passage_mask must be a torch.bool tensor"),
        ((torch.ones(1, 2, DQ), torch.ones(1, 3, DV), None, torch.ones(1, 3, 1, dtype=torch.bool)), ValueError,
         r"passage_mask must have shape \(batch=1, N=3\), got \(1, 3, 1\)"),
        ((torch.ones(1, 2, DQ), torch.ones(1, 3, DV), None, torch.ones(2, 3, dtype=torch.bool)), ValueError,
         r"passage_mask must have shape \(batch=1, N=3\), got \(2, 3\)"),
    ],
)
def test_bad_input(cls, args, error, match):
    masks = dict(zip(("question_mask", "passage_mask"), args[2:], strict=False))  # keyword-only
    with pytest.raises(error, match=match):
        cls(DQ, DV)(*args[:2], **masks)


@pytest.mark.parametrize("cls", [ParallelCoAttention, AlternatingCoAttention, DCNCoAttention])
def test_one_interface_for_the_three_layers(cls):
    """The three layers take ``(question, passage, *, question_mask, passage_mask)``: the masks keyword-only (a
    positional mask cannot be mistaken for the other one), and DCN's document is a ``passage`` like Lu et al.'s."""
    import inspect

    params = inspect.signature(cls.forward).parameters
    assert list(params)[:3] == ["self", "question", "passage"]
    for name in ("question_mask", "passage_mask"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError):
        cls(DQ, DV)(torch.ones(1, 2, DQ), torch.ones(1, 3, DV), torch.ones(1, 2, dtype=torch.bool))
    out = cls(DQ, DV)(torch.ones(1, 2, DQ), torch.ones(1, 3, DV), passage_mask=torch.tensor([[True, True, False]]))
    assert out.passage_weights.shape[:2] == ((1, 3) if cls is not DCNCoAttention else (1, 4))


@pytest.mark.parametrize("cls", [ParallelCoAttention, AlternatingCoAttention, DCNCoAttention])
def test_same_dtype_inputs_run_in_that_dtype(cls):
    """The dtype check does not get in the way: a float64 layer takes float64 inputs, a bf16 layer bf16 inputs."""
    for dtype in (torch.float64, torch.bfloat16):
        out = cls(DQ, DV).to(dtype)(torch.randn(2, 3, DQ, dtype=dtype), torch.randn(2, 4, DV, dtype=dtype))
        assert out[0].dtype == dtype and torch.isfinite(out[0].float()).all()


@pytest.mark.parametrize("cls", [ParallelCoAttention, AlternatingCoAttention, DCNCoAttention])
@pytest.mark.parametrize("kwargs, error, match", [
    ({"question_dim": 0}, ValueError, "question_dim must be >= 1"),
    ({"passage_dim": 2.0}, TypeError, "passage_dim must be an int"),
])
def test_bad_constructor(cls, kwargs, error, match):
    args = {"question_dim": DQ, "passage_dim": DV, **kwargs}
    with pytest.raises(error, match=match):
        cls(**args)
    if cls is not DCNCoAttention:
        with pytest.raises(ValueError, match="hidden must be >= 1"):
            cls(DQ, DV, hidden=0)


@pytest.mark.parametrize("cls", [ParallelCoAttention, AlternatingCoAttention, DCNCoAttention])
def test_empty_batch(cls):
    out = cls(DQ, DV)(torch.ones(0, 4, DQ), torch.ones(0, 6, DV))
    if cls is DCNCoAttention:
        assert out.context.shape == (0, 7, 2 * DV) and out.affinity.shape == (0, 7, 5) and out.encoding.shape == (0, 6, 2 * DV)
    else:
        assert out.question_summary.shape == (0, DQ) and out.passage_weights.shape == (0, 6)


def test_registry_entries():
    names = {"parallel_coattention": ParallelCoAttention, "alternating_coattention": AlternatingCoAttention, "dcn_coattention": DCNCoAttention}
    assert registry.chapter(7).slug == "co_attention"
    for name, cls in names.items():
        m = registry.get(name)
        assert m.chapter == 7 and m.data == "pair" and m.cls is cls and m.build is None and m.own_task is not None
        assert name in own_tasks()  # the own task lives in attn.experiments.co_attention


def test_matching_pairs_task():
    data = MatchingPairs()
    b = data.sample(64, torch.Generator().manual_seed(0))
    rows = torch.arange(64)
    assert torch.equal(b["passage"][rows, b["passage_target"]], b["question"][rows, b["question_target"]])
    assert b["passage_mask"][rows, b["passage_target"]].all() and b["question_mask"][rows, b["question_target"]].all()
    assert (b["passage"][~b["passage_mask"]] == 0).all() and (b["passage"][b["passage_mask"]] > 0).all()
    for i in range(64):  # exactly one shared key
        p = set(b["passage"][i][b["passage_mask"][i]].tolist())
        q = b["question"][i][b["question_mask"][i]].tolist()
        assert len(p & set(q)) == 1 and len(set(q)) == len(q)
    with pytest.raises(ValueError, match="n_keys"):
        MatchingPairs(n_keys=5)


@pytest.mark.parametrize("kind", ["parallel", "alternating", "dcn"])
def test_own_task_hook(kind):
    task = make_co_attention_task(kind, "quick")
    hist = train(task.model, task.sample, task.loss, steps=task.steps, batch_size=task.batch_size, lr=task.lr, progress=False)
    assert math.isfinite(hist.loss[-1])
    gen = torch.Generator().manual_seed(0)
    for n in task.sizes:
        q, v = task.inputs(n, gen)
        out = task.layer(q, v)
        assert v.shape[1] == n and out[0].shape[0] == 1
    w = task.weights(task.model, task.sample(5, gen))
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]))
    with pytest.raises(ValueError, match="unknown task size 'nope'"):
        make_co_attention_task(kind, "nope")


def test_co_attention_learns_both_pointers_one_way_cannot():
    """A short run: parallel co-attention finds the question position far above chance; the one-way model does not."""
    data = MatchingPairs()
    res = {}
    for kind in ("parallel", "one-way"):
        torch.manual_seed(0)
        model = CoAttentionPointer(kind, data.n_keys)
        train(model, data.sample, pointer_loss, steps=150, batch_size=32, lr=1e-2, progress=False)
        with torch.no_grad():
            res[kind] = pointer_loss(model, data.sample(512, torch.Generator().manual_seed(9)))[1]
    assert res["parallel"]["question_acc"] > 0.4
    assert res["one-way"]["question_acc"] < 0.35  # chance is about 0.24
    with pytest.raises(ValueError, match="kind must be one of"):
        CoAttentionPointer("two-way", 8)


def bidaf_reference(mod: BiDAFAttention, question, passage, t_len, n_len):
    """Seo et al. 2017, section 2.4, one example at a time, real positions only, the concatenation formed explicitly:
    S_nt = w^T [h_n; u_t; h_n o u_t], a_n = softmax_t S_n:, b = softmax_n max_t S_nt, G = [h; u~; h o u~; h o h~]."""
    outs = []
    w = mod.w_s.weight[0]
    for i in range(question.shape[0]):
        U, H = question[i, : t_len[i]], passage[i, : n_len[i]]  # (T, d), (N, d)
        S = torch.stack([torch.stack([w @ torch.cat([h, u, h * u]) for u in U]) for h in H])  # (N, T)
        A = torch.stack([softmax_cols(S[n]) for n in range(S.shape[0])])  # (N, T)
        Ut = A @ U  # (N, d)
        b = softmax_cols(S.max(1).values)  # (N,)
        ht = b @ H  # (d,)
        G = torch.cat([H, Ut, H * Ut, H * ht], 1)
        outs.append((S, A, b, Ut, ht, G))
    return outs


@pytest.mark.parametrize("masked", [False, True])
def test_bidaf_matches_seo_equations(masked):
    torch.manual_seed(0)
    mod = BiDAFAttention(DV).double()
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 6, DV, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 9, DV, generator=g, dtype=torch.float64, requires_grad=True)
    t_len, n_len = LENS if masked else ([6] * 3, [9] * 3)
    qm, vm = (padding_mask(t_len, 6), padding_mask(n_len, 9)) if masked else (None, None)
    if masked:  # padding content must not matter
        with torch.no_grad():
            q[~qm] = 40.0
            v[~vm] = -40.0
    out = mod(q, v, question_mask=qm, passage_mask=vm)
    assert out.similarity.shape == (3, 9, 6) and out.merged.shape == (3, 9, 4 * DV)
    mine, theirs = [], []
    for i, ref in enumerate(bidaf_reference(mod, q, v, t_len, n_len)):
        t, n = t_len[i], n_len[i]
        mine += [out.similarity[i, :n, :t], out.question_weights[i, :n, :t], out.passage_weights[i, :n],
                 out.attended_question[i, :n], out.attended_passage[i], out.merged[i, :n]]
        theirs += list(ref)
        assert (out.question_weights[i, :, t:] == 0).all() and (out.passage_weights[i, n:] == 0).all()
        assert (out.merged[i, n:] == 0).all()
    for a, b in zip(mine, theirs, strict=True):
        assert (a - b).abs().max() <= 1e-12
    for a, b in zip(*_grads(mine, theirs, [q, v, *mod.parameters()]), strict=True):
        if a is not None or b is not None:
            assert (a - b).abs().max() <= 1e-10


def test_bidaf_bad_input_and_empty_batch():
    mod = BiDAFAttention(DV)
    with pytest.raises(ValueError, match=r"width 5 != 7"):
        mod(torch.ones(1, 2, DQ), torch.ones(1, 3, DV))
    with pytest.raises(ValueError, match="at least one real position"):
        mod(torch.ones(1, 2, DV), torch.ones(1, 3, DV), question_mask=torch.zeros(1, 2, dtype=torch.bool))
    out = mod(torch.ones(0, 2, DV), torch.ones(0, 3, DV))
    assert out.similarity.shape == (0, 3, 2) and out.merged.shape == (0, 3, 4 * DV)


def test_dcn_question_sentinel_goes_through_the_projection():
    """Xiong et al. append q_∅ to Q' before Q = tanh(W Q' + b): the sentinel lives in the question's input space."""
    torch.manual_seed(0)
    mod = DCNCoAttention(DQ, DV, fusion=False)
    assert mod.q_sentinel.shape == (DQ,)
    d = torch.randn(1, 4, DV)
    out = mod(torch.randn(1, 3, DQ), d)
    q_s = torch.tanh(mod.q_proj(mod.q_sentinel))  # the projected sentinel column of Q: (ℓ,)
    d_s = torch.cat([d[0], mod.doc_sentinel[None]], 0)  # (m+1, ℓ)
    torch.testing.assert_close(out.affinity[0, :, -1], d_s @ q_s)  # L's sentinel column is D^T tanh(W q_∅ + b)


def test_two_way_cross_attention_has_no_shared_affinity():
    """Each direction has its own projections; padding of the other stream is ignored."""
    torch.manual_seed(0)
    mod = TwoWayCrossAttention(DQ, DV, hidden=8)
    assert mod.to_question.q_proj.weight.data_ptr() != mod.to_passage.k_proj.weight.data_ptr()
    q, v = torch.randn(2, 4, DQ), torch.randn(2, 6, DV)
    qm, vm = padding_mask([4, 2], 4), padding_mask([6, 3], 6)
    h_q, h_v = mod(q, v, question_mask=qm, passage_mask=vm)
    assert h_q.shape == q.shape and h_v.shape == v.shape
    q2, v2 = q.masked_fill(~qm[..., None], 9.0), v.masked_fill(~vm[..., None], -9.0)
    h_q2, h_v2 = mod(q2, v2, question_mask=qm, passage_mask=vm)
    torch.testing.assert_close(h_q2[qm], h_q[qm])
    torch.testing.assert_close(h_v2[vm], h_v[vm])


def test_first_step_entropy_and_steps_to_target():
    data = MatchingPairs()
    b = data.sample(64, torch.Generator().manual_seed(0))
    model = CoAttentionPointer("alternating", data.n_keys)
    with torch.no_grad():  # a zero score vector makes a^s uniform: entropy 1
        model.layer.step1.w_hx.weight.zero_()
    assert first_step_entropy(model, b) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="alternating or one-way"):
        first_step_entropy(CoAttentionPointer("parallel", data.n_keys), b)
    h = History()
    for step, acc in zip(range(10, 110, 10), [0.1, 0.95, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9, 0.95, 1.0], strict=True):
        h.log(step, 0.0, {"acc": acc})
    assert steps_to_target(h, 0.9, window=1) == 20  # one lucky batch
    assert steps_to_target(h, 0.9, window=5) == 80  # the moving mean damps it
    assert steps_to_target(h, 0.99, window=5) is None  # censored


def test_train_pointers_one_value_per_seed_per_arm_and_bidaf_learns():
    data = MatchingPairs(n_keys=16)
    held = data.sample(256, torch.Generator().manual_seed(9))
    runs = train_pointers(["bidaf", "cross", "one-way"], [0, 1], data=data, held_out=held, steps=20)
    assert set(runs) == {(s, k) for s in (0, 1) for k in ("bidaf", "cross", "one-way")}
    for r in runs.values():
        assert set(r.metrics) >= {"acc", "passage_acc", "question_acc"} and len(r.history.step) == 2
    runs = train_pointers(["bidaf", "one-way"], [0], data=data, held_out=held, steps=120, target=0.5)
    assert runs[0, "bidaf"].metrics["acc"] > 0.6  # the trilinear term finds the match fast
    assert runs[0, "bidaf"].steps_to_target is not None and runs[0, "one-way"].steps_to_target is None
    assert runs[0, "one-way"].metrics["question_acc"] < 0.35  # floor: chance is about 0.24
