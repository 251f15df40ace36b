"""Layers that apply their own norm and activation: a Conv/Linear subclass calling child modules in forward.

detectron2's ``Conv2d`` is such a layer. The dependency graph, the groups, surgery and
the FLOP counter must see its convolution and its norm as two layers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pnp.core.cost import CostModel, count_flops_params
from pnp.core.groups import OUT, build_dependency_graph, find_channel_groups, keep_from_ratio
from pnp.core.surgery import apply_surgery


class ConvNormAct(nn.Conv2d):
    """A convolution followed, inside its own forward, by its ``norm`` and ``activation``."""

    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class LinearNormAct(nn.Linear):
    """The same for a Linear layer."""

    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = self.activation(self.norm(super().forward(x)))
        return x


class FusedResidualNet(nn.Module):
    """Stem (functional ReLU), a residual block of fused layers (ReLU module), a fused Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, padding=1, bias=False, norm=nn.BatchNorm2d(8), activation=F.relu)
        self.conv1 = ConvNormAct(8, 12, 3, padding=1, bias=False, norm=nn.BatchNorm2d(12), activation=nn.ReLU())
        self.conv2 = ConvNormAct(12, 8, 3, padding=1, bias=False, norm=nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.head = ConvNormAct(8, 16, 1)  # no norm, no activation: an ordinary convolution
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = LinearNormAct(16, 24, norm=nn.BatchNorm1d(24), activation=nn.ReLU())
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(x + self.conv2(self.conv1(x)))
        x = self.pool(self.head(x)).flatten(1)
        return self.fc2(self.fc1(x))


FUSED = {"stem": "stem.norm", "conv1": "conv1.norm", "conv2": "conv2.norm", "fc1": "fc1.norm"}
SIDE = 16

# By hand, per sample, on 16x16 inputs (every convolution keeps the size): convolution MACs
# plus bias adds; BatchNorm two per element; ReLU modules and pooling one per element.
P = SIDE * SIDE
FUSED_FLOPS = {
    "stem": P * 8 * 3 * 9,
    "stem.norm": 2 * 8 * P,
    "conv1": P * 12 * 8 * 9,
    "conv1.norm": 2 * 12 * P,
    "conv1.activation": 12 * P,
    "conv2": P * 8 * 12 * 9,
    "conv2.norm": 2 * 8 * P,
    "relu": 8 * P,
    "head": P * 16 * 8 + P * 16,
    "pool": 16 * P,
    "fc1": 16 * 24 + 24,
    "fc1.norm": 2 * 24,
    "fc1.activation": 24,
    "fc2": 24 * 5 + 5,
}


@pytest.fixture
def fused_net(randomize_norms):
    torch.manual_seed(0)
    model = randomize_norms(FusedResidualNet().eval())
    return model, torch.randn(2, 3, SIDE, SIDE)


def test_graph_puts_each_norm_after_its_layer(fused_net):
    model, x = fused_net
    graph = build_dependency_graph(model, x)
    modules = dict(model.named_modules())
    for layer, norm in FUSED.items():
        norm_node = graph.module2node[modules[norm]]
        assert [n.module for n in norm_node.inputs] == [modules[layer]], norm


def producer_groups(groups) -> dict[str, str]:
    """Group name of each layer whose output channels a group holds."""
    return {m.module: g.name for g in groups for m in g.members if m.side == OUT}


def test_groups_hold_the_norms_of_fused_layers(fused_net):
    model, x = fused_net
    groups = find_channel_groups(model, x)
    group_of = producer_groups(groups)
    for layer, norm in FUSED.items():
        assert norm in group_of and group_of[norm] == group_of[layer], norm
    assert group_of["stem"] == group_of["conv2"]  # the residual add ties them
    assert len(groups) == 4 and "head.norm" not in group_of


@pytest.mark.parametrize("ratio", [0.5, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surgery_shrinks_the_norms_and_matches_the_gated_model(fused_net, randomize_norms, gated_output, ratio, seed):
    model, x = fused_net
    randomize_norms(model, seed)
    groups = find_channel_groups(model, x)
    keep = keep_from_ratio(groups, ratio, generator=torch.Generator().manual_seed(seed))
    pruned = apply_surgery(model, groups, keep, x, verify=True)

    kept = {layer: int(keep[name].sum()) for layer, name in producer_groups(groups).items()}
    assert pruned.conv1.norm.num_features == pruned.conv1.out_channels == kept["conv1"] < 12
    assert pruned.stem.norm.num_features == pruned.conv2.norm.num_features == kept["stem"] < 8
    assert pruned.fc1.norm.num_features == pruned.fc1.out_features == kept["fc1"] < 24
    expected = gated_output(model, groups, keep, x)
    with torch.no_grad():
        actual = pruned(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_flops_count_each_fused_layer_and_its_norm(fused_net):
    model, x = fused_net
    counted = count_flops_params(model, x)
    assert counted.layer_flops == FUSED_FLOPS
    assert counted.flops == sum(FUSED_FLOPS.values())
    assert counted.layer_params["conv1"] == 12 * 8 * 9 and counted.layer_params["conv1.norm"] == 2 * 12
    assert sum(counted.layer_params.values()) == counted.params == sum(p.numel() for p in model.parameters())

    groups = find_channel_groups(model, x)
    cost = CostModel(groups)
    assert cost.full_flops == counted.flops
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))
    pruned_count = count_flops_params(apply_surgery(model, groups, keep, x), x)
    assert cost.per_layer_flops(keep) == pytest.approx(pruned_count.layer_flops, rel=1e-6)
    assert float(cost.flops(keep)) == pytest.approx(pruned_count.flops, rel=1e-6)


def test_tracing_and_counting_leave_the_model_as_it_was(fused_net):
    model, x = fused_net
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    groups = find_channel_groups(model, x)
    count_flops_params(model, x)
    apply_surgery(model, groups, keep_from_ratio(groups, 0.5), x)

    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert "forward" not in vars(module) and "__flops__" not in vars(module), name
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), before)
        # the fused layer still applies its norm and activation itself
        expected = torch.relu(model.conv1.norm(F.conv2d(x.new_ones(2, 8, SIDE, SIDE), model.conv1.weight, padding=1)))
        assert torch.equal(model.conv1(x.new_ones(2, 8, SIDE, SIDE)), expected)
