"""Chapter 26's exercises: causal linear attention as a recurrence, the delta-rule update, and when a KV cache
outgrows the linear-attention state.

Solutions: :func:`causal_linear_attention`, :func:`delta_update`, :func:`break_even_tokens`. Checkers:
:func:`check_causal_linear_attention`, :func:`check_delta_update`, :func:`check_break_even_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "causal_linear_attention", "delta_update", "break_even_tokens",
    "check_causal_linear_attention", "check_delta_update", "check_break_even_tokens",
    "CAUSAL_LINEAR_ATTENTION", "DELTA_UPDATE", "BREAK_EVEN_TOKENS", "EXERCISES",
]


# ----------------------------------------------------------------------------- 1. the recurrence
def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    r"""Causal linear attention, one token at a time, with ``phi(x) = elu(x) + 1``.

    ``U_i = U_{i-1} + phi(k_i) v_iᵀ``, ``z_i = z_{i-1} + phi(k_i)``, ``y_i = phi(q_i)ᵀ U_i / phi(q_i)ᵀ z_i``,
    from ``U_0 = 0``, ``z_0 = 0``.

    Shapes: ``q, k (..., n, d)``, ``v (..., n, d_v)`` -> ``(..., n, d_v)``.
    """
    fq, fk = F.elu(q) + 1, F.elu(k) + 1  # (..., n, d), positive features
    state = q.new_zeros(*q.shape[:-2], q.shape[-1], v.shape[-1])  # U: (..., d, d_v)
    norm = q.new_zeros(*q.shape[:-2], q.shape[-1])  # z: (..., d)
    outs = []
    for i in range(q.shape[-2]):
        state = state + fk[..., i, :, None] * v[..., i, None, :]  # + phi(k_i) v_iᵀ
        norm = norm + fk[..., i, :]  # + phi(k_i)
        num = (fq[..., i, :, None] * state).sum(-2)  # phi(q_i)ᵀ U_i: (..., d_v)
        den = (fq[..., i, :] * norm).sum(-1, keepdim=True)  # phi(q_i)ᵀ z_i: (..., 1), > 0
        outs.append(num / den)
    return torch.stack(outs, dim=-2)


def _linear_cases(g: torch.Generator) -> list[Case]:
    def qkv(*lead: int, n: int, d: int, dv: int) -> tuple[Tensor, Tensor, Tensor]:
        def r(*s: int) -> Tensor:
            return torch.randn(*s, generator=g, dtype=torch.float64)

        return r(*lead, n, d), r(*lead, n, d), r(*lead, n, dv)

    return [
        Case(qkv(2, n=6, d=4, dv=3), label="q, k (2, 6, 4), v (2, 6, 3)"),
        Case(qkv(2, 3, n=5, d=3, dv=5), label="q, k (2, 3, 5, 3), v (2, 3, 5, 5): batch and heads"),
        Case(qkv(1, n=1, d=4, dv=2), label="one token: q, k (1, 1, 4), v (1, 1, 2)"),
    ]


def _elu_plus_one(x: Tensor) -> Tensor:
    return F.elu(x) + 1


def _quadratic(q: Tensor, k: Tensor, v: Tensor, phi: Callable[[Tensor], Tensor] = _elu_plus_one,
               causal: bool = True, normalise: bool = True, shift: int = 0) -> Tensor:
    """The same attention through the ``n x n`` matrix, with one thing changed (the mistakes)."""
    a = phi(q) @ phi(k).transpose(-1, -2)  # (..., n, n)
    if causal:
        a = a.tril(-shift)
    out = a @ v
    return out / a.sum(-1, keepdim=True) if normalise else out


LINEAR_MISTAKES = (
    Mistake("elu_without_one", "the feature map is `elu(x)`, which is negative for x < 0: the similarities "
            "φ(q)ᵀφ(k) must be positive (they replace exp), so use φ(x) = elu(x) + 1.",
            lambda q, k, v: _quadratic(q, k, v, phi=F.elu)),
    Mistake("no_normaliser", "the output is φ(q_i)ᵀ U_i without dividing by φ(q_i)ᵀ z_i: the weights "
            "φ(q_i)ᵀφ(k_j) must be normalised to sum to one over j ≤ i, so keep z_i = Σ φ(k_j) too.",
            lambda q, k, v: _quadratic(q, k, v, normalise=False)),
    Mistake("not_causal", "every query sees every key: the state must hold only the tokens up to i, "
            "so read y_i from the prefix sums U_i and z_i, not from the sums over the whole sequence.",
            lambda q, k, v: _quadratic(q, k, v, causal=False)),
    Mistake("read_before_write", "y_i is read from U_{i-1}, before token i is added: query i may attend to "
            "key i itself, so add φ(k_i) v_iᵀ (and φ(k_i)) first, then read.",
            lambda q, k, v: _quadratic(q, k, v, shift=1)),
    Mistake("relu_feature", "the feature map is relu(x): it zeroes every negative coordinate, so a query "
            "can end up with no similarity at all; the chapter's map is elu(x) + 1, positive and smooth.",
            lambda q, k, v: _quadratic(q, k, v, phi=F.relu)),
)

CAUSAL_LINEAR_ATTENTION = Exercise(
    name="causal_linear_attention",
    chapter=26,
    title="Causal linear attention as a recurrence",
    solution=causal_linear_attention,
    cases=_linear_cases,
    atol=1e-8,
    rtol=1e-6,
    hint="Per token: fold φ(k_i) v_iᵀ into U and φ(k_i) into z, then y_i = φ(q_i)ᵀU / φ(q_i)ᵀz.",
    mistakes=LINEAR_MISTAKES,
)


# ----------------------------------------------------------------------------- 2. the delta rule
def delta_update(state: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> Tensor:
    r"""One delta-rule write: ``U <- U + beta (v - U k) kᵀ``.

    ``U k`` is what the memory returns for ``k`` now; the write moves it a fraction ``beta`` of the way to ``v``.
    Shapes: ``state`` ``U (..., d_v, d_k)``, ``k (..., d_k)``, ``v (..., d_v)``, ``beta (...)`` -> ``(..., d_v, d_k)``.
    """
    recalled = (state @ k[..., :, None])[..., 0]  # U k: (..., d_v)
    error = v - recalled  # (..., d_v): what the memory gets wrong for k
    return state + beta[..., None, None] * error[..., :, None] * k[..., None, :]  # + beta (v - U k) kᵀ


def _delta_cases(g: torch.Generator) -> list[Case]:
    def r(*s: int) -> Tensor:
        return torch.randn(*s, generator=g, dtype=torch.float64)

    def unit(x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True)

    beta2 = torch.rand(2, 3, generator=g, dtype=torch.float64)
    return [
        Case((r(4, 4), unit(r(4)), r(4), torch.tensor(0.5, dtype=torch.float64)),
             label="U (4, 4), k (4,), v (4,), beta 0.5"),
        Case((r(2, 3, 5, 5), unit(r(2, 3, 5)), r(2, 3, 5), beta2),
             label="U (2, 3, 5, 5), k (2, 3, 5), v (2, 3, 5), beta (2, 3)"),
        Case((r(3, 3), unit(r(3)), r(3), torch.tensor(1.0, dtype=torch.float64)),
             label="U (3, 3), unit k, beta 1: afterwards U k = v"),
    ]


def _outer(a: Tensor, b: Tensor) -> Tensor:
    return a[..., :, None] * b[..., None, :]


def _recall(state: Tensor, k: Tensor) -> Tensor:
    return (state * k[..., None, :]).sum(-1)


DELTA_UPDATE = Exercise(
    name="delta_update",
    chapter=26,
    title="The delta-rule update",
    solution=delta_update,
    cases=_delta_cases,
    atol=1e-8,
    rtol=1e-6,
    hint="Ask the memory first (U k), write the error times kᵀ, scaled by beta.",
    mistakes=(
        Mistake("additive", "that is linear attention's additive write, U + beta v kᵀ: the delta rule first "
                "subtracts what the memory already returns for k, U + beta (v − U k) kᵀ.",
                lambda state, k, v, beta: state + beta[..., None, None] * _outer(v, k)),
        Mistake("error_sign", "the error has the wrong sign, (U k − v): the write must move U k *towards* v, "
                "so add beta (v − U k) kᵀ.",
                lambda state, k, v, beta: state + beta[..., None, None] * _outer(_recall(state, k) - v, k)),
        Mistake("outer_transposed", "the outer product is the wrong way round, k (v − U k)ᵀ: U maps keys to "
                "values (d_v × d_k), so the write is (v − U k) kᵀ, the error as a column times k as a row.",
                lambda state, k, v, beta: state + beta[..., None, None] * _outer(k, v - _recall(state, k))),
        Mistake("recall_transposed", "the memory is read as Uᵀ k: with U of shape d_v × d_k what it returns "
                "for k is U k.",
                lambda state, k, v, beta: state + beta[..., None, None]
                * _outer(v - (state.transpose(-1, -2) * k[..., None, :]).sum(-1), k)),
        Mistake("beta_on_value_only", "beta scales only v, (beta v − U k) kᵀ: it scales the whole correction, "
                "beta (v − U k) kᵀ, so that beta = 0 leaves the memory unchanged.",
                lambda state, k, v, beta: state + _outer(beta[..., None] * v - _recall(state, k), k)),
    ),
)


# ----------------------------------------------------------------------------- 3. state against cache
def break_even_tokens() -> float:
    r"""The number of tokens at which the KV cache holds as many numbers as the linear-attention state.

    The chapter's model: 32 layers, width ``E = 4096``, ``h = 32`` heads of ``d = 128``, ``r = d``. Per layer the
    cache grows by ``2 E`` numbers a token, the state holds ``h r (d + 1)``: equal at
    ``n = h d (d + 1) / (2 h d) = (d + 1) / 2 = 64.5`` tokens, whatever the layers, heads or precision.
    """
    layers, width, heads = 32, 4096, 32
    d = width // heads  # 128 per head; r = d features, d_v = d
    cache_per_token = layers * 2 * width  # a key and a value of width E per layer
    state = layers * heads * d * (d + 1)  # U (r x d_v) and z (r) per head and layer
    return state / cache_per_token


BREAK_EVEN_TOKENS = Exercise(
    name="break_even_tokens",
    chapter=26,
    title="When the cache outgrows the state",
    solution=break_even_tokens,
    kind="value",
    atol=1e-6,
    rtol=1e-6,
    hint="Per layer: the cache grows by a key and a value of width E per token; the state is U (r × d_v) and "
         "z (r) per head.",
    mistakes=(
        Mistake("no_normaliser_state", "that leaves out the normaliser z: the state is U (r × d_v) *and* z (r) "
                "per head, h r (d_v + 1) numbers, so the answer is (d + 1) / 2.", lambda: 64.0),
        Mistake("keys_only", "that counts only the keys in the cache: it holds a key *and* a value per head "
                "and token, 2 E numbers a token per layer.", lambda: 129.0),
        Mistake("one_wide_head", "that treats the state as one head of width E (E × (E + 1)): each of the h "
                "heads has its own d × (d + 1) state, h d (d + 1) = E (d + 1) in all.", lambda: 2048.5),
        Mistake("all_layers_cache", "that compares one layer's state with the whole model's cache per token: "
                "both grow with the number of layers, which cancels.", lambda: 64.5 / 32),
    ),
)

check_causal_linear_attention = CAUSAL_LINEAR_ATTENTION.checker()
check_delta_update = DELTA_UPDATE.checker()
check_break_even_tokens = BREAK_EVEN_TOKENS.checker()

EXERCISES = (CAUSAL_LINEAR_ATTENTION, DELTA_UPDATE, BREAK_EVEN_TOKENS)
