"""Channel importance by torch-pruning's criteria, ranked globally for pnp's read-out.

Baselines for comparing against pnp's learned pruner. Each criterion is one of
torch-pruning's importance classes, run on torch-pruning's own group for every
pnp :class:`~pnp.core.groups.ChannelGroup` (same root layer, same channel order),
so the scores are torch-pruning's, not a re-implementation. Like torch-pruning's
global pruning, each group's scores are normalised by the criterion (by their
mean, torch-pruning's default) and then ranked across all groups;
:func:`global_rank` turns the ranks into scores in (0, 1) that
:func:`pnp.core.readout.decide_keep` thresholds to meet an exact FLOPs budget::

    scores = rank_channels(model, groups, "l1")
    keep, info = decide_keep(groups, scores, budget=0.5, metric="flops")
    pruned = apply_surgery(model, groups, keep)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from pnp.core.groups import ChannelGroups, build_dependency_graph


class CriterionNotApplicableError(ValueError):
    """The criterion has nothing to measure in this model (e.g. BN scales without BatchNorm)."""


@dataclass(frozen=True)
class Criterion:
    """A torch-pruning importance, built fresh for each use."""

    importance: Callable[[], tp.importance.Importance]
    description: str
    needs_gradients: bool = False


CRITERIA: dict[str, Criterion] = {
    # "first" reads only the group's root layer, i.e. each filter's own weights (Li et al. 2017)
    "l1": Criterion(
        lambda: tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer="mean"),
        "L1 norm of each filter of the group's root layer (Li et al., 2017)",
    ),
    "magnitude": Criterion(
        lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "torch-pruning's group magnitude: L2 norms over every layer of the group, averaged",
    ),
    "taylor": Criterion(
        lambda: tp.importance.GroupTaylorImportance(),
        "torch-pruning's group Taylor: |weight x gradient of the task loss| over the group",
        needs_gradients=True,
    ),
    "bn_scale": Criterion(
        lambda: tp.importance.BNScaleImportance(),
        "|BatchNorm scale| of the group's channels (Network Slimming, Liu et al., 2017)",
    ),
    "random": Criterion(lambda: tp.importance.RandomImportance(), "uniformly random scores"),
}


def check_criterion(name) -> str:
    """Return ``name`` if it names a criterion, else raise listing the valid names."""
    if not isinstance(name, str) or name not in CRITERIA:
        raise ValueError(f"criterion {name!r} is not one of {list(CRITERIA)}")
    return name


def channel_importance(
    model: nn.Module,
    groups: ChannelGroups,
    criterion: str,
    batches: Iterable | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Each group's per-channel importance under ``criterion``, as torch-pruning computes it.

    ``batches`` (an iterable of ``(inputs, targets, ...)``) is needed by ``"taylor"``:
    the gradients of ``loss_fn`` are summed over them, then cleared again.
    ``"random"`` draws from a generator seeded with ``seed`` and leaves the global
    random state alone. Groups the criterion cannot score (``"bn_scale"`` on a group
    without BatchNorm) are left out of the result; :func:`global_rank` keeps them.
    ``model`` is not changed.
    """
    spec = CRITERIA[check_criterion(criterion)]
    device = _device_of(model)
    was_training = model.training
    model.eval()  # BatchNorm uses its running statistics and does not update them
    try:
        if spec.needs_gradients:
            _accumulate_gradients(model, batches, loss_fn, criterion, device)
        graph = build_dependency_graph(model, _to(groups.example_inputs, device), pnp_conv_handler=False)
        modules = dict(model.named_modules())
        importance = spec.importance()
        scores: dict[str, torch.Tensor] = {}
        with torch.random.fork_rng(devices=[]), graph.channels_unchanged():
            torch.manual_seed(int(seed))
            for g in groups:
                root = modules[g.name]
                handler = graph.get_pruner_of_module(root)
                channels = g.root_channels(torch.ones(g.size, dtype=torch.bool))
                tp_group = graph.get_pruning_group(root, handler.prune_out_channels, channels.tolist())
                value = importance(tp_group)
                if value is not None:
                    # an all-zero group normalises to NaN: it is the least important
                    scores[g.name] = _per_unit(g, torch.nan_to_num(value.detach().float().cpu(), nan=0.0))
    finally:
        if spec.needs_gradients:
            model.zero_grad(set_to_none=True)
        model.train(was_training)
    if not scores:
        raise CriterionNotApplicableError(
            f"criterion {criterion!r} scores none of the {len(groups)} channel groups of "
            f"{type(model).__name__} ({CRITERIA[criterion].description}); pick another criterion"
        )
    return scores


def _per_unit(group, per_channel: torch.Tensor) -> torch.Tensor:
    """Scores of the root layer's channels as scores of the group's units: the mean over each unit's channels.

    The identity for channel groups; an attention head scores the mean of its query,
    key and value channels.
    """
    if len(per_channel) == group.size:
        return per_channel
    units = group.root.root_indices
    total = torch.zeros(group.size).index_add_(0, units, per_channel)
    return total / torch.bincount(units, minlength=group.size).clamp(min=1).float()


def global_rank(groups: ChannelGroups, importance: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One score per channel in (0, 1): its percentile among all scored channels of all groups.

    A higher score means more important. Ties keep network order. Groups missing
    from ``importance`` get 1.0: they are kept unless no budget can be met otherwise.
    """
    scored = [g for g in groups if g.name in importance]
    for g in scored:
        if tuple(importance[g.name].shape) != (g.size,):
            raise ValueError(
                f"importance[{g.name!r}] has shape {tuple(importance[g.name].shape)}; "
                f"group {g.name!r} has {g.size} channels"
            )
    out = {g.name: torch.ones(g.size) for g in groups}
    if not scored:
        return out
    joined = torch.cat([importance[g.name].detach().float().cpu() for g in scored])
    order = torch.argsort(joined, stable=True)
    ranks = torch.empty_like(joined)
    ranks[order] = torch.arange(len(joined), dtype=joined.dtype)
    percentiles = (ranks + 0.5) / len(joined)
    for g, part in zip(scored, percentiles.split([g.size for g in scored])):
        out[g.name] = part
    return out


def rank_channels(model: nn.Module, groups: ChannelGroups, criterion: str, **kwargs) -> dict[str, torch.Tensor]:
    """:func:`channel_importance` then :func:`global_rank`: scores ready for ``decide_keep``."""
    return global_rank(groups, channel_importance(model, groups, criterion, **kwargs))


def _accumulate_gradients(model: nn.Module, batches, loss_fn, criterion: str, device: torch.device) -> None:
    if batches is None:
        raise ValueError(
            f"criterion {criterion!r} needs batches=... (an iterable of (inputs, targets)) "
            "to accumulate gradients of the task loss"
        )
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    seen = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                x, y = _to(batch[0], device), batch[1].to(device)
                loss_fn(model(x), y).backward()
                seen += 1
    finally:
        for p in frozen:
            p.requires_grad_(False)
    if not seen:
        raise ValueError(f"criterion {criterion!r} got no batches: pass a non-empty iterable of (inputs, targets)")


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _to(inputs, device: torch.device):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs
