"""A target whose channels are gated by keep masks, exactly where surgery cuts.

A channel removed by surgery stops contributing to the layers that read it, so
the gate multiplies the *inputs* of those consumer layers: with a mask of 0 on
channel ``c``, the gated model computes what the pruned model computes without
``c`` (BatchNorm shifts and biases of ``c`` never reach another layer).
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from pnp.core.groups import IN, ChannelGroups

NORM_STATS = ("running", "batch")


class GatedModel(nn.Module):
    """Wraps ``target``; ``forward(*args, masks=..., **kwargs)`` runs it gated.

    ``masks`` maps group names to masks shaped ``[size]`` (one per batch) or
    ``[batch, size]`` (one per sample), bool or float; float masks carry gradients
    back to whatever produced them. Groups not named stay fully open. With
    ``freeze=True`` the target is put in eval mode and its weights stop learning.

    ``norm_stats`` says which statistics the target's BatchNorm layers normalise
    with while it runs gated: ``"running"`` (as the target was trained, the
    default) or ``"batch"``, the gated batch's own, as if the cut network's
    statistics had been measured again; its running statistics are not updated.
    """

    def __init__(self, target: nn.Module, groups: ChannelGroups, freeze: bool = False, norm_stats: str = "running"):
        super().__init__()
        if norm_stats not in NORM_STATS:
            raise ValueError(f"norm_stats {norm_stats!r} must be one of {list(NORM_STATS)}")
        self.target = target
        self.groups = groups
        self._masks: Mapping[str, torch.Tensor] | None = None
        self._frozen = freeze
        self._norms = [m for m in target.modules() if isinstance(m, _BatchNorm)] if norm_stats == "batch" else []
        modules = dict(target.named_modules())
        routes: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for g in groups:
            for m in g.members:
                if m.side == IN:
                    routes.setdefault(m.module, []).append((g.name, m.indices, m.root_indices))
        self._routes = routes
        self._handles = [
            modules[name].register_forward_pre_hook(self._make_hook(name, modules[name])) for name in routes
        ]
        if freeze:
            target.eval()
            target.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self._frozen:
            self.target.eval()
        return self

    def _make_hook(self, name: str, module: nn.Module):
        routes = self._routes[name]
        channel_dim = -1 if isinstance(module, nn.Linear) else 1

        def hook(_module, args):
            if self._masks is None or not args:
                return None
            x = args[0]
            gate = self._input_gate(routes, x, channel_dim)
            if gate is None:
                return None
            return (x * gate,) + tuple(args[1:])

        return hook

    def _input_gate(self, routes, x: torch.Tensor, channel_dim: int) -> torch.Tensor | None:
        width = x.shape[channel_dim]
        per_sample = any(self._masks.get(g) is not None and self._masks[g].dim() == 2 for g, _, _ in routes)
        batch = x.shape[0]
        gate = torch.ones((batch, width) if per_sample else (width,), dtype=x.dtype, device=x.device)
        used = False
        for group_name, idx, root in routes:
            mask = self._masks.get(group_name)
            if mask is None:
                continue
            used = True
            mask = mask.to(device=x.device, dtype=x.dtype)
            if per_sample and mask.dim() == 1:
                mask = mask.expand(batch, -1)
            values = mask.index_select(-1, root.to(x.device))
            gate = gate.index_copy(-1, idx.to(x.device), values)
        if not used:
            return None
        if channel_dim == 1:
            shape = (gate.shape[0] if per_sample else 1, width) + (1,) * (x.dim() - 2)
            return gate.reshape(shape)
        if per_sample:
            return gate.reshape((batch,) + (1,) * (x.dim() - 2) + (width,))
        return gate

    @contextlib.contextmanager
    def masked(self, masks: Mapping[str, torch.Tensor]):
        """Gate every call of the target inside the block with ``masks``."""
        previous = self._masks
        self._masks = self._check(masks)
        try:
            with self._batch_statistics():
                yield self
        finally:
            self._masks = previous

    def _check(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        checked = {}
        for name, mask in masks.items():
            if name not in self.groups:
                raise KeyError(self.groups.unknown_group_message(name))
            size = self.groups[name].size
            if mask.shape[-1] != size or mask.dim() not in (1, 2):
                raise ValueError(
                    f"mask for group {name!r} has shape {tuple(mask.shape)}; expected [{size}] or [batch, {size}]"
                )
            checked[name] = mask.float() if mask.dtype == torch.bool else mask
        return checked

    def forward(self, *args, masks: Mapping[str, torch.Tensor] | None = None, **kwargs):
        if masks is None:
            return self.target(*args, **kwargs)
        with self.masked(masks):
            return self.target(*args, **kwargs)

    @contextlib.contextmanager
    def _batch_statistics(self):
        """With ``norm_stats="batch"``: BatchNorm normalises with the batch's statistics and leaves its running ones."""
        saved = [(m, m.training, m.track_running_stats) for m in self._norms]
        for m in self._norms:
            m.train(True)
            m.track_running_stats = False  # running buffers are neither read nor updated
        try:
            yield
        finally:
            for m, training, track in saved:
                m.train(training)
                m.track_running_stats = track

    def remove(self) -> nn.Module:
        """Take the gates off and return the plain target."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.target
