r"""The comparison: every registered mechanism measured on the same axes.

``python -m attn compare`` and the book's comparison chapter both call
:func:`run`. For each registered mechanism whose ``build(embed_dim, num_heads)``
gives a token-mixing layer, it measures

* **cost of the layer alone**: parameters; FLOPs of one forward
  (:func:`attn.benchmark.count_flops`); median latency and peak memory of one
  forward at a fixed size; and a sweep over sequence lengths with the fitted
  growth exponent ``p`` of ``cost ~ n^p`` for time, memory and FLOPs
  (:func:`attn.benchmark.sweep`, :func:`attn.benchmark.exponents`);
* **what it learns**: the same small model (:class:`PositionalRecallModel`:
  pair embeddings + learned positions + ``layers`` pre-norm residual
  attention layers + a readout at the query) trained on the same batches of
  the same task (:class:`attn.tasks.AssociativeRecall`) for the same budget:
  held-out accuracy, accuracy when the answer is far from the query,
  convergence (first logged step whose training accuracy reaches a target),
  the loss curve;
* **how it attends**: the entropy of the query's attention row per head
  (``need_weights=True`` on a held-out batch) and the weight it puts on the
  pair that holds the answer.

The task is associative recall with the query at the **end** of the sequence
and the matching pair anywhere before it, uniformly: a mechanism that cannot
reach far (a window, a fixed sparse pattern) can only answer when the pair
happens to lie within its reach, which the ``acc_far`` column shows.

Mechanisms whose ``build`` is ``None`` or whose ``data`` is not
``"sequence"`` work on their own kind of input (graphs, images, sets, pairs):
they appear in the table as *own task, see chapter N*, with no numbers.

Everything that is learned is seeded: each mechanism's model is initialised
from ``seed`` and sees the same stream of training batches, training runs on
a fixed number of CPU threads, and the result of one mechanism does not depend
on which others run with it. Two runs with the same seed give the same
accuracies and losses; only timings differ.
"""


from . import cost, decide
from .model import POSITION_INIT_STD, PositionalRecallModel, recall_loss
from .mqar import MQARCell, MQARModel, mqar_loss, run_mqar, train_mqar
from .presets import PRESETS, Preset, get_preset, presets_help, resolve_device
from .report import Comparison
from .results import AXES, TABLE_COLUMNS, MechanismResult
from .runner import run, run_one

__all__ = [
    "cost",
    "decide",
    "MQARCell",
    "MQARModel",
    "mqar_loss",
    "run_mqar",
    "train_mqar",
    "Preset",
    "PRESETS",
    "get_preset",
    "resolve_device",
    "presets_help",
    "PositionalRecallModel",
    "recall_loss",
    "POSITION_INIT_STD",
    "MechanismResult",
    "Comparison",
    "run",
    "run_one",
    "TABLE_COLUMNS",
    "AXES",
]
