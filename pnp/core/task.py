"""The seam between pnp's engine and a task (classification, detection, ...).

A :class:`PruningTask` says what differs from task to task: which module of the
model is traced and cut (its names are the model's own), what it is traced on, what
the pruner sees of a batch, what the model's task output and target are, and what
to fix after surgery. On top of it, once for every task: channel groups
(:meth:`PruningTask.find_groups`), the pruner's training step (:func:`pruner_terms`,
called by the Lightning module and by detectron2's trainer alike), the read-out
(:func:`pnp.decide_keep`) and one-shot surgery (:meth:`PruningTask.surgery`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from pnp.core.gating import GatedModel
from pnp.core.groups import ChannelGroups, find_channel_groups
from pnp.core.losses import PrunerLoss
from pnp.core.pruner import PrunerNetwork
from pnp.core.readout import KeepScores
from pnp.core.surgery import apply_surgery


class PruningTask:
    """What pnp needs to know about a task. Subclasses override what differs; see the module docstring."""

    def prunable(self, model: nn.Module) -> nn.Module:
        """The module whose channel groups are found, gated and cut; its module names are ``model``'s."""
        return model

    def example_inputs(self, model: nn.Module) -> Any:
        """What :meth:`prunable` is traced, costed and verified on."""
        raise NotImplementedError

    def find_groups(self, model: nn.Module, ignore: Sequence[str] = (), prove: bool = False) -> ChannelGroups:
        """The prunable channel groups of ``model``, with what is left out and why (``prove``: see find_channel_groups)."""
        was_training = model.training
        model.eval()
        try:
            return find_channel_groups(self.prunable(model), self.example_inputs(model), ignore=tuple(ignore), prove=prove)
        finally:
            model.train(was_training)

    def pruner_input(self, model: nn.Module, batch) -> torch.Tensor:
        """What the pruner network sees of a batch."""
        raise NotImplementedError

    def output(self, model: nn.Module, batch) -> tuple[Any, Any]:
        """``(output, target)`` of ``model`` on ``batch`` for :class:`pnp.PrunerLoss`'s task term (gates apply)."""
        raise NotImplementedError

    def after_surgery(self, model: nn.Module, pruned: nn.Module) -> nn.Module:
        """The pruned model, from ``model`` and its cut :meth:`prunable` ``pruned``.

        Where the prunable part is not the whole model, the pruned part goes back into
        a copy of it, and what the model reports about itself (e.g. detectron2's
        ``output_shape()``) is brought in line with its pruned layers.
        """
        return pruned

    def surgery(self, model: nn.Module, groups: ChannelGroups, keep, verify: bool = True) -> nn.Module:
        """A copy of ``model`` with every channel ``keep`` drops removed (``model`` is not changed)."""
        was_training = model.training
        model.eval()
        try:
            pruned = apply_surgery(self.prunable(model), groups, keep, groups.example_inputs, verify=verify)
        finally:
            model.train(was_training)
        pruned.train(was_training)
        return self.after_surgery(model, pruned)


class ClassificationTask(PruningTask):
    """A model called on an input tensor (or tuple) whose output is class logits; batches are ``(x, y, ...)``."""

    def __init__(self, example_inputs):
        self._example = example_inputs

    def example_inputs(self, model: nn.Module) -> Any:
        return self._example

    def pruner_input(self, model: nn.Module, batch) -> torch.Tensor:
        return batch[0]

    def output(self, model: nn.Module, batch) -> tuple[Any, Any]:
        return model(batch[0]), batch[1]


def pruner_terms(task: PruningTask, model: nn.Module, gate: GatedModel, pruner: PrunerNetwork, objective: PrunerLoss,
                 batch, reference_model: nn.Module | None = None, budget: float | None = None) -> dict[str, Any]:
    """One step of the pruner's objective on ``batch``: the loss and its terms, the masks and the task output.

    The pruner decides masks from :meth:`PruningTask.pruner_input`; the model runs
    its task gated by them (``gate`` wraps ``task.prunable(model)``). With
    distillation the ungated output of ``reference_model`` (default: ``model``) is the reference.
    ``budget``: the budget this step aims at (default: the objective's own).
    """
    masks = pruner(task.pruner_input(model, batch))
    reference = None
    if objective.kd_weight > 0:
        with torch.no_grad():
            reference, _ = task.output(model if reference_model is None else reference_model, batch)
    with gate.masked(masks):
        output, target = task.output(model, batch)
    terms = dict(objective(output, target, masks, reference, budget=budget))
    terms["masks"], terms["output"], terms["target"] = masks, output, target
    return terms


@torch.no_grad()
def calibrate_keep_scores(task: PruningTask, model: nn.Module, pruner: PrunerNetwork, groups: ChannelGroups,
                          batches, max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Mean keep probability of every channel over ``batches``: the keep scores the read-out thresholds."""
    scores = KeepScores(groups)
    was_training = pruner.training
    pruner.eval()
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            scores.update(pruner.keep_probabilities(task.pruner_input(model, batch)))
    finally:
        pruner.train(was_training)
    return scores.compute()
