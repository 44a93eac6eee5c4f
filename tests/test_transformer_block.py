"""Chapter 3's Transformer block: the block's two placements, sinusoidal positions in TokenLM, greedy decoding
with the KV cache, the reversal task and its ablation runner (attn.experiments.transformer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attn.attention import Attention
from attn.core import AttentionOutput
from attn.experiments.transformer import (
    ARMS,
    NoResidualBlock,
    ReversalTask,
    decode_accuracy,
    reversal_loss,
    reversal_model,
    run_reversal,
)
from attn.models import TokenLM, TransformerBlock, greedy_decode
from attn.positions import sinusoidal_embedding
from attn.train import set_seed, train


def _lm(positions: str, causal: bool = True, max_len: int | None = 32, E: int = 16) -> TokenLM:
    set_seed(0)
    return TokenLM(12, E, 2, lambda i: Attention(E, 2, causal=causal), max_len=max_len,
                   positions=positions, position_std=1.0).eval()  # type: ignore[arg-type]


# ---------------------------------------------------------------- the block


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_matches_its_equations(norm_first: bool) -> None:
    """pre-LN: h = x + Mix(LN1 x), y = h + FFN(LN2 h); post-LN: h = LN1(x + Mix x), y = LN2(h + FFN h)."""
    set_seed(0)
    E = 8
    block = TransformerBlock(Attention(E, 2), E, ffn_mult=2, norm_first=norm_first).eval()
    x = torch.randn(2, 5, E)
    assert block.ffn is not None and block.norm2 is not None
    with torch.no_grad():
        y = block(x).output
        if norm_first:
            h = x + block.mixer(block.norm1(x)).output
            want = h + block.ffn(block.norm2(h))
        else:
            h = block.norm1(x + block.mixer(x).output)
            want = block.norm2(h + block.ffn(h))
    torch.testing.assert_close(y, want)


def test_block_without_ffn_is_attention_plus_residual() -> None:
    set_seed(0)
    block = TransformerBlock(Attention(8, 2), 8, ffn_mult=0).eval()
    x = torch.randn(1, 4, 8)
    assert block.ffn is None
    with torch.no_grad():
        torch.testing.assert_close(block(x).output, x + block.mixer(block.norm1(x)).output)


class _Zero(nn.Module):
    def forward(self, x: torch.Tensor, **_: object) -> AttentionOutput:
        return AttentionOutput(torch.zeros_like(x), None)


def test_no_residual_block_forgets_its_input() -> None:
    """Without the residual addition a mixer that writes nothing erases the token; with it, the token passes."""
    set_seed(0)
    x = torch.randn(2, 3, 8)
    plain = NoResidualBlock(_Zero(), 8, ffn_mult=2).eval()
    full = TransformerBlock(_Zero(), 8, ffn_mult=2).eval()
    full.load_state_dict(plain.state_dict())
    with torch.no_grad():
        y_plain = plain(x).output
        y_full = full(x).output
    torch.testing.assert_close(y_plain, y_plain[:1, :1].expand_as(y_plain))  # the same vector whatever x was
    assert not torch.allclose(y_full, y_full[:1, :1].expand_as(y_full))


# ---------------------------------------------------------------- positions in TokenLM


def test_sinusoidal_positions_are_added_to_the_embeddings() -> None:
    model = _lm("sinusoidal")
    seen: list[torch.Tensor] = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    tokens = torch.randint(0, 12, (2, 7))
    model(tokens)
    want = model.embed(tokens) + sinusoidal_embedding(torch.arange(7), 16)
    torch.testing.assert_close(seen[0], want)
    assert model.pos is None and not any("pos" in name for name, _ in model.named_parameters())


def test_without_positions_a_bidirectional_model_is_permutation_equivariant() -> None:
    tokens = torch.randint(0, 12, (1, 6))
    perm = torch.randperm(6)
    for positions, equivariant in (("none", True), ("sinusoidal", False)):
        model = _lm(positions, causal=False)
        with torch.no_grad():
            a, b = model(tokens).logits[:, perm], model(tokens[:, perm]).logits
        assert torch.allclose(a, b, atol=1e-5) == equivariant, positions


def test_token_lm_rejects_bad_positions_and_long_sequences() -> None:
    with pytest.raises(ValueError, match="positions"):
        TokenLM(5, 8, 1, lambda i: Attention(8, 2), positions="rope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="even"):
        TokenLM(5, 9, 1, lambda i: Attention(9, 1), positions="sinusoidal")
    with pytest.raises(ValueError, match="max_len"):
        _lm("sinusoidal", max_len=4)(torch.zeros(1, 5, dtype=torch.long))


# ---------------------------------------------------------------- greedy decoding


@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "none"])
def test_greedy_decode_with_cache_equals_recomputing(positions: str) -> None:
    model = _lm(positions)
    prompt = torch.randint(0, 12, (3, 5))
    cached = greedy_decode(model, prompt, 9)
    full = greedy_decode(model, prompt, 9, use_cache=False)
    assert cached.shape == (3, 14) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, full)
    with torch.no_grad():  # each decoded token is the argmax of the model run on everything before it
        logits = model(full[:, :-1]).logits[:, 4:]
    assert torch.equal(logits.argmax(-1), full[:, 5:])


def test_greedy_decode_keeps_the_mode_and_checks_its_arguments() -> None:
    model = _lm("sinusoidal").train()
    prompt = torch.randint(0, 12, (2, 3))
    assert torch.equal(greedy_decode(model, prompt, 0), prompt)
    greedy_decode(model, prompt, 2)
    assert model.training
    with pytest.raises(ValueError):
        greedy_decode(model, prompt, -1)
    with pytest.raises(ValueError):
        greedy_decode(model, torch.full((1, 2), 99), 1)


# ---------------------------------------------------------------- the task and the runner


@pytest.mark.parametrize("reverse", [True, False])
def test_reversal_task_layout(reverse: bool) -> None:
    task = ReversalTask(length=6, n_symbols=5, reverse=reverse)
    b = task.sample(50, torch.Generator().manual_seed(0))
    n = 6
    assert b["seq"].shape == (50, 13) and b["x"].shape == b["y"].shape == (50, 12)
    assert (b["seq"][:, n] == task.SEP).all() and (b["seq"][:, :n] >= 1).all() and (b["seq"].max() <= 5)
    source, answer = b["seq"][:, :n], b["seq"][:, n + 1:]
    assert torch.equal(answer, source.flip(1) if reverse else source)
    assert (b["y"][:, :n] == -100).all() and torch.equal(b["y"][:, n:], answer)  # loss only on the answer
    assert torch.equal(b["prompt"], b["seq"][:, : n + 1])
    again = task.sample(50, torch.Generator().manual_seed(0))
    assert torch.equal(again["seq"], b["seq"])


def test_reversal_arms_remove_one_piece_each() -> None:
    task = ReversalTask()
    models = {}
    for arm in ARMS:
        set_seed(3)
        models[arm] = reversal_model(task, arm)
    full = models["sinusoidal"]
    assert full.positions == "sinusoidal" and models["no positions"].positions == "none"
    assert all(isinstance(b, NoResidualBlock) for b in models["no residual"].blocks)
    assert all(b.ffn is None for b in models["no FFN"].blocks)
    for arm in ("no positions", "no residual"):  # the same initial weights as the full block
        for (name, p), (_, q) in zip(full.named_parameters(), models[arm].named_parameters(), strict=True):
            assert torch.equal(p, q), (arm, name)
    with pytest.raises(ValueError, match="arm"):
        reversal_model(task, "rope")


def test_run_reversal_returns_one_value_per_seed_per_arm() -> None:
    task = ReversalTask(length=4, n_symbols=4)
    run = run_reversal(task, arms=("sinusoidal", "no FFN"), seeds=(0, 1, 2), steps=2, eval_size=8, embed_dim=8)
    for metric in (run.exact, run.token, run.teacher):
        assert set(metric) == {"sinusoidal", "no FFN"}
        assert all(len(v) == 3 and all(0.0 <= x <= 1.0 for x in v) for v in metric.values())
    assert set(run.models) == {(a, s) for a in ("sinusoidal", "no FFN") for s in (0, 1, 2)}


def test_a_trained_block_reverses_and_one_without_positions_cannot() -> None:
    """The chapter's point on a small budget: 100 steps give near-perfect greedy reversal with sinusoidal
    positions; without positions no whole sequence comes out right."""
    task = ReversalTask()
    held_out = task.sample(256, torch.Generator().manual_seed(1))
    scores = {}
    for arm in ("sinusoidal", "no positions"):
        set_seed(0)
        model = reversal_model(task, arm)
        train(model, task.sample, reversal_loss, steps=100, lr=5e-3, seed=0, progress=False)
        scores[arm] = decode_accuracy(model, task, held_out)
    assert scores["sinusoidal"]["exact"] > 0.8 and scores["sinusoidal"]["token"] > 0.95
    assert scores["no positions"]["exact"] < 0.05
