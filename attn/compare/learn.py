"""What a mechanism learns: held-out accuracy by distance, attention entropy, weight on the answer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from ..registry import OwnTask
from ..train import History, evaluate, set_seed, train
from .model import PositionalRecallModel
from .presets import Preset
from .results import MechanismResult


@contextlib.contextmanager
def _reproducible(device: torch.device, threads: int) -> Iterator[None]:
    """Fixed CPU thread count (reductions then add up in one order) and deterministic kernels."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(max(1, threads))
    if device.type == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def _attention_stats(
    model: PositionalRecallModel, preset: Preset, seed: int, device: torch.device, res: MechanismResult
) -> None:
    """Held-out accuracy by distance, entropy of the attention rows, weight on the answer."""
    task = model.task
    batch = task.sample(preset.eval_batch, torch.Generator().manual_seed(_eval_seed(seed)))
    x = batch["x"].to(device)
    target = batch["y"] - task.n_keys
    with torch.no_grad():
        logits, _ = model(x)
    correct = (logits.argmax(-1).cpu() == target).float()
    pair = (batch["where"] - 1) // 2  # index of the pair holding the answer
    distance = task.n_pairs - pair  # 1 (just before the query) .. n_pairs (first token)
    far = distance > task.n_pairs / 2
    res.metrics["accuracy_near"] = float(correct[~far].mean()) if (~far).any() else None
    res.metrics["accuracy_far"] = float(correct[far].mean()) if far.any() else None
    quarters = torch.clamp(((distance - 1) * 4) // task.n_pairs, max=3)
    res.accuracy_by_distance = [float(correct[quarters == q].mean()) if (quarters == q).any() else float("nan") for q in range(4)]

    try:
        with torch.no_grad():
            _, weights = model(x, need_weights=True)
    except Exception as err:
        res.notes.append(f"need_weights=True failed: {type(err).__name__}: {err}")
        return
    n = preset.seq_len
    per_layer = []
    for i, w in enumerate(weights):
        if w is None:
            res.notes.append(f"layer {i} returned no weights")
            return
        w = w.detach().float().cpu()
        if w.ndim == 3:
            w = w[:, None]  # (B, n, n) -> (B, 1, n, n)
        if w.ndim != 4 or tuple(w.shape[-2:]) != (n, n) or w.shape[0] != x.shape[0]:
            res.notes.append(f"weights of shape {tuple(w.shape)}, expected (batch, [heads,] {n}, {n}); entropy skipped")
            return
        sums = w.sum(-1)
        if (w < 0).any() or not torch.allclose(sums[sums > 0], torch.ones(()), atol=1e-3):
            res.notes.append(f"layer {i}'s weights are not distributions (rows do not sum to 1): entropy skipped")
            return
        per_layer.append(w)
    from ..core import entropy

    rows = torch.stack([entropy(w) for w in per_layer]).float()  # (layers, B, H, n)
    res.query_entropy = rows[..., -1].numpy()  # (layers, B, H)
    res.head_entropy = rows.mean(dim=(1, 3)).numpy()  # (layers, H)
    res.metrics["query_entropy"] = float(rows[..., -1].mean())
    res.metrics["uniform_entropy"] = math.log(n)
    answer = torch.stack([w[torch.arange(w.shape[0]), :, -1, pair] for w in per_layer])  # (layers, B, H)
    res.metrics["answer_weight"] = float(answer.mean(1).max())  # the best (layer, head)
    k = min(preset.probe_examples, x.shape[0])
    res.probe_weights = torch.stack([w[:k] for w in per_layer])  # (layers, k, H, n, n)
    res.probe = {
        "x": batch["x"][:k], "y": batch["y"][:k], "where": batch["where"][:k],
        "pred": logits.argmax(-1).cpu()[:k] + task.n_keys,
    }


def _eval_seed(seed: int) -> int:
    return seed + 1_000_003  # a held-out stream, distinct from the training stream seeded by ``seed``


def own_task_learning(task: OwnTask, preset: Preset, seed: int, device: torch.device, res: MechanismResult, progress: bool = False) -> None:
    """Train a mechanism's own task model (same seed, same batches every run); held-out accuracy, convergence, entropy."""
    import time

    from .cost import _n_params

    with _reproducible(device, preset.train_threads if device.type == "cpu" else torch.get_num_threads()):
        set_seed(seed)
        model = task.model.to(device)
        res.metrics["model_params"] = _n_params(model)
        t0 = time.perf_counter()
        hist: History = train(
            model, task.sample, task.loss, steps=task.steps, batch_size=task.batch_size, lr=task.lr,
            seed=seed, log_every=task.log_every, device=device, progress=progress, num_threads=None,
        )
        res.metrics["train_s"] = time.perf_counter() - t0
        res.history = hist.to_frame()
        res.metrics["final_train_loss"] = hist.loss[-1]
        res.metrics["steps_to_target"] = hist.first_step_reaching("acc", task.target_acc)
        ev = evaluate(model, task.sample, task.loss, batch_size=task.eval_batch, seed=_eval_seed(seed), device=device)
        res.metrics["accuracy"] = ev["acc"]
        res.metrics["eval_loss"] = ev["loss"]
        if task.weights is not None:
            from ..core import entropy

            batch = task.sample(task.eval_batch, torch.Generator().manual_seed(_eval_seed(seed)))
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            model.eval()
            with torch.no_grad():
                w = task.weights(model, batch).detach().float().cpu()
            rows = w.reshape(-1, w.shape[-1])
            rows = rows[rows.sum(-1) > 0.5]  # padding rows are all zero
            if len(rows) and ((rows < 0).any() or not torch.allclose(rows.sum(-1), torch.ones(()), atol=1e-3)):
                res.notes.append("its attention rows are not distributions (they do not sum to 1): entropy skipped")
            elif len(rows):
                res.metrics["query_entropy"] = float(entropy(rows).mean())
                res.metrics["uniform_entropy"] = math.log(w.shape[-1])
