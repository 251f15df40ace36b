import pytest
import torch
import torchvision

import pnp


@pytest.fixture(scope="module")
def resnet():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    return model, pnp.find_channel_groups(model, x), x


def random_scores(groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {grp.name: torch.rand(grp.size, generator=g) for grp in groups}


def test_threshold_keeps_channels_above_it(resnet):
    _, groups, _ = resnet
    scores = random_scores(groups)
    keep, info = pnp.decide_keep(groups, scores, threshold=0.5)
    for g in groups:
        assert torch.equal(keep[g.name], scores[g.name] > 0.5)
    assert info["threshold"] == 0.5


def test_min_channels_and_round_to(resnet):
    _, groups, _ = resnet
    scores = {g.name: torch.zeros(g.size) for g in groups}  # the pruner wants everything gone
    keep, _ = pnp.decide_keep(groups, scores, min_channels=3)
    assert all(int(k.sum()) == 3 for k in keep.values())
    keep, _ = pnp.decide_keep(groups, random_scores(groups), round_to=8)
    assert all(int(k.sum()) % 8 == 0 and int(k.sum()) >= 8 for k in keep.values())


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_budget_is_met_by_the_pruned_model(resnet, budget):
    model, groups, x = resnet
    keep, info = pnp.decide_keep(groups, random_scores(groups, 1), budget=budget, round_to=4)
    assert info["flops_fraction"] <= budget
    assert info["flops_fraction"] > budget - 0.05  # keeps as much as the budget allows
    pruned = pnp.apply_surgery(model, groups, keep, x)
    measured = pnp.count_flops_params(pruned, x).flops / pnp.count_flops_params(model, x).flops
    assert measured == pytest.approx(info["flops_fraction"], abs=0.01)


@pytest.mark.parametrize("round_to", [1, 4])
def test_fill_spends_what_the_threshold_left(resnet, round_to):
    """After bisection, the best-scored channels that still fit are added until none does."""
    from pnp.core.cost import CostModel

    _, groups, _ = resnet
    scores = random_scores(groups, 2)
    bare, bare_info = pnp.decide_keep(groups, scores, budget=0.5, round_to=round_to, fill=False)
    keep, info = pnp.decide_keep(groups, scores, budget=0.5, round_to=round_to)
    assert bare_info["filled"] == 0 and info["filled"] > 0
    assert bare_info["flops_fraction"] < info["flops_fraction"] <= 0.5
    cost = CostModel(groups)
    for g in groups:
        assert bool((keep[g.name] | ~bare[g.name]).all())  # nothing the threshold kept is dropped
        count = int(keep[g.name].sum())
        assert count % round_to == 0 or count == g.size
        if count < g.size:  # the next best channels of any group no longer fit
            more = dict(keep)
            more[g.name] = keep[g.name].clone()
            left = scores[g.name].masked_fill(keep[g.name], -1.0)
            more[g.name][torch.topk(left, min(round_to, g.size - count)).indices] = True
            assert float(cost.flops_fraction(more)) > 0.5


def test_params_budget(resnet):
    _, groups, _ = resnet
    keep, info = pnp.decide_keep(groups, random_scores(groups, 2), budget=0.3, metric="params")
    assert info["params_fraction"] <= 0.3


def test_impossible_budget_says_what_it_can_reach(resnet):
    _, groups, _ = resnet
    with pytest.raises(ValueError, match="cannot be met"):
        pnp.decide_keep(groups, random_scores(groups), budget=0.001, min_channels=16)


@pytest.mark.parametrize(
    "kwargs, field", [({"budget": 0}, "budget"), ({"round_to": 0}, "round_to"), ({"min_channels": 0}, "min_channels"), ({"metric": "ms"}, "metric")]
)
def test_bad_read_out_settings_name_the_field(resnet, kwargs, field):
    _, groups, _ = resnet
    with pytest.raises(ValueError, match=field):
        pnp.decide_keep(groups, random_scores(groups), **kwargs)


def test_scores_must_cover_every_group_with_the_right_length(resnet):
    _, groups, _ = resnet
    scores = random_scores(groups)
    name = groups.names[0]
    scores[name] = scores[name][:-1]
    with pytest.raises(ValueError, match=name):
        pnp.decide_keep(groups, scores)


def test_keep_scores_average_over_batches(resnet):
    _, groups, _ = resnet
    acc = pnp.KeepScores(groups)
    first = {g.name: torch.zeros(2, g.size) for g in groups}
    second = {g.name: torch.ones(6, g.size) for g in groups}
    acc.update(first)
    acc.update(second)
    means = acc.compute()
    assert all(torch.allclose(m, torch.full_like(m, 0.75)) for m in means.values())
    acc.reset()
    with pytest.raises(RuntimeError, match="empty"):
        acc.compute()


@pytest.mark.parametrize("value", [1.0, 0.0])
def test_budget_splits_saturated_scores(resnet, value):
    """A pruner that is sure of every channel (all scores equal) still gets the budget, not the floor."""
    _, groups, _ = resnet
    scores = {g.name: torch.full((g.size,), value) for g in groups}
    keep, info = pnp.decide_keep(groups, scores, budget=0.5)
    assert 0.45 < info["flops_fraction"] <= 0.5


def test_tie_breaking_keeps_the_order_of_distinct_scores(resnet):
    _, groups, _ = resnet
    scores = random_scores(groups, 2)
    keep, info = pnp.decide_keep(groups, scores, budget=0.4)
    for g in groups:  # within a group, every kept channel outscores every dropped one
        kept, dropped = scores[g.name][keep[g.name]], scores[g.name][~keep[g.name]]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()
