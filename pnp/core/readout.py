"""From keep probabilities to one static architecture.

The pruner decides per input; surgery needs one decision per channel. Keep
probabilities are averaged over a calibration set (summed across processes when
running distributed, so every rank reads out the same architecture), then
thresholded, with a floor (``min_channels``), rounding of keep counts to
multiples of ``round_to`` for real speed, and, optionally, the threshold bisected
until the pruned model meets a FLOPs or params budget, then what the budget has
left filled with the best-scored channels that still fit. With a budget, no group
keeps less than ``min_share`` of the width uniform pruning would give it at that
budget, so scores that rate a whole layer low cannot cut it to a few channels.
"""

from __future__ import annotations

from typing import Mapping

import torch

from pnp.core.cost import CostModel
from pnp.core.groups import ChannelGroups, legalize_keep


# every group keeps at least this share of the uniform keep ratio that meets the budget (see decide_keep)
MIN_SHARE = 0.75


class KeepScores:
    """Running mean of keep probabilities per channel, over batches and processes."""

    def __init__(self, groups: ChannelGroups):
        self.groups = groups
        self.reset()

    def reset(self) -> None:
        self._sums = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in self.groups}
        self._count = torch.zeros((), dtype=torch.float64)

    def update(self, probabilities: Mapping[str, torch.Tensor]) -> None:
        """Add a batch of ``{group: [N, size]}`` (or ``[size]``) probabilities."""
        n = None
        for name, p in probabilities.items():
            p = p.detach().to("cpu", torch.float64)
            if p.dim() == 1:
                p = p.unsqueeze(0)
            self._sums[name] += p.sum(0)
            n = p.shape[0]
        if n is not None:
            self._count += n

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean probability per channel, all-reduced across processes if distributed."""
        sums = torch.cat([self._sums[g.name] for g in self.groups] + [self._count.reshape(1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            reduced = sums.to(device)
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
            sums = reduced.cpu()
        count = float(sums[-1])
        if count == 0:
            raise RuntimeError("no keep probabilities were accumulated: the calibration loader was empty")
        means = (sums[:-1] / count).float().split([g.size for g in self.groups])
        return dict(zip((g.name for g in self.groups), means))


def _rounded_count(count: int, size: int, round_to: int, min_channels: int) -> int:
    floor = min(size, max(1, min_channels))
    if round_to > 1 and size >= round_to:
        count = int(round(count / round_to)) * round_to
        floor = min(size, max(floor, round_to))
    return max(floor, min(size, count))


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A mask of the ``count`` highest scores (ties: earlier channels first)."""
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[torch.argsort(scores, descending=True, stable=True)[:count]] = True
    return keep


def _decide_at(groups, scores, threshold: float, min_channels: int, round_to: int, floor=None) -> dict[str, torch.Tensor]:
    """Channels scoring above ``threshold``, counts rounded, and every channel of ``floor`` (masks) besides."""
    keep = {}
    for g in groups:
        s = scores[g.name]
        keep[g.name] = _top(s, _rounded_count(int((s > threshold).sum()), g.size, round_to, min_channels))
        if floor is not None:
            keep[g.name] |= floor[g.name]
    return keep


def _top_per_block(scores: torch.Tensor, count: int, group) -> torch.Tensor:
    """:func:`_top`, except that a group feeding grouped convolutions keeps ``count`` spread evenly over its blocks."""
    if group.blocks is None:
        return _top(scores, count)
    keep = torch.zeros(len(scores), dtype=torch.bool)
    per_block = max(1, int(round(count / group.num_blocks)))
    for b in range(group.num_blocks):
        idx = (group.blocks == b).nonzero().flatten()
        keep[idx[_top(scores[idx], per_block)]] = True
    return keep


def _uniform_keep(groups: ChannelGroups, scores, ratio: float, min_channels: int, round_to: int) -> dict[str, torch.Tensor]:
    """Every group keeping ``ratio`` of its channels (its best-scored), rounded and legalised as any read-out is."""
    keep = {
        g.name: _top_per_block(scores[g.name], _rounded_count(int(round(ratio * g.size)), g.size, round_to, min_channels), g)
        for g in groups
    }
    return legalize_keep(groups, keep, scores)[0]


def _uniform_ratio(groups: ChannelGroups, scores, budget: float, fraction, min_channels: int, round_to: int,
                   iterations: int) -> float:
    """The largest keep ratio that, applied to every group alike, meets ``budget`` (0 when none does)."""
    if float(fraction(_uniform_keep(groups, scores, 1.0, min_channels, round_to))) <= budget:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if float(fraction(_uniform_keep(groups, scores, mid, min_channels, round_to))) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _ties_broken(groups: ChannelGroups, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``scores`` in float64 with exact ties split, earlier channels (network order) first.

    Each channel gets an offset below half the smallest gap between distinct
    scores, so distinct scores keep their order and equal ones become distinct.
    """
    flat = torch.cat([scores[g.name].double() for g in groups])
    distinct = torch.unique(flat)
    gap = float((distinct[1:] - distinct[:-1]).min()) if len(distinct) > 1 else 1.0
    n = len(flat)
    flat = flat + torch.arange(n, 0, -1, dtype=torch.float64) * (0.5 * gap / (n + 1))
    return dict(zip((g.name for g in groups), flat.split([g.size for g in groups])))


def decide_keep(
    groups: ChannelGroups,
    scores: Mapping[str, torch.Tensor],
    threshold: float = 0.5,
    min_channels: int = 1,
    round_to: int = 1,
    budget: float | None = None,
    metric: str = "flops",
    iterations: int = 64,
    fill: bool = True,
    min_share: float = MIN_SHARE,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Static keep decisions from per-channel keep scores (probabilities in [0, 1]).

    Without ``budget`` a channel is kept when its score exceeds ``threshold``. With
    ``budget`` (fraction of ``metric`` to keep), the threshold is bisected to the
    lowest value whose pruned model meets the budget. One threshold stops at the
    first channel that does not fit, which can be an expensive one (a wide early
    convolution) with a large share of the budget still unused; ``fill`` then adds
    the best-scored channels left out, ``round_to`` at a time, while they fit.

    With ``budget``, every group first keeps its best-scored ``min_share`` x r of its
    channels, r being the keep ratio that pruning every group alike would need to
    meet the same budget (bisected, rounded and legalised as the read-out is); the
    threshold and the fill then spend the rest of the budget by the scores. Scores
    rank channels well within a layer but can rate a whole layer far too low, and a
    residual group cut to a few channels starves every block that adds to it, which
    fine-tuning does not undo. The default 0.75 leaves each group at least three
    quarters of its uniform width (ResNet-20 at budget 0.1: 15 of 64 channels, where
    uniform keeps 19), yet the scores place a quarter of every group's width and all
    the budget the floor leaves; at 0.5 starved groups still cost accuracy (README).
    1 gives uniform widths, 0 no floor. The floor is uniform pruning at a lower
    ratio, so it always fits the budget.

    Returns the decisions and ``info`` (threshold used, predicted FLOPs/params
    fractions, channels added by the fill, adjustments made for grouped convolutions;
    with a budget and a floor, the uniform keep ratio and, in ``floored``, each group
    the floor lifted: ``{"by_scores": channels the scores kept at the threshold,
    "floor": channels the floor keeps}``).
    """
    if metric not in ("flops", "params"):
        raise ValueError(f"metric {metric!r} is not 'flops' or 'params'")
    if int(min_channels) < 1:
        raise ValueError(f"min_channels {min_channels} must be >= 1")
    if int(round_to) < 1:
        raise ValueError(f"round_to {round_to} must be >= 1")
    if budget is not None and not (0.0 < float(budget) <= 1.0):
        raise ValueError(f"budget {budget} is outside (0, 1]: it is the fraction of {metric} to keep")
    if not (0.0 <= float(min_share) <= 1.0):
        raise ValueError(f"min_share {min_share} is outside [0, 1]: it is the share of the uniform keep ratio "
                         "every group keeps at least (0: no floor)")
    scores = {name: torch.as_tensor(s).detach().float().cpu() for name, s in scores.items()}
    for g in groups:
        if g.name not in scores:
            raise KeyError(f"scores has no entry for group {g.name!r}")
        if scores[g.name].shape != (g.size,):
            raise ValueError(f"scores[{g.name!r}] has shape {tuple(scores[g.name].shape)}; expected ({g.size},)")
    cost = CostModel(groups)
    fraction = cost.flops_fraction if metric == "flops" else cost.params_fraction

    floor_keep = None  # with a budget and min_share: the widths no group falls under

    def decide(t: float):
        keep, adjusted = legalize_keep(groups, _decide_at(groups, scores, t, min_channels, round_to, floor_keep), scores)
        return keep, adjusted

    filled, extra = 0, {}
    if budget is None:
        keep, adjusted = decide(threshold)
    else:
        scores = _ties_broken(groups, scores)  # saturated scores (all 1s) must still split at the budget
        if min_share > 0:
            uniform = _uniform_ratio(groups, scores, budget, fraction, min_channels, round_to, iterations)
            floor_keep = _uniform_keep(groups, scores, min_share * uniform, min_channels, round_to)
        low = min(float(v.min()) for v in scores.values())
        high = max(float(v.max()) for v in scores.values())
        lo, hi = low - 1e-6, high + 1e-6  # threshold lo keeps everything; hi keeps the floor
        keep_hi, adjusted_hi = decide(hi)
        least = float(fraction(keep_hi))
        if least > budget + 1e-9:
            raise ValueError(
                f"budget {budget} cannot be met: even keeping min_channels={min_channels} "
                f"(round_to={round_to}) per group keeps {least:.3f} of the {metric}"
            )
        keep, adjusted = decide(lo)
        used = lo
        if float(fraction(keep)) > budget:
            keep, adjusted = keep_hi, adjusted_hi
            for _ in range(iterations):
                mid = 0.5 * (lo + hi)
                k_mid, a_mid = decide(mid)
                if float(fraction(k_mid)) <= budget:
                    hi, keep, adjusted = mid, k_mid, a_mid
                else:
                    lo = mid
            threshold = used = hi
        if floor_keep is not None:
            extra = {"min_share": float(min_share), "uniform_keep_ratio": uniform,
                     "floored": _floored(groups, scores, floor_keep, used, min_channels, round_to)}
        if fill:
            keep, filled = _fill_budget(groups, scores, keep, budget, fraction, round_to)
    info = {
        "threshold": float(threshold),
        "flops_fraction": float(cost.flops_fraction(keep)),
        "params_fraction": float(cost.params_fraction(keep)),
        "channels_kept": int(sum(int(k.sum()) for k in keep.values())),
        "channels_total": groups.total_channels,
        "filled": filled,
        "adjustments": adjusted,
        **extra,
    }
    return keep, info


def _floored(groups: ChannelGroups, scores, floor, threshold: float, min_channels: int, round_to: int) -> dict:
    """The groups whose scores alone, at ``threshold``, keep fewer channels than ``floor``; both counts."""
    out = {}
    for g in groups:
        by_scores = _rounded_count(int((scores[g.name] > threshold).sum()), g.size, round_to, min_channels)
        at_floor = int(floor[g.name].sum())
        if by_scores < at_floor:
            out[g.name] = {"by_scores": by_scores, "floor": at_floor}
    return out


def _fill_budget(groups: ChannelGroups, scores, keep, budget: float, fraction, round_to: int):
    """Add the best-scored channels not kept, ``round_to`` at a time, while ``fraction`` stays within ``budget``.

    Each step takes the group whose next channel scores highest; a group whose next
    addition does not fit is closed, since what it would cost only grows as other
    groups widen. Groups feeding grouped convolutions keep their counts (they move a
    block at a time). Returns the decisions and how many channels were added.
    """
    keep = {name: k.clone() for name, k in keep.items()}
    open_groups = [g for g in groups if g.blocks is None and not bool(keep[g.name].all())]
    added = 0
    while open_groups:
        best = None
        for g in open_groups:
            left = scores[g.name].masked_fill(keep[g.name], float("-inf"))
            step = round_to if round_to > 1 and g.size >= round_to else 1
            idx = torch.topk(left, min(step, int((~keep[g.name]).sum()))).indices
            if best is None or left[idx[0]] > best[0]:
                best = (left[idx[0]], g, idx)
        _, g, idx = best
        trial = dict(keep)
        trial[g.name] = keep[g.name].clone()
        trial[g.name][idx] = True
        if float(fraction(trial)) <= budget:
            keep, added = trial, added + len(idx)
            if bool(keep[g.name].all()):
                open_groups.remove(g)
        else:
            open_groups.remove(g)
    return keep, added


def reselect_keep(
    groups: ChannelGroups, keep: Mapping[str, torch.Tensor], importance: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list]:
    """As many channels per group as ``keep`` keeps, chosen instead by ``importance`` (higher is kept).

    The widths (the architecture) stay those of ``keep``; only which channels carry
    their weights into the pruned model changes. Groups ``importance`` does not
    score keep the channels ``keep`` picked. Returns the decisions and the
    adjustments made for grouped convolutions.
    """
    chosen, scores = {}, {}
    for g in groups:
        k = torch.as_tensor(keep[g.name]).bool().cpu()
        if k.shape != (g.size,):
            raise ValueError(f"keep[{g.name!r}] has shape {tuple(k.shape)}; expected ({g.size},)")
        s = importance.get(g.name)
        if s is None:
            chosen[g.name], scores[g.name] = k.clone(), k.float()
            continue
        s = torch.as_tensor(s).detach().float().cpu()
        if s.shape != (g.size,):
            raise ValueError(f"importance[{g.name!r}] has shape {tuple(s.shape)}; expected ({g.size},)")
        chosen[g.name], scores[g.name] = _top(s, int(k.sum())), s
    return legalize_keep(groups, chosen, scores)
