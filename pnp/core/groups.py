"""Groups of coupled channels, found on torch-pruning's dependency graph.

A :class:`ChannelGroup` is a set of channels that must be removed together: the
output channels of one or more producers (convolutions whose outputs are added,
concatenated pieces, BatchNorm, depthwise convolutions) and the matching input
channels of every consumer. Channel ``c`` of a group is addressed by its index in
the group's root layer, whatever index it has in each member.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from pnp.core.attention import HeadLayout, head_layouts
from pnp.core.handlers import make_dependency_graph
from pnp.core.sections import SizeAttribute, size_attributes

OUT = "out"
IN = "in"


@dataclass(frozen=True)
class ChannelMember:
    """One layer's share of a group.

    ``side`` is ``"out"`` for layers whose output channels shrink (producers and
    per-channel layers such as BatchNorm) and ``"in"`` for layers whose input
    channels shrink (consumers). ``indices[i]`` is a channel of this layer that
    belongs to group channel ``root_indices[i]``; a flattened consumer maps one
    group channel to many of its inputs.
    """

    module: str
    side: str
    indices: torch.Tensor
    root_indices: torch.Tensor
    groups: int = 1


@dataclass(frozen=True)
class SectionMember:
    """The group's channels where a module splits or slices them into sizes it holds.

    ``positions[i]`` is the position, in the split or sliced tensor, of group channel
    ``root_indices[i]``; the spec resizes ``attribute`` by the positions dropped (see
    :mod:`pnp.core.sections`).
    """

    attribute: SizeAttribute
    positions: torch.Tensor
    root_indices: torch.Tensor


@dataclass
class ChannelGroup:
    """Channels that are kept or removed together."""

    name: str
    size: int
    members: tuple[ChannelMember, ...]
    blocks: torch.Tensor | None = None
    flops_per_channel: float = 0.0
    params_per_channel: float = 0.0
    unit: str = "channel"  # what one of the group's ``size`` entries is: a channel, or an attention "head"
    sections: tuple[SectionMember, ...] = ()  # where a module splits or slices its channels into sizes it holds

    @property
    def producers(self) -> list[str]:
        return [m.module for m in self.members if m.side == OUT]

    @property
    def consumers(self) -> list[str]:
        return [m.module for m in self.members if m.side == IN]

    @property
    def root(self) -> ChannelMember:
        """The root layer's output side: ``root_indices`` says which group entry each of its channels carries."""
        return next(m for m in self.members if m.module == self.name and m.side == OUT)

    def root_channels(self, entries: torch.Tensor) -> torch.Tensor:
        """The root layer's output channels that carry the group's ``entries`` (a bool mask or indices).

        The identity for channel groups; the query, key and value channels of each
        head for an attention-head group.
        """
        entries = torch.as_tensor(entries)
        chosen = entries if entries.dtype == torch.bool else torch.zeros(self.size, dtype=torch.bool).index_fill_(0, entries.long(), True)
        return self.root.indices[chosen[self.root.root_indices]]

    @property
    def num_blocks(self) -> int:
        """Equal-size blocks that must keep the same number of channels."""
        return 1 if self.blocks is None else int(self.blocks.max()) + 1

    def check_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """Return ``keep`` as a bool vector, or raise naming this group."""
        if not isinstance(keep, torch.Tensor):
            keep = torch.as_tensor(keep)
        keep = keep.detach().to("cpu")
        if keep.dim() != 1 or keep.numel() != self.size:
            raise ValueError(
                f"keep[{self.name!r}] has shape {tuple(keep.shape)}, but group "
                f"{self.name!r} has {self.size} channels: pass a vector of length {self.size}"
            )
        if keep.dtype != torch.bool and not bool(((keep == 0) | (keep == 1)).all()):
            odd = keep[(keep != 0) & (keep != 1)][:3].tolist()
            raise ValueError(
                f"keep[{self.name!r}] holds {odd}: keep decisions are booleans (or exactly 0/1); "
                "threshold probabilities first, e.g. with pnp.decide_keep"
            )
        keep = keep.bool()
        if not bool(keep.any()):
            raise ValueError(
                f"keep[{self.name!r}] drops all {self.size} channels; keep at least one "
                "(pruning a whole layer away is not supported)"
            )
        return keep

    def __repr__(self) -> str:
        extra = f", blocks={self.num_blocks}" if self.blocks is not None else ""
        return f"ChannelGroup({self.name!r}, size={self.size}, members={len(self.members)}{extra})"


class ChannelGroups(Sequence[ChannelGroup]):
    """The prunable groups of a model, with the groups left out and why."""

    def __init__(
        self,
        groups: Iterable[ChannelGroup],
        excluded: Mapping[str, str],
        example_inputs,
        layer_costs: list | None = None,
    ):
        self._groups = list(groups)
        self._by_name = {g.name: g for g in self._groups}
        self.excluded = dict(excluded)
        self.example_inputs = example_inputs
        self.layer_costs = layer_costs or []
        self.other_params = 0  # parameters outside counted layers, which pruning leaves as they are

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return self._by_name[key]
            except KeyError:
                raise KeyError(self.unknown_group_message(key)) from None
        return self._groups[key]

    def __len__(self) -> int:
        return len(self._groups)

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self._groups)

    def __contains__(self, name) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return [g.name for g in self._groups]

    @property
    def total_channels(self) -> int:
        return sum(g.size for g in self._groups)

    def unknown_group_message(self, name: str) -> str:
        close = difflib_close(name, self.names)
        hint = f"; did you mean {close!r}?" if close else ""
        why = f" (it was left out: {self.excluded[name]})" if name in self.excluded else ""
        return f"unknown group name {name!r}{why}{hint}. Known groups: {len(self)} (see ChannelGroups.names)"

    def check_keep(self, keep: Mapping[str, torch.Tensor], complete: bool = False) -> dict[str, torch.Tensor]:
        """Validate a ``{group name: bool vector}`` mapping at the API boundary."""
        if not isinstance(keep, Mapping):
            raise TypeError(f"keep must map group names to bool vectors, got {type(keep).__name__}")
        checked = {}
        for name, value in keep.items():
            if name not in self._by_name:
                raise KeyError(self.unknown_group_message(name))
            checked[name] = self._by_name[name].check_keep(value)
        if complete:
            missing = [g.name for g in self._groups if g.name not in checked]
            if missing:
                raise KeyError(f"keep has no decision for groups {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for g in self._groups:
            checked.setdefault(g.name, torch.ones(g.size, dtype=torch.bool))
        return checked

    def full_keep(self) -> dict[str, torch.Tensor]:
        return {g.name: torch.ones(g.size, dtype=torch.bool) for g in self._groups}

    def __repr__(self) -> str:
        return f"ChannelGroups({len(self)} groups, {self.total_channels} channels, {len(self.excluded)} excluded)"


def difflib_close(name: str, names: list[str]) -> str | None:
    import difflib

    close = difflib.get_close_matches(name, names, n=1)
    return close[0] if close else None


class UntraceableModelError(RuntimeError):
    """The model could not be run or traced on the example inputs."""


@contextlib.contextmanager
def _track_running_module(model: nn.Module, record: list):
    """Remember the innermost module that was running when forward failed."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []

    def pre(module, args):
        stack.append(names.get(module, type(module).__name__))

    def post(module, args, output):
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        yield stack
    except Exception:
        record.extend(stack)
        raise
    finally:
        for h in handles:
            h.remove()


def run_model(model: nn.Module, example_inputs):
    """Call ``model`` on ``example_inputs`` (a tensor, a tuple of args or a dict)."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def first_tensor(output) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a mapping or a sequence)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return first_tensor(next(iter(output.values())))
    return first_tensor(output[0])


def build_dependency_graph(
    model: nn.Module, example_inputs, ignored_modules=(), pnp_conv_handler: bool = True
) -> tp.DependencyGraph:
    """Trace ``model`` into torch-pruning's dependency graph, with errors that name the layer.

    ``pnp_conv_handler=False`` keeps torch-pruning's convolution handler (see
    :func:`pnp.core.handlers.make_dependency_graph`).
    """
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:  # the tracer follows autograd, which skips frozen weights
        p.requires_grad_(True)
    failed_in: list[str] = []
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _track_running_module(model, failed_in):
                graph = make_dependency_graph(pnp_conv_handler)
                # torch-pruning's tracer calls model(*inputs) and retries with the
                # whole tuple; a single call through forward_fn keeps errors readable.
                graph.build_dependency(
                    model,
                    example_inputs,
                    forward_fn=lambda m, x: run_model(m, x),
                    ignored_layers=list(ignored_modules),
                    verbose=False,
                )
    except Exception as exc:
        where = failed_in[-1] if failed_in else "<model>"
        raise UntraceableModelError(
            f"could not trace {type(model).__name__} at layer {where!r}: {type(exc).__name__}: {exc}. "
            "Check that example_inputs match what forward expects, or exclude the layer with ignore=[...]"
        ) from exc
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(False)
    return graph


def _is_consumer(graph: tp.DependencyGraph, module, handler) -> bool:
    """True when ``handler`` shrinks the input side of a layer whose in and out differ."""
    pruner = graph.get_pruner_of_module(module)
    return (
        pruner is not None
        and pruner.prune_in_channels != pruner.prune_out_channels
        and handler == pruner.prune_in_channels
    )


def _block_ids(member_module, side: str, indices: torch.Tensor) -> torch.Tensor | None:
    """Block of each channel of a grouped (not depthwise) convolution, else None."""
    if not isinstance(member_module, nn.modules.conv._ConvNd) or member_module.groups == 1:
        return None
    conv = member_module
    if conv.groups == conv.out_channels and conv.groups == conv.in_channels:
        return None  # depthwise: channels are independent
    width = (conv.in_channels if side == IN else conv.out_channels) // conv.groups
    return indices // width


def _combine_blocks(size: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | str | None:
    """Merge the block structures of several grouped convolutions into one.

    Returns block ids per group channel, ``None`` when unconstrained, or a reason
    string when the constraints cannot be met by equal per-block counts.
    """
    if not parts:
        return None
    key = torch.zeros(size, dtype=torch.long)
    for root_idx, block in parts:
        per_channel = torch.full((size,), -1, dtype=torch.long)
        per_channel[root_idx] = block
        if (per_channel < 0).any():
            return "a grouped convolution sees only part of the group's channels"
        key = key * (int(per_channel.max()) + 1) + per_channel
    _, blocks = torch.unique(key, return_inverse=True)
    counts = torch.bincount(blocks)
    if not bool((counts == counts[0]).all()):
        return "grouped convolutions split the group into blocks of unequal size"
    return blocks


def _leaves_model(group, graph) -> str | None:
    for dep, _ in group:
        node = dep.target
        if node.type == tp.ops.OPTYPE.OUTPUT:
            return "its channels are part of the model's output"
        if graph.is_out_channel_pruning_fn(dep.handler) and not node.outputs:
            name = graph._module2name.get(node.module, str(node.module))
            return f"its channels are the model's output (produced by {name!r})"
    return None


def _standardised_weight(group, graph) -> str | None:
    """Why a layer of the group that standardises its weight in forward (see handlers) keeps it out, or None.

    Weight standardisation (timm's ``ScaledStdConv2d``, NF-ResNets) normalises each
    output channel's weights over all its input channels: removing input channels
    changes the weights of those kept, so gating cannot stand in for removal. Its
    output channels would be exact, but the layer computes its weight from more
    than ``weight`` and ``bias`` (a per-channel gain), which pnp does not cut.
    """
    found = [(_is_consumer(graph, dep.target.module, dep.handler), dep.target) for dep, _ in group
             if getattr(dep.target, "pnp_standardised_weight", None)]
    if not found:
        return None
    consumer, node = max(found, key=lambda f: f[0])  # a consumer's input channels are what makes it inexact
    what = f"{graph._module2name.get(node.module, node.module)!r} ({type(node.module).__name__})"
    how = f"which standardises its weight in forward (weight standardisation, {node.pnp_standardised_weight[0]})"
    if consumer:
        return (f"its channels are input channels of {what}, {how}: each output channel's weights are normalised "
                "over all its input channels, so removing some changes the weights kept and gating cannot stand in "
                "for removal")
    return (f"its channels are output channels of {what}, {how} from parameters besides its weight and bias, "
            "which pnp does not cut")


def _through_channel_shuffle(group) -> str | None:
    for dep, _ in group:
        if getattr(dep.target, "pnp_channel_shuffle", False):
            return _channel_shuffle_reason(dep.target)
        if getattr(dep.target, "pnp_unmapped", None):
            return dep.target.pnp_unmapped
    return None


def _normalises_across_channels(module: nn.Module, name: str) -> str | None:
    """Why a norm layer makes gating differ from removal, or None.

    A LayerNorm, or a GroupNorm with fewer groups than channels, computes its
    statistics across the group's channels: a gated (zeroed) channel still counts
    in them and a removed one does not, so the gated target the pruner trains
    against would not be the model surgery makes.
    """
    if isinstance(module, nn.LayerNorm):
        kind = "LayerNorm"
    elif isinstance(module, nn.GroupNorm) and module.num_groups != module.num_channels:
        kind = f"GroupNorm with {module.num_groups} group(s) of {module.num_channels} channels"
    else:
        return None
    return (f"it passes through {kind} {name!r}, which normalises across channels: "
            "removing some changes the others, so gating cannot stand in for removal")


# layers torch-pruning has a handler for that pnp does not cut: removing channels there does
# not reproduce gating them (measured on an LSTM), or their heads would need coupling pnp
# does not make
_NOT_FOLLOWED = (nn.RNNBase, nn.MultiheadAttention)


# autograd nodes of ops that pick part of a tensor: torch-pruning passes channels through
# them unchanged (or maps a split's pieces), which holds only when they do not act on the
# channels or their sizes are not fixed in the model's code: groups through them are proven
_SLICING = ("SliceBackward", "IndexBackward", "SelectBackward", "NarrowBackward", "IndexSelectBackward",
            "GatherBackward", "AsStridedBackward", "TakeBackward",
            # splits: torch-pruning maps their pieces, but sizes written in the model's code stay as they were
            "SplitBackward", "SplitWithSizesBackward", "UnbindBackward")


def _slices(node) -> bool:
    grad_fn = getattr(node, "grad_fn", None)
    return grad_fn is not None and grad_fn.name().startswith(_SLICING)


def _not_followed(module: nn.Module, name: str) -> str | None:
    if isinstance(module, _NOT_FOLLOWED):
        return f"it reaches {type(module).__name__} {name!r}, a layer pnp does not cut"
    return None


def _out_of_range(graph, module: nn.Module, name: str, side: str, indices: torch.Tensor, size: int) -> str | None:
    """Why a member's channel indices cannot be its own (channels sliced or indexed on the way), or None."""
    handler = graph.get_pruner_of_module(module)
    if handler is None or not len(indices):
        return None
    count = handler.get_in_channels(module) if side == IN else handler.get_out_channels(module)
    if count is not None and int(indices.max()) >= count:
        return (f"{name!r} takes {count} channels where the group has {size}: the channels are sliced or indexed "
                "on the way, which pnp cannot follow")
    return None


def _channel_shuffle_reason(node) -> str:
    grad_fn = node.grad_fn
    return f"its channels pass through a channel shuffle ({grad_fn.name() if grad_fn else 'reshape'}), which torch-pruning cannot follow"


def _channel_shuffle_downstream(node):
    """A channel-shuffle node that ``node``'s output channels reach before any layer consumes them."""
    stack, seen = list(node.outputs), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if getattr(n, "pnp_channel_shuffle", False):
            return n
        if n.type not in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR):
            stack.extend(n.outputs)
    return None


def _all_groups(graph: tp.DependencyGraph, names: dict, excluded: dict[str, str]):
    """Yield ``(root name, torch-pruning group)`` for every Conv/Linear not yet in a group.

    Like ``DependencyGraph.get_all_groups``, but a group torch-pruning cannot
    follow is recorded in ``excluded`` instead of ending the search.
    """
    visited: set = set()
    for module in list(graph.module2node):
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or module in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        name = names.get(module, str(module))
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module))))
        except Exception as exc:  # torch-pruning's index mapping fails on some layouts
            visited.add(module)
            shuffle = _channel_shuffle_downstream(graph.module2node[module])
            if shuffle is not None:  # a split after the shuffle sees indices it cannot place
                excluded[name] = _channel_shuffle_reason(shuffle)
            else:
                excluded[name] = f"torch-pruning could not map its channels ({type(exc).__name__}: {exc})"
            continue
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
        yield name, group


def find_channel_groups(
    model: nn.Module,
    example_inputs,
    ignore: Sequence[str] = (),
    min_size: int = 2,
    prove: bool = False,
) -> ChannelGroups:
    """Find the prunable groups of coupled channels of ``model``.

    ``example_inputs`` is what ``model`` is called with (a tensor, a tuple or a dict).
    ``ignore`` holds ``fnmatch`` patterns of qualified module names whose output
    channels must not change; groups containing them are left out. Groups whose
    channels reach the model's outputs are always left out. Every left-out group is
    listed in ``ChannelGroups.excluded`` with the reason.

    Groups that reach a recurrent or attention layer, or a layer that standardises its
    weight in forward (NF-ResNet's ``ScaledStdConv2d``), are left out (pnp does not cut
    them). A split or slice whose sizes the module running it holds in an attribute
    (MixNet's ``MixedConv2d.splits``, GhostNet's ``out_chs``) is followed: the spec
    carries the attribute's new value (see :mod:`pnp.core.sections`). Channels that
    reach one layer channel from two places (a map and its depthwise copy) are
    tied into one unit. A group whose channels pass through a slice or an index is proven, and
    with ``prove`` every group is: half of each group's channels are cut from a copy
    of ``model`` and the result compared with the model gated the same way; a group
    whose removal does not reproduce its gating, or crashes, is left out with what went
    wrong, so no group offered can give a wrong model later (one extra surgery when all
    pass; the commands prove their groups).
    """
    from pnp.core.cost import CostModel, layer_costs, params_outside_layers

    if isinstance(ignore, str):
        ignore = [ignore]
    names = {m: n for n, m in model.named_modules()}
    ignored = {m for m, n in names.items() if n and any(fnmatch.fnmatchcase(n, p) for p in ignore)}

    graph = build_dependency_graph(model, example_inputs)
    layouts = head_layouts(model)
    sites = _section_sites(graph, names)
    groups: list[ChannelGroup] = []
    excluded: dict[str, str] = {}
    flows: dict[tuple[str, int], list[tuple[str, torch.Tensor]]] = {}
    suspect: set[str] = set()  # groups whose channels pass through a slice or an index: proven below
    with graph.channels_unchanged():  # nothing is pruned while groups are listed
        tp_groups = list(_all_groups(graph, names, excluded))
    for root_name, tp_group in tp_groups:
        if root_name in layouts:
            head_group = _attention_heads(layouts[root_name], tp_group, names, ignored, min_size)
            if isinstance(head_group, str):
                excluded[root_name] = head_group
            else:
                groups.append(head_group)
                suspect.add(root_name)  # reshapes into heads: proven below
            continue
        reason = (_leaves_model(tp_group, graph) or _standardised_weight(tp_group, graph)
                  or _through_channel_shuffle(tp_group))
        members: list[ChannelMember] = []
        block_parts = []
        carried: dict = {}
        for item in tp_group:
            dep, idxs = item.dep, item.idxs
            module = dep.target.module
            if isinstance(module, nn.Parameter) and reason is None:
                # a per-channel scale outside any layer: surgery cuts it, but the saved channel spec lists layers only
                param = graph._param_to_name.get(module, "a parameter")
                reason = (f"it reaches {param!r}, a parameter used outside any layer (a per-channel scale); pnp's "
                          "saved channel spec cannot describe it, so the pruned model would not reload")
            if not isinstance(module, nn.Module) or module not in names:
                if _slices(dep.target) or getattr(dep.target, "pnp_token_reshape", False):
                    suspect.add(root_name)
                call = graph.pnp_layer_calls.get(dep.target.grad_fn)
                if call is not None:  # an activation or pooling layer the channels pass through
                    carried.setdefault(call, torch.as_tensor(item.root_idxs, dtype=torch.long))
                continue  # graph-only ops: concat, split, add, ...
            side = IN if _is_consumer(graph, module, dep.handler) else OUT
            if side == OUT and module in ignored and reason is None:
                reason = f"it contains the ignored layer {names[module]!r}"
            reason = reason or _normalises_across_channels(module, names[module]) or _not_followed(module, names[module])
            indices = torch.as_tensor(idxs, dtype=torch.long)
            reason = reason or _out_of_range(graph, module, names[module], side, indices, len(tp_group[0].idxs))
            root_indices = torch.as_tensor(item.root_idxs, dtype=torch.long)
            groups_attr = getattr(module, "groups", 1) if isinstance(module, nn.modules.conv._ConvNd) else 1
            members.append(ChannelMember(names[module], side, indices, root_indices, groups_attr))
            blocks = _block_ids(module, side, indices)
            if blocks is not None:
                block_parts.append((root_indices, blocks))
        sections = _sections_of(tp_group, graph, names, sites)
        if isinstance(sections, str):
            reason = reason or sections
            sections = []
        size = len(tp_group[0].idxs)
        unit = "channel"
        units = _tied_units(size, getattr(tp_group, "pnp_ties", ())) if reason is None else None
        if units is not None:
            if block_parts:
                reason = "its channels are tied in pairs and split into grouped-convolution blocks at once"
            else:
                members, size, unit = _as_units(members, units), int(units.max()) + 1, "tied channels"
                sections = [SectionMember(s.attribute, s.positions, units[s.root_indices]) for s in sections]
                suspect.add(root_name)  # proven below, like every group pnp renumbers
        if reason is None and not any(m.side == IN for m in members):
            reason = "no layer consumes its channels"
        if reason is None and size < min_size:
            reason = f"it has {size} channel(s), fewer than min_size={min_size}"
        blocks = _combine_blocks(size, block_parts)
        if isinstance(blocks, str):
            reason = reason or blocks
            blocks = None
        if reason is not None:
            excluded[root_name] = reason
            continue
        groups.append(ChannelGroup(root_name, size, tuple(members), blocks, unit=unit, sections=tuple(sections)))
        for call, root_indices in carried.items():
            flows.setdefault(call, []).append((root_name, root_indices if units is None else units[root_indices]))

    order = {n: i for i, n in enumerate(names.values())}
    groups.sort(key=lambda g: order.get(g.name, len(order)))  # network order, for reports and plots
    to_prove = groups if prove else [g for g in groups if g.name in suspect]
    if to_prove:
        unfollowed = _groups_surgery_cannot_follow(model, to_prove, example_inputs)
        excluded.update(unfollowed)
        groups = [g for g in groups if g.name not in unfollowed]
        flows = {call: [(n, r) for n, r in carried if n not in unfollowed] for call, carried in flows.items()}
    result = ChannelGroups(groups, excluded, example_inputs)
    result.layer_costs = layer_costs(model, example_inputs, result, flows)
    result.other_params = params_outside_layers(model)
    marginal = CostModel(result).marginal_costs()
    for g in result:
        g.flops_per_channel, g.params_per_channel = marginal[g.name]
    return result


def _section_sites(graph, names: dict) -> dict:
    """``{grad_fn: size attributes, or why they cannot be told}`` for every split or slice a module ran."""
    sites, calls = {}, {}
    for grad_fn, module in graph.pnp_section_owners.items():
        name = names.get(module, type(module).__name__)
        call = calls[name] = calls.get(name, -1) + 1
        sites[grad_fn] = size_attributes(grad_fn, module, name, call)
    return sites


def _sections_of(tp_group, graph, names: dict, sites: dict) -> list[SectionMember] | str:
    """The group's channels at each split or slice whose sizes a module attribute holds, or why pnp cannot follow them.

    A split's or slice's positions are those of the tensor it cuts: the group's
    channels at the op that made that tensor (a layer's output side, a concat, ...).
    """
    picks = list(dict.fromkeys(item.dep.target for item in tp_group if sites.get(item.dep.target.grad_fn)))
    if not picks:
        return []
    at: dict = {}
    for item in tp_group:
        module = item.dep.target.module
        if isinstance(module, nn.Module) and module in names and _is_consumer(graph, module, item.dep.handler):
            continue  # a layer's input side, numbered unlike the tensor it makes
        at.setdefault(item.dep.target, item)
    found = []
    for node in picks:
        attributes = sites[node.grad_fn]
        if isinstance(attributes, str):
            return attributes
        source = node.inputs[0] if len(node.inputs) == 1 else None
        if source is None or source not in at or source.type in _RENUMBERING:
            return (f"its channels reach a split or slice in {attributes[0].module!r} through an op whose channel "
                    "positions pnp does not follow (another split or slice, a reshape)")
        positions = torch.as_tensor(at[source].idxs, dtype=torch.long)
        roots = torch.as_tensor(at[source].root_idxs, dtype=torch.long)
        found += [SectionMember(attribute, positions, roots) for attribute in attributes]
    return found


# ops whose group indices are not the positions of the tensor they make
_RENUMBERING = (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.RESHAPE)


def _tied_units(size: int, ties) -> torch.Tensor | None:
    """The unit of each of the group's channels when some are tied together, else None.

    ``ties`` are pairs of the group's channels that reach one channel of some layer
    (see :class:`pnp.core.handlers._BoundedGroup`): GhostNet's ``cat([x, depthwise(x)])``
    carries channel ``j`` of ``x`` at two positions, and a depthwise convolution cannot
    drop an output without its input. Dropping one of the pair would cut that layer's
    channel for both, so the two stand or fall together: they become one unit of the group.
    """
    if not ties:
        return None
    parent = list(range(size))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in ties:
        parent[find(a)] = find(b)
    _, units = torch.unique(torch.tensor([find(i) for i in range(size)]), return_inverse=True)
    return units


def _as_units(members: list[ChannelMember], units: torch.Tensor) -> list[ChannelMember]:
    """``members`` with each group channel replaced by its unit, each layer channel listed once."""
    out = []
    for m in members:
        pairs = sorted(set(zip(m.indices.tolist(), units[m.root_indices].tolist())))
        indices, roots = (torch.tensor(v, dtype=torch.long) for v in zip(*pairs))
        out.append(ChannelMember(m.module, m.side, indices, roots, m.groups))
    return out


def _attention_heads(layout: HeadLayout, tp_group, names: dict, ignored: set, min_size: int) -> ChannelGroup | str:
    """The whole-head group of one attention layer, or why its heads cannot be pruned."""
    qkv_module = next(item.dep.target.module for item in tp_group if names.get(item.dep.target.module) == layout.qkv)
    if qkv_module in ignored:
        return f"it contains the ignored layer {layout.qkv!r}"
    others = sorted(
        {names[item.dep.target.module] for item in tp_group
         if isinstance(item.dep.target.module, nn.Module) and item.dep.target.module in names}
        - {layout.qkv, layout.proj}
    )
    if others:
        return (f"the heads of attention layer {layout.layer!r} also reach {others[:3]}, which pnp does not cut "
                "head by head (a norm within heads, a gate)")
    if layout.num_heads < min_size:
        return f"attention layer {layout.layer!r} has {layout.num_heads} head(s), fewer than min_size={min_size}"
    qkv_heads, proj_heads = layout.qkv_heads(), layout.proj_heads()
    members = (
        ChannelMember(layout.qkv, OUT, torch.arange(len(qkv_heads)), qkv_heads),
        ChannelMember(layout.proj, IN, torch.arange(len(proj_heads)), proj_heads),
    )
    return ChannelGroup(layout.qkv, layout.num_heads, members, unit="head")


def _groups_surgery_cannot_follow(model: nn.Module, groups: list[ChannelGroup], example_inputs) -> dict[str, str]:
    """The groups whose surgery does not reproduce their gating, each with what went wrong.

    One surgery of every group at once when all are followed; otherwise halves are
    tried until each failing group is found on its own.
    """
    from pnp.core.surgery import apply_surgery

    def failure(subset: list[ChannelGroup]) -> str | None:
        chosen = ChannelGroups(subset, {}, example_inputs)
        keep = keep_from_ratio(chosen, 0.5, generator=torch.Generator().manual_seed(0))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # judged against the output's scale only: a small output hides a wrong cut from an absolute tolerance
                apply_surgery(model, chosen, keep, example_inputs, verify=True, atol=1e-7, rtol=1e-4)
        except Exception as exc:  # any failure means the group cannot be cut as traced
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return f"removing its channels does not reproduce gating them ({type(exc).__name__}: {first}); " \
                   "pnp cannot follow its channels through the model (a slice, an index, a recurrent layer, ...)"
        return None

    def search(subset: list[ChannelGroup], why: str | None) -> dict[str, str]:
        if why is None:
            return {}
        if len(subset) == 1:
            return {subset[0].name: why}
        half = len(subset) // 2
        found = {}
        for part in (subset[:half], subset[half:]):
            found.update(search(part, failure(part)))
        return found or {g.name: why for g in subset}  # failing only together: none of them is offered

    return search(groups, failure(groups))


def legalize_keep(
    groups: ChannelGroups,
    keep: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Adjust keep decisions to the nearest ones the structure allows.

    Groups feeding grouped convolutions must keep the same number of channels in
    every block; the count is the median of the blocks' counts (the fewest flips),
    and channels are added or dropped by ``scores`` (keep probabilities) when given.
    In other groups every layer keeps at least one of its channels: a layer that
    holds only part of a group (the convolution of one section of a split) gets its
    best-scored channel back when the decisions drop all of its own.
    Returns the legal decisions and, for each adjusted group, what changed.
    """
    checked = groups.check_keep(keep)
    adjusted: dict[str, str] = {}
    out = {}
    for g in groups:
        k = checked[g.name]
        score = k.float() if scores is None or g.name not in scores else scores[g.name].detach().float().cpu()
        if g.blocks is None:
            out[g.name] = legal = k.clone()
            emptied = []
            for m in g.members:
                if len(m.root_indices) and not bool(legal[m.root_indices].any()):
                    legal[m.root_indices[torch.argmax(score[m.root_indices])]] = True
                    emptied.append(m.module)
            if emptied:
                adjusted[g.name] = (f"{len(emptied)} channel(s) kept so that layers {emptied[:3]} keep "
                                    "at least one channel each")
            continue
        # kept channels rank first, then by score, so flips are as few as possible
        rank = k.float() * 2.0 + score.clamp(0, 1)
        counts = torch.bincount(g.blocks[k], minlength=g.num_blocks)
        target = max(1, int(counts.float().median().round().item()))
        legal = torch.zeros_like(k)
        for b in range(g.num_blocks):
            idx = (g.blocks == b).nonzero().flatten()
            top = idx[torch.argsort(rank[idx], descending=True, stable=True)[:target]]
            legal[top] = True
        flips = int((legal != k).sum())
        if flips:
            adjusted[g.name] = (
                f"{flips} channel(s) flipped so that each of its {g.num_blocks} blocks "
                f"(grouped convolution) keeps {target}"
            )
        out[g.name] = legal
    return out, adjusted


def check_keep_ratio(ratio: float, field_name: str = "keep ratio") -> float:
    """Raise unless ``ratio`` is in (0, 1]."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"{field_name} {ratio!r} is not a number; use a value in (0, 1]") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"{field_name} {ratio} is outside (0, 1]; use a value such as 0.5")
    return value


def keep_from_ratio(groups: ChannelGroups, ratio: float, scores: Mapping[str, torch.Tensor] | None = None, generator=None):
    """Keep ``ratio`` of every group's channels: the highest-scored, or random ones."""
    ratio = check_keep_ratio(ratio)
    keep = {}
    for g in groups:
        n = max(1, int(round(g.size * ratio)))
        if scores is not None:
            order = torch.argsort(scores[g.name].detach().float().cpu(), descending=True, stable=True)
        else:
            order = torch.randperm(g.size, generator=generator)
        k = torch.zeros(g.size, dtype=torch.bool)
        k[order[:n]] = True
        keep[g.name] = k
    return keep
