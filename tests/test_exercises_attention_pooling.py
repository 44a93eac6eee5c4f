"""Chapter 19's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn import attention_pooling as lib
from attn.exercises import attention_pooling as ex


def _normalise(k: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return k / k.sum(dim, keepdim=True)


def test_nadaraya_watson_agrees_with_the_library() -> None:
    q, k, v = torch.randn(2, 5, 3), torch.randn(2, 8, 3), torch.randn(2, 8, 2)
    mask = torch.rand(2, 8) > 0.3
    mask[:, 0] = True
    for m in (None, mask):
        torch.testing.assert_close(ex.nadaraya_watson(q, k, v, 0.8, m),
                                   lib.nadaraya_watson(q, k, v, 0.8, key_mask=m).output)


def test_nadaraya_watson_written_another_way_passes() -> None:
    def mine(queries, keys, values, bandwidth, key_mask=None):  # type: ignore[no-untyped-def]
        logk = -torch.cdist(queries, keys) ** 2 / (2 * bandwidth * bandwidth)
        if key_mask is not None:
            logk = torch.where(key_mask.unsqueeze(1), logk, -torch.inf)
        w = torch.exp(logk - logk.amax(-1, keepdim=True))
        return torch.einsum("bmn,bnk->bmk", _normalise(w), values)

    assert ex.check_nadaraya_watson(mine).passed


def test_nadaraya_watson_wrong_answers_get_their_diagnosis() -> None:
    def kernel(q, k, h, power=2, denom=None):  # type: ignore[no-untyped-def]
        dist = torch.linalg.vector_norm(q.unsqueeze(2) - k.unsqueeze(1), dim=-1) ** power
        return torch.exp(-dist / (2 * h * h if denom is None else denom))

    def laplace(queries, keys, values, bandwidth, key_mask=None):  # type: ignore[no-untyped-def]
        w = kernel(queries, keys, bandwidth, power=1)
        if key_mask is not None:
            w = w * key_mask[:, None]
        return _normalise(w) @ values

    def narrow(queries, keys, values, bandwidth, key_mask=None):  # type: ignore[no-untyped-def]
        w = kernel(queries, keys, bandwidth, denom=bandwidth**2)
        if key_mask is not None:
            w = w * key_mask[:, None]
        return _normalise(w) @ values

    def padding_counted(queries, keys, values, bandwidth, key_mask=None):  # type: ignore[no-untyped-def]
        return _normalise(kernel(queries, keys, bandwidth)) @ values

    def per_observation(queries, keys, values, bandwidth, key_mask=None):  # type: ignore[no-untyped-def]
        logk = -torch.cdist(queries, keys) ** 2 / (2 * bandwidth**2)
        if key_mask is not None:  # a padded column is empty over the queries: 0 / 0, as a softmax gives
            logk = torch.where(key_mask[:, None], logk, -torch.inf)
        return _normalise(logk.exp(), dim=1) @ values

    table = {laplace: "distance_not_squared", narrow: "no_factor_two", padding_counted: "mask_ignored",
             per_observation: "softmax_over_queries"}
    for fn, name in table.items():
        report = ex.check_nadaraya_watson(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_invariant_pools_values() -> None:
    state = torch.random.get_rng_state()
    assert ex.invariant_pools() == "ad"
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert ex.check_invariant_pools("d, a").passed
    assert ex.check_invariant_pools("A C D").mistake == "self_attention_invariant"
    assert ex.check_invariant_pools("abcd").mistake == "generic"
    assert ex.check_invariant_pools(["a"]).mistake == "generic"
