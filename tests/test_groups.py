"""Channel groups of small hand-made networks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pnp.core.artifacts import ArtifactError, load_pruned, save_pruned
from pnp.core.builders import register_builder
from pnp.core.groups import IN, OUT, UntraceableModelError, find_channel_groups, keep_from_ratio, legalize_keep
from pnp.core.surgery import apply_surgery


def sides(group) -> dict[str, set[str]]:
    """``{module name: {"out", "in"}}``: which sides of which layers a group changes."""
    out: dict[str, set[str]] = {}
    for m in group.members:
        out.setdefault(m.module, set()).add(m.side)
    return out


def group_of(groups, module: str, side: str = OUT):
    found = [g for g in groups if any(m.module == module and m.side == side for m in g.members)]
    assert len(found) == 1, f"{module!r} ({side}) is in {len(found)} groups: {groups.names}, excluded {groups.excluded}"
    return found[0]


def random_keep(groups, seed: int = 0, ratio: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in groups:
        k = torch.rand(g.size, generator=gen) < ratio
        k[torch.randint(g.size, (1,), generator=gen)] = True  # never drop a whole layer
        keep[g.name] = k
    return keep


class TwoBranchAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(3, 8, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.conv_c = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x)))
        return self.fc(self.conv_c(y).mean((2, 3)))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.conv_c = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.conv_a(x), self.conv_b(x)], dim=1)))
        return self.fc(self.conv_c(y).mean((2, 3)))


class DepthwiseSeparable(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.expand(x)))
        x = torch.relu(self.bn2(self.depthwise(x)))
        return self.fc(self.project(x).mean((2, 3)))


class GroupedConv(nn.Module):
    """A 12-channel producer read by a convolution with 3 groups (blocks of 4 channels)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.grouped(x)))
        return self.fc(self.conv3(x).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = Block(8)
        self.block2 = Block(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.block2(torch.relu(self.block1(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class FullyConvolutional(nn.Module):
    """Segmentation-style: the last convolution's channels are the model's output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.classifier(torch.relu(self.conv1(x)))


class Explodes(nn.Module):
    def forward(self, x):
        raise RuntimeError("this layer cannot run")


class BrokenInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.body = nn.Sequential(nn.ReLU(), Explodes())

    def forward(self, x):
        return self.body(self.conv(x))


X = torch.randn(2, 3, 8, 8)


def build(cls, randomize_norms):
    torch.manual_seed(0)
    return randomize_norms(cls().eval())


def test_residual_add_couples_both_branches_into_one_group(randomize_norms):
    model = build(TwoBranchAdd, randomize_norms)
    groups = find_channel_groups(model, X)
    g = group_of(groups, "conv_a")
    assert g is group_of(groups, "conv_b")
    assert g.size == 8
    assert sides(g) == {"conv_a": {OUT}, "bn_a": {OUT}, "conv_b": {OUT}, "bn_b": {OUT}, "conv_c": {IN}}
    pruned = apply_surgery(model, groups, random_keep(groups), X, verify=True)
    assert pruned.conv_a.out_channels == pruned.conv_b.out_channels == pruned.conv_c.in_channels < 8


def test_concatenated_producers_form_separate_groups_mapped_into_the_consumer(randomize_norms):
    model = build(Concat, randomize_norms)
    groups = find_channel_groups(model, X)
    a, b = group_of(groups, "conv_a"), group_of(groups, "conv_b")
    assert (a.size, b.size) == (4, 6)
    for g, offset in ((a, 0), (b, 4)):
        for side in (OUT, IN):
            module = "bn" if side == OUT else "conv_c"
            member = next(m for m in g.members if m.module == module and m.side == side)
            # channel c of the group is channel offset + c of the concatenated tensor
            assert member.indices.tolist() == [offset + int(r) for r in member.root_indices]
            assert sorted(member.root_indices.tolist()) == list(range(g.size))
    keep = {a.name: torch.tensor([1, 0, 1, 0], dtype=torch.bool), b.name: torch.tensor([0, 1, 1, 0, 0, 1], dtype=torch.bool)}
    pruned = apply_surgery(model, groups, keep, X, verify=True)
    assert (pruned.conv_a.out_channels, pruned.conv_b.out_channels, pruned.bn.num_features, pruned.conv_c.in_channels) == (2, 3, 5, 5)
    assert pruned.pnp_channel_spec.modules["conv_c"]["kept_in"] == [0, 2, 5, 6, 9]


def test_depthwise_convolution_is_coupled_with_its_producer(randomize_norms):
    model = build(DepthwiseSeparable, randomize_norms)
    groups = find_channel_groups(model, X)
    g = group_of(groups, "expand")
    assert sides(g) == {"expand": {OUT}, "bn1": {OUT}, "depthwise": {OUT}, "bn2": {OUT}, "project": {IN}}
    assert g.blocks is None  # depthwise channels are independent: no block constraint
    keep = {g.name: torch.tensor([1, 1, 0, 1, 0, 0, 0, 1], dtype=torch.bool)}
    pruned = apply_surgery(model, groups, keep, X, verify=True)
    dw = pruned.depthwise
    assert (dw.in_channels, dw.out_channels, dw.groups, pruned.project.in_channels) == (4, 4, 4, 4)


def test_grouped_convolution_exposes_blocks_and_legal_keep_has_equal_counts_per_block(randomize_norms):
    model = build(GroupedConv, randomize_norms)
    groups = find_channel_groups(model, X)
    g = group_of(groups, "conv1")
    assert g.num_blocks == 3
    assert g.blocks.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    out_group = group_of(groups, "grouped")
    assert out_group.num_blocks == 3

    # blocks keep 3, 3 and 1: the fewest flips bring block 2 up to 3
    keep = torch.tensor([1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.9, 0.2, 0.8, 0.7, 0.6, 0.3, 0.9, 0.4])
    legal, adjusted = legalize_keep(groups, {g.name: keep}, {g.name: scores})
    assert torch.bincount(g.blocks[legal[g.name]], minlength=3).tolist() == [3, 3, 3]
    assert bool(legal[g.name][keep].all())  # nothing kept was dropped
    assert legal[g.name].nonzero().flatten().tolist() == [0, 1, 2, 4, 6, 7, 8, 10, 11]  # best-scored added
    assert "2 channel(s) flipped" in adjusted[g.name]
    assert out_group.name not in adjusted  # untouched groups are not reported

    pruned = apply_surgery(model, groups, legal, X, verify=True)
    assert (pruned.grouped.in_channels, pruned.grouped.groups) == (9, 3)


@pytest.mark.parametrize("seed", range(5))
def test_legalize_keep_flips_as_few_channels_as_possible(randomize_norms, seed):
    model = build(GroupedConv, randomize_norms)
    groups = find_channel_groups(model, X)
    keep = random_keep(groups, seed)
    legal, _ = legalize_keep(groups, keep)
    for g in groups:
        if g.blocks is None:
            continue
        counts = torch.bincount(g.blocks[keep[g.name]], minlength=g.num_blocks)
        fewest = min(int((counts - t).abs().sum()) for t in range(1, g.size // g.num_blocks + 1))
        assert int((legal[g.name] != keep[g.name]).sum()) == fewest
        legal_counts = torch.bincount(g.blocks[legal[g.name]], minlength=g.num_blocks)
        assert len(set(legal_counts.tolist())) == 1 and int(legal_counts[0]) >= 1


def test_surgery_refuses_unequal_blocks_when_not_legalised(randomize_norms):
    model = build(GroupedConv, randomize_norms)
    groups = find_channel_groups(model, X)
    g = group_of(groups, "conv1")
    keep = {g.name: torch.tensor([1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)}
    with pytest.raises(ValueError, match="same number"):
        apply_surgery(model, groups, keep, X, legalize=False)


def test_ignore_patterns_leave_groups_out_with_reason():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    full = find_channel_groups(model, X)
    assert {"block1.conv1", "block2.conv1"} <= set(full.names)

    groups = find_channel_groups(model, X, ignore=["block*.conv1"])
    for name in ("block1.conv1", "block2.conv1"):
        assert name not in groups.names
        assert f"ignored layer {name!r}" in groups.excluded[name]
    assert len(groups) == len(full) - 2

    one = find_channel_groups(model, X, ignore="block2.conv1")  # a single pattern works too
    assert "block1.conv1" in one.names and "block2.conv1" in one.excluded


def test_linear_classifier_output_is_never_prunable(randomize_norms):
    model = build(TwoBranchAdd, randomize_norms)
    groups = find_channel_groups(model, X)
    assert "fc" not in groups.names
    assert "model's output" in groups.excluded["fc"]
    assert not any(m.module == "fc" and m.side == OUT for g in groups for m in g.members)


def test_convolution_whose_output_is_the_model_output_is_never_prunable():
    torch.manual_seed(0)
    model = FullyConvolutional().eval()
    groups = find_channel_groups(model, X)
    assert groups.names == ["conv1"]
    assert "model's output" in groups.excluded["classifier"]


def test_forward_failing_inside_a_layer_names_that_layer():
    model = BrokenInside().eval()
    with pytest.raises(UntraceableModelError, match=r"'body\.1'.*this layer cannot run"):
        find_channel_groups(model, X)


def test_wrong_example_input_names_the_first_layer_that_rejects_it():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    with pytest.raises(UntraceableModelError, match=r"at layer 'stem'"):
        find_channel_groups(model, torch.randn(2, 5, 8, 8))


def test_groups_smaller_than_min_size_are_left_out_with_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 1, 1), nn.ReLU(), nn.Conv2d(1, 4, 1), nn.Flatten(), nn.LazyLinear(2))
    model(X)
    model.eval()
    groups = find_channel_groups(model, X)
    assert "0" not in groups.names
    assert "fewer than min_size=2" in groups.excluded["0"]


def test_groups_come_in_network_order():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3)).eval()
    groups = find_channel_groups(model, X)
    assert groups.names == ["0", "2"]


def test_groups_through_a_norm_across_channels_are_left_out_with_reason():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(),  # statistics across 4 channels each
        nn.Conv2d(8, 8, 3), nn.GroupNorm(8, 8), nn.ReLU(),  # one channel per group: per-channel norm
        nn.Conv2d(8, 8, 1), nn.Flatten(), nn.LazyLinear(16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2),
    )
    model(X)
    model.eval()
    groups = find_channel_groups(model, X)
    assert "GroupNorm with 2 group(s) of 8 channels '1'" in groups.excluded["0"]
    assert "LayerNorm '9'" in groups.excluded["8"]
    assert "gating cannot stand in for removal" in groups.excluded["8"]
    assert {"3", "6"} <= set(groups.names)


class _SlicedChannels(nn.Module):
    """conv1's channels sliced (x[:, :4]) before conv2: torch-pruning passes them through as if whole."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(4, 6, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x)[:, :4]).mean((2, 3)))


class _IndexedChannels(_SlicedChannels):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(3, 6, 3)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x)[:, torch.tensor([0, 2, 5])]).mean((2, 3)))


class _Recurrent(nn.Module):
    """conv features read as a sequence by an LSTM."""

    def __init__(self):
        super().__init__()
        self.conv, self.rnn, self.fc = nn.Conv2d(3, 8, 3), nn.LSTM(8, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x):
        out, _ = self.rnn(self.conv(x).mean(2).transpose(1, 2))
        return self.fc(out[:, -1])


class _GhostWithExcitation(nn.Module):
    """GhostNet's module: a map and its depthwise copy, concatenated, under one squeeze-excitation."""

    def __init__(self):
        super().__init__()
        self.primary, self.cheap = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.reduce, self.expand = nn.Conv2d(8, 3, 1), nn.Conv2d(3, 8, 1)
        self.consumer, self.fc = nn.Conv2d(8, 6, 1), nn.Linear(6, 5)

    def forward(self, x):
        x1 = self.primary(x)
        y = torch.cat([x1, self.cheap(x1)], 1)
        y = y * torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.fc(self.consumer(y).mean((2, 3)))


class _DualPath(nn.Module):
    """DPN's dual path: slices of two layers' outputs added and concatenated."""

    def __init__(self):
        super().__init__()
        self.proj, self.body = nn.Conv2d(3, 12, 1), nn.Conv2d(3, 10, 1)
        self.after, self.fc = nn.Conv2d(14, 6, 1), nn.Linear(6, 5)

    def forward(self, x):
        s, o = self.proj(x), self.body(x)
        return self.fc(self.after(torch.cat([s[:, :8] + o[:, :8], s[:, 8:], o[:, 8:]], dim=1)).mean((2, 3)))


@pytest.mark.parametrize(
    "model, left_out, why",
    [(_SlicedChannels, "conv1", "does not reproduce gating"), (_IndexedChannels, "conv1", "sliced or indexed"),
     (_Recurrent, "conv", "LSTM 'rnn'"),
     (_DualPath, "body", "sliced or indexed")],
)
def test_channels_pnp_cannot_follow_are_left_out_with_the_reason_not_offered(model, left_out, why):
    model = model().eval()
    x = torch.randn(2, 3, 12, 12)
    groups = find_channel_groups(model, x)
    assert left_out not in groups and why in groups.excluded[left_out]
    # what is offered cuts exactly
    keep = {g.name: torch.arange(g.size) % 2 == 0 for g in groups}
    apply_surgery(model, groups, keep, x, verify=True)


def test_proving_every_group_keeps_every_exact_one(randomize_norms):
    from pnp.models import resnet20

    model = randomize_norms(resnet20(in_channels=1, num_classes=10, input_size=28)).eval()
    x = torch.randn(2, 1, 28, 28)
    assert find_channel_groups(model, x, prove=True).names == find_channel_groups(model, x).names


class _ScaledChannels(nn.Module):
    """A per-channel scale viewed as [1, C, 1, 1] (ConvNeXt's and PoolFormer's layer scale)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.Linear(4, 5)
        self.gamma = nn.Parameter(torch.rand(8))

    def forward(self, x):
        return self.fc(self.conv2(self.bn(self.conv1(x)) * self.gamma.reshape(1, -1, 1, 1)).mean((2, 3)))


def test_a_per_channel_scale_outside_any_layer_is_left_out_with_its_name(tmp_path):
    """Surgery could cut the scale, but a saved model must reload: the channel spec describes layers only."""
    model, x = _ScaledChannels().eval(), torch.randn(2, 3, 12, 12)
    groups = find_channel_groups(model, x)
    assert "'gamma', a parameter used outside any layer" in groups.excluded["conv1"]
    assert "conv2" in groups


class _PartialResiduals(nn.Module):
    """ReXNet's blocks: the input added into the first channels of a wider output, six times over."""

    def __init__(self, blocks: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.convs = nn.ModuleList(nn.Conv2d(8 + 4 * i, 12 + 4 * i, 1) for i in range(blocks))
        self.fc = nn.Linear(8 + 4 * blocks, 5)

    def forward(self, x):
        x = self.stem(x)
        for conv in self.convs:
            y = conv(x)
            x = torch.cat([y[:, : x.shape[1]] + x, y[:, x.shape[1]:]], dim=1)
        return self.fc(x.mean((2, 3)))


def test_a_search_that_keeps_growing_is_stopped_and_its_group_left_out():
    """torch-pruning's search on a chain of partial residuals grows exponentially with depth: bounded, not hung."""
    model, x = _PartialResiduals().eval(), torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(model, x)
    assert any("grew past" in why for why in groups.excluded.values()), groups.excluded
    keep = {g.name: torch.arange(g.size) % 2 == 0 for g in groups}
    apply_surgery(model, groups, keep, x, verify=True)


# ---------------------------------------------------------------- sizes a module holds, ties, weight standardisation


class _MixedConv(nn.Module):
    """timm's ``MixedConv2d``: the input split into sections of fixed sizes, one convolution per section."""

    def __init__(self, cin: int, cout: int, kernels: list[int], depthwise: bool = False):
        super().__init__()
        n = len(kernels)
        ins, outs = [cin // n] * n, [cout // n] * n
        ins[0], outs[0] = ins[0] + cin - sum(ins), outs[0] + cout - sum(outs)
        self.convs = nn.ModuleList(
            nn.Conv2d(i, i if depthwise else o, k, padding=k // 2, groups=i if depthwise else 1)
            for i, o, k in zip(ins, outs, kernels)
        )
        self.splits = ins

    def forward(self, x):
        return torch.cat([conv(part) for conv, part in zip(self.convs, torch.split(x, self.splits, 1))], 1)


class _MixedNet(nn.Module):
    """MixNet's layers: a stem split between two kernels, a depthwise layer split among three."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.mix = _MixedConv(12, 10, [1, 3])
        self.bn = nn.BatchNorm2d(10)
        self.dw = _MixedConv(10, 10, [3, 5, 7], depthwise=True)
        self.project, self.fc = nn.Conv2d(10, 6, 1), nn.Linear(6, 5)

    def forward(self, x):
        x = self.dw(torch.relu(self.bn(self.mix(self.stem(x)))))
        return self.fc(self.project(x).mean((2, 3)))


class _GhostModule(nn.Module):
    """GhostNet's module: a map and its depthwise copy concatenated, the first ``out_chs`` kept (odd: one cut off)."""

    def __init__(self, cin: int, out_chs: int):
        super().__init__()
        init = (out_chs + 1) // 2
        self.out_chs = out_chs
        self.primary = nn.Sequential(nn.Conv2d(cin, init, 1), nn.BatchNorm2d(init), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, padding=1, groups=init), nn.BatchNorm2d(init), nn.ReLU())

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)[:, :self.out_chs]


class _GhostNet(nn.Module):
    """Two ghost modules with a depthwise convolution between them, as in GhostNet's strided bottleneck."""

    def __init__(self):
        super().__init__()
        self.ghost1, self.dw, self.bn = _GhostModule(3, 7), nn.Conv2d(7, 7, 3, padding=1, groups=7), nn.BatchNorm2d(7)
        self.ghost2, self.consumer, self.fc = _GhostModule(7, 9), nn.Conv2d(9, 6, 1), nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.consumer(self.ghost2(self.bn(self.dw(self.ghost1(x))))).mean((2, 3)))


register_builder("test-groups-mixed-split")(_MixedNet)
register_builder("test-groups-ghost-slice")(_GhostNet)
register_builder("test-groups-ghost-excitation")(_GhostWithExcitation)


def cut_save_reload(model, groups, keep, x, builder: str, directory):
    """The model cut to ``keep`` (proven against the gated model) and that model saved and reloaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legalize_keep's notes
        pruned = apply_surgery(model, groups, keep, x, verify=True, atol=1e-6, rtol=1e-5).eval()
    save_pruned(pruned, directory, builder=builder)
    loaded = load_pruned(directory)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    return pruned, loaded


@pytest.mark.parametrize("seed", range(4))
def test_fixed_split_sections_shrink_with_their_kept_channels_at_surgery_and_reload(randomize_norms, tmp_path, seed):
    model, x = build(_MixedNet, randomize_norms), torch.randn(2, 3, 12, 12)
    groups = find_channel_groups(model, x, prove=True)
    assert {"stem.0", "dw.convs.0"} <= set(groups.names), groups.excluded
    held = [(s.attribute.module, s.attribute.attr, s.attribute.value) for s in groups["stem.0"].sections]
    assert held == [("mix", "splits", (6, 6))]
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(seed))
    pruned, loaded = cut_save_reload(model, groups, keep, x, "pnp:test-groups-mixed-split", tmp_path / "mixed")
    for net in (pruned, loaded):
        for mixed in (net.mix, net.dw):  # each section as wide as the convolution that reads it
            assert mixed.splits == [conv.in_channels for conv in mixed.convs]
        assert sum(net.mix.splits) == net.stem[0].out_channels < 12 and sum(net.dw.splits) == net.bn.num_features < 10


def test_reloading_split_sizes_that_do_not_fit_the_model_names_the_attribute(randomize_norms, tmp_path):
    model, x = build(_MixedNet, randomize_norms), torch.randn(2, 3, 12, 12)
    groups = find_channel_groups(model, x)
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))
    cut_save_reload(model, groups, keep, x, "pnp:test-groups-mixed-split", tmp_path / "mixed")
    path = tmp_path / "mixed" / "channels.json"
    channels = json.loads(path.read_text())
    assert set(channels["section_sizes"]) == {"mix", "dw"}
    channels["section_sizes"]["mix"]["splits"] = [1, 2, 3]  # three sections where the model has two
    path.write_text(json.dumps(channels))
    with pytest.raises(ArtifactError, match=r"mix\.splits to \[1, 2, 3\].*holds \[6, 6\]"):
        load_pruned(tmp_path / "mixed")


def test_a_split_section_dropped_whole_keeps_one_channel_of_its_layer(randomize_norms):
    model, x = build(_MixedNet, randomize_norms), torch.randn(2, 3, 12, 12)
    groups = find_channel_groups(model, x)
    keep = {"stem.0": torch.arange(12) >= 6}  # every channel of mix.convs.0's section dropped
    with pytest.raises(ValueError, match="drop every input channel of layer 'mix.convs.0'"):
        apply_surgery(model, groups, keep, x, legalize=False)
    legal, adjusted = legalize_keep(groups, keep)
    assert int(legal["stem.0"][:6].sum()) == 1 and "mix.convs.0" in adjusted["stem.0"]
    with pytest.warns(UserWarning, match="mix.convs.0"):
        pruned = apply_surgery(model, groups, keep, x, verify=True)
    assert pruned.mix.splits == [1, 6]


class _TwoHolders(_MixedNet):
    def __init__(self):
        super().__init__()
        self.mix.sizes = [6, 6]  # the split sizes twice: which one forward reads cannot be told


def test_split_sizes_held_by_two_attributes_leave_the_group_out_naming_them():
    model, x = _TwoHolders().eval(), torch.randn(2, 3, 12, 12)
    groups = find_channel_groups(model, x)
    assert "held by several attributes (splits, sizes)" in groups.excluded["stem.0"]
    assert "dw.convs.0" in groups


@pytest.mark.parametrize("seed", range(4))
def test_channels_sliced_off_a_concatenation_are_prunable_and_the_bound_follows(randomize_norms, tmp_path, seed):
    model, x = build(_GhostNet, randomize_norms), torch.randn(2, 3, 12, 12)
    groups = find_channel_groups(model, x, prove=True)
    assert {"dw", "ghost2.cheap.0"} <= set(groups.names), groups.excluded
    # ghost1's 4 map channels, each tied by dw to its copy (the last copy cut off by [:, :7])
    assert (groups["dw"].size, groups["dw"].unit) == (4, "tied channels")
    assert [s.attribute.attr for s in groups["dw"].sections] == ["out_chs"]
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(seed))
    pruned, loaded = cut_save_reload(model, groups, keep, x, "pnp:test-groups-ghost-slice", tmp_path / "ghost")
    for net in (pruned, loaded):
        assert net.ghost1.out_chs == net.dw.in_channels < 7
        assert net.ghost2.out_chs == net.consumer.in_channels < 9


def test_a_map_and_its_depthwise_copy_under_one_excitation_are_cut_as_one_unit(randomize_norms, tmp_path):
    """GhostNet's cat([x, depthwise(x)]) under a squeeze-excitation: channel j and j + 4 stand or fall together."""
    model, x = build(_GhostWithExcitation, randomize_norms), torch.randn(2, 3, 12, 12)
    groups = find_channel_groups(model, x, prove=True)
    g = group_of(groups, "expand")
    assert (g.size, g.unit) == (4, "tied channels")
    keep = {g.name: torch.tensor([1, 0, 0, 1], dtype=torch.bool)}
    pruned, _ = cut_save_reload(model, groups, keep, x, "pnp:test-groups-ghost-excitation", tmp_path / "se")
    assert (pruned.primary.out_channels, pruned.cheap.out_channels, pruned.expand.out_channels) == (2, 2, 4)


class _StandardisedConv(nn.Conv2d):
    """Weight standardisation as timm's ``ScaledStdConv2d`` computes it: each output channel's weights normalised."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class _CentredConv(nn.Conv2d):
    """Weight standardisation written with mean and std."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("conv", [_StandardisedConv, _CentredConv])
def test_a_weight_standardised_convolution_keeps_its_inputs_with_a_reason_naming_it(conv):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), conv(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1),
                          nn.Flatten(), nn.LazyLinear(5))
    model(X)
    groups = find_channel_groups(model.eval(), X)
    why = groups.excluded["0"]
    assert "input channels of '2'" in why and "weight standardisation" in why and "shuffle" not in why
    assert "output channels of '2'" in groups.excluded["2"]
    assert "4" in groups  # layers around it are pruned as usual
