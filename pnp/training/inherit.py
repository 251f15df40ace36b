"""Which channels carry their weights into the pruned model, at the widths the pruner learned.

The pruner learns how many channels each layer keeps and which ones: the ones the
frozen target needs most. Those keep the most accuracy right after surgery, but
they are not always the best start for fine-tuning. On LeNet-5 at 10% of the
FLOPs, the same widths fine-tuned from the largest-L1 filters ended 0.5 to 1
point higher than from the pruner's own picks, though they started 40 points
lower (the README has the figures). AdaPruner (Liu et al., 2021) makes the same
observation and picks the weight-inheritance criterion per architecture.

:func:`choose_inheritance` does this: every candidate (``"learned"``, the
pruner's picks, or a :mod:`pnp.core.criteria` name) keeps the learned widths;
each is cut and fine-tuned briefly on the same batches, and the one with the
best held-out accuracy is taken.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnp.core.criteria import CRITERIA, CriterionNotApplicableError, channel_importance
from pnp.core.groups import ChannelGroups
from pnp.core.readout import reselect_keep
from pnp.core.surgery import apply_surgery
from pnp.training.report import evaluate_accuracy

LEARNED = "learned"
AUTO = "auto"


def check_inherit(choice: str, candidates: Sequence[str]) -> None:
    """Raise a clear error for an unknown choice or candidate (config fields ``inherit.choice``/``candidates``)."""
    valid = (LEARNED, *CRITERIA)
    if choice not in (AUTO, *valid):
        raise ValueError(f"inherit.choice {choice!r} is not one of {[AUTO, *valid]}")
    if choice == AUTO:
        if not candidates:
            raise ValueError(f"inherit.candidates is empty: name at least one of {list(valid)} for inherit.choice=auto")
        for name in candidates:
            if name not in valid:
                raise ValueError(f"inherit.candidates has {name!r}, which is not one of {list(valid)}")


@dataclass
class Inheritance:
    """What :func:`choose_inheritance` decided, and why."""

    choice: str
    keep: dict[str, torch.Tensor]
    accuracy: dict[str, float] = field(default_factory=dict)  # look-ahead accuracy per candidate, %
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it could not be tried
    steps: int = 0

    def to_dict(self) -> dict:
        return {"choice": self.choice, "lookahead_accuracy": self.accuracy, "skipped": self.skipped, "steps": self.steps}


def candidate_keeps(
    target: nn.Module,
    groups: ChannelGroups,
    keep: Mapping[str, torch.Tensor],
    names: Iterable[str],
    batches: Iterable | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """Each candidate's keep decisions at the widths of ``keep``; and the candidates that do not apply, with why.

    ``batches`` feed criteria that need loss gradients (``"taylor"``).
    """
    keeps: dict[str, dict[str, torch.Tensor]] = {}
    skipped: dict[str, str] = {}
    for name in dict.fromkeys(names):
        if name == LEARNED:
            keeps[name] = {k: torch.as_tensor(v).bool().cpu() for k, v in keep.items()}
            continue
        try:
            importance = channel_importance(copy.deepcopy(target), groups, name, batches=batches)
        except CriterionNotApplicableError as e:
            skipped[name] = str(e)
            continue
        keeps[name], _ = reselect_keep(groups, keep, importance)
    return keeps, skipped


def lookahead_accuracy(
    model: nn.Module,
    train_loader,
    eval_loader,
    steps: int,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> float:
    """Fine-tune ``model`` in place for ``steps`` SGD steps on ``train_loader``; its accuracy on ``eval_loader``, %.

    The learning rate falls from ``lr`` to 0 on a cosine, as in a full fine-tuning.
    """
    if int(steps) < 1:
        raise ValueError(f"inherit.steps {steps} must be >= 1")
    torch.manual_seed(int(seed))
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    step = 0
    while step < steps:
        progressed = False
        for batch in train_loader:
            x, y = batch[0].to(device), batch[1].to(device)
            for g in optimizer.param_groups:
                g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            step += 1
            progressed = True
            if step >= steps:
                break
        if not progressed:
            raise ValueError("the training loader gave no batches; cannot fine-tune the candidates")
    return evaluate_accuracy(model, eval_loader, device)


def choose_inheritance(
    target: nn.Module,
    groups: ChannelGroups,
    keep: Mapping[str, torch.Tensor],
    example_inputs,
    candidates: Sequence[str],
    train_loader_fn,
    eval_loader,
    steps: int,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    device: str | torch.device = "cpu",
    seed: int = 0,
    gradient_batches: Iterable | None = None,
) -> Inheritance:
    """Cut ``target`` once per candidate, fine-tune each briefly, take the best held-out accuracy.

    ``train_loader_fn()`` must give the same batches in the same order on every
    call, so that every candidate sees the same data. Ties go to the earlier
    candidate. ``target`` is not changed.
    """
    check_inherit(AUTO, candidates)
    keeps, skipped = candidate_keeps(target, groups, keep, candidates, gradient_batches)
    if not keeps:
        raise ValueError(f"none of inherit.candidates {list(candidates)} applies to this model: {skipped}")
    accuracy: dict[str, float] = {}
    for name, k in keeps.items():
        pruned = apply_surgery(copy.deepcopy(target), groups, k, example_inputs, verify=False)
        accuracy[name] = lookahead_accuracy(
            pruned, train_loader_fn(), eval_loader, steps, lr, momentum, weight_decay, device, seed
        )
    best = max(accuracy, key=lambda n: (accuracy[n], -list(keeps).index(n)))
    return Inheritance(best, keeps[best], accuracy, skipped, int(steps))
