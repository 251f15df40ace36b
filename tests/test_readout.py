import json

import pytest
import torch
import torch.nn as nn
import torchvision

import pnp
from pnp.cli.config import ConfigError, validate
from pnp.core.builders import build_model
from pnp.core.io import write_keep_decisions
from test_pipeline import compose_config


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
    "kwargs, field",
    [({"budget": 0}, "budget"), ({"round_to": 0}, "round_to"), ({"min_channels": 0}, "min_channels"),
     ({"metric": "ms"}, "metric"), ({"min_share": -1}, "min_share"), ({"min_share": 2}, "min_share")],
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


@pytest.fixture(scope="module")
def resnet20():
    model = build_model("pnp:resnet20", in_channels=1, num_classes=10, input_size=28).eval()
    x = torch.randn(1, 1, 28, 28)
    return model, pnp.find_channel_groups(model, x), x


def starving_scores(groups, seed=0):
    """Scores that rate the last stage of a ResNet-20 far below the rest, as a pruner did at 90% fewer FLOPs."""
    scores = {name: 0.3 + 0.7 * s for name, s in random_scores(groups, seed).items()}
    for g in groups:
        if g.name.startswith("layer3."):
            scores[g.name] = scores[g.name] * 0.01
    return scores


def test_floor_stops_scores_from_starving_a_residual_group(resnet20, tmp_path):
    """Without the floor the last residual group keeps a channel or two; with it, most of the uniform width."""
    model, groups, x = resnet20
    scores, budget, residual = starving_scores(groups), 0.1, "layer3.0.shortcut.0"
    starved, starved_info = pnp.decide_keep(groups, scores, budget=budget, min_share=0)
    assert int(starved[residual].sum()) <= 2
    assert "floored" not in starved_info

    keep, info = pnp.decide_keep(groups, scores, budget=budget)  # the default floor
    floor_ratio = info["min_share"] * info["uniform_keep_ratio"]
    assert 0.25 < info["uniform_keep_ratio"] < 0.4  # FLOPs grow about as the square of the widths
    for g in groups:
        assert int(keep[g.name].sum()) >= round(floor_ratio * g.size)
    assert info["floored"][residual]["by_scores"] <= 2
    assert int(keep[residual].sum()) == info["floored"][residual]["floor"] >= 14
    assert budget - 0.01 < info["flops_fraction"] <= budget  # the floor took its share; the scores spent the rest
    pruned = pnp.apply_surgery(model, groups, keep, x)
    measured = pnp.count_flops_params(pruned, x).flops / pnp.count_flops_params(model, x).flops
    assert measured <= budget + 1e-6

    write_keep_decisions(tmp_path / "keep.json", groups, keep, info)  # what pnp-prune writes
    assert json.loads((tmp_path / "keep.json").read_text())["readout"]["floored"] == info["floored"]


@pytest.mark.parametrize("min_share", [0.5, 1.0])
def test_floor_keeps_each_groups_best_channels_within_the_budget(resnet, min_share):
    _, groups, _ = resnet
    scores = random_scores(groups, 3)
    keep, info = pnp.decide_keep(groups, scores, budget=0.3, round_to=4, min_share=min_share)
    assert info["flops_fraction"] <= 0.3
    for g in groups:
        count = int(keep[g.name].sum())
        assert count >= 4 * int(min_share * info["uniform_keep_ratio"] * g.size // 4)  # rounding may take up to a step
        assert count % 4 == 0 or count == g.size
        kept, dropped = scores[g.name][keep[g.name]], scores[g.name][~keep[g.name]]
        if len(dropped):
            assert kept.min() >= dropped.max()  # the floor keeps a group's best channels, not others


def test_floor_respects_grouped_convolutions():
    """A group feeding a grouped convolution is lifted block by block, every block keeping as many."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    groups = pnp.find_channel_groups(model, x)
    blocked = next(g for g in groups if g.num_blocks > 1 and g.size == 16)
    scores = random_scores(groups, 4)
    scores[blocked.name] = scores[blocked.name] * 0.01
    keep, info = pnp.decide_keep(groups, scores, budget=0.2, min_share=1.0)
    per_block = torch.bincount(blocked.blocks[keep[blocked.name]], minlength=blocked.num_blocks)
    assert len(set(per_block.tolist())) == 1 and int(per_block.sum()) >= 4
    assert blocked.name in info["floored"] and info["flops_fraction"] <= 0.2
    pnp.apply_surgery(model, groups, keep, x, verify=True)


@pytest.mark.parametrize("value", [-1, 2])
def test_bad_min_share_names_the_field(tmp_path, value):
    cfg = compose_config("prune", [f"out_dir={tmp_path}", "target=x", f"readout.min_share={value}"])
    with pytest.raises(ConfigError) as info:
        validate(cfg, "prune")
    assert str(info.value).startswith(f"readout.min_share={float(value)!r}:")
