"""Chapter 1's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn.exercises import soft as ex
from attn.soft import AdditiveAttention, MultiplicativeAttention


def test_general_scores_another_way_and_wrong_answers() -> None:
    def mine(s, h, W):  # type: ignore[no-untyped-def]
        return torch.einsum("bld,de,bse->bls", s, W, h)

    assert ex.check_general_scores(mine).passed
    table = {
        "dot_not_general": lambda s, h, W: torch.einsum("bld,bsd->bls", s, h),
        "w_transposed": lambda s, h, W: torch.einsum("bld,ed,bse->bls", s, W, h),
        "scaled": lambda s, h, W: mine(s, h, W) * s.shape[-1] ** -0.5,
        "softmaxed": lambda s, h, W: mine(s, h, W).exp() / mine(s, h, W).exp().sum(-1, keepdim=True),
    }
    for name, fn in table.items():
        report = ex.check_general_scores(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def _loop_additive(s, h, W, U, v, key_mask=None, *, tanh=True, invert=False, mask=True, dim=-1):  # type: ignore[no-untyped-def]
    """A loop over batch and source positions (the mistakes' code is vectorised)."""
    B, S = h.shape[:2]
    e = torch.stack([torch.stack([v @ (torch.tanh if tanh else (lambda x: x))(W @ s[b] + U @ h[b, j])
                                  for j in range(S)]) for b in range(B)])
    if key_mask is not None and mask:
        keep = ~key_mask if invert else key_mask
        e = torch.where(keep, e, torch.full_like(e, -1e30))
    alpha = torch.softmax(e, dim=dim)
    return torch.einsum("bs,bsd->bd", alpha, h), alpha


def test_additive_attention_another_way_and_wrong_answers() -> None:
    assert ex.check_additive_attention(_loop_additive).passed
    table = {
        "no_tanh": lambda *a, **k: _loop_additive(*a, **k, tanh=False),
        "mask_inverted": lambda *a, **k: _loop_additive(*a, **k, invert=True),
        "mask_ignored": lambda *a, **k: _loop_additive(*a, **k, mask=False),
        "softmax_over_batch": lambda *a, **k: _loop_additive(*a, **k, dim=0),
    }
    for name, fn in table.items():
        report = ex.check_additive_attention(fn)
        assert not report.passed and report.mistake == name, (name, report.text())

    def renormalised_late(s, h, W, U, v, key_mask=None):  # type: ignore[no-untyped-def]
        _, alpha = _loop_additive(s, h, W, U, v, mask=False)
        if key_mask is not None:
            alpha = torch.where(key_mask, alpha, torch.zeros_like(alpha))
        return torch.einsum("bs,bsd->bd", alpha, h), alpha

    assert ex.check_additive_attention(renormalised_late).mistake == "mask_after_softmax"
    detached = ex.check_additive_attention(lambda *a, **k: tuple(t.detach() for t in _loop_additive(*a, **k)))
    assert not detached.passed and "gradient" in detached.diagnosis


def test_solutions_agree_with_the_library() -> None:
    g = torch.Generator().manual_seed(3)
    s, h = torch.randn(2, 4, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    add = AdditiveAttention(4, 6, hidden=7)
    with torch.no_grad():
        add.w_k.bias.zero_()  # the exercise's score has no bias inside the tanh
        ctx, alpha = add(s, h, key_mask=mask)
        mine_ctx, mine_alpha = ex.additive_attention(s, h, add.w_q.weight, add.w_k.weight, add.v.weight[0], mask)
    torch.testing.assert_close(mine_alpha, alpha)
    torch.testing.assert_close(mine_ctx, ctx)

    gen = MultiplicativeAttention(6, 6, "general")
    q = torch.randn(2, 3, 6, generator=g)
    h6 = torch.randn(2, 5, 6, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ex.general_scores(q, h6, gen.w.weight), gen.scores(q, h6))


def test_reversal_values() -> None:
    from attn.tasks import PermutationTask

    perm = PermutationTask(vocab=12, length=6, permutation="reverse").perm
    assert ex.check_reversal_alignment(tuple(perm.tolist())).passed
    assert ex.check_reversal_alignment(perm).passed  # a tensor is accepted too
    assert ex.check_reversal_alignment([7, 6, 5, 4, 3, 2]).mistake == "reversed_padding"
    assert ex.check_reversal_alignment((5, 4, 3, 2, 1)).mistake == "generic"
