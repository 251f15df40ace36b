"""Which channels carry their weights into the pruned model, at the widths the pruner learned.

The pruner learns how many channels each layer keeps and which ones: the ones the
frozen target needs most. Those keep the most accuracy right after surgery, but
they are not always the best start for fine-tuning. On LeNet-5 at 10% of the
FLOPs, the same widths fine-tuned from the largest-L1 filters ended 0.5 to 1
point higher than from the pruner's own picks, though they started 40 points
lower (the README has the figures). AdaPruner (Liu et al., 2021) makes the same
observation and picks the weight-inheritance criterion per architecture.

:func:`select_inheritance` is the choice, for any task: every candidate
(``"learned"``, the pruner's picks, or a :mod:`pnp.core.criteria` name) keeps the
learned widths (:func:`keeps_by_candidate`); the task scores each by a look-ahead
(cut, fine-tune briefly on the same batches, evaluate on held-out data) and the
best score is taken. Rivals with widths of their own (``widths:CRITERION``, a
criterion's read-out at the same budget) can enter the same look-ahead: where a
frozen target gated to a tight budget is at chance, its task loss no longer says
which layer needs width, and learned widths can starve a layer that a criterion's
widths do not. :func:`choose_inheritance` is that look-ahead for classification;
the detection stages (:mod:`pnp.detection.pipeline`) have theirs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnp.core.criteria import CRITERIA, CriterionNotApplicableError, channel_importance
from pnp.core.groups import ChannelGroups
from pnp.core.losses import kd_loss
from pnp.core.readout import reselect_keep
from pnp.core.surgery import apply_surgery
from pnp.training.layout import CHANNELS_LAST, forward_layout, in_layout, training_layout
from pnp.training.report import evaluate_accuracy

LEARNED = "learned"
AUTO = "auto"
WIDTHS = "widths:"  # a look-ahead candidate with a criterion's own widths: "widths:magnitude"


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
    """What :func:`select_inheritance` decided, and why."""

    choice: str
    keep: dict[str, torch.Tensor]
    scores: dict[str, float] = field(default_factory=dict)  # look-ahead score per candidate (higher is better)
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it could not be tried
    steps: int = 0  # training steps of each candidate's look-ahead
    metric: str = "accuracy"  # what the scores measure: classification's accuracy (%), detection's box AP

    def to_dict(self) -> dict:
        return {"choice": self.choice, f"lookahead_{self.metric}": self.scores, "skipped": self.skipped, "steps": self.steps}


def channels_changed(learned: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Per group, how many of the pruner's picks (``learned``) the inherited ``keep`` dropped."""
    return {g: int((learned[g].bool() & ~keep[g].bool()).sum()) for g in keep}


def inheritance_line(record: dict, steps: str, label: str, unit: str = "") -> str:
    """The console line for an :meth:`Inheritance.to_dict` record with ``evaluated_on`` and ``channels_changed``.

    ``steps`` names the look-ahead's steps (e.g. "fine-tuning steps"), ``label`` what
    its scores are (e.g. "accuracy on the"), ``unit`` follows each score.
    """
    tried = next((v for k, v in record.items() if k.startswith("lookahead_")), None) or {}
    how = ""
    if tried:
        skipped = f"; skipped {', '.join(record['skipped'])}" if record.get("skipped") else ""
        how = (f" (after {record['steps']} {steps} each, {label} {record['evaluated_on']}: "
               + ", ".join(f"{name} {score:.2f}{unit}" for name, score in tried.items()) + f"{skipped})")
    changed = sum(record.get("channels_changed", {}).values())
    if record["choice"].startswith(WIDTHS):
        return (f"[pnp] the {record['choice'][len(WIDTHS):]!r} criterion's own widths and channels beat the learned widths{how}; "
                f"{changed} of the pruner's picks are not kept")
    return f"[pnp] weights inherited from the {record['choice']!r} channels{how}; {changed} kept channels differ from the pruner's picks"


def select_inheritance(
    keeps: Mapping[str, Mapping[str, torch.Tensor]],
    score: Callable[[str, Mapping[str, torch.Tensor]], float],
    skipped: Mapping[str, str] | None = None,
    steps: int = 0,
    metric: str = "accuracy",
) -> Inheritance:
    """The candidate whose keep decisions ``score(name, keep)`` rates highest; ties go to the earlier candidate.
    A single candidate is taken as it is, unscored.

    ``score`` is the task's look-ahead: cut the target to ``keep``, fine-tune it
    briefly (every candidate on the same batches, from the same seed) and evaluate
    it on held-out data; higher is better. ``skipped`` (candidates that do not
    apply, with why), ``steps`` and ``metric`` are recorded with the choice.
    """
    skipped = dict(skipped or {})
    if not keeps:
        raise ValueError(f"none of the inheritance candidates {list(skipped)} applies to this model: {skipped}")
    if len(keeps) == 1:  # nothing to compare it with: no look-ahead is trained
        [(only, keep)] = keeps.items()
        return Inheritance(only, dict(keep), {}, skipped, 0, metric)
    scores = {name: float(score(name, keep)) for name, keep in keeps.items()}
    order = list(scores)
    best = max(order, key=lambda n: (scores[n], -order.index(n)))
    return Inheritance(best, dict(keeps[best]), scores, skipped, int(steps), metric)


def keeps_by_candidate(
    groups: ChannelGroups,
    keep: Mapping[str, torch.Tensor],
    names: Iterable[str],
    importance: Callable[[str], Mapping[str, torch.Tensor]],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """Each candidate's keep decisions at the widths of ``keep``; and the candidates that do not apply, with why.

    ``importance(name)`` gives criterion ``name``'s per-channel scores of the task's
    model and raises :class:`CriterionNotApplicableError` when it has nothing to measure.
    """
    keeps: dict[str, dict[str, torch.Tensor]] = {}
    skipped: dict[str, str] = {}
    for name in dict.fromkeys(names):
        if name == LEARNED:
            keeps[name] = {k: torch.as_tensor(v).bool().cpu() for k, v in keep.items()}
            continue
        try:
            scores = importance(name)
        except CriterionNotApplicableError as e:
            skipped[name] = str(e)
            continue
        keeps[name], _ = reselect_keep(groups, keep, scores)
    return keeps, skipped


def rival_widths(
    criteria: Iterable[str],
    budget: float | None,
    read_out: Callable[[str], tuple[Mapping[str, torch.Tensor], dict]],
    budget_field: str = "budget",
) -> tuple[dict[str, tuple[dict[str, torch.Tensor], dict]], dict[str, str]]:
    """``{"widths:CRITERION": (keep, info)}`` from ``read_out(criterion)``, the task's read-out of a criterion's scores
    at ``budget``; and the rivals that could not be tried, with why. Without a budget that is every one (the
    reason names ``budget_field``, the setting the user would give); else those whose criterion does not apply
    (``read_out`` raised :class:`CriterionNotApplicableError`).
    """
    rivals: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}
    skipped: dict[str, str] = {}
    if budget is None:
        return rivals, {WIDTHS + name: f"no {budget_field}: a criterion's own widths are read out at a budget"
                        for name in dict.fromkeys(criteria)}
    for criterion in dict.fromkeys(criteria):
        try:
            keep, info = read_out(criterion)
        except CriterionNotApplicableError as e:
            skipped[WIDTHS + criterion] = str(e)
            continue
        rivals[WIDTHS + criterion] = (dict(keep), {**info, "criterion": criterion})
    return rivals, skipped


def candidate_keeps(
    target: nn.Module,
    groups: ChannelGroups,
    keep: Mapping[str, torch.Tensor],
    names: Iterable[str],
    batches: Iterable | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """:func:`keeps_by_candidate` for a classifier: criteria score a copy of ``target``.

    ``batches`` feed criteria that need loss gradients (``"taylor"``).
    """
    return keeps_by_candidate(
        groups, keep, names, lambda name: channel_importance(copy.deepcopy(target), groups, name, batches=batches)
    )


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
    teacher: nn.Module | None = None,
    kd_weight: float = 0.0,
    teacher_outputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    channels_last: bool = CHANNELS_LAST,
) -> float:
    """Fine-tune ``model`` in place for ``steps`` SGD steps on ``train_loader``; its accuracy on ``eval_loader``, %.

    The learning rate falls from ``lr`` to 0 on a cosine, as in a full fine-tuning. With
    ``kd_weight > 0`` the loss adds ``kd_weight`` times the distillation loss from ``teacher``
    (in eval mode, unchanged), as a distilled fine-tuning does. ``teacher_outputs``, a list
    shared by calls on the same batches, keeps the teacher's logits of each step (with the
    step's labels, checked), so that only the first call runs the teacher; batches with a
    third item carry the teacher's logits themselves (the data module's ``train_outputs``),
    and then the teacher does not run at all. ``channels_last``
    runs it in that memory format as the fine-tuning does (:mod:`pnp.training.layout`: on a
    CPU a MobileNetV2 step is about x2 faster); ``model`` and ``teacher`` are given back in
    the usual layout.
    """
    if int(steps) < 1:
        raise ValueError(f"inherit.steps {steps} must be >= 1")
    if float(kd_weight) < 0:
        raise ValueError(f"inherit.kd_weight {kd_weight} must be >= 0")
    if float(kd_weight) > 0 and teacher is None:
        raise ValueError(f"inherit.kd_weight {kd_weight} > 0 needs a teacher")
    distil = float(kd_weight) > 0
    # the student trains in the usual layout where oneDNN's channels-last weight gradient is wrong
    # for one of its layers; the teacher only runs forward
    teacher_layout = forward_layout(channels_last)
    layout = training_layout(model, channels_last)
    if distil:
        teacher.to(device, memory_format=teacher_layout).eval()
    torch.manual_seed(int(seed))
    model.to(device, memory_format=layout).train()
    try:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        step = 0
        while step < steps:
            progressed = False
            for batch in train_loader:
                x, y = batch[0].to(device), batch[1].to(device)
                for g in optimizer.param_groups:
                    g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
                optimizer.zero_grad(set_to_none=True)
                logits = model(in_layout(x, layout))
                loss = F.cross_entropy(logits, y)
                if distil:
                    if len(batch) > 2:  # the teacher's logits came with the batch (computed once for the run)
                        teacher_logits = batch[2].to(device)
                    else:
                        teacher_logits = _teacher_logits(teacher, in_layout(x, teacher_layout), y, step, teacher_outputs)
                    loss = loss + float(kd_weight) * kd_loss(logits, teacher_logits)
                loss.backward()
                optimizer.step()
                step += 1
                progressed = True
                if step >= steps:
                    break
            if not progressed:
                raise ValueError("the training loader gave no batches; cannot fine-tune the candidates")
        return evaluate_accuracy(model, eval_loader, device, layout=layout)
    finally:
        model.to(memory_format=torch.contiguous_format)
        if distil:
            teacher.to(memory_format=torch.contiguous_format)


def _teacher_logits(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int,
                    kept: list[tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
    if kept is not None and step < len(kept):
        labels, logits = kept[step]
        if not torch.equal(labels, y):
            raise RuntimeError(f"look-ahead step {step} got other batches than the first candidate's; "
                               "the training loader must give the same batches on every call")
        return logits
    with torch.no_grad():
        logits = teacher(x)
    if kept is not None:
        kept.append((y, logits))
    return logits


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
    rivals: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    kd_weight: float = 0.0,
    channels_last: bool = CHANNELS_LAST,
    teacher: nn.Module | None = None,
) -> Inheritance:
    """Cut ``target`` once per candidate, fine-tune each briefly, take the best held-out accuracy.

    ``train_loader_fn()`` must give the same batches in the same order on every
    call, so that every candidate sees the same data. Ties go to the earlier
    candidate. ``rivals`` are keep decisions with widths of their own (named
    ``widths:CRITERION``, a criterion's own read-out), tried after the candidates
    at the learned widths. With ``kd_weight > 0`` each candidate is distilled from
    ``teacher`` while it fine-tunes (default ``target``; when ``target`` adapted beside the
    pruner, the original it adapted from, which the fine-tuning that follows distils from).
    ``channels_last``: the memory format the look-ahead trains in (see
    :func:`lookahead_accuracy`). ``target`` is not changed.
    """
    check_inherit(AUTO, candidates)
    keeps, skipped = candidate_keeps(target, groups, keep, candidates, gradient_batches)
    keeps.update({name: dict(k) for name, k in (rivals or {}).items()})
    teacher = copy.deepcopy(target if teacher is None else teacher).eval() if kd_weight > 0 else None
    teacher_outputs: list = []  # every candidate trains on the same batches: the teacher runs once

    def score(name: str, k: Mapping[str, torch.Tensor]) -> float:
        pruned = apply_surgery(copy.deepcopy(target), groups, k, example_inputs, verify=False)
        return lookahead_accuracy(pruned, train_loader_fn(), eval_loader, steps, lr, momentum, weight_decay, device, seed,
                                  teacher=teacher, kd_weight=kd_weight, teacher_outputs=teacher_outputs,
                                  channels_last=channels_last)

    return select_inheritance(keeps, score, skipped, steps=int(steps))
