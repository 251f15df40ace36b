"""What a model costs: FLOPs, parameters and measured latency.

FLOPs follow torch-pruning's counter, per input sample: one multiply-accumulate
of a convolution or Linear layer counts as one FLOP, a normalisation layer costs
one or two per element, ReLU-like activations and pooling one per element.

:class:`CostModel` predicts the FLOPs and parameters of the pruned model from
keep decisions (or keep probabilities, differentiably): each convolution's cost is
bilinear in the channels it keeps on its input and output side.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from pnp.core.attention import HeadLayout, head_layout

CONV = "conv"
DEPTHWISE = "depthwise"
LINEAR = "linear"
NORM = "norm"
ELEMENTWISE = "elementwise"
ATTENTION = "attention"  # the attention core of a fused-qkv layer: scaled dot products and softmax, per head


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
    spatial: float  # elements per channel per sample: output positions, tokens for Linear
    kernel: float  # kernel elements per (in, out) channel pair
    groups: int
    has_bias: bool
    affine: bool
    in_count: ChannelCount
    out_count: ChannelCount

    def coefficients(self) -> tuple[float, float, float, float]:
        """``(a, b, c, d)`` with FLOPs ``a*in*out + b*out`` and params ``c*in*out + d*out``."""
        bias = 1.0 if self.has_bias else 0.0
        if self.kind == NORM:
            per_channel = 2.0 if self.affine else 1.0
            return 0.0, self.spatial * per_channel, 0.0, (2.0 if self.affine else 0.0)
        if self.kind == DEPTHWISE:
            return 0.0, self.spatial * (self.kernel + bias), 0.0, self.kernel + bias
        if self.kind == ATTENTION:  # kernel: the layer's own per-head parameters (Swin's bias table), per head
            return 0.0, self.spatial, 0.0, self.kernel
        if self.kind == ELEMENTWISE:
            return 0.0, self.spatial, 0.0, 0.0
        return self.spatial * self.kernel / self.groups, self.spatial * bias, self.kernel / self.groups, bias

    def flops(self, masks) -> torch.Tensor | float:
        a, b, _, _ = self.coefficients()
        out = self.out_count.evaluate(masks)
        return (a * self.in_count.evaluate(masks) if a else 0.0) * out + b * out

    def params(self, masks) -> torch.Tensor | float:
        _, _, c, d = self.coefficients()
        out = self.out_count.evaluate(masks)
        return (c * self.in_count.evaluate(masks) if c else 0.0) * out + d * out


# Parameter-free layers that torch-pruning's counter charges one FLOP per element
# of the output (activations, upsampling) or of the input (pooling).
_PER_OUTPUT_ELEMENT = (nn.ReLU, nn.ReLU6, nn.ELU, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.Upsample)
_PER_INPUT_ELEMENT = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _counted_kind(module: nn.Module) -> str | None:
    if head_layout(module, "") is not None:
        return ATTENTION
    if isinstance(module, nn.modules.conv._ConvNd):
        dw = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        return DEPTHWISE if dw else CONV
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, _NORMS):
        return NORM
    if isinstance(module, _PER_OUTPUT_ELEMENT + _PER_INPUT_ELEMENT):
        return ELEMENTWISE
    return None


def _norm_channels(module: nn.Module) -> tuple[int, bool]:
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.affine
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1], module.elementwise_affine
    return module.num_features, module.affine


def layer_costs(model: nn.Module, example_inputs, groups, flows=None) -> list[LayerCost]:
    """Record, by running ``model`` once, how each counted layer's cost depends on ``groups``.

    ``flows`` maps ``(module name, call index)`` of parameter-free layers (activations,
    pooling) to the ``(group name, root indices)`` of the channels they carry, as
    :func:`pnp.core.groups.find_channel_groups` finds them; without it such layers
    count as unchanged by pruning. A weighted layer called several times (a head shared
    by the levels of a feature pyramid) is one entry whose FLOPs add up its calls.
    Costs are per sample of the example batch (the first tensor's first dimension),
    so a layer that sees many rows per sample (a detector's RoI head) counts them all.
    """
    from pnp.core.groups import IN, OUT, run_model

    shapes: dict[tuple[str, int], list[tuple]] = {}
    calls: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def hook(module, args, output):
        name = names[module]
        call = calls.get(name, 0)
        calls[name] = call + 1
        out = output[0] if isinstance(output, (tuple, list)) else output
        key = (name, call if _counted_kind(module) == ELEMENTWISE else 0)
        shapes.setdefault(key, []).append((tuple(args[0].shape), tuple(out.shape)))

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
    sizes = {g.name: g.size for g in groups}
    flow_terms = {
        key: [(name, torch.bincount(root, minlength=sizes[name]).float()) for name, root in carried]
        for key, carried in (flows or {}).items()
    }

    costs = []
    modules = dict(model.named_modules())
    batch = _batch_size(example_inputs)
    for (name, call), seen in shapes.items():
        module = modules[name]
        kind = _counted_kind(module)
        in_shape, out_shape = seen[0]
        kernel, grp, affine = 1.0, 1, False
        if kind == LINEAR:
            n_in, n_out = module.in_features, module.out_features
            spatial = sum(max(1.0, _numel(o) / (batch * n_out)) for _, o in seen)
        elif kind == NORM:
            n_out, affine = _norm_channels(module)
            n_in = n_out
            spatial = sum(_numel(o) / (batch * n_out) for _, o in seen)
        elif kind == ELEMENTWISE:
            counted = in_shape if isinstance(module, _PER_INPUT_ELEMENT) else out_shape
            n_in = n_out = counted[_channel_dim_of_flow(flow_terms.get((name, call), []), groups, modules)] if len(counted) > 1 else 1
            spatial = _numel(counted) / (batch * n_out)
        elif kind == ATTENTION:
            layout = head_layout(module, name)
            n_in = n_out = module.num_heads
            spatial = sum(_attention_flops_per_head(i, layout) for i, _ in seen) / batch
            kernel = sum(getattr(module, p).numel() for p, _ in layout.per_head) / n_out
        else:
            n_in, n_out = module.in_channels, module.out_channels
            spatial = sum(_numel(o) / (batch * n_out) for _, o in seen)
            kernel = float(torch.tensor(module.kernel_size).prod())
            grp = module.groups
        side_terms = {}
        for side, total in ((IN, n_in), (OUT, n_out)):
            if kind == ATTENTION:
                t = [(layout.qkv, torch.ones(n_out))] if layout.qkv in sizes else []
            else:
                t = flow_terms.get((name, call), []) if kind == ELEMENTWISE else terms.get((name, side), [])
            side_terms[side] = ChannelCount(total - sum(float(w.sum()) for _, w in t), t)
        costs.append(
            LayerCost(
                module=name,
                kind=kind,
                spatial=spatial,
                kernel=kernel,
                groups=grp,
                has_bias=getattr(module, "bias", None) is not None and kind in (CONV, DEPTHWISE, LINEAR),
                affine=bool(affine),
                in_count=side_terms[IN],
                out_count=side_terms[OUT],
            )
        )
    return costs


def params_outside_layers(model: nn.Module) -> int:
    """Parameters that no counted layer holds (a class token, position embeddings, layer scales)."""
    total = 0
    for m in model.modules():
        kind = _counted_kind(m)
        if kind in (CONV, DEPTHWISE, LINEAR, NORM):
            continue
        per_head = {p for p, _ in head_layout(m, "").per_head} if kind == ATTENTION else set()
        total += sum(p.numel() for n, p in m.named_parameters(recurse=False) if n not in per_head)
    return total


def _attention_flops_per_head(in_shape, layout: HeadLayout) -> float:
    """One head's attention core on ``[windows x batch, tokens, channels]``: query scaling, QK^T, softmax, AV.

    As torch-pruning counts timm's attention, less the projections (counted as Linear layers).
    """
    tokens = in_shape[1]
    return _numel(in_shape[:-1]) * (layout.key_dim + tokens * (layout.key_dim + layout.val_dim + 1))


def _channel_dim_of_flow(carried, groups, modules) -> int:
    """The channel dim of an activation's tensor: last when the channels it carries come from Linear layers (tokens)."""
    by_name = {g.name: g for g in groups}
    producers = [modules.get(p) for name, _ in carried if name in by_name for p in by_name[name].producers]
    return -1 if producers and all(isinstance(p, nn.Linear) for p in producers) else 1


def _numel(shape) -> float:
    return float(math.prod(shape))


class CostModel:
    """FLOPs and params of the pruned model as a function of per-group keep masks.

    Masks may be bool or float (probabilities), shaped ``[size]`` or ``[batch, size]``;
    missing groups count as fully kept. Float masks give differentiable costs.
    All layers are evaluated at once: a layer usually sees every channel of a group
    equally often, so its channel count is a weighted sum of the groups' kept counts
    (one small matrix product); other channel weightings are gathered one by one.
    """

    def __init__(self, groups):
        self.groups = groups
        self.layers: list[LayerCost] = list(groups.layer_costs)
        self._offsets: dict[str, int] = {}
        index: dict[str, int] = {}
        total = 0
        for i, g in enumerate(groups):
            self._offsets[g.name] = total
            index[g.name] = i
            total += g.size
        self._total = total
        coeffs = torch.tensor([layer.coefficients() for layer in self.layers], dtype=torch.float64).reshape(-1, 4)
        self._tables = {
            "coeffs": coeffs,
            "group_of": torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([g.size for g in groups], dtype=torch.long)),
            "sizes": torch.tensor([float(g.size) for g in groups], dtype=torch.float64),
            "in_fixed": torch.tensor([float(layer.in_count.fixed) for layer in self.layers], dtype=torch.float64),
            "out_fixed": torch.tensor([float(layer.out_count.fixed) for layer in self.layers], dtype=torch.float64),
        }
        for side in ("in", "out"):
            uniform = torch.zeros(len(self.layers), len(groups), dtype=torch.float64)
            rows, cols, weights = [], [], []
            for i, layer in enumerate(self.layers):
                count = layer.in_count if side == "in" else layer.out_count
                for name, weight in count.terms:
                    if bool((weight == weight[0]).all()):
                        uniform[i, index[name]] += float(weight[0])
                        continue
                    nz = weight.nonzero().flatten()
                    rows.append(torch.full_like(nz, i))
                    cols.append(nz + self._offsets[name])
                    weights.append(weight[nz].double())
            self._tables[f"{side}_uniform"] = uniform
            self._tables[f"{side}_rows"] = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
            self._tables[f"{side}_cols"] = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)
            self._tables[f"{side}_weights"] = torch.cat(weights) if weights else torch.zeros(0, dtype=torch.float64)
        self._on: dict[tuple, dict[str, torch.Tensor]] = {}
        full = self._layer_counts(torch.ones(total, dtype=torch.float64))
        self.full_flops = float(self._layer_flops(*full).sum())
        self.other_params = float(getattr(groups, "other_params", 0))  # tokens, embeddings, scales: never pruned
        self.full_params = float(self._layer_params(*full).sum()) + self.other_params

    def _table(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (device, dtype)
        if key not in self._on:
            self._on[key] = {
                k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
                for k, v in self._tables.items()
            }
        return self._on[key]

    def _joined(self, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """All groups' masks as one ``[total]`` or ``[batch, total]`` vector (missing groups kept)."""
        given = [m for m in masks.values() if isinstance(m, torch.Tensor)]
        device = given[0].device if given else torch.device("cpu")
        # at least float32: half precision cannot hold billions of FLOPs
        dtype = torch.float64 if any(m.dtype == torch.float64 for m in given) else torch.float32
        batch = max((m.shape[0] for m in given if m.dim() == 2), default=None)
        parts = []
        for g in self.groups:
            m = masks.get(g.name)
            m = torch.ones(g.size, device=device, dtype=dtype) if m is None else m.to(device=device, dtype=dtype)
            if batch is not None:
                m = m.expand(batch, g.size)
            parts.append(m)
        if not parts:
            return torch.zeros((batch, 0) if batch is not None else (0,), device=device, dtype=dtype)
        return torch.cat(parts, dim=-1)

    def _layer_counts(self, joined: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Channels each layer keeps on its input and output side, ``[..., layers]``."""
        t = self._table(joined.device, joined.dtype)
        batch_shape = joined.shape[:-1]
        kept = torch.zeros(batch_shape + (len(self.groups),), device=joined.device, dtype=joined.dtype)
        kept = kept.index_add(-1, t["group_of"], joined)
        counts = []
        for side in ("in", "out"):
            count = t[f"{side}_fixed"] + kept @ t[f"{side}_uniform"].T
            if t[f"{side}_rows"].numel():
                values = joined.index_select(-1, t[f"{side}_cols"]) * t[f"{side}_weights"]
                count = count.index_add(-1, t[f"{side}_rows"], values)
            counts.append(count)
        return counts[0], counts[1]

    def _layer_flops(self, n_in: torch.Tensor, n_out: torch.Tensor) -> torch.Tensor:
        c = self._table(n_in.device, n_in.dtype)["coeffs"]
        return c[:, 0] * n_in * n_out + c[:, 1] * n_out

    def _layer_params(self, n_in: torch.Tensor, n_out: torch.Tensor) -> torch.Tensor:
        c = self._table(n_in.device, n_in.dtype)["coeffs"]
        return c[:, 2] * n_in * n_out + c[:, 3] * n_out

    def _checked(self, masks: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        for name in masks:
            if name not in self._offsets:
                raise KeyError(self.groups.unknown_group_message(name))
        return masks

    def flops(self, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._layer_flops(*self._layer_counts(self._joined(self._checked(masks)))).sum(-1)

    def params(self, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._layer_params(*self._layer_counts(self._joined(self._checked(masks)))).sum(-1) + self.other_params

    def flops_fraction(self, masks) -> torch.Tensor:
        return self.flops(masks) / self.full_flops

    def params_fraction(self, masks) -> torch.Tensor:
        return self.params(masks) / self.full_params

    def per_layer_flops(self, masks) -> dict[str, float]:
        """FLOPs per module (summed over its calls), for one mask per group."""
        return self._per_layer(self._layer_flops, masks)

    def per_layer_params(self, masks) -> dict[str, float]:
        """Parameters per module, for one mask per group."""
        return self._per_layer(self._layer_params, masks)

    def _per_layer(self, measure, masks) -> dict[str, float]:
        per_layer = measure(*self._layer_counts(self._joined(self._checked(masks))))
        if per_layer.dim() != 1:
            raise ValueError("per-layer costs take one mask per group (shape [size]), not a batch of masks")
        out: dict[str, float] = {}
        for layer, value in zip(self.layers, per_layer.tolist()):
            out[layer.module] = out.get(layer.module, 0.0) + value
        return out

    def marginal_costs(self) -> dict[str, tuple[float, float]]:
        """FLOPs and params that one channel of each group costs in the full model.

        Exactly ``(cost(full) - cost(group removed)) / size``, for all groups at once:
        removing group g takes ``A[l, g]`` inputs and ``B[l, g]`` outputs from layer l.
        """
        t = self._table(torch.device("cpu"), torch.float64)
        n_in, n_out = self._layer_counts(torch.ones(self._total, dtype=torch.float64))
        layers, groups = len(self.layers), len(self.groups)
        removed = {}
        for side in ("in", "out"):
            flat = t[f"{side}_rows"] * groups + t["group_of"][t[f"{side}_cols"]]
            gathered = torch.zeros(layers * groups, dtype=torch.float64).index_add(0, flat, t[f"{side}_weights"])
            removed[side] = t[f"{side}_uniform"] * t["sizes"] + gathered.reshape(layers, groups)
        a_in, b_out = removed["in"], removed["out"]
        bilinear = n_in[:, None] * b_out + a_in * n_out[:, None] - a_in * b_out
        c = t["coeffs"]
        flops = (c[:, 0, None] * bilinear + c[:, 1, None] * b_out).sum(0)
        params = (c[:, 2, None] * bilinear + c[:, 3, None] * b_out).sum(0)
        return {g.name: (float(flops[i]) / g.size, float(params[i]) / g.size) for i, g in enumerate(self.groups)}


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
    """Count FLOPs per sample (MACs) and parameters with torch-pruning's per-layer counters.

    A subclass of a counted layer is counted as its nearest counted base class. A
    Conv/Linear layer that calls child modules in its own forward (a norm, an
    activation: detectron2's ``Conv2d``) counts its own op, and its children count theirs.
    """
    from pnp.core.groups import run_model

    counters = _flops_counters(model)
    batch = _batch_size(example_inputs)
    handles = []
    was_training = model.training
    model.eval()
    try:
        for module, counter in counters.items():
            setattr(module, "__flops__", 0)  # torch-pruning's counters add to this attribute
            handles.append(module.register_forward_hook(counter))
        with torch.no_grad():
            run_model(model, example_inputs)
        counted = {module: int(getattr(module, "__flops__")) for module in counters}
    finally:
        for h in handles:
            h.remove()
        for module in counters:
            vars(module).pop("__flops__", None)
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    per_layer = {names[m]: v // batch for m, v in counted.items() if v}
    per_layer_params = {}
    for m, name in names.items():
        own = sum(p.numel() for p in m.parameters(recurse=False))
        if own and (m in counters or not any(True for _ in m.children())):
            per_layer_params[name] = own
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(sum(counted.values()) // batch, params, per_layer, per_layer_params)


def _flops_counters(model: nn.Module) -> dict:
    """The layers of ``model`` that torch-pruning's counter counts, each with its counter.

    As in torch-pruning, the children of a counted layer are not counted again (an
    attention layer's counter covers its projections), except under a Conv/Linear
    layer, whose counter covers only its own op.
    """
    counters: dict = {}

    def visit(module: nn.Module) -> None:
        counter = _flops_counter_of(module)
        if counter is not None:
            counters[module] = counter
            if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and counter is not _attention_flops_hook:
                return
        for child in module.children():
            visit(child)

    visit(model)
    return counters


def _flops_counter_of(module: nn.Module):
    """torch-pruning's counter for the class of ``module`` or its nearest counted base class."""
    from torch_pruning.utils.op_counter import MODULES_MAPPING

    if head_layout(module, "") is not None:
        return _attention_flops_hook
    for cls in type(module).__mro__:
        if cls is nn.Linear:
            return _linear_flops_hook
        if cls in MODULES_MAPPING:
            return MODULES_MAPPING[cls]
    return None


def _linear_flops_hook(module, args, output) -> None:
    """torch-pruning's Linear count, but with the bias added once per output element, not per call."""
    out_elements = output.numel()
    module.__flops__ += int(args[0].numel() * module.out_features + (out_elements if module.bias is not None else 0))


def _attention_flops_hook(module, args, output) -> None:
    """A fused-qkv attention layer's core (its qkv and proj are counted as Linear layers).

    torch-pruning's counter for timm's attention counts ``proj`` as square
    (``attn_dim x attn_dim``), which no longer holds once heads are removed.
    """
    module.__flops__ += int(_attention_flops_per_head(tuple(args[0].shape), head_layout(module, "")) * module.num_heads)


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
