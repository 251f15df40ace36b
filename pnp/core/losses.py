"""Losses for training the pruner and for distilling into the pruned model."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from pnp.core.cost import CostModel
from pnp.core.groups import ChannelGroups

SPARSITY_KINDS = ("flops", "params", "channels")
BUDGET_METRICS = ("flops", "params")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton's distillation loss: KL(teacher || student) on softened logits, times T^2."""
    t = float(temperature)
    if t <= 0:
        raise ValueError(f"kd temperature {temperature} must be > 0")
    teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    student = F.log_softmax(student_logits / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


def feature_distillation_loss(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    kept_channels: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Mean squared error between feature maps, the teacher's cut to the student's kept channels.

    ``kept_channels[i]`` holds the teacher channels that student map ``i`` kept
    (``ChannelSpec.modules[name]["kept_out"]``); ``None`` compares all channels.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(f"{len(student_features)} student feature maps but {len(teacher_features)} teacher maps")
    kept_channels = kept_channels or [None] * len(student_features)
    total = student_features[0].new_zeros(())
    for s, t, kept in zip(student_features, teacher_features, kept_channels):
        t = t.detach()
        if kept is not None:
            t = t.index_select(1, torch.as_tensor(kept, device=t.device))
        if s.shape != t.shape:
            raise ValueError(f"feature map shapes differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        total = total + F.mse_loss(s, t)
    return total / max(1, len(student_features))


def channel_fraction(masks: Mapping[str, torch.Tensor], groups: ChannelGroups) -> torch.Tensor:
    """Fraction of all prunable channels kept (per sample for ``[N, size]`` masks)."""
    kept = sum(masks[g.name].float().sum(-1) for g in groups if g.name in masks)
    return kept / groups.total_channels


def budget_at(budget: float, progress: float, warmup: float) -> float:
    """The budget a pruner aims at ``progress`` (0 to 1) of the way through its training.

    With ``warmup`` > 0 it falls from the whole model (1.0) to ``budget`` over that share
    of the training, along the cubic of Zhu and Gupta's gradual pruning (2017): fast at
    first, slowly as it nears the budget, so that the pruner's decisions settle on the
    budget instead of overshooting it; ``budget`` from there on. ``warmup=0``: the budget throughout.
    """
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"budget warmup {warmup} must be in [0, 1): the share of the training the budget falls over")
    if warmup == 0.0 or progress >= warmup:
        return float(budget)
    left = 1.0 - max(0.0, progress) / warmup
    return float(budget) + (1.0 - float(budget)) * left ** 3


class PrunerLoss:
    """Task loss through the gated target, plus sparsity, budget and distillation terms.

    ``sparsity="flops"`` penalises the fraction of FLOPs kept (each channel weighted
    by what it costs, which depends on its neighbours' decisions); ``"params"`` the
    fraction of parameters kept, which weighs on wide, cheap layers (fully connected
    ones) that a FLOPs budget leaves almost free; ``"channels"`` the fraction of
    channels kept. ``budget`` is the fraction of FLOPs
    (or params, ``budget_metric``) to keep: ``budget_weight * |kept / budget - 1|``
    pulls the pruner to the budget from both sides, so that it spends what it may
    keep on the channels that matter instead of pruning on past it (the read-out
    then meets the budget exactly). A call's ``budget`` overrides the one it aims
    at for that step (:func:`budget_at`: a budget reached gradually). ``kd_weight``
    distils the unpruned target's logits into the gated target's.
    """

    def __init__(
        self,
        groups: ChannelGroups,
        sparsity: str = "flops",
        sparsity_weight: float = 1.0,
        budget: float | None = None,
        budget_metric: str = "flops",
        budget_weight: float = 10.0,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    ):
        if sparsity not in SPARSITY_KINDS:
            raise ValueError(f"sparsity {sparsity!r} is not one of {SPARSITY_KINDS}")
        if budget_metric not in BUDGET_METRICS:
            raise ValueError(f"budget_metric {budget_metric!r} is not one of {BUDGET_METRICS}")
        if budget is not None and not (0.0 < float(budget) <= 1.0):
            raise ValueError(f"budget {budget} is outside (0, 1]: it is the fraction of {budget_metric} to keep")
        for field, value in (("sparsity_weight", sparsity_weight), ("budget_weight", budget_weight), ("kd_weight", kd_weight)):
            if float(value) < 0:
                raise ValueError(f"{field} {value} must be >= 0")
        self.groups = groups
        self.cost = CostModel(groups)
        self.sparsity = sparsity
        self.sparsity_weight = float(sparsity_weight)
        self.budget = None if budget is None else float(budget)
        self.budget_metric = budget_metric
        self.budget_weight = float(budget_weight)
        self.kd_weight = float(kd_weight)
        self.kd_temperature = float(kd_temperature)
        self.task_loss = task_loss

    def __call__(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        masks: Mapping[str, torch.Tensor],
        teacher_logits: torch.Tensor | None = None,
        budget: float | None = None,
    ) -> dict[str, torch.Tensor]:
        task = self.task_loss(logits, targets)
        flops_kept = self.cost.flops_fraction(masks).mean()
        params_kept = self.cost.params_fraction(masks).mean()
        channels_kept = channel_fraction(masks, self.groups).mean()
        sparsity = {"flops": flops_kept, "params": params_kept, "channels": channels_kept}[self.sparsity]
        off_budget = task.new_zeros(())
        if self.budget is not None:
            aim = self.budget if budget is None else float(budget)
            kept = flops_kept if self.budget_metric == "flops" else params_kept
            off_budget = (kept / aim - 1.0).abs()
        kd = task.new_zeros(())
        if self.kd_weight > 0 and teacher_logits is not None:
            kd = kd_loss(logits, teacher_logits, self.kd_temperature)
        total = task + self.sparsity_weight * sparsity + self.budget_weight * off_budget + self.kd_weight * kd
        return {
            "loss": total,
            "task": task,
            "sparsity": sparsity,
            "budget": off_budget,
            "kd": kd,
            "flops_kept": flops_kept,
            "params_kept": params_kept,
            "channels_kept": channels_kept,
        }
