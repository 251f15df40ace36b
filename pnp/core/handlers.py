"""Per-layer channel handlers.

torch-pruning removes channels layer by layer through a table of pruning
functions, one per layer type. pnp replaces its convolution entry with one that
also handles grouped convolutions whose blocks keep *different* channels (each
block keeps the same number), which torch-pruning's own handler does not.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.dependency import graph as tp_graph
from torch_pruning.pruner import function as tp_function

from pnp.core.sections import record_section_owners


def _block_keep(total: int, groups: int, removed: Sequence[int], what: str, layer: nn.Module) -> list[torch.Tensor]:
    """Kept local indices of each block; every block must keep as many as the others."""
    width = total // groups
    removed_set = set(int(i) for i in removed)
    kept = [
        torch.tensor([j for j in range(width) if b * width + j not in removed_set], dtype=torch.long)
        for b in range(groups)
    ]
    counts = {len(k) for k in kept}
    if len(counts) != 1:
        raise ValueError(
            f"cannot remove {what} channels {sorted(removed_set)[:8]}... of grouped convolution {layer}: "
            f"its {groups} blocks would keep {sorted(counts)} channels; every block must keep the same "
            "number (use pnp.legalize_keep)"
        )
    return kept


class ConvChannelHandler(tp_function.ConvPruner):
    """torch-pruning's convolution handler, extended to grouped convolutions."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if layer.groups > 1 and not _is_depthwise(layer):
            _block_keep(layer.out_channels, layer.groups, idxs, "output", layer)
        return super().prune_out_channels(layer, idxs)

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if layer.groups == 1 or _is_depthwise(layer):
            return super().prune_in_channels(layer, idxs)
        kept = _block_keep(layer.in_channels, layer.groups, idxs, "input", layer)
        dim = 0 if layer.transposed else 1
        out_dim = 1 - dim
        weight = layer.weight.detach()
        rows_per_block = weight.shape[out_dim] // layer.groups
        pieces = []
        for b, local in enumerate(kept):
            block = weight.narrow(out_dim, b * rows_per_block, rows_per_block)
            pieces.append(block.index_select(dim, local.to(weight.device)))
        layer.weight = nn.Parameter(torch.cat(pieces, dim=out_dim).contiguous())
        layer.in_channels = layer.in_channels - len(idxs)
        return layer


def _is_depthwise(layer: nn.Module) -> bool:
    return layer.groups == layer.out_channels and layer.groups == layer.in_channels


_CONV_HANDLER = ConvChannelHandler()


class GroupTooLargeError(RuntimeError):
    """torch-pruning's search for one group kept growing (index maps that feed back into each other)."""


class _BoundedGroup(tp.dependency.Group):
    """torch-pruning's group, which stops the search once it has added ``limit`` dependencies.

    A chain of partial residuals (ReXNet's ``cat([y[:, :c] + x, y[:, c:]])``) makes
    torch-pruning revisit each layer with ever longer index lists, so finding one
    group takes time exponential in the depth.

    It also keeps what torch-pruning's merge drops: when one channel of a layer is
    reached from two channels of the root (GhostNet's ``cat([x, depthwise(x)])``:
    channel ``j`` of ``x`` feeds positions ``j`` and ``c + j``), the merge keeps the
    first root channel only. Removing either root channel removes that layer channel,
    so the two are tied; ``pnp_ties`` lists such pairs of root channels. Both apply
    to pnp's searches only (``limit`` set): other users of torch-pruning get its own.
    """

    limit: int | None = None

    def add_and_merge(self, dep, idxs):
        if self.limit is not None:
            known = next((i for d, i in self.items if d.target == dep.target and d.handler == dep.handler), [])
            roots, ties = {}, []
            for index in [*known, *idxs]:
                root = roots.setdefault(index.idx, index.root_idx)
                if root != index.root_idx:
                    ties.append((root, index.root_idx))
            if ties:
                self.pnp_ties = getattr(self, "pnp_ties", []) + ties
        super().add_and_merge(dep, idxs)

    def add_dep(self, dep, idxs):
        if self.limit is not None:
            self._pnp_added = getattr(self, "_pnp_added", 0) + 1
            if self._pnp_added > self.limit:
                raise GroupTooLargeError(
                    f"the group grew past {self.limit} dependencies: its channels are mapped through partial "
                    "residuals or slices that feed back into each other"
                )
        super().add_dep(dep, idxs)


tp_graph.Group = _BoundedGroup


class DependencyGraph(tp.DependencyGraph):
    """torch-pruning's graph, told apart from reshapes it cannot follow.

    torch-pruning maps channel indices through flattening (a reshape feeding a
    Linear layer) but not through channel shuffles (view, transpose, view). Such
    reshapes are marked ``pnp_channel_shuffle`` and treated as element-wise so the
    graph still builds; groups that cross them are left out by the caller. A reshape
    that keeps the channels in place (see :func:`_keeps_channels`) is marked
    ``pnp_token_reshape`` instead: groups through it are proven by surgery.

    torch-pruning rebuilds every concat/split/reshape index map before each
    ``get_pruning_group``, because pruning in between changes channel counts.
    Inside :meth:`channels_unchanged` nothing is pruned, so the maps are built once.

    A Conv/Linear layer that normalises its weight in forward (weight
    standardisation: timm's ``ScaledStdConv2d`` in NF-ResNets) is marked
    ``pnp_standardised_weight`` with the normalising ops.

    Each split or slice is attributed to the module running it
    (``pnp_section_owners``, see :mod:`pnp.core.sections`).

    A Conv/Linear layer that applies child modules in its own forward (a norm, an
    activation: detectron2's ``Conv2d``) would be placed at the grad_fn of its
    final output and hide its norm; such layers are split back into their own op
    and their children (see :func:`_record_fused_calls`).
    """

    _index_maps_current = False

    def get_pruning_group(self, module, pruning_fn, idxs):
        # measured at most 0.25x the graph's nodes on DenseNet-121, DLA-34 and HRNet: 20x headroom
        _BoundedGroup.limit = max(200, 5 * len(self.module2node))
        try:
            return super().get_pruning_group(module, pruning_fn, idxs)
        finally:
            _BoundedGroup.limit = None

    @contextlib.contextmanager
    def channels_unchanged(self):
        """Reuse the index maps across ``get_pruning_group`` calls; prune nothing inside."""
        _tp_update_index_mapping(self)
        self._index_maps_current = True
        try:
            yield self
        finally:
            self._index_maps_current = False

    def _trace(self, model, example_inputs, forward_fn, output_transform):
        # grad_fn -> (name, call index) of parameter-free layers (activations, pooling),
        # which torch-pruning sees only as anonymous element-wise nodes
        self.pnp_layer_calls: dict = {}
        self._pnp_fused_calls: list = []
        self.pnp_section_owners: dict = {}  # grad_fn of a split or slice -> the module running it
        handles = _record_parameter_free_calls(model, self.pnp_layer_calls)
        handles += _record_fused_calls(model, self._pnp_fused_calls)
        try:
            with record_section_owners(model, self.pnp_section_owners):
                module2node = super()._trace(model, example_inputs, forward_fn, output_transform)
        finally:
            for h in handles:
                h.remove()
            self._pnp_fused_calls = []
        for node in module2node.values():
            if node.type != tp.ops.OPTYPE.RESHAPE or _feeds_linear(node):
                continue
            node.type = tp.ops.OPTYPE.ELEMENTWISE
            if _keeps_channels(node.grad_fn):
                node.pnp_token_reshape = True  # groups through it are proven (see find_channel_groups)
            else:
                node.pnp_channel_shuffle = True
        layer_ops = {node.grad_fn for node in module2node.values() if node.module in self._module2name}
        for node in module2node.values():
            if isinstance(node.module, (nn.modules.conv._ConvNd, nn.Linear)):
                ops = _weight_normalising_ops(node.grad_fn, node.module, layer_ops - {node.grad_fn})
                if ops:
                    node.pnp_standardised_weight = ops  # groups through it are left out (see find_channel_groups)
        return module2node

    def _trace_computational_graph(self, module2node, output, gradfn2module, reused, visited):
        self._separate_fused_calls(gradfn2module)
        return super()._trace_computational_graph(module2node, output, gradfn2module, reused, visited=visited)

    def _separate_fused_calls(self, gradfn2module: dict) -> None:
        """Map each fused layer to its own op, and its final output back to the child that made it."""
        traced = tuple(tp.ops.type2class(t) for t in self.REGISTERED_PRUNERS) + tuple(self.CUSTOMIZED_PRUNERS)
        ignored = self.IGNORED_LAYERS_IN_TRACING
        for layer, own, output, inner in self._pnp_fused_calls:
            if layer in ignored:
                continue
            gradfn2module[own] = layer
            if output is not own and gradfn2module.get(output) is layer:
                child = inner.get(output)
                if child is not None and isinstance(child, traced) and child not in ignored:
                    gradfn2module[output] = child  # torch-pruning's hook on the layer overwrote the norm's entry
                else:
                    del gradfn2module[output]  # a functional activation: an element-wise node, as elsewhere
        self._pnp_fused_calls = []


def _record_fused_calls(model: nn.Module, record: list) -> list:
    """Hooks noting each call of a Conv/Linear layer that calls its child modules in its own forward.

    For every such call whose first child received the layer's own op (the op reads
    the layer's weight), ``record`` gets ``(layer, grad_fn of that op, grad_fn of the
    layer's output, {grad_fn of a child's output: child})``.
    """
    frames: list[list] = []  # [layer, [input grad_fn of its first child], {output grad_fn: child}]
    handles = []
    for layer in model.modules():
        children = list(layer.children())
        if not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) or not children:
            continue

        def enter(mod, args):
            frames.append([mod, [], {}])

        def leave(mod, args, out):
            if not frames or frames[-1][0] is not mod:
                return
            _, first_input, inner = frames.pop()
            own = first_input[0] if first_input else None
            if isinstance(out, torch.Tensor) and own is not None and _reads_weight(own, mod):
                record.append((mod, own, out.grad_fn, inner))

        def child_enter(mod, args, parent=layer):
            if frames and frames[-1][0] is parent and not frames[-1][1]:
                frames[-1][1].append(args[0].grad_fn if args and isinstance(args[0], torch.Tensor) else None)

        def child_leave(mod, args, out, parent=layer):
            if frames and frames[-1][0] is parent and isinstance(out, torch.Tensor):
                frames[-1][2][out.grad_fn] = mod

        handles.append(layer.register_forward_pre_hook(enter))
        handles.append(layer.register_forward_hook(leave))
        for child in children:
            handles.append(child.register_forward_pre_hook(child_enter))
            handles.append(child.register_forward_hook(child_leave))
    return handles


# autograd nodes of ops that normalise a tensor by statistics over it
_NORMALISING = ("NativeBatchNormBackward", "CudnnBatchNormBackward", "VarBackward", "StdBackward", "VarMeanBackward",
                "StdMeanBackward", "MeanBackward", "NormBackward", "LinalgVectorNormBackward")


def _weight_normalising_ops(grad_fn, layer: nn.Module, other_layers: set, depth: int = 8) -> list[str]:
    """The normalising ops between ``layer.weight`` and the layer's output op ``grad_fn``, if any.

    Weight standardisation computes the weight a convolution applies from its
    parameter in forward (``batch_norm(weight.reshape(1, out, -1))``, or
    ``(w - w.mean()) / w.std()`` per output channel). The search follows autograd
    back from ``grad_fn``, at most ``depth`` ops, and not through other layers' ops (a
    layer run twice would otherwise find its own weight through the layers between).
    """
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or grad_fn is None:
        return []
    stack, seen = [(grad_fn, ())], set()
    while stack:
        fn, path = stack.pop()
        path = path + (fn.name(),)
        for nxt, _ in getattr(fn, "next_functions", ()):
            if nxt is None or nxt in seen or nxt in other_layers:
                continue
            seen.add(nxt)
            if getattr(nxt, "variable", None) is weight:
                return [op for op in path if op.startswith(_NORMALISING)]
            if len(path) < depth and not hasattr(nxt, "variable"):
                stack.append((nxt, path))
    return []


def _reads_weight(grad_fn, layer: nn.Module) -> bool:
    """True when ``grad_fn`` is an op on ``layer.weight``, read directly or through a transpose or view."""
    weight = getattr(layer, "weight", None)
    stack = [(grad_fn, 0)]
    while stack:
        fn, depth = stack.pop()
        for nxt, _ in getattr(fn, "next_functions", ()):
            if nxt is None:
                continue
            if getattr(nxt, "variable", None) is weight:
                return True
            if depth < 2 and not hasattr(nxt, "variable"):
                stack.append((nxt, depth + 1))
    return False


def _record_parameter_free_calls(model: nn.Module, record: dict) -> list:
    calls: dict[str, int] = {}
    inputs: list = []
    handles = []
    for name, module in model.named_modules():
        if not name or any(True for _ in module.children()) or any(True for _ in module.parameters(recurse=False)):
            continue

        def pre(mod, args):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            inputs.append(first.grad_fn if first is not None else None)

        def post(mod, args, out, name=name):
            before = inputs.pop() if inputs else None
            call = calls.get(name, 0)
            calls[name] = call + 1
            # identity-like layers hand on their input; an in-place layer gets a new grad_fn
            if isinstance(out, torch.Tensor) and out.grad_fn is not None and out.grad_fn is not before:
                record.setdefault(out.grad_fn, (name, call))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles


def _update_index_mapping_unless_current(graph) -> None:
    if not getattr(graph, "_index_maps_current", False):
        _tp_update_index_mapping(graph)


def _patch_index_mapping(name: str, replacement):
    """Install ``replacement`` as torch-pruning's ``index_mapping.<name>``; returns torch-pruning's own function.

    torch-pruning's graph calls these functions by module attribute. Re-importing pnp
    wraps the original again, not the previous wrapper.
    """
    original = getattr(tp_graph.index_mapping, name)
    original = getattr(original, "pnp_wrapped", original)
    replacement.pnp_wrapped = original
    setattr(tp_graph.index_mapping, name, replacement)
    return original


# changes nothing for graphs outside channels_unchanged()
_tp_update_index_mapping = _patch_index_mapping("update_index_mapping", _update_index_mapping_unless_current)


_UNMAPPED_CONCAT = ("its channels pass through a concatenation whose input widths torch-pruning cannot infer "
                    "(a slice of a layer's output among its inputs), so their positions are unknown")


def _update_concat_index_mapping_or_mark(graph, node) -> None:
    """torch-pruning's concat index map; a concat whose input widths it cannot infer is marked ``pnp_unmapped``.

    Its channel offsets are then unknown and the group through it would be numbered
    wrongly; torch-pruning either raises (comparing a width with None) or leaves the
    map out silently. ``pnp_unmapped`` holds the reason groups through it are left out.

    torch-pruning also leaves out the map of a concat whose consumers take fewer
    channels than it makes, taking it for a concat along another dim. A concat of
    feature maps ``[N, C, H, W]`` along dim 1 whose input widths add up to its output's
    is along channels, whatever follows (GhostNet's ``cat([x1, x2], 1)[:, :out_chs]``):
    in pnp's graphs it is mapped by those widths.
    """
    module = getattr(node, "module", None)
    try:
        _tp_update_concat_index_mapping(graph, node)
    except TypeError:
        node.pnp_unmapped = _UNMAPPED_CONCAT
        return
    sizes = getattr(module, "concat_sizes", None)
    if node.type != tp.ops.OPTYPE.CONCAT or sizes is None:
        return
    if any(c is None for c in sizes):
        node.pnp_unmapped = _UNMAPPED_CONCAT
    elif module.offsets is None and isinstance(graph, DependencyGraph) and _concat_of_feature_maps(node.grad_fn, sizes):
        _map_concat(node, sizes)


def _concat_of_feature_maps(grad_fn, sizes) -> bool:
    """True when ``grad_fn`` concatenates maps ``[N, C, H, W]`` along C and ``sizes`` are its inputs' widths."""
    metadata = getattr(grad_fn, "_input_metadata", None)
    if getattr(grad_fn, "_saved_dim", None) != 1 or not metadata:
        return False
    shape = metadata[0].shape
    return len(shape) == 4 and int(shape[1]) == sum(sizes)


def _map_concat(node, sizes) -> None:
    """Map each input's channels to its place in the concat, ``sizes`` being the inputs' widths in order."""
    if len(set(node.inputs)) != len(node.inputs):
        node.pnp_unmapped = _UNMAPPED_CONCAT  # one tensor at two places: one map cannot hold both
        return
    offsets = [0]
    for width in sizes:
        offsets.append(offsets[-1] + width)
    node.module.offsets = offsets
    for i, source in enumerate(node.inputs):
        _map_edges(node, source, 1, tp_graph.index_mapping._ConcatIndexMapping, offsets[i:i + 2], reverse=True)


def _map_edges(node, other, slot: int, mapping, offset, reverse: bool) -> None:
    """Set the index map at ``slot`` of both edges between ``node`` and ``other`` (``reverse`` from ``node``'s side)."""
    for dep in node.dependencies:
        if dep.target is other:
            dep.index_mapping[slot] = mapping(offset=offset, reverse=reverse)
    for dep in other.dependencies:
        if dep.target is node:
            dep.index_mapping[slot] = mapping(offset=offset, reverse=not reverse)


_tp_update_concat_index_mapping = _patch_index_mapping("update_concat_index_mapping", _update_concat_index_mapping_or_mark)


def _update_split_index_mapping_by_section(graph, node) -> None:
    """torch-pruning's split index map, with each consumer mapped to the section it reads.

    torch-pruning maps the i-th consumer it met while tracing to the i-th section, but
    tracing meets consumers in no set order (MixNet's per-section convolutions came
    reversed) and a section nobody reads shifts the rest. The section a consumer reads
    is the output number of its edge to the split. A consumer reading several sections
    cannot be mapped: the split is marked ``pnp_unmapped`` with the reason. pnp's
    graphs only: other users of torch-pruning get its own map.
    """
    _tp_update_split_index_mapping(graph, node)
    offsets = getattr(node.module, "offsets", None)
    mapped = [d for d in node.dependencies if isinstance(d.index_mapping[0], tp_graph.index_mapping._SplitIndexMapping)]
    if not isinstance(graph, DependencyGraph) or node.type != tp.ops.OPTYPE.SPLIT or offsets is None or not mapped:
        return  # torch-pruning does not map this split (not along channels)
    for out in node.outputs:
        sections = {nr for fn, nr in getattr(out.grad_fn, "next_functions", ()) if fn is node.grad_fn}
        if len(sections) != 1:
            node.pnp_unmapped = ("its channels pass through a split one consumer of which reads several "
                                 "sections, so their positions are unknown")
            continue
        section = offsets[sections.pop():][:2]
        _map_edges(node, out, 0, tp_graph.index_mapping._SplitIndexMapping, section, reverse=False)


_tp_update_split_index_mapping = _patch_index_mapping("update_split_index_mapping", _update_split_index_mapping_by_section)


def _keeps_channels(grad_fn) -> bool:
    """True for a reshape that leaves the channels where they are, as far as its shapes tell.

    A Linear layer's channels are its input's last dim: on tokens ``[batch, tokens,
    channels]`` PyTorch flattens the leading dims into one around the matrix product
    and restores them after. A feature map flattened into tokens keeps its first two
    dims. Shapes alone cannot tell channels from positions, so groups through such
    a reshape are proven by surgery before they are offered.
    """
    before = getattr(grad_fn, "_saved_self_sym_sizes", None)
    metadata = getattr(grad_fn, "_input_metadata", None)
    if before is None or not metadata:
        return False
    try:
        before, after = [int(d) for d in before], [int(d) for d in metadata[0].shape]
    except (TypeError, ValueError):  # symbolic sizes
        return False
    if [d for d in before if d != 1] == [d for d in after if d != 1] and sum(d != 1 for d in before) == 1:
        return True  # a per-channel vector viewed for broadcasting ([c] -> [1, c, 1, 1])
    if len(before) < 2 or len(after) < 2:
        return False
    if before[-1] == after[-1] > 1 and min(len(before), len(after)) == 2:
        return True  # leading dims flattened to one, or one split back: not a channel shuffle's [b, g, c/g, h, w]
    # a feature map's positions merged ([batch, channels, h, w] -> [batch, channels, h * w]), or tokens
    # laid back out as one ([batch, channels, h * w] -> [batch, channels, h, w])
    return before[:2] == after[:2] and (len(after) < len(before) or (len(before), len(after)) == (3, 4))


def _feeds_linear(node, depth: int = 0) -> bool:
    if depth > 8 or not node.outputs:
        return False
    for out in node.outputs:
        if out.type == tp.ops.OPTYPE.LINEAR:
            continue
        if out.type == tp.ops.OPTYPE.RESHAPE and _feeds_linear(out, depth + 1):
            continue
        return False
    return True


def make_dependency_graph(pnp_conv_handler: bool = True) -> tp.DependencyGraph:
    """A torch-pruning dependency graph whose convolution handler is pnp's.

    ``pnp_conv_handler=False`` keeps torch-pruning's own, which its importance
    classes (``tp.importance``) recognise: for scoring channels, not for cutting them.
    """
    graph = DependencyGraph()
    if pnp_conv_handler:
        graph.REGISTERED_PRUNERS[tp.ops.OPTYPE.CONV] = _CONV_HANDLER
    graph._in_channel_pruning_fn = {p.prune_in_channels for p in graph.REGISTERED_PRUNERS.values() if p is not None}
    graph._out_channel_pruning_fn = {p.prune_out_channels for p in graph.REGISTERED_PRUNERS.values() if p is not None}
    return graph


def handler_for(module: nn.Module):
    """The channel handler of one layer, or None for layers without channels."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1 and _is_depthwise(module):
            return tp_function.PrunerBox[tp.ops.OPTYPE.DEPTHWISE_CONV]
        return _CONV_HANDLER
    return tp_function.PrunerBox.get(tp.ops.module2type(module))


def shrink_module(module: nn.Module, kept_out: Sequence[int] | None, kept_in: Sequence[int] | None) -> None:
    """Remove every channel of ``module`` not in ``kept_out`` / ``kept_in``, in place."""
    handler = handler_for(module)
    if handler is None:
        raise ValueError(f"no channel handler for layer type {type(module).__name__}")
    if kept_out is not None:
        total = handler.get_out_channels(module)
        removed = sorted(set(range(total)) - set(int(i) for i in kept_out))
        if removed:
            handler.prune_out_channels(module, removed)
    coupled = handler.prune_in_channels == handler.prune_out_channels
    if coupled and kept_in is not None and kept_out is not None and list(map(int, kept_in)) != list(map(int, kept_out)):
        raise ValueError(
            f"{type(module).__name__} ties its input channels to its output channels, "
            "but kept_in differs from kept_out; the channel spec is inconsistent"
        )
    if kept_in is not None and not coupled:
        total = handler.get_in_channels(module)
        removed = sorted(set(range(total)) - set(int(i) for i in kept_in))
        if removed:
            handler.prune_in_channels(module, removed)
