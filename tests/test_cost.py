"""FLOPs and parameter counts, the differentiable cost model, and latency measurement."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn as nn

from pnp.core.cost import CostModel, count_flops_params, measure_latency
from pnp.core.groups import find_channel_groups, keep_from_ratio
from pnp.core.surgery import apply_surgery


class TinyNet(nn.Module):
    """Conv(3->4, 3x3, bias) -> ReLU -> flatten -> Linear(4*8*8 -> 10, bias), on 8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


# By hand, per sample: conv 8*8 positions * 4 out * 3 in * 9 taps MACs + 8*8*4 bias adds;
# ReLU one per element; Linear 256*10 MACs + 10 bias adds.
TINY_FLOPS = {"conv": 8 * 8 * 4 * 3 * 9 + 8 * 8 * 4, "relu": 4 * 8 * 8, "fc": 256 * 10 + 10}
TINY_PARAMS = {"conv": 4 * 3 * 9 + 4, "fc": 256 * 10 + 10}
# The same with 2 of the conv's 4 channels kept.
TINY_HALF_FLOPS = 8 * 8 * 2 * 3 * 9 + 8 * 8 * 2 + 2 * 8 * 8 + 128 * 10 + 10


@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_net_flops_and_params_are_counted_exactly_per_sample(batch):
    model = TinyNet().eval()
    cost = count_flops_params(model, torch.randn(batch, 3, 8, 8))
    assert cost.layer_flops == TINY_FLOPS
    assert cost.flops == sum(TINY_FLOPS.values())
    assert cost.layer_params == TINY_PARAMS
    assert cost.params == sum(TINY_PARAMS.values())


def test_cost_model_predicts_the_pruned_tiny_net_exactly():
    model = TinyNet().eval()
    x = torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(model, x)
    assert groups.names == ["conv"]
    cost = CostModel(groups)
    assert cost.full_flops == sum(TINY_FLOPS.values())
    assert cost.full_params == sum(TINY_PARAMS.values())
    keep = {"conv": torch.tensor([True, False, True, False])}
    assert float(cost.flops(keep)) == TINY_HALF_FLOPS
    pruned = apply_surgery(model, groups, keep, x, verify=True)
    assert count_flops_params(pruned, x).flops == TINY_HALF_FLOPS
    assert float(cost.params(keep)) == count_flops_params(pruned, x).params == 2 * 3 * 9 + 2 + 128 * 10 + 10


def test_per_layer_counts_add_up_to_the_total(small_cnn):
    model, x = small_cnn
    cost = count_flops_params(model, x)
    assert cost.flops > 0 and cost.params > 0
    assert sum(cost.layer_flops.values()) == pytest.approx(cost.flops, abs=len(cost.layer_flops))
    assert sum(cost.layer_params.values()) == cost.params == sum(p.numel() for p in model.parameters())
    assert {"stem.0", "stem.1", "conv1", "bn1", "conv2", "bn2", "head", "fc"} <= set(cost.layer_flops)


def test_cost_model_matches_the_counter_layer_by_layer_after_surgery(small_cnn):
    model, x = small_cnn
    groups = find_channel_groups(model, x)
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))
    pruned = apply_surgery(model, groups, keep, x, verify=True)
    counted = count_flops_params(pruned, x)
    predicted = CostModel(groups).per_layer_flops(keep)
    assert predicted.keys() == counted.layer_flops.keys()
    for name, flops in counted.layer_flops.items():
        assert predicted[name] == pytest.approx(flops, rel=1e-6), name
    assert sum(predicted.values()) == pytest.approx(float(CostModel(groups).flops(keep)), rel=1e-6)


def test_counting_prints_nothing(small_cnn, capsys):
    model, x = small_cnn
    count_flops_params(model, x)
    assert capsys.readouterr().out == ""


def test_cost_gradients_flow_through_float_masks(small_cnn):
    model, x = small_cnn
    groups = find_channel_groups(model, x)
    cost = CostModel(groups)
    masks = {g.name: torch.ones(g.size, requires_grad=True) for g in groups}
    flops = cost.flops(masks)
    assert float(flops.detach()) == pytest.approx(cost.full_flops)
    flops.backward()
    for g in groups:
        grad = masks[g.name].grad
        assert grad is not None and bool((grad > 0).all()), g.name
        # at the full model, a channel's gradient averages to what removing it saves
        assert float(grad.mean()) == pytest.approx(g.flops_per_channel, rel=1e-5), g.name


def test_batched_masks_give_one_cost_per_sample(small_cnn):
    model, x = small_cnn
    groups = find_channel_groups(model, x)
    cost = CostModel(groups)
    gen = torch.Generator().manual_seed(0)
    batch = {g.name: torch.rand(3, g.size, generator=gen, requires_grad=True) for g in groups}
    flops = cost.flops_fraction(batch)
    assert flops.shape == (3,)
    for i in range(3):
        one = cost.flops_fraction({name: m[i].detach() for name, m in batch.items()})
        assert float(flops[i].detach()) == pytest.approx(float(one), rel=1e-6)
    flops.sum().backward()
    assert all(m.grad.shape == m.shape for m in batch.values())


def test_half_precision_masks_do_not_overflow(small_cnn):
    model, x = small_cnn
    groups = find_channel_groups(model, x)
    cost = CostModel(groups)
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))
    full_precision = float(cost.flops({n: k.float() for n, k in keep.items()}))
    assert float(cost.flops({n: k.half() for n, k in keep.items()})) == pytest.approx(full_precision)


def test_cost_model_refuses_unknown_group_names(small_cnn):
    model, x = small_cnn
    cost = CostModel(find_channel_groups(model, x))
    with pytest.raises(KeyError, match="unknown group name 'nope'"):
        cost.flops({"nope": torch.ones(3)})


def test_measure_latency_times_every_batch_and_thread_pair_and_restores_threads(small_cnn):
    model, _ = small_cnn
    model.train()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = measure_latency(model, (3, 16, 16), batch_sizes=(1, 4), threads=(1, 2), warmup=1, repeats=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert sorted((r.batch_size, r.threads) for r in results) == [(1, 1), (1, 2), (4, 1), (4, 2)]
    for r in results:
        assert len(r.runs_ms) == 3 and all(t > 0 for t in r.runs_ms)
        assert r.median_ms == statistics.median(r.runs_ms) > 0
    assert model.training  # the model's mode is restored too


def test_measure_latency_refuses_zero_repeats(small_cnn):
    model, _ = small_cnn
    with pytest.raises(ValueError, match="repeats=0"):
        measure_latency(model, (3, 16, 16), repeats=0)
