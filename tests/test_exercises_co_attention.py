"""Chapter 7's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn.co_attention import DCNCoAttention, ParallelCoAttention
from attn.exercises import co_attention as ex


def test_solutions_agree_with_the_library() -> None:
    torch.manual_seed(0)
    layer = ParallelCoAttention(5, 3, hidden=8)
    q, v = torch.randn(2, 4, 5), torch.randn(2, 6, 3)
    qm = torch.tensor([[True] * 4, [True, True, False, False]])
    vm = torch.tensor([[True] * 6, [True, False, True, True, True, False]])
    with torch.no_grad():
        ref = layer(q, v, question_mask=qm, passage_mask=vm).affinity
        assert torch.allclose(ex.affinity(q, v, layer.w_b, qm, vm), ref, atol=1e-6)

    dcn = DCNCoAttention(4, 4, fusion=False)
    q, d = torch.randn(2, 3, 4), torch.randn(2, 7, 4)
    with torch.no_grad():
        out = dcn(q, d)
        q_in = torch.cat([q, dcn.q_sentinel.expand(2, 1, 4)], 1)
        q_proj = torch.tanh(dcn.q_proj(q_in))  # the question, projected, sentinel last
        d_s = torch.cat([d, dcn.doc_sentinel.expand(2, 1, 4)], 1)
        assert torch.allclose(ex.dcn_context(d_s, q_proj), out.context, atol=1e-5)


def _aff(q, v, w, qm=None, vm=None, tanh=True, both=True, fill=0.0):  # type: ignore[no-untyped-def]
    c = torch.einsum("btd,de,bne->btn", q, w, v)
    if fill != 0.0:  # fill before the non-linearity
        if qm is not None:
            c = torch.where(qm[:, :, None], c, torch.tensor(fill))
        if vm is not None:
            c = torch.where(vm[:, None, :], c, torch.tensor(fill))
    c = c.tanh() if tanh else c
    if fill == 0.0:
        if qm is not None and both:
            c = torch.where(qm[:, :, None], c, torch.zeros(()))
        if vm is not None:
            c = torch.where(vm[:, None, :], c, torch.zeros(()))
    return c


def test_affinity_right_and_wrong_answers() -> None:
    assert ex.check_affinity(_aff).passed
    table = {
        "no_tanh": lambda *a: _aff(*a, tanh=False),
        "transposed": lambda *a: _aff(*a).permute(0, 2, 1),
        "mask_ignored": lambda q, v, w, qm=None, vm=None: _aff(q, v, w),
        "inf_before_tanh": lambda *a: _aff(*a, fill=-1e30),
        "one_side_masked": lambda *a: _aff(*a, both=False),
        "scaled": lambda q, v, w, qm=None, vm=None: _aff(q / q.shape[-1] ** 0.5, v, w, qm, vm),
    }
    for name, fn in table.items():
        report = ex.check_affinity(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_softmax_axes_values() -> None:
    assert ex.check_dcn_softmax_axes((-1, -2)).passed
    assert ex.check_dcn_softmax_axes([2, 1]).passed  # positive axes of (B, m+1, n+1)
    assert ex.check_dcn_softmax_axes((-1, -1)).mistake == "same_axis_question"
    assert ex.check_dcn_softmax_axes((1, 2)).mistake == "swapped"
    assert ex.check_dcn_softmax_axes((0, 0)).mistake == "generic"


def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    e = (x - x.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)


def _dcn_loop(d, q, bug=""):  # type: ignore[no-untyped-def]
    out = []
    for b in range(d.shape[0]):
        aff = torch.einsum("ml,nl->mn", d[b], q[b])
        if bug == "scaled":
            aff = aff / d.shape[-1] ** 0.5
        a_d = _softmax(aff, 0 if bug == "swap" else 1)
        a_q = _softmax(aff, 1 if bug in ("swap", "same") else 0)
        c_q = torch.einsum("mn,ml->nl", a_q, d[b])
        parts = [c_q, q[b]] if bug == "order" else [q[b], c_q]
        out.append(torch.einsum("mn,nl->ml", a_d, torch.cat(parts, 1)))
    return torch.stack(out)


def test_dcn_context_right_and_wrong_answers() -> None:
    assert ex.check_dcn_context(_dcn_loop).passed
    table = {"same": "same_axis", "swap": "axes_swapped", "scaled": "scaled", "order": "concat_order"}
    for bug, name in table.items():
        report = ex.check_dcn_context(lambda d, q, bug=bug: _dcn_loop(d, q, bug))
        assert not report.passed and report.mistake == name, (name, report.text())
    report = ex.check_dcn_context(lambda d, q: torch.softmax(d @ q.mT, -1) @ q)
    assert report.mistake == "no_summaries", report.text()
