"""Chapter 22's experiment -- adversarial attention: a cue-word sentiment task, the attention classifier
around :class:`attn.adversarial.AttentionPooling`, adversarial training on its embeddings or scores, attacks.

:class:`AttentionClassifier` is the attention text classifier the papers study (after Jain & Wallace 2019),
made small: normalised embeddings ``(B, n, E)`` -> :class:`~attn.adversarial.AttentionPooling` (one learned
query over the tokens, ``c (B, E)``, weights ``a (B, n)``) -> an MLP -> logits ``(B, C)``. Its task,
:class:`CueSentiment`, hides the label in a few cue words among neutral ones, so that where the model attends
can be scored. :func:`adversarial_loss` trains it on ``L(s) + alpha L(s + r_adv)`` with ``r_adv`` the
fast-gradient step (:func:`attn.adversarial.fgm_perturbation`) on the embeddings (Miyato et al. 2017) or on the
attention scores (Kitada & Iyatomi 2021); :func:`attack` measures it under FGM or PGD (Madry et al. 2018).
``OWN_TASKS`` gives the comparison both trainings on this task.

Miyato, Dai, Goodfellow, "Adversarial Training Methods for Semi-Supervised Text Classification", ICLR 2017.
Kitada, Iyatomi, "Attention Meets Perturbations: Robust and Interpretable Attention with Adversarial
Training", IEEE Access 2021. Jain, Wallace, "Attention is not Explanation", NAACL 2019. Madry et al.,
"Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adversarial import AttentionPooling, _norms, fgm_perturbation, js_distance, tv_distance
from ..masks import check_key_mask
from ..registry import OwnTask
from . import OwnTaskFactory, sized

__all__ = [
    "CueSentiment", "AttentionClassifier", "Target", "adversarial_loss", "attack", "make_task", "OWN_TASKS",
]

Target = Literal["none", "embedding", "attention"]
_TARGETS = ("none", "embedding", "attention")


# ----------------------------------------------------------------------------- the task


@dataclass
class CueSentiment:
    """Binary "sentiment" from a few cue words hidden among neutral ones, padded to ``length``.

    Token 0 is padding; tokens ``1..n_cues`` are positive cues, ``n_cues+1..2 n_cues``
    negative cues, the rest neutral. Each sequence has a random length in
    ``[length // 2, length]`` and either one cue of its label's polarity or,
    half the time, two of its polarity and one of the other: the classifier
    must find the cues and weigh them, not just spot one.

    ``sample`` returns ``x (B, length)`` token ids, ``mask (B, length)`` (``True`` =
    real token), ``y (B,)`` labels (1 = positive) and ``cue (B, length)`` (``True``
    at cue words, the positions an interpretable attention should pick).
    """

    length: int = 12
    vocab: int = 24
    n_cues: int = 3

    def __post_init__(self) -> None:
        if self.length < 6:
            raise ValueError(f"length must be >= 6 (room for 3 cues in the shortest sequence), got {self.length}")
        if self.n_cues < 1 or self.vocab < 2 * self.n_cues + 2:
            raise ValueError(f"need n_cues >= 1 and vocab >= 2 n_cues + 2 (padding and a neutral word), got vocab={self.vocab}, n_cues={self.n_cues}")

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        B, n, c = batch_size, self.length, self.n_cues
        lengths = torch.randint(n // 2, n + 1, (B,), generator=generator)
        mask = torch.arange(n)[None, :] < lengths[:, None]  # (B, n)
        x = torch.randint(2 * c + 1, self.vocab, (B, n), generator=generator)  # neutral words
        y = torch.randint(0, 2, (B,), generator=generator)
        mixed = torch.rand(B, generator=generator) < 0.5  # 2 of the label's polarity + 1 of the other
        # three distinct positions inside each sequence: argsort of random keys, padding pushed last
        slots = torch.rand(B, n, generator=generator).masked_fill(~mask, 2.0).argsort(-1)[:, :3]  # (B, 3)
        pos_word = 1 + torch.randint(0, c, (B, 3), generator=generator)
        neg_word = pos_word + c
        polarity = torch.stack([y, y, 1 - y], -1).bool()  # (B, 3): True = positive cue
        words = torch.where(polarity, pos_word, neg_word)
        used = torch.stack([torch.ones_like(mixed), mixed, mixed], -1)  # slot 0 always, slots 1-2 when mixed
        rows = torch.arange(B)[:, None].expand(B, 3)
        cue = torch.zeros(B, n, dtype=torch.bool)
        x[rows[used], slots[used]] = words[used]
        cue[rows[used], slots[used]] = True
        x = x.masked_fill(~mask, 0)
        return {"x": x, "mask": mask, "y": y, "cue": cue}


# ----------------------------------------------------------------------------- the classifier around the layer


class AttentionClassifier(nn.Module):
    """Normalised embeddings -> :class:`AttentionPooling` -> MLP: the attention classifier of this chapter.

    Args:
        vocab: number of token ids (id 0 is padding).
        embed_dim: ``E``.
        num_classes: ``C``.
        hidden: width of the MLP's hidden layer.

    ``forward(tokens (B, n) long, *, key_mask (B, n) bool, embed_delta (B, n, E),
    score_delta (B, n), need_weights)`` -> ``(logits (B, C), weights (B, n) | None)``.
    ``embed(tokens)`` gives the normalised embeddings ``s`` and ``classify(s, ...)``
    the rest, so that an attack can perturb ``s`` in between.
    """

    def __init__(self, vocab: int, embed_dim: int = 32, num_classes: int = 2, hidden: int = 32) -> None:
        super().__init__()
        for name, v in (("vocab", vocab), ("embed_dim", embed_dim), ("num_classes", num_classes), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if vocab < 3:
            raise ValueError(f"vocab must be >= 3 (normalising the embeddings needs several words), got {vocab}")
        self.vocab, self.embed_dim, self.num_classes = vocab, embed_dim, num_classes
        self.embedding = nn.Embedding(vocab, embed_dim)
        self.pool = AttentionPooling(embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def _check_tokens(self, tokens: object, key_mask: Tensor | None) -> Tensor:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of shape (batch, n) with integer ids, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise TypeError(f"tokens must hold integer ids (torch.long) of shape (batch, n), got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, n), got {tuple(tokens.shape)}")
        if tokens.shape[0] > 0 and tokens.shape[1] == 0:
            raise ValueError(f"tokens is an empty sequence: shape (batch, n) needs n >= 1, got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab):
            raise ValueError(f"token ids must lie in [0, vocab={self.vocab}), got min {int(tokens.min())}, max {int(tokens.max())}")
        check_key_mask(key_mask, tokens.shape[0], tokens.shape[1], length_name="n")
        return tokens

    def normalised_table(self) -> Tensor:
        """The embedding table with each dimension at mean 0, variance 1 over the vocabulary (Miyato et al., eq. 1, uniform frequencies)."""
        w = self.embedding.weight  # (V, E)
        return (w - w.mean(0)) / torch.sqrt(w.var(0, unbiased=False) + 1e-6)

    def embed(self, tokens: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Token ids ``(B, n)`` -> normalised embeddings ``s`` ``(B, n, E)``."""
        tokens = self._check_tokens(tokens, key_mask)
        return F.embedding(tokens, self.normalised_table())

    def classify(
        self, s: Tensor, *, key_mask: Tensor | None = None, score_delta: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Embeddings ``s (B, n, E)`` -> ``(logits (B, C), weights (B, n) | None)``."""
        c, a = self.pool(s, key_mask=key_mask, score_delta=score_delta, need_weights=need_weights)
        return self.mlp(c), a

    def forward(
        self,
        tokens: Tensor,
        *,
        key_mask: Tensor | None = None,
        embed_delta: Tensor | None = None,
        score_delta: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        s = self.embed(tokens, key_mask)
        if embed_delta is not None:
            if not isinstance(embed_delta, Tensor) or embed_delta.shape != s.shape:
                raise ValueError(f"embed_delta must be a tensor of shape (batch, n, embed_dim) = {tuple(s.shape)}, got {tuple(getattr(embed_delta, 'shape', ())) or type(embed_delta).__name__}")
            s = s + embed_delta
        return self.classify(s, key_mask=key_mask, score_delta=score_delta, need_weights=need_weights)


# ----------------------------------------------------------------------------- adversarial training and attacks


def _check_target(target: str) -> None:
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")


def _worst_case(
    model: AttentionClassifier, batch: dict[str, Tensor], target: Target, epsilon: float
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """Clean pass, then the FGM perturbation of ``target``; returns the pieces both the loss and the attack need."""
    x, mask, y = batch["x"], batch.get("mask"), batch["y"]
    with torch.enable_grad():  # the perturbation needs a gradient even under torch.no_grad (evaluation)
        s = model.embed(x, mask)
        if target == "embedding" and not s.requires_grad:
            s = s.detach().requires_grad_()
        zero = None
        if target == "attention":  # a zero offset on the scores: its gradient is the gradient w.r.t. the scores
            zero = torch.zeros(s.shape[:2], dtype=s.dtype, device=s.device, requires_grad=True)
            logits, a = model.classify(s, key_mask=mask, score_delta=zero, need_weights=True)
        else:
            logits, a = model.classify(s, key_mask=mask, need_weights=True)
        loss = F.cross_entropy(logits, y)
        r = None
        if target == "embedding":
            (g,) = torch.autograd.grad(loss, s, retain_graph=True)
            r = fgm_perturbation(g, epsilon)
        elif target == "attention":
            assert zero is not None  # made above for target "attention"
            (g,) = torch.autograd.grad(loss, zero, retain_graph=True)
            r = fgm_perturbation(g, epsilon)
    return s, logits, a, loss, r


def adversarial_loss(
    model: AttentionClassifier,
    batch: dict[str, Tensor],
    target: Target = "embedding",
    epsilon: float = 1.0,
    alpha: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    r"""``L(s) + alpha * L(s + r_adv)`` with ``r_adv`` from :func:`fgm_perturbation` on ``target``.

    ``target``: ``"embedding"`` (Miyato et al.: perturb the normalised
    embeddings), ``"attention"`` (Kitada & Iyatomi: perturb the attention
    scores before the softmax) or ``"none"`` (plain training: the clean loss
    only). ``r_adv`` is a constant: the gradient of the total flows through
    the clean and the perturbed forward passes, not through ``r_adv``.

    Batch: ``x (B, n)`` ids, ``mask (B, n)``, ``y (B,)``. Metrics: clean
    ``acc``; ``robust_acc``, the accuracy on the perturbed pass (``acc`` again for ``"none"``).
    """
    _check_target(target)
    if not isinstance(alpha, (int, float)) or alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    y, mask = batch["y"], batch.get("mask")
    s, logits, _, loss, r = _worst_case(model, batch, target, epsilon)
    acc = float((logits.argmax(-1) == y).float().mean()) if y.numel() else float("nan")
    if target == "none" or r is None:
        return loss, {"acc": acc, "robust_acc": acc}
    if target == "embedding":
        adv_logits, _ = model.classify(s + r.detach(), key_mask=mask)
    else:
        adv_logits, _ = model.classify(s, key_mask=mask, score_delta=r.detach())
    adv_loss = F.cross_entropy(adv_logits, y)
    robust = float((adv_logits.argmax(-1) == y).float().mean()) if y.numel() else float("nan")
    return loss + alpha * adv_loss, {"acc": acc, "robust_acc": robust}


def attack(
    model: AttentionClassifier, batch: dict[str, Tensor], epsilon: float, target: Target = "embedding", steps: int = 1
) -> dict[str, Tensor]:
    r"""Attack ``model`` (in eval mode) with a perturbation of L2 norm ``<= epsilon`` per example on ``target``.

    ``steps = 1``: the fast-gradient step :func:`fgm_perturbation` (FGM). ``steps > 1``:
    projected gradient ascent (PGD, Madry et al. 2018): ``steps`` normalised
    gradient steps of size ``2.5 epsilon / steps``, each followed by a projection
    back onto the ball ``||r|| <= epsilon``; a stronger attack, since one step
    trusts the linearisation of the loss over the whole ball.

    Returns ``clean_pred``, ``adv_pred`` ``(B,)``, ``clean_weights``, ``adv_weights``
    ``(B, n)``, ``js`` and ``tv`` ``(B,)`` (distance between the clean and attacked
    attention rows), ``clean_loss``, ``adv_loss`` (scalars) and ``delta`` (the
    perturbation), all detached.
    """
    _check_target(target)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    mask, y = batch.get("mask"), batch["y"]
    was_training = model.training
    model.eval()
    try:
        s, logits, a, loss, r = _worst_case(model, batch, target, epsilon)
        s = s.detach()

        def perturbed(delta: Tensor | None) -> tuple[Tensor, Tensor | None]:
            if target == "embedding" and delta is not None:
                return model.classify(s + delta, key_mask=mask, need_weights=True)
            if target == "attention":
                return model.classify(s, key_mask=mask, score_delta=delta, need_weights=True)
            return model.classify(s, key_mask=mask, need_weights=True)

        if r is not None and steps > 1:  # r is None for target "none"
            step = 2.5 * epsilon / steps
            r = torch.zeros_like(r)
            for _ in range(steps):
                with torch.enable_grad():
                    r = r.detach().requires_grad_()
                    (g,) = torch.autograd.grad(F.cross_entropy(perturbed(r)[0], y, reduction="sum"), r)
                r = r.detach() + fgm_perturbation(g, step)
                r = r * (epsilon / _norms(r).clamp_min(1e-30)).clamp(max=1.0)  # project onto ||r|| <= epsilon
        with torch.no_grad():
            adv_logits, adv_a = perturbed(r)
            adv_loss = F.cross_entropy(adv_logits, y)
    finally:
        model.train(was_training)
    assert a is not None and adv_a is not None  # both passes ask for the weights
    a, adv_a = a.detach(), adv_a.detach()
    return {"clean_pred": logits.argmax(-1).detach(), "adv_pred": adv_logits.argmax(-1), "clean_weights": a,
            "adv_weights": adv_a, "js": js_distance(a, adv_a), "tv": tv_distance(a, adv_a),
            "clean_loss": loss.detach(), "adv_loss": adv_loss.detach(),
            "delta": torch.zeros(0) if r is None else r.detach()}


# ----------------------------------------------------------------------------- the comparison's own task


def make_task(size: str = "book", target: Target = "embedding", epsilon: float = 1.0) -> OwnTask[AttentionClassifier]:
    """The comparison's :class:`~attn.registry.OwnTask`: :class:`CueSentiment` trained with ``target`` adversarial training.

    ``size`` is one of :data:`attn.experiments.SIZES` (training steps and batch size grow with it). The layer
    timed alone is the :class:`~attn.adversarial.AttentionPooling`, over ``size`` tokens of width 32.
    """
    steps, batch = sized(size, quick=(20, 32), book=(200, 64), full=(400, 64), large=(800, 128))
    _check_target(target)
    task = CueSentiment()
    model = AttentionClassifier(task.vocab, embed_dim=32)

    def inputs(size: int, generator: torch.Generator) -> tuple[Tensor]:
        return (torch.randn(8, size, 32, generator=generator),)

    def weights(m: AttentionClassifier, b: dict[str, Tensor]) -> Tensor:
        return m(b["x"], key_mask=b["mask"], need_weights=True)[1]

    return OwnTask(
        description=f"cue-word sentiment, {target} adversarial training (epsilon {epsilon})",
        model=model, sample=task.sample, loss=partial(adversarial_loss, target=target, epsilon=epsilon),
        layer=model.pool, inputs=inputs, sizes=(64, 256, 1024, 4096), size_unit="tokens",
        steps=steps, batch_size=batch, lr=3e-3, log_every=10, target_acc=0.9, eval_batch=512, weights=weights,
    )


OWN_TASKS: dict[str, OwnTaskFactory] = {
    "adversarial_embedding": partial(make_task, target="embedding"),
    "adversarial_attention": partial(make_task, target="attention"),
}
