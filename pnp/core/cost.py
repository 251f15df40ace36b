"""What a model costs: FLOPs, parameters and measured latency.

FLOPs follow the convention of fvcore and torch-pruning's counter: one
multiply-accumulate counts as one FLOP, per input sample.

:class:`CostModel` predicts the FLOPs and parameters of the pruned model from
keep decisions (or keep probabilities, differentiably): each convolution's cost is
bilinear in the channels it keeps on its input and output side.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn as nn

CONV = "conv"
DEPTHWISE = "depthwise"
LINEAR = "linear"
NORM = "norm"


@dataclass
class ChannelCount:
    """Channels a layer keeps on one side: ``fixed`` plus, per group, ``mask @ weight``."""

    fixed: float
    terms: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    def evaluate(self, masks: Mapping[str, torch.Tensor]) -> torch.Tensor | float:
        total = self.fixed
        for name, weight in self.terms:
            m = masks[name]
            total = total + (m.to(weight.dtype) * weight.to(m.device)).sum(-1)
        return total


@dataclass
class LayerCost:
    """One layer's FLOPs and params as a function of its channel counts."""

    module: str
    kind: str
    spatial: float  # output positions per sample (tokens for Linear)
    kernel: float  # kernel elements per (in, out) channel pair
    groups: int
    has_bias: bool
    affine: bool
    in_count: ChannelCount
    out_count: ChannelCount

    def flops(self, masks) -> torch.Tensor | float:
        out = self.out_count.evaluate(masks)
        if self.kind == NORM:
            return self.spatial * out * (2 if self.affine else 1)
        bias = self.spatial * out if self.has_bias else 0.0
        if self.kind == DEPTHWISE:
            return self.spatial * self.kernel * out + bias
        return self.spatial * self.kernel * self.in_count.evaluate(masks) * out / self.groups + bias

    def params(self, masks) -> torch.Tensor | float:
        out = self.out_count.evaluate(masks)
        if self.kind == NORM:
            return 2 * out if self.affine else 0.0 * out
        bias = out if self.has_bias else 0.0
        if self.kind == DEPTHWISE:
            return self.kernel * out + bias
        return self.kernel * self.in_count.evaluate(masks) * out / self.groups + bias


def _counted_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        dw = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        return DEPTHWISE if dw else CONV
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return NORM
    return None


def layer_costs(model: nn.Module, example_inputs, groups) -> list[LayerCost]:
    """Record, by running ``model`` once, how each counted layer's cost depends on ``groups``."""
    from pnp.core.groups import IN, OUT, run_model

    shapes: dict[str, tuple] = {}
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def hook(module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        shapes.setdefault(names[module], (tuple(args[0].shape), tuple(out.shape)))

    for module in model.modules():
        if _counted_kind(module) is not None:
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    terms: dict[tuple[str, str], list[tuple[str, torch.Tensor]]] = {}
    for g in groups:
        for m in g.members:
            weight = torch.bincount(m.root_indices, minlength=g.size).float()
            terms.setdefault((m.module, m.side), []).append((g.name, weight))

    costs = []
    modules = dict(model.named_modules())
    for name, (in_shape, out_shape) in shapes.items():
        module = modules[name]
        kind = _counted_kind(module)
        batch = in_shape[0] if in_shape else 1
        if kind == LINEAR:
            n_in, n_out = module.in_features, module.out_features
            spatial = max(1.0, float(torch.tensor(out_shape).prod()) / (batch * n_out))
            kernel, grp = 1.0, 1
        elif kind == NORM:
            n_in = n_out = module.num_features
            spatial = float(torch.tensor(out_shape).prod()) / (batch * n_out)
            kernel, grp = 1.0, 1
        else:
            n_in, n_out = module.in_channels, module.out_channels
            spatial = float(torch.tensor(out_shape).prod()) / (batch * n_out)
            kernel = float(torch.tensor(module.kernel_size).prod())
            grp = module.groups
        side_terms = {}
        for side, total in ((IN, n_in), (OUT, n_out)):
            t = terms.get((name, side), [])
            side_terms[side] = ChannelCount(total - sum(float(w.sum()) for _, w in t), t)
        costs.append(
            LayerCost(
                module=name,
                kind=kind,
                spatial=spatial,
                kernel=kernel,
                groups=grp,
                has_bias=getattr(module, "bias", None) is not None and kind != NORM,
                affine=bool(getattr(module, "affine", False)),
                in_count=side_terms[IN],
                out_count=side_terms[OUT],
            )
        )
    return costs


class CostModel:
    """FLOPs and params of the pruned model as a function of per-group keep masks.

    Masks may be bool or float (probabilities), shaped ``[size]`` or ``[batch, size]``;
    missing groups count as fully kept. Float masks give differentiable costs.
    """

    def __init__(self, groups):
        self.groups = groups
        self.layers: list[LayerCost] = list(groups.layer_costs)
        full = {g.name: torch.ones(g.size) for g in groups}
        self.full_flops = float(self.flops(full))
        self.full_params = float(self.params(full))

    def _complete(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for g in self.groups:
            m = masks.get(g.name)
            out[g.name] = torch.ones(g.size) if m is None else (m.float() if m.dtype == torch.bool else m)
        return out

    def flops(self, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        masks = self._complete(masks)
        return sum(layer.flops(masks) for layer in self.layers)

    def params(self, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        masks = self._complete(masks)
        return sum(layer.params(masks) for layer in self.layers)

    def flops_fraction(self, masks) -> torch.Tensor:
        return self.flops(masks) / self.full_flops

    def params_fraction(self, masks) -> torch.Tensor:
        return self.params(masks) / self.full_params

    def per_layer_flops(self, masks) -> dict[str, float]:
        masks = self._complete(masks)
        return {layer.module: float(layer.flops(masks)) for layer in self.layers}


@dataclass
class ModelCost:
    """Counted FLOPs and params of a model, in total and per layer."""

    flops: int
    params: int
    layer_flops: dict[str, int]
    layer_params: dict[str, int]

    def as_dict(self) -> dict:
        return {"flops": self.flops, "params": self.params, "layer_flops": self.layer_flops, "layer_params": self.layer_params}


def count_flops_params(model: nn.Module, example_inputs) -> ModelCost:
    """Count FLOPs per sample (MACs) and parameters with torch-pruning's counter."""
    import torch_pruning as tp

    inputs = example_inputs
    batch = _batch_size(inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flops, params, layer_flops, layer_params = tp.utils.count_ops_and_params(
                _CallAs(model, inputs), (), layer_wise=True
            )
    finally:
        model.train(was_training)
    leaves = {m: n for n, m in model.named_modules() if not any(True for _ in m.children())}
    per_layer = {leaves[m]: int(v) // batch for m, v in layer_flops.items() if m in leaves and v}
    per_layer_params = {leaves[m]: int(v) for m, v in layer_params.items() if m in leaves and v}
    return ModelCost(int(flops) // batch, int(params), per_layer, per_layer_params)


class _CallAs(nn.Module):
    """Lets torch-pruning's counter call a model with dict or tuple inputs."""

    def __init__(self, model, inputs):
        super().__init__()
        self.model = model
        self._inputs = inputs

    def forward(self, _ignored=None):
        from pnp.core.groups import run_model

        return run_model(self.model, self._inputs)


def _batch_size(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    if isinstance(inputs, Mapping):
        inputs = list(inputs.values())
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim():
            return int(x.shape[0])
    return 1


@dataclass
class Latency:
    batch_size: int
    threads: int
    median_ms: float
    runs_ms: list[float]

    def as_dict(self) -> dict:
        return {"batch_size": self.batch_size, "threads": self.threads, "median_ms": self.median_ms, "runs_ms": self.runs_ms}


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1,),
    threads: Sequence[int] | None = None,
    warmup: int = 3,
    repeats: int = 10,
    device: str | torch.device = "cpu",
) -> list[Latency]:
    """Median wall time of ``model`` on random inputs of ``[batch, *input_shape]``.

    ``input_shape`` excludes the batch dimension. Each (batch size, threads) pair
    is warmed up, then timed ``repeats`` times; the model is put in eval mode.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    device = torch.device(device)
    threads = list(threads) if threads else [torch.get_num_threads()]
    was_training = model.training
    model.eval()
    previous_threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in threads:
            torch.set_num_threads(int(n_threads))
            for batch in batch_sizes:
                x = torch.randn(int(batch), *input_shape, device=device)
                runs = []
                with torch.inference_mode():
                    for i in range(warmup + repeats):
                        _sync(device)
                        start = time.perf_counter()
                        model(x)
                        _sync(device)
                        if i >= warmup:
                            runs.append((time.perf_counter() - start) * 1000.0)
                results.append(Latency(int(batch), int(n_threads), statistics.median(runs), runs))
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
