"""Chapter 22's experiment -- adversarial attention: a cue-word sentiment task, the attention classifier
around :class:`attn.adversarial.AttentionPooling`, adversarial training on its embeddings or scores, attacks.

:class:`AttentionClassifier` is the attention text classifier the papers study (after Jain & Wallace 2019),
made small: normalised embeddings ``(B, n, E)`` -> :class:`~attn.adversarial.AttentionPooling` (one learned
query over the tokens, ``c (B, E)``, weights ``a (B, n)``) -> an MLP -> logits ``(B, C)``. Its task,
:class:`CueSentiment`, hides the label in a few cue words among neutral ones, so that where the model attends
can be scored. :func:`adversarial_loss` trains it on ``L(s) + alpha L(s + r_adv)`` with ``r_adv`` the
fast-gradient step (:func:`attn.adversarial.fgm_perturbation`) on the embeddings (Miyato et al. 2017) or on the
attention scores (Kitada & Iyatomi 2021), or on ``KL(p(. | s) || p(. | s + r_vadv))`` (virtual adversarial
training); :func:`attack` measures it under FGM or PGD (Madry et al. 2018). The chapter's comparison:
:func:`train_arms` (every :class:`Arm` on the same seeds and batches), :func:`robustness` (PGD at every
budget), :func:`robust_auc`, :func:`score_scale` and :func:`cue_ranking` (attention judged by rank).
``OWN_TASKS`` gives the comparison both trainings on this task.

Miyato, Dai, Goodfellow, "Adversarial Training Methods for Semi-Supervised Text Classification", ICLR 2017.
Kitada, Iyatomi, "Attention Meets Perturbations: Robust and Interpretable Attention with Adversarial
Training", IEEE Access 2021. Jain, Wallace, "Attention is not Explanation", NAACL 2019. Madry et al.,
"Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # pandas is loaded by the functions that build frames, not by `import attn`
    import pandas as pd

from ..adversarial import (
    AttentionPooling,
    _norms,
    fgm_perturbation,
    js_distance,
    kl_logits,
    tv_distance,
    vat_perturbation,
)
from ..masks import check_key_mask
from ..registry import OwnTask
from ..train import set_seed, train
from . import OwnTaskFactory, sized

__all__ = [
    "CueSentiment", "AttentionClassifier", "Target", "Method", "adversarial_loss", "attack", "Arm", "train_arms",
    "cue_ranking", "score_scale", "robustness", "robust_auc", "make_task", "OWN_TASKS",
]

Target = Literal["none", "embedding", "attention"]
_TARGETS = ("none", "embedding", "attention")
#: training methods: the attack targets, and ``"virtual"`` (virtual adversarial training on the embeddings)
Method = Literal["none", "embedding", "attention", "virtual"]
_METHODS = ("none", "embedding", "attention", "virtual")


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
        qk_norm: LayerNorm (no gain) on the query and the keys, bounding every score by
            ``sqrt(E)`` (:class:`~attn.adversarial.AttentionPooling`).

    ``forward(tokens (B, n) long, *, key_mask (B, n) bool, embed_delta (B, n, E),
    score_delta (B, n), need_weights)`` -> ``(logits (B, C), weights (B, n) | None)``.
    ``embed(tokens)`` gives the normalised embeddings ``s`` and ``classify(s, ...)``
    the rest, so that an attack can perturb ``s`` in between.
    """

    def __init__(self, vocab: int, embed_dim: int = 32, num_classes: int = 2, hidden: int = 32, *, qk_norm: bool = False) -> None:
        super().__init__()
        for name, v in (("vocab", vocab), ("embed_dim", embed_dim), ("num_classes", num_classes), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if vocab < 3:
            raise ValueError(f"vocab must be >= 3 (normalising the embeddings needs several words), got {vocab}")
        self.vocab, self.embed_dim, self.num_classes = vocab, embed_dim, num_classes
        self.embedding = nn.Embedding(vocab, embed_dim)
        self.pool = AttentionPooling(embed_dim, qk_norm=qk_norm)
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


def _check_target(target: str, allowed: tuple[str, ...] = _TARGETS) -> None:
    if target not in allowed:
        raise ValueError(f"target must be one of {allowed}, got {target!r}")


def _worst_case(
    model: AttentionClassifier, batch: dict[str, Tensor], target: Target, epsilon: float | Tensor
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
    target: Method = "embedding",
    epsilon: float = 1.0,
    alpha: float = 1.0,
    *,
    random_epsilon: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    r"""``L(s) + alpha * L_adv`` for plain, adversarial (FGM) or virtual adversarial training.

    ``target``:

    * ``"none"``: plain training, the clean cross-entropy ``L(s)`` only;
    * ``"embedding"`` (Miyato et al. 2017): ``L_adv = L(s + r_adv)``, ``r_adv`` the FGM step
      :func:`~attn.adversarial.fgm_perturbation` on the normalised embeddings;
    * ``"attention"`` (Kitada & Iyatomi 2021, Attention AT): ``L_adv = L`` with
      ``r_adv`` added to the attention scores before the softmax;
    * ``"virtual"`` (virtual adversarial training, Miyato et al. 2016 / 2017 section 3):
      ``L_adv = KL(p(. | s) || p(. | s + r_vadv))`` with ``p(. | s)`` held constant and
      ``r_vadv`` from :func:`~attn.adversarial.vat_perturbation` (one power iteration) on the
      embeddings. It uses no label, so it also applies to unlabelled sentences.

    ``r_adv`` and ``r_vadv`` are constants: the gradient flows through the clean and the
    perturbed forward passes, not through the perturbation. ``random_epsilon``: each
    example's budget is ``epsilon * u``, ``u ~ U(0, 1)`` drawn from torch's global generator
    (seeded by :func:`attn.train.train`), so the defence is not tuned to one radius.

    Batch: ``x (B, n)`` ids, ``mask (B, n)``, ``y (B,)``. Metrics: clean ``acc``;
    ``robust_acc``, the accuracy on the perturbed pass (``acc`` again for ``"none"``).
    """
    _check_target(target, _METHODS)
    if not isinstance(alpha, (int, float)) or alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    y, mask = batch["y"], batch.get("mask")
    eps: float | Tensor = epsilon
    if random_epsilon and target != "none":
        eps = epsilon * torch.rand(y.shape[0]).to(y.device)
    if target == "virtual":
        s, logits, _, loss, _ = _worst_case(model, batch, "none", 0.0)
        s_const = s.detach()
        r = vat_perturbation(
            lambda d: model.classify(s_const + d, key_mask=mask)[0], logits, s_const, eps
        )
        adv_logits, _ = model.classify(s + r, key_mask=mask)
        adv_loss = kl_logits(logits.detach(), adv_logits).mean() if y.numel() else adv_logits.sum() * 0
    else:
        s, logits, _, loss, r_fgm = _worst_case(model, batch, target, eps)
        if target == "none" or r_fgm is None:
            acc = float((logits.argmax(-1) == y).float().mean()) if y.numel() else float("nan")
            return loss, {"acc": acc, "robust_acc": acc}
        if target == "embedding":
            adv_logits, _ = model.classify(s + r_fgm.detach(), key_mask=mask)
        else:
            adv_logits, _ = model.classify(s, key_mask=mask, score_delta=r_fgm.detach())
        adv_loss = F.cross_entropy(adv_logits, y)
    acc = float((logits.argmax(-1) == y).float().mean()) if y.numel() else float("nan")
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


# ----------------------------------------------------------------------------- the chapter's multi-seed comparison


@dataclass(frozen=True)
class Arm:
    """One training method of the comparison: what :func:`adversarial_loss` perturbs, and the model around it.

    ``target``: ``"none"`` (plain), ``"embedding"``, ``"attention"`` or ``"virtual"``;
    ``qk_norm``: LayerNorm on ``q`` and the keys (scores bounded by ``sqrt(E)``);
    ``random_epsilon``: train with a budget ``U(0, epsilon)`` per example instead of ``epsilon``.
    """

    target: Method = "none"
    qk_norm: bool = True
    random_epsilon: bool = True


def train_arms(
    arms: Mapping[str, Arm],
    seeds: Sequence[int],
    *,
    task: CueSentiment | None = None,
    steps: int = 200,
    batch_size: int = 64,
    embed_dim: int = 32,
    epsilon: float = 2.0,
    lr: float = 3e-3,
    device: torch.device | str = "cpu",
) -> tuple[dict[tuple[str, int], AttentionClassifier], dict[tuple[str, int], pd.DataFrame]]:
    """Train every arm on every seed: same initial weights and same batches for all arms of a seed.

    For seed ``s`` each arm starts from the weights ``set_seed(s)`` draws, and
    :func:`attn.train.train` draws the batches from ``s`` (a generator of its own), so
    the arms of one seed differ only in their loss. Returns ``models[(arm, s)]`` (in eval
    mode) and ``histories[(arm, s)]`` (the training log as a DataFrame).
    """
    task = task or CueSentiment()
    models: dict[tuple[str, int], AttentionClassifier] = {}
    histories: dict[tuple[str, int], pd.DataFrame] = {}
    for s in seeds:
        for name, arm in arms.items():
            _check_target(arm.target, _METHODS)
            set_seed(s)  # the same initial weights for every arm of this seed
            model = AttentionClassifier(task.vocab, embed_dim, qk_norm=arm.qk_norm)
            loss = partial(adversarial_loss, target=arm.target, epsilon=epsilon, random_epsilon=arm.random_epsilon)
            histories[name, s] = train(
                model, task.sample, loss, steps=steps, batch_size=batch_size, lr=lr, seed=s, progress=False, device=device
            ).to_frame()
            models[name, s] = model
    return models, histories


def cue_ranking(weights: Tensor, cue: Tensor, mask: Tensor) -> dict[str, Tensor]:
    r"""How the attention *ranks* the cue words, a measure no rescaling of the scores can inflate.

    ``weights``, ``cue``, ``mask`` ``(B, n)``. Returns per sentence ``(B,)``:
    ``top_is_cue`` (1 if the most attended real token is a cue word) and ``auc``, the
    share of (cue, neutral) pairs in which the cue gets more weight (ties count one half):
    the probability that a random cue outranks a random neutral word, 1 for a perfect
    ranking, 0.5 for none. Both depend only on the order of the scores.
    """
    w = weights.masked_fill(~mask, -1.0)
    top = w.argmax(-1)
    top_is_cue = cue.gather(-1, top[:, None])[:, 0].float()
    neutral = mask & ~cue
    diff = weights[:, :, None] - weights[:, None, :]  # (B, n cue?, n neutral?)
    pair = cue[:, :, None] & neutral[:, None, :]
    wins = ((diff > 0).float() + 0.5 * (diff == 0).float()) * pair
    auc = wins.sum((1, 2)) / pair.sum((1, 2)).clamp_min(1)
    return {"top_is_cue": top_is_cue, "auc": auc}


@torch.no_grad()
def score_scale(model: AttentionClassifier, batch: dict[str, Tensor]) -> dict[str, float]:
    r"""How large the model has made its attention scores ``\tilde a`` on ``batch`` (clean inputs).

    ``score_std``: the standard deviation of each sentence's scores over its real tokens,
    averaged over sentences (a shift common to all scores does not change the softmax, so
    the spread is what a perturbation competes with); ``score_range``: the mean of
    ``max - min`` per sentence; ``qk_norm_product``: the mean of
    ``||q|| ||W_k s_j|| / sqrt(E)`` over real tokens (after the LayerNorms when the model
    has them), the bound that Cauchy-Schwarz puts on ``|\tilde a_j|``.
    """
    mask = batch["mask"]
    s = model.embed(batch["x"], mask)
    scores = model.pool.scores(s)  # (B, n)
    m = mask.float()
    count = m.sum(-1).clamp_min(1)
    mean = (scores * m).sum(-1) / count
    std = (((scores - mean[:, None]) ** 2 * m).sum(-1) / count).sqrt()
    rng = scores.masked_fill(~mask, -torch.inf).amax(-1) - scores.masked_fill(~mask, torch.inf).amin(-1)
    q: Tensor = model.pool.query
    k = model.pool.key(s)
    if model.pool.qk_norm:
        q, k = F.layer_norm(q, q.shape), F.layer_norm(k, k.shape[-1:])
    prod = q.norm() * k.norm(dim=-1) / model.embed_dim**0.5  # (B, n)
    return {"score_std": float(std.mean()), "score_range": float(rng.mean()),
            "qk_norm_product": float((prod * m).sum() / m.sum())}


def robustness(
    models: Mapping[tuple[str, int], AttentionClassifier],
    test: dict[str, Tensor],
    epsilons: Sequence[float],
    *,
    targets: Sequence[Target] = ("embedding", "attention"),
    attack_steps: int = 4,
    keep_seed: int | None = None,
) -> tuple[pd.DataFrame, dict[tuple[float, str, str], dict[str, Tensor]]]:
    """Attack every model at every ``epsilon`` on each of ``targets`` (PGD, ``attack_steps`` steps).

    One row per (method, seed, attack, epsilon) with ``clean acc``; ``robust acc``, the share
    of sentences right clean and under every attack of budget ``<= epsilon`` (the ball of
    radius ``epsilon`` holds the smaller ones, so this is an attack of budget ``epsilon`` too);
    ``PGD at eps alone``; the mean ``JS distance`` and ``TV distance`` between the clean and the
    attacked attention. Also returns the attacks on the ``keep_seed`` models, keyed
    ``(epsilon, method, target)``.
    """
    records: list[dict[str, float | str | int]] = []
    kept: dict[tuple[float, str, str], dict[str, Tensor]] = {}
    for (name, s), model in models.items():
        for target in targets:
            still_right: Tensor | None = None
            for eps in sorted(epsilons):
                out = attack(model, test, eps, target, steps=attack_steps)
                if s == keep_seed:
                    kept[eps, name, target] = out
                right_here = out["adv_pred"] == test["y"]
                clean_right = out["clean_pred"] == test["y"]
                still_right = (clean_right if still_right is None else still_right) & right_here
                records.append({
                    "method": name, "seed": s, "attack": target, "epsilon": eps,
                    "clean acc": float(clean_right.float().mean()), "robust acc": float(still_right.float().mean()),
                    "PGD at eps alone": float(right_here.float().mean()),
                    "JS distance": float(out["js"].mean()), "TV distance": float(out["tv"].mean()),
                })
    import pandas as pd

    return pd.DataFrame(records), kept


def robust_auc(results: pd.DataFrame) -> pd.DataFrame:
    r"""Normalised area under each model's robust-accuracy curve: one number for the whole epsilon sweep.

    For the rows of :func:`robustness`, per (method, seed, attack): the trapezoid area
    under robust accuracy against epsilon on ``[0, epsilon_max]`` (clean accuracy at 0),
    divided by ``epsilon_max``: the robust accuracy averaged over budgets drawn uniformly
    from ``[0, epsilon_max]``. Returns columns ``method, seed, attack, auc``.
    """
    rows = []
    for (method, seed, target), g in results.groupby(["method", "seed", "attack"], sort=False):
        g = g.sort_values("epsilon")
        eps = [0.0, *g["epsilon"].tolist()]
        acc = [float(g["clean acc"].iloc[0]), *g["robust acc"].tolist()]
        area = sum((eps[i + 1] - eps[i]) * (acc[i + 1] + acc[i]) / 2 for i in range(len(eps) - 1))
        rows.append({"method": method, "seed": seed, "attack": target, "auc": area / eps[-1]})
    import pandas as pd

    return pd.DataFrame(rows)


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
