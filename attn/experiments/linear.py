"""Chapter 26's experiments: multi-query associative recall (MQAR) with a fixed-size state against softmax attention.

The task is :class:`attn.tasks.MQARTask` (Arora et al. 2023, "Zoology"): ``P`` key-value pairs as separate tokens,
then queries, each asking for the value of a key seen earlier. The models are :class:`attn.models.TokenLM`
(2 pre-norm blocks, learned positions initialised ``N(0, 1)``) whose mixer is, per arm,

* ``"softmax"``: causal softmax attention (:class:`attn.attention.Attention`, the fused SDPA kernel);
  it keeps every key and value, a cache that grows with the length;
* ``"linear"``: causal elu+1 linear attention (:class:`attn.linear.LinearAttention`), a state
  ``U = sum_j phi(k_j) v_j^T`` of fixed size ``d_k x d_v`` per head, whatever the number of pairs;
* ``"delta"``: the delta rule (DeltaNet, :func:`attn.linear.delta_rule_recurrent`), the same state size with
  an update that overwrites instead of adding.

:func:`run_mqar` trains every arm on the same seeds and batches for every (pairs, width) and reports the
query accuracy on a held-out batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import Attention
from ..checks import check_token_ids
from ..core import AttentionOutput
from ..linear import delta_rule_recurrent, favor_feature_pair, linear_attention
from ..models import LMOutput, TokenLM
from ..tasks import MQARTask
from ..train import evaluate, set_seed, train

__all__ = ["Arm", "ARMS", "DeltaRuleAttention", "ShiftTokenLM", "mqar_model", "mqar_loss", "run_mqar",
           "state_and_cache_bytes", "layer_qkv", "favor_relative_error"]

Arm = Literal["softmax", "linear", "delta"]
ARMS: tuple[str, ...] = ("softmax", "linear", "delta")


class DeltaRuleAttention(nn.Module):
    r"""Multi-head causal delta-rule attention (DeltaNet; Schlag et al. 2021, Yang et al. 2024), a sequence mixer.

    Per head: ``q_t, k_t`` L2-normalised, ``beta_t = sigmoid(w_beta^T x_t)`` in ``(0, 1)``, then
    ``U_t = U_{t-1} + beta_t (v_t - U_{t-1} k_t) k_t^T``, ``y_t = U_t q_t`` (:func:`~attn.linear.delta_rule_recurrent`,
    a loop over tokens), heads concatenated and projected. ``forward(x (B, n, E), *, key_mask=None,
    is_causal=None, need_weights=False) -> AttentionOutput(y (B, n, E), None)``: always causal, no padding
    (the MQAR batches have none), no weights.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int | None = None) -> None:
        super().__init__()
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
            head_dim = embed_dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(embed_dim, 3 * num_heads * head_dim)
        self.beta = nn.Linear(embed_dim, num_heads)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim)

    def forward(self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None,
                need_weights: bool = False, **_: Any) -> AttentionOutput:
        if key_mask is not None and not bool(key_mask.all()):
            raise ValueError("DeltaRuleAttention takes no padding (key_mask must be all True or None)")
        if is_causal is False:
            raise ValueError("DeltaRuleAttention is causal only")
        b, n = x.shape[0], x.shape[1]
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.beta(x)).transpose(1, 2)  # (B, h, n)
        y = delta_rule_recurrent(q, k, v, beta)  # (B, h, n, d)
        return AttentionOutput(self.out_proj(y.transpose(1, 2).reshape(b, n, -1)), None)


class ShiftTokenLM(TokenLM):
    """:class:`~attn.models.TokenLM` whose token ``t`` also carries the embedding of token ``t - 1`` (a token shift).

    ``h_t = E[x_t] + E'[x_{t-1}] + P_t`` (``E'[x_{-1}] = 0``), then the blocks. The shift is the short
    convolution that H3, Based and the Zoology models put before their mixers (Arora et al. 2023): it hands
    every value token its key, so the mixer's job is the lookup itself (query ``q`` reads the position whose
    previous token is ``q``), not also learning a previous-token head first. Every arm gets it. No caches.
    """

    def __init__(self, vocab: int, embed_dim: int, num_layers: int, mixer: Callable[[int], nn.Module],
                 max_len: int | None = None, position_std: float = 0.02, ffn_mult: int = 4) -> None:
        super().__init__(vocab, embed_dim, num_layers, mixer, max_len=max_len, position_std=position_std,
                         ffn_mult=ffn_mult)
        self.prev_embed = nn.Embedding(vocab, embed_dim)

    def forward(self, tokens: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None,
                need_weights: bool = False, caches: list[Any] | None = None) -> LMOutput:
        if caches is not None:
            raise ValueError("ShiftTokenLM has no cached decoding")
        check_token_ids(tokens, self.embed.num_embeddings)
        prev = self.prev_embed(tokens[:, :-1])  # (B, n - 1, E): token t - 1 for t >= 1
        h = self.embed(tokens) + F.pad(prev, (0, 0, 1, 0))  # (B, n, E)
        if self.pos is not None:
            h = h + self.pos.weight[: tokens.shape[1]]
        weights: list[Tensor | None] = []
        for block in self.blocks:
            h, w = block(h, key_mask=key_mask, is_causal=is_causal, need_weights=need_weights)
            if need_weights:
                weights.append(w)
        return LMOutput(self.head(self.norm(h)), weights)


def _mixer(arm: str, width: int, num_heads: int, head_dim: int, chunk: int) -> Callable[[int], nn.Module]:
    if arm == "softmax":
        return lambda i: Attention(width, num_heads, causal=True, head_dim=head_dim)
    if arm == "linear":  # LinearAttention is Attention(kernel="linear"); this spelling sets the head width
        return lambda i: Attention(width, num_heads, kernel="linear", causal=True, head_dim=head_dim, chunk=chunk)
    if arm == "delta":
        return lambda i: DeltaRuleAttention(width, num_heads, head_dim)
    raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")


def mqar_model(arm: str, task: MQARTask, width: int = 32, num_heads: int = 2, head_dim: int = 8,
               num_layers: int = 2, chunk: int = 64, shift: bool = True, ffn_mult: int = 0) -> TokenLM:
    """A causal model for ``task``: ``num_layers`` blocks of the ``arm``'s mixer (``"softmax"``, ``"linear"``,
    ``"delta"``), model width ``width``, ``num_heads`` heads of width ``head_dim`` (queries, keys and values).

    :class:`ShiftTokenLM` (``shift=True``, the token shift every arm shares) or plain
    :class:`~attn.models.TokenLM`; learned positions initialised ``N(0, 1)`` (as chapter 27's models), no
    feed-forward sublayer by default (``ffn_mult=0``: the lookup is the mixer's job). A linear-attention or
    delta-rule layer then carries a state of ``num_heads * head_dim * head_dim`` numbers (plus ``head_dim``
    per head for linear attention's normaliser), whatever the length; softmax attention keeps every key and
    value (``2 * num_heads * head_dim`` numbers per token).
    """
    cls = ShiftTokenLM if shift else TokenLM
    return cls(task.vocab, width, num_layers, _mixer(arm, width, num_heads, head_dim, chunk), max_len=task.length,
               position_std=1.0, ffn_mult=ffn_mult)


def mqar_loss(model: TokenLM, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy at the query positions only (``batch["loss_mask"]``), and the accuracy there."""
    logits = model(batch["x"]).logits  # (B, n, vocab)
    mask = batch["loss_mask"]
    picked, target = logits[mask], batch["y"][mask]
    loss = F.cross_entropy(picked, target)
    return loss, {"acc": float((picked.argmax(-1) == target).float().mean())}


def run_mqar(pairs: Sequence[int], head_dims: Sequence[int], seeds: Sequence[int],
             arms: Sequence[str] = ("softmax", "linear"), width: int = 32, num_heads: int = 2, steps: int = 200,
             batch_size: int = 16, lr: float = 1e-2, device: torch.device | str = "cpu", eval_size: int = 256,
             progress: bool = False, keep: dict[tuple[str, int, int, int], TokenLM] | None = None,
             ) -> list[dict[str, Any]]:
    """Train every ``arm`` at every (``pairs``, head width) for every seed; one row per run.

    Every arm of a (pairs, head width, seed) cell starts from the same seed, sees the same training batches
    (:func:`attn.train.train` seeds the data generator from the seed) and is evaluated on the same held-out
    batch of ``eval_size`` sequences. The task: ``MQARTask(2 P + 1, P)`` (every key of the alphabet used,
    every key asked once), sequences of ``3 P`` tokens. The models: :func:`mqar_model` with ``width``,
    ``num_heads`` heads of width ``head_dim``; the head width sets the size of the linear-attention state
    (``num_heads * head_dim^2`` per layer) while the model width stays the same for every arm and cell.

    Returns:
        rows ``{"arm", "pairs", "head_dim", "state", "seed", "acc", "loss", "train_acc_end", "cpu_s"}``:
        ``state`` the numbers in one layer's recurrent state (``num_heads * head_dim^2``), ``acc`` the query
        accuracy on the held-out batch, ``train_acc_end`` the mean training-batch accuracy over the last
        quarter of the logged steps (near ``acc`` when training has levelled off), ``cpu_s`` the process CPU
        seconds of the run. ``keep``: a dict that receives every trained model under
        ``(arm, pairs, head_dim, seed)``.
    """
    rows: list[dict[str, Any]] = []
    for p in pairs:
        task = MQARTask(vocab=2 * p + 1, num_pairs=p)
        for hd in head_dims:
            for seed in seeds:
                for arm in arms:
                    t0 = time.process_time()
                    set_seed(seed)
                    model = mqar_model(arm, task, width, num_heads, hd)
                    hist = train(model, task.sample, mqar_loss, steps, batch_size=batch_size, lr=lr, seed=seed,
                                 device=device, progress=progress)
                    res = evaluate(model, task.sample, mqar_loss, batch_size=eval_size, seed=10_000 + seed,
                                   device=device)
                    if keep is not None:
                        keep[(arm, p, hd, seed)] = model
                    tail = hist.metrics["acc"][-max(1, len(hist.step) // 4):]
                    rows.append({"arm": arm, "pairs": p, "head_dim": hd, "state": num_heads * hd * hd,
                                 "seed": seed, "acc": res["acc"], "loss": res["loss"],
                                 "train_acc_end": sum(tail) / len(tail), "cpu_s": time.process_time() - t0})
    return rows


def state_and_cache_bytes(embed_dim: int, num_heads: int, num_layers: int, tokens: int, bytes_per_value: int = 2,
                          feature_dim: int | None = None) -> dict[str, int]:
    """Decoding memory after ``tokens`` tokens: the KV cache of softmax attention against a linear-attention state.

    KV cache: ``2 * tokens * E`` values per layer (a key and a value of ``d_k = E / h`` per head and token).
    Linear-attention state: ``h * r * (d_v + 1)`` values per layer (``U`` of ``r x d_v`` and ``z`` of ``r``,
    ``r = feature_dim`` or ``d_k``), whatever ``tokens``. Returns bytes of each, ``bytes_per_value`` a value
    (2: bf16/fp16).
    """
    d = embed_dim // num_heads
    r = d if feature_dim is None else feature_dim
    return {"kv_cache": num_layers * 2 * tokens * embed_dim * bytes_per_value,
            "linear_state": num_layers * num_heads * r * (d + 1) * bytes_per_value}


@torch.no_grad()
def layer_qkv(model: TokenLM, tokens: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """The queries, keys and values of block ``layer``'s :class:`~attn.attention.Attention` mixer on ``tokens``.

    Runs the model once with a hook on that mixer and applies its projections to the mixer's input:
    ``(q, k, v)``, each ``(B, h, n, head_dim)`` (the mixer scales the scores by ``1 / sqrt(head_dim)``).
    """
    mixer = model.blocks[layer].mixer
    if not isinstance(mixer, Attention):
        raise TypeError(f"block {layer}'s mixer must be an Attention, got {type(mixer).__name__}")
    seen: list[Tensor] = []
    handle = mixer.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        model.eval()
        model(tokens)
    finally:
        handle.remove()
    x = seen[0]
    b, n = x.shape[0], x.shape[1]

    def split(t: Tensor) -> Tensor:
        return t.reshape(b, n, mixer.num_heads, -1).transpose(1, 2)

    return split(mixer.q_proj(x)), split(mixer.k_proj(x)), split(mixer.v_proj(x))


def favor_relative_error(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, projection: Tensor) -> float:
    r"""Error of causal FAVOR+ attention relative to the exact output's distance from the uniform average.

    .. math::

        \frac{\lVert Y_{\text{FAVOR+}} - Y \rVert_F}{\lVert Y_{\text{uniform}} - Y \rVert_F}

    over the rows ``rows`` (a boolean ``(B, n)``, e.g. the query positions), with ``Y`` exact causal softmax
    attention and ``Y_uniform`` the causal average ``sum_{j<=i} v_j / i`` (every weight equal): 0 is exact,
    1 is no better than ignoring the scores. In float64. Shapes: ``q, k, v (B, h, n, d)``, ``projection (m, d)``.
    """
    q, k, v, projection = (t.double() for t in (q, k, v, projection))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    counts = torch.arange(1, v.shape[-2] + 1, dtype=v.dtype, device=v.device)[:, None]
    uniform = v.cumsum(-2) / counts
    fq, fk = favor_feature_pair(q, k, projection)
    approx = linear_attention(fq, fk, v, None, causal=True)
    pick = rows[:, None, :].expand(-1, q.shape[1], -1)  # (B, h, n)
    num = (approx - exact)[pick].norm()
    den = (uniform - exact)[pick].norm()
    return float(num / den)
