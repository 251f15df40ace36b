"""The pruner network: the target's own architecture with a multitask keep/prune head.

The pruner sees the same input as the target and outputs, for every channel of
every group, a binary keep decision. Decisions are hard (0 or 1) in the forward
pass; in the backward pass the gradient flows through the keep probability
``sigmoid(logit / temperature)`` (straight-through estimator). Optional logistic
noise on the logits (a Gumbel-sigmoid relaxation) lets training explore.

The original "Network Pruning Network" paper's full text was not available to us:
the binarisation, the head's initialisation and the read-out are pnp's own
reconstruction.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from pnp.core.groups import ChannelGroups, first_tensor, run_model

MASK_MODES = ("sample", "batch")


def _logistic_like(x: torch.Tensor) -> torch.Tensor:
    """Standard logistic noise shaped like ``x``: ``sigmoid(l + noise) > 0.5`` is then a draw of Bernoulli(sigmoid(l))."""
    u = torch.rand_like(x).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


class _StraightThrough(torch.autograd.Function):
    """Exactly 0/1 forward; the gradient passes to the probability unchanged."""

    @staticmethod
    def forward(ctx, prob: torch.Tensor) -> torch.Tensor:
        return (prob > 0.5).to(prob.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class MultiTaskHead(nn.Module):
    """One logit per channel of every group, from the features the target's classifier read.

    When operations follow the replaced layer in the target's forward, the head
    keeps its logits in ``captured`` and hands the rest of the network zeros of
    the replaced layer's output shape (``passthrough_shape``), whose result is
    discarded.
    """

    def __init__(self, in_features: int, total: int, init_keep: float, spatial: bool, passthrough_shape=None):
        super().__init__()
        self.spatial = spatial
        self.passthrough_shape = passthrough_shape
        self.captured: torch.Tensor | None = None
        self.linear = nn.Linear(in_features, total)
        nn.init.normal_(self.linear.weight, std=0.1 / math.sqrt(max(1, in_features)))
        nn.init.constant_(self.linear.bias, math.log(init_keep / (1.0 - init_keep)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial and x.dim() > 2:
            x = x.flatten(2).mean(-1)
        logits = self.linear(x)
        if self.passthrough_shape is None:
            return logits
        self.captured = logits
        return logits.new_zeros((logits.shape[0], *self.passthrough_shape))


def _layer_outputs(model: nn.Module, example_inputs):
    """Run ``model`` once; return its output and every Linear/Conv layer's output."""
    names = {m: n for n, m in model.named_modules()}
    last: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out: last.__setitem__(names[mod], out))
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = run_model(model, example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    out = first_tensor(out)
    return out, last


def find_head_layer(model: nn.Module, example_inputs) -> str:
    """Name of the Linear/Conv layer whose output is the model's output."""
    out, last = _layer_outputs(model, example_inputs)
    for name, value in last.items():
        if value is out or (isinstance(value, torch.Tensor) and value.shape == out.shape and value.data_ptr() == out.data_ptr()):
            return name
    raise ValueError(
        f"{type(model).__name__}'s output is not produced directly by a Linear or Conv layer "
        "(other operations follow its last layer); pass head_layer='<name>' naming the layer "
        "whose input the pruner's head should read"
    )


def _first_samples(inputs, k: int):
    """``inputs`` (tensors in tuples, lists and dicts) with every tensor cut to its first ``k`` rows."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:k] if inputs.dim() > 0 else inputs
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_first_samples(v, k) for v in inputs)
    if isinstance(inputs, dict):
        return {key: _first_samples(v, k) for key, v in inputs.items()}
    return inputs


class PrunerNetwork(nn.Module):
    """Same architecture as ``target`` (its weights by default), ending in a multitask head.

    ``forward(x)`` returns ``{group name: mask}`` with masks ``[N, size]``
    (``mask_mode="sample"``) or ``[size]`` (``"batch"``: one decision per batch).
    With ``input_samples=K`` (batch mode only) the batch's decision is made from its
    first K samples: the pruner's own forward and backward then cost K samples, not
    the whole batch, while the gated target still runs every sample.
    """

    def __init__(
        self,
        target: nn.Module,
        groups: ChannelGroups,
        example_inputs=None,
        head_layer: str | None = None,
        init_from_target: bool = True,
        temperature: float = 1.0,
        init_keep: float = 0.9,
        noise: float = 0.0,
        mask_mode: str = "sample",
        min_channels: int = 1,
        input_samples: int | None = None,
    ):
        super().__init__()
        if int(min_channels) < 1:
            raise ValueError(f"min_channels {min_channels} must be >= 1")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode {mask_mode!r} is not one of {MASK_MODES}")
        if input_samples is not None:
            if isinstance(input_samples, bool) or not isinstance(input_samples, int) or input_samples < 1:
                raise ValueError(f"input_samples {input_samples!r} must be an integer >= 1, or None for the whole batch")
            if mask_mode != "batch":
                raise ValueError(f"input_samples {input_samples} needs mask_mode='batch': with per-sample decisions "
                                 "every sample needs the pruner's own output")
        if not 0.0 < init_keep < 1.0:
            raise ValueError(f"init_keep {init_keep} must be in (0, 1): the starting keep probability")
        if temperature <= 0:
            raise ValueError(f"temperature {temperature} must be > 0")
        example_inputs = groups.example_inputs if example_inputs is None else example_inputs
        passthrough = None
        if head_layer is None:
            head_layer = find_head_layer(target, example_inputs)
        else:
            out, layer_outputs = _layer_outputs(target, example_inputs)
            if head_layer not in layer_outputs:
                raise ValueError(f"head_layer {head_layer!r} is not a Linear or Conv layer that {type(target).__name__} runs")
            if layer_outputs[head_layer] is not out:
                passthrough = tuple(layer_outputs[head_layer].shape[1:])
        trunk = copy.deepcopy(target)
        trunk.requires_grad_(True)
        if not init_from_target:
            for m in trunk.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        modules = dict(trunk.named_modules())
        if head_layer not in modules:
            raise ValueError(f"head_layer {head_layer!r} is not a module of {type(target).__name__}")
        old = modules[head_layer]
        if isinstance(old, nn.Linear):
            head = MultiTaskHead(old.in_features, groups.total_channels, init_keep, False, passthrough)
        elif isinstance(old, nn.modules.conv._ConvNd):
            head = MultiTaskHead(old.in_channels, groups.total_channels, init_keep, True, passthrough)
        else:
            raise ValueError(f"head_layer {head_layer!r} is a {type(old).__name__}; it must be a Linear or Conv layer")
        parent_name, _, child = head_layer.rpartition(".")
        setattr(modules[parent_name] if parent_name else trunk, child, head)
        self.trunk = trunk
        self.head_layer = head_layer
        self.group_names = list(groups.names)
        self.group_sizes = [g.size for g in groups]
        self.temperature = float(temperature)
        self.noise = float(noise)
        self.mask_mode = mask_mode
        self.min_channels = int(min_channels)
        self.input_samples = input_samples

    @property
    def head(self) -> MultiTaskHead:
        return self.trunk.get_submodule(self.head_layer)

    def param_groups(self, lr: float, trunk_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups: the fresh head at ``lr``, the trunk at ``trunk_lr`` (default ``lr / 10``).

        The trunk starts from the target's trained weights: it moves slower than the
        head, so the keep decisions do not swing all at once.
        """
        head = list(self.head.parameters())
        head_ids = {id(p) for p in head}
        trunk = [p for p in self.parameters() if id(p) not in head_ids]
        return [{"params": head, "lr": lr}, {"params": trunk, "lr": lr / 10 if trunk_lr is None else trunk_lr}]

    def logits(self, *args, **kwargs) -> torch.Tensor:
        out = self.trunk(*args, **kwargs)
        if self.head.passthrough_shape is not None:
            out, self.head.captured = self.head.captured, None
        return out.flatten(1)

    def _split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.group_names, flat.split(self.group_sizes, dim=-1)))

    def keep_probabilities(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Keep probability of every channel, per sample: ``{group: [N, size]}``."""
        return self._split(torch.sigmoid(self.logits(*args, **kwargs) / self.temperature))

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        if self.input_samples is not None:
            args, kwargs = _first_samples((args, kwargs), self.input_samples)
        logits = self.logits(*args, **kwargs)
        if self.mask_mode == "batch":
            # one decision for the batch: its images' mean keep probability, and with noise one
            # draw for the whole batch (noise on each image's logit would average away)
            prob = torch.sigmoid(logits / self.temperature).mean(0)
            if self.training and self.noise > 0:
                prob = torch.sigmoid(torch.logit(prob, eps=1e-6) + self.noise * _logistic_like(prob))
        else:
            if self.training and self.noise > 0:
                logits = logits + self.noise * _logistic_like(logits)
            prob = torch.sigmoid(logits / self.temperature)
        masks = self._split(_StraightThrough.apply(prob))
        probs = self._split(prob.detach())
        return {name: self._keep_floor(masks[name], probs[name]) for name in masks}

    def _keep_floor(self, mask: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """Keep each group's ``min_channels`` most likely channels on.

        A group with every channel off cuts the network in two: no gradient then
        reaches the other groups' decisions, and the pruner cannot recover.
        """
        k = min(self.min_channels, mask.shape[-1])
        floor = torch.zeros_like(mask).scatter(-1, prob.topk(k, dim=-1).indices, 1.0)
        return torch.maximum(mask, floor)
