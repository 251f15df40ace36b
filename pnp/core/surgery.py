"""One-shot surgery: remove every dropped channel at once, giving a smaller dense model."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn as nn
import torch_pruning as tp

from pnp.core.attention import head_layouts, resize_attention
from pnp.core.groups import IN, OUT, ChannelGroups, build_dependency_graph, first_tensor, legalize_keep, run_model
from pnp.core.handlers import handler_for, shrink_module
from pnp.core.sections import SizeAttribute, resize_sections


class SurgeryMismatchError(RuntimeError):
    """The pruned model does not compute what the gated original computes."""


@dataclass
class ChannelSpec:
    """Which original channels each changed layer kept.

    ``modules`` maps a qualified module name (in the original model) to
    ``{"kept_out": [...], "kept_in": [...]}`` (only the sides that changed) and
    ``groups`` maps group names to their kept channel indices. ``section_sizes``
    maps a module that splits or slices channels into sizes it holds to
    ``{attribute: new value}`` (see :mod:`pnp.core.sections`).
    """

    modules: dict[str, dict[str, list[int]]]
    groups: dict[str, list[int]]
    group_sizes: dict[str, int]
    adjustments: dict[str, str] = field(default_factory=dict)
    section_sizes: dict[str, dict[str, int | list[int]]] = field(default_factory=dict)

    def kept_fraction(self) -> dict[str, float]:
        return {name: len(kept) / self.group_sizes[name] for name, kept in self.groups.items()}


def channel_spec(model: nn.Module, groups: ChannelGroups, keep: Mapping[str, torch.Tensor], adjustments=None) -> ChannelSpec:
    """The per-module kept indices that ``keep`` implies for ``model``."""
    modules = dict(model.named_modules())
    removed: dict[tuple[str, str], set[int]] = {}
    for g in groups:
        dropped = ~keep[g.name]
        for m in g.members:
            hit = dropped[m.root_indices]
            removed.setdefault((m.module, m.side), set()).update(m.indices[hit].tolist())
    spec: dict[str, dict[str, list[int]]] = {}
    for (name, side), gone in sorted(removed.items()):
        if not gone:
            continue
        module = modules[name]
        handler = handler_for(module)
        total = handler.get_out_channels(module) if side == OUT else handler.get_in_channels(module)
        kept = [i for i in range(total) if i not in gone]
        if not kept:
            raise ValueError(
                f"the keep decisions drop every {side}put channel of layer {name!r}; keep at least one "
                "(legalize_keep does)"
            )
        entry = spec.setdefault(name, {})
        entry["kept_out" if side == OUT else "kept_in"] = kept
        if side == OUT and handler.prune_in_channels == handler.prune_out_channels and isinstance(module, nn.Conv2d):
            entry["kept_in"] = kept  # depthwise: input and output channels go together
    group_keep = {g.name: keep[g.name].nonzero().flatten().tolist() for g in groups}
    return ChannelSpec(spec, group_keep, {g.name: g.size for g in groups}, dict(adjustments or {}),
                       _section_sizes(groups, keep))


def _section_sizes(groups: ChannelGroups, keep: Mapping[str, torch.Tensor]) -> dict[str, dict[str, int | list[int]]]:
    """``{module: {attribute: new value}}`` for each split or slice size that ``keep`` changes."""
    removed: dict[SizeAttribute, set[int]] = {}
    for g in groups:
        dropped = ~keep[g.name]
        for section in g.sections:
            gone = section.positions[dropped[section.root_indices]]
            removed.setdefault(section.attribute, set()).update(gone.tolist())
    resized: dict[tuple[str, str], list] = {}
    for attribute, gone in removed.items():
        resized.setdefault((attribute.module, attribute.attr), []).append((attribute, attribute.resized(gone)))
    sizes: dict[str, dict[str, int | list[int]]] = {}
    for (module, attr), pairs in resized.items():
        values = [value for _, value in pairs]
        if any(value != values[0] for value in values):
            raise ValueError(
                f"{module}.{attr} sizes {len(values)} splits or slices, and the keep decisions resize them "
                f"differently ({values}); one attribute cannot hold them all"
            )
        attribute, value = pairs[0]
        if value != attribute.resized(set()):
            sizes.setdefault(module, {})[attr] = value
    return sizes


def apply_surgery(
    model: nn.Module,
    groups: ChannelGroups,
    keep: Mapping[str, torch.Tensor],
    example_inputs=None,
    verify: bool = False,
    legalize: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> nn.Module:
    """Return a copy of ``model`` with every channel that ``keep`` drops removed.

    ``keep`` maps group names to bool vectors of the group's size; groups not
    named keep all channels. With ``legalize=True`` decisions that the structure
    cannot realise (grouped convolutions) are moved to the nearest legal ones and a
    warning says so. With ``verify=True`` the gated original and the pruned model
    are run on ``example_inputs`` and a :class:`SurgeryMismatchError` names the first
    layer where they differ. The returned model carries its :class:`ChannelSpec` as
    ``model.pnp_channel_spec``; ``model`` itself is not changed.
    """
    keep = groups.check_keep(keep)
    adjustments: dict[str, str] = {}
    if legalize:
        keep, adjustments = legalize_keep(groups, keep)
        for name, what in adjustments.items():
            warnings.warn(f"group {name!r}: {what}", stacklevel=2)
    example_inputs = groups.example_inputs if example_inputs is None else example_inputs
    spec = channel_spec(model, groups, keep, adjustments)

    pruned = copy.deepcopy(model)
    if hasattr(pruned, "pnp_channel_spec"):
        del pruned.pnp_channel_spec
    _remove_channels(pruned, groups, keep, example_inputs)
    resize_attention(pruned, head_layouts(model), spec.modules)
    resize_sections(pruned, spec.section_sizes)
    _check_widths(pruned, spec)
    pruned.pnp_channel_spec = spec
    if verify:
        verify_surgery(model, pruned, groups, keep, example_inputs, atol=atol, rtol=rtol)
    return pruned


def _remove_channels(model: nn.Module, groups: ChannelGroups, keep: Mapping[str, torch.Tensor], example_inputs) -> None:
    """Remove every dropped channel of ``model`` in place.

    All groups' removals are collected in the unpruned model's channel numbering
    and each layer is cut once; pruning group by group would make torch-pruning
    renumber every concatenation after each group.
    """
    graph = build_dependency_graph(model, example_inputs)
    modules = dict(model.named_modules())
    removals: dict[tuple, tuple] = {}  # (target node, handler) -> (dependency, channels)
    with graph.channels_unchanged():
        for g in groups:
            dropped = g.root_channels(~keep[g.name]).tolist()
            if not dropped or g.unit == "head":
                continue
            root = modules[g.name]
            pruner = graph.get_pruner_of_module(root)
            for item in graph.get_pruning_group(root, pruner.prune_out_channels, dropped):
                dep = item.dep
                if dep.target.type != tp.ops.OPTYPE.PARAMETER and dep.target.module not in graph._module2name:
                    continue  # graph-only ops (concat, split, add): nothing to cut
                _, channels = removals.setdefault((dep.target, dep.handler), (dep, set()))
                channels.update(int(i) for i in item.idxs)
    merged = tp.dependency.Group()
    merged._DG = graph
    for dep, channels in removals.values():
        merged.add_dep(dep, sorted(channels))
    merged.prune(record_history=False)
    _remove_heads(model, groups, keep)


def _remove_heads(model: nn.Module, groups: ChannelGroups, keep: Mapping[str, torch.Tensor]) -> None:
    """Cut each attention-head group's layers by the heads their channels belong to.

    torch-pruning maps channels through the reshape into heads as if they kept their
    place (and onto per-head tables, which resize_attention cuts); the members say
    which head each channel of ``qkv`` and ``proj`` belongs to. A head group is a
    layer's only group on its side, so the cut does not meet the other groups'.
    """
    modules = dict(model.named_modules())
    for g in groups:
        if g.unit != "head" or bool(keep[g.name].all()):
            continue
        for m in g.members:  # each member lists every channel of its side
            kept = m.indices[keep[g.name][m.root_indices]].tolist()
            shrink_module(modules[m.module], kept if m.side == OUT else None, kept if m.side == IN else None)


def _check_widths(pruned: nn.Module, spec: ChannelSpec) -> None:
    """Raise unless every cut layer has as many channels as the spec says it kept.

    A layer reached from two channels of one group (a map and a depthwise copy of it,
    concatenated) loses the channels of both when only one is dropped: the model is
    then not the one the keep decisions describe.
    """
    modules = dict(pruned.named_modules())
    for name, sides in spec.modules.items():
        handler = handler_for(modules[name])
        for side, kept in sides.items():
            width = handler.get_out_channels(modules[name]) if side == "kept_out" else handler.get_in_channels(modules[name])
            if width != len(kept):
                raise SurgeryMismatchError(
                    f"surgery left layer {name!r} with {width} {side[5:]}put channels, but the keep decisions keep "
                    f"{len(kept)}: its channels are tied to more than one channel of a group, which pnp cannot "
                    "follow (exclude the layer with ignore=[...], or prove the groups with prove=True)"
                )


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def _record_outputs(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], list]:
    outputs: dict[str, torch.Tensor] = {}
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if not name or any(True for _ in module.children()):
            continue

        def hook(mod, args, out, name=name):
            if isinstance(out, torch.Tensor) and name not in outputs:
                outputs[name] = out.detach()
                order.append(name)

        handles.append(module.register_forward_hook(hook))
    return outputs, order, handles


def verify_surgery(
    original: nn.Module,
    pruned: nn.Module,
    groups: ChannelGroups,
    keep: Mapping[str, torch.Tensor],
    example_inputs,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> float:
    """Check ``pruned`` against ``original`` gated by ``keep``; return the max output difference.

    Raises :class:`SurgeryMismatchError` naming the first layer (in execution
    order) whose kept outputs differ.
    """
    from pnp.core.gating import GatedModel

    spec: ChannelSpec = pruned.pnp_channel_spec
    masks = {name: k.float() for name, k in keep.items()}
    states = original.training, pruned.training
    original.eval()
    pruned.eval()
    gated = GatedModel(original, groups)
    ref, order, h1 = _record_outputs(original)
    got, _, h2 = _record_outputs(pruned)
    try:
        with torch.no_grad():
            expected = gated(*_as_args(example_inputs), masks=masks) if not isinstance(example_inputs, Mapping) else gated(masks=masks, **example_inputs)
            actual = run_model(pruned, example_inputs)
    finally:
        for h in h1 + h2:
            h.remove()
        gated.remove()
        original.train(states[0])
        pruned.train(states[1])
    expected_t, actual_t = first_tensor(expected), first_tensor(actual)
    diff = (expected_t - actual_t).abs().max().item() if expected_t.shape == actual_t.shape else float("inf")
    scale = expected_t.abs().max().item()
    if diff <= atol + rtol * scale:
        return diff
    modules = dict(original.named_modules())
    for name in order:
        if name not in got:
            continue
        e, a = ref[name], got[name]
        kept = spec.modules.get(name, {}).get("kept_out")
        if kept is not None:
            e = e.index_select(_channel_dim(modules[name]) % e.dim(), torch.tensor(kept, device=e.device))
        elif e.shape != a.shape:
            continue  # a layer without weights (activation, pooling) on cut channels: no channel map to compare by
        if e.shape != a.shape:
            raise SurgeryMismatchError(
                f"pruned model differs from the gated original first at layer {name!r}: "
                f"output shape {tuple(a.shape)} instead of {tuple(e.shape)}"
            )
        layer_diff = (e - a).abs().max().item()
        if layer_diff > atol + rtol * e.abs().max().item():
            raise SurgeryMismatchError(
                f"pruned model differs from the gated original first at layer {name!r} "
                f"(max abs difference {layer_diff:.3g})"
            )
    raise SurgeryMismatchError(
        f"pruned model's output differs from the gated original's (max abs difference {diff:.3g}), "
        "though no layer's kept outputs differ"
    )


def _as_args(example_inputs):
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


@torch.no_grad()
def remeasure_norm_statistics(model: nn.Module, inputs) -> int:
    """Measure every BatchNorm's running statistics again, as the plain mean over ``inputs``; returns the batches used.

    A cut network's layers see other statistics than the unpruned network's did, and
    its BatchNorm layers still hold those. Each item of ``inputs`` is a batch of the
    model's input. Nothing else changes: the weights are untouched and the model is
    left in the mode it was in. A model without BatchNorm is left as it is (0).

    Unlike ``torch.optim.swa_utils.update_bn``, which puts the whole model in
    training mode, only the BatchNorm layers measure: dropout and stochastic depth
    (torchvision's EfficientNet, timm's ViTs) stay off, so the statistics are those
    the model will see at inference.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    device = next(model.parameters()).device
    model.eval()  # dropout and the like stay off; only the BatchNorm layers measure
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over the batches
        m.train()
    batches = 0
    try:
        for x in inputs:
            model(x.to(device))
            batches += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    if batches == 0:
        raise ValueError("no batches to measure the BatchNorm statistics on")
    return batches
