import pytest
import torch
import torch.nn as nn

import pnp


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(8, 10)
    assert pnp.kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert pnp.kd_loss(logits, torch.randn(8, 10)).item() > 0
    with pytest.raises(ValueError, match="temperature"):
        pnp.kd_loss(logits, logits, temperature=0)


def test_feature_distillation_cuts_teacher_to_kept_channels():
    teacher = torch.randn(2, 6, 4, 4)
    kept = torch.tensor([0, 2, 5])
    student = teacher[:, kept].clone()
    assert pnp.feature_distillation_loss([student], [teacher], [kept]).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        pnp.feature_distillation_loss([student], [teacher])


@pytest.fixture
def groups():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    return pnp.find_channel_groups(model.eval(), x)


def test_flops_sparsity_equals_flops_fraction_of_the_masks(groups):
    cost = pnp.CostModel(groups)
    loss = pnp.PrunerLoss(groups, sparsity="flops")
    half = {g.name: (torch.arange(g.size) < g.size // 2).float() for g in groups}
    terms = loss(torch.randn(2, 4), torch.zeros(2, dtype=torch.long), half)
    assert terms["sparsity"].item() == pytest.approx(float(cost.flops_fraction(half)), rel=1e-5)
    assert terms["sparsity"].item() < 0.6


def test_params_sparsity_weighs_on_the_wide_cheap_layer(groups):
    cost = pnp.CostModel(groups)
    full = {g.name: torch.ones(g.size, requires_grad=True) for g in groups}
    y = torch.zeros(2, dtype=torch.long)
    gradients = {}
    for kind in ("flops", "params"):
        terms = pnp.PrunerLoss(groups, sparsity=kind)(torch.randn(2, 4), y, full)
        expected = cost.flops_fraction(full) if kind == "flops" else cost.params_fraction(full)
        assert terms["sparsity"].item() == pytest.approx(float(expected), rel=1e-5)
        gradients[kind] = dict(zip(full, torch.autograd.grad(terms["sparsity"], list(full.values()))))
    # the second conv's channels feed the 8 x 4 x 4 inputs of the linear layer: under a
    # params count they weigh more, against the first conv's, than under a FLOPs count
    first, second = [g.name for g in groups]
    ratio = {k: float(g[second].mean() / g[first].mean()) for k, g in gradients.items()}
    assert ratio["params"] > 1.2 * ratio["flops"]


def test_budget_term_pulls_towards_the_budget_from_both_sides(groups):
    cost = pnp.CostModel(groups)
    full = {g.name: torch.ones(g.size) for g in groups}
    tiny = {g.name: (torch.arange(g.size) < 1).float() for g in groups}
    y = torch.zeros(2, dtype=torch.long)
    at_tiny = float(cost.flops_fraction(tiny))
    assert pnp.PrunerLoss(groups, budget=at_tiny)(torch.randn(2, 4), y, tiny)["budget"].item() == pytest.approx(0.0, abs=1e-6)
    loss = pnp.PrunerLoss(groups, budget=0.5)
    assert loss(torch.randn(2, 4), y, full)["budget"].item() == pytest.approx(1.0)
    assert loss(torch.randn(2, 4), y, tiny)["budget"].item() == pytest.approx(1.0 - at_tiny / 0.5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sparsity": "l1"}, "sparsity"),
        ({"budget": 1.5}, "budget"),
        ({"budget_metric": "latency"}, "budget_metric"),
        ({"sparsity_weight": -1}, "sparsity_weight"),
    ],
)
def test_bad_loss_settings_name_the_field(groups, kwargs, field):
    with pytest.raises(ValueError, match=field):
        pnp.PrunerLoss(groups, **kwargs)


def test_a_budget_warmup_falls_from_the_whole_model_to_the_budget_and_stays():
    from pnp.core.losses import budget_at

    aims = [budget_at(0.1, step / 100, warmup=0.5) for step in range(101)]
    assert aims[0] == pytest.approx(1.0) and aims[50] == pytest.approx(0.1) and aims[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(aims, aims[1:]))  # never back up
    # cubic: most of the way down in the first third of the warmup, slowly onto the budget
    assert aims[17] < 0.1 + 0.3 * 0.9 and aims[45] - 0.1 < 0.001
    assert all(budget_at(0.1, p, warmup=0.0) == 0.1 for p in (0.0, 0.5, 1.0))
    with pytest.raises(ValueError, match="warmup 1.0"):
        budget_at(0.1, 0.0, warmup=1.0)


def test_the_budget_a_step_aims_at_replaces_the_objectives_own(groups):
    full = {g.name: torch.ones(g.size) for g in groups}
    y = torch.zeros(2, dtype=torch.long)
    loss = pnp.PrunerLoss(groups, budget=0.5)
    assert loss(torch.randn(2, 4), y, full, budget=1.0)["budget"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss(torch.randn(2, 4), y, full)["budget"].item() == pytest.approx(1.0)
