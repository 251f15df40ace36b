import copy

import pytest
import torch
import torch.nn as nn

import pnp


def small_cnn(num_classes=5):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    ).eval()


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = small_cnn()
    x = torch.randn(4, 3, 12, 12)
    return model, pnp.find_channel_groups(model, x), x


def test_pruner_outputs_binary_masks_per_sample(setup):
    model, groups, x = setup
    pruner = pnp.PrunerNetwork(model, groups)
    masks = pruner(x)
    assert list(masks) == groups.names
    for g in groups:
        assert masks[g.name].shape == (4, g.size)
        assert set(masks[g.name].unique().tolist()) <= {0.0, 1.0}


def test_head_replaces_the_classifier_and_trunk_starts_from_target_weights(setup):
    model, groups, x = setup
    pruner = pnp.PrunerNetwork(model, groups)
    assert pruner.head_layer == "8"
    assert pruner.trunk[8].linear.out_features == groups.total_channels
    assert torch.equal(pruner.trunk[0].weight, model[0].weight)
    assert pruner.trunk[0].weight is not model[0].weight  # a copy: training it leaves the target alone
    fresh = pnp.PrunerNetwork(model, groups, init_from_target=False)
    assert not torch.equal(fresh.trunk[0].weight, model[0].weight)


def test_initial_keep_probability_follows_init_keep(setup):
    model, groups, x = setup
    probs = pnp.PrunerNetwork(model, groups, init_keep=0.9).keep_probabilities(x)
    mean = torch.cat([p.flatten() for p in probs.values()]).mean().item()
    assert 0.85 < mean < 0.95


def test_straight_through_gradient_reaches_the_head(setup):
    model, groups, x = setup
    pruner = pnp.PrunerNetwork(model, groups)
    gated = pnp.GatedModel(model, groups, freeze=True)
    loss = pnp.PrunerLoss(groups, sparsity_weight=1.0)
    masks = pruner(x)
    terms = loss(gated(x, masks=masks), torch.zeros(4, dtype=torch.long), masks)
    terms["loss"].backward()
    head = pruner.trunk[8].linear
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_batch_norm_stats_gate_as_the_cut_model_with_its_statistics_measured_again(setup, randomize_norms):
    model, groups, x = setup
    randomize_norms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep = {g.name: torch.arange(g.size) % 3 != 0 for g in groups}
    gated = pnp.GatedModel(model, groups, freeze=True, norm_stats="batch")
    masks = {k: v.float() for k, v in keep.items()}
    with torch.no_grad():
        out = gated(x, masks=masks)
        with gated.masked(masks):  # the pruner's path: the target itself runs inside the block
            inside = model(x)
        running = pnp.GatedModel(model, groups, freeze=True)(x, masks=masks)
    cut = pnp.apply_surgery(copy.deepcopy(model), groups, keep, x, verify=False).train()
    with torch.no_grad():
        expected = cut(x)  # BatchNorm on the cut network's own batch statistics
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inside, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, running, atol=1e-3)  # the unpruned statistics give something else
    # the target's running statistics and modes are as they were
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())


def test_norm_stats_must_be_known(setup):
    model, groups, _ = setup
    with pytest.raises(ValueError, match="norm_stats 'bach'"):
        pnp.GatedModel(model, groups, norm_stats="bach")


def test_sparsity_loss_lowers_keep_probabilities(setup):
    model, groups, x = setup
    pruner = pnp.PrunerNetwork(model, groups, init_keep=0.6)
    loss = pnp.PrunerLoss(groups, sparsity="channels", sparsity_weight=1.0)
    gated = pnp.GatedModel(model, groups, freeze=True)
    opt = torch.optim.Adam(pruner.parameters(), lr=0.05)
    before = pnp.core.losses.channel_fraction(pruner.keep_probabilities(x), groups).mean().item()
    for _ in range(20):
        masks = pruner(x)
        terms = loss(gated(x, masks=masks), torch.zeros(4, dtype=torch.long), masks)
        opt.zero_grad()
        (terms["sparsity"]).backward()
        opt.step()
    after = pnp.core.losses.channel_fraction(pruner.keep_probabilities(x), groups).mean().item()
    assert after < before


def test_batch_mode_gives_one_decision_per_batch(setup):
    model, groups, x = setup
    masks = pnp.PrunerNetwork(model, groups, mask_mode="batch")(x)
    assert all(m.shape == (g.size,) for m, g in zip(masks.values(), groups))


def test_batch_decision_from_the_first_samples_is_the_decision_for_those_samples_alone(setup):
    model, groups, x = setup
    torch.manual_seed(1)
    pruner = pnp.PrunerNetwork(model, groups, mask_mode="batch", init_keep=0.5)
    seen = []
    pruner.trunk.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    head = torch.cat(list(pruner(x[:2]).values()))
    first_two = pnp.PrunerNetwork(model, groups, mask_mode="batch", init_keep=0.5, input_samples=2)
    first_two.load_state_dict(pruner.state_dict())
    first_two.trunk.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    masks = first_two(x)
    assert seen == [2, 2]  # the pruner's trunk ran on 2 samples, not the batch's 4
    assert torch.equal(torch.cat(list(masks.values())), head)
    assert all(m.shape == (g.size,) for m, g in zip(masks.values(), groups))
    sum(m.sum() for m in masks.values()).backward()  # straight-through: the head still learns
    assert first_two.head.linear.weight.grad.abs().sum() > 0


class PoolAfterClassifier(nn.Module):
    """Like SqueezeNet: the last conv is followed by ReLU and pooling."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.classifier = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return torch.relu(self.classifier(self.features(x))).mean((2, 3))


def test_noise_in_batch_mode_draws_each_batch_decision_at_its_keep_probability(setup):
    model, groups, x = setup
    torch.manual_seed(0)
    quiet = pnp.PrunerNetwork(model, groups, mask_mode="batch", init_keep=0.3).train()
    noisy = pnp.PrunerNetwork(model, groups, mask_mode="batch", init_keep=0.3, noise=1.0).train()
    for pruner in (quiet, noisy):
        nn.init.zeros_(pruner.trunk[8].linear.weight)  # every channel's keep probability is 0.3
    group = groups.names[-1]
    size = groups[group].size
    with torch.no_grad():
        quiet_kept = torch.stack([quiet(x)[group] for _ in range(200)]).mean().item()
        noisy_kept = torch.stack([noisy(x)[group] for _ in range(200)]).mean().item()
    assert quiet_kept == pytest.approx(quiet.min_channels / size)  # below 0.5: only the floor stays on
    assert 0.25 < noisy_kept < 0.4  # a Bernoulli(0.3) draw per batch (and the floor)


def test_head_layer_must_be_named_when_ops_follow_the_last_layer():
    model = PoolAfterClassifier().eval()
    x = torch.randn(2, 3, 10, 10)
    groups = pnp.find_channel_groups(model, x)
    with pytest.raises(ValueError, match="head_layer"):
        pnp.PrunerNetwork(model, groups)
    pruner = pnp.PrunerNetwork(model, groups, head_layer="classifier")
    assert pruner(x)["features.0"].shape == (2, 8)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"init_keep": 1.0}, "init_keep"), ({"temperature": 0}, "temperature"), ({"mask_mode": "pixel"}, "mask_mode"),
     ({"input_samples": 0, "mask_mode": "batch"}, "input_samples"), ({"input_samples": 8}, "input_samples .*mask_mode")],
)
def test_bad_pruner_settings_name_the_field(setup, kwargs, field):
    model, groups, _ = setup
    with pytest.raises(ValueError, match=field):
        pnp.PrunerNetwork(model, groups, **kwargs)


def test_remeasured_norm_statistics_are_the_cut_models_own(setup, randomize_norms):
    from pnp.core.surgery import remeasure_norm_statistics

    model, groups, x = setup
    randomize_norms(model)
    keep = {g.name: torch.arange(g.size) % 2 == 0 for g in groups}
    cut = pnp.apply_surgery(copy.deepcopy(model), groups, keep, x, verify=False).eval()
    batches = [torch.randn(6, 3, 12, 12) for _ in range(3)]
    assert remeasure_norm_statistics(cut, iter(batches)) == 3
    # the first BatchNorm's running statistics are now those of what the cut convolution gives on these images
    with torch.no_grad():
        seen = [cut[0](b) for b in batches]
    torch.testing.assert_close(cut[1].running_mean, torch.cat(seen).mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cut[1].running_var, torch.stack([s.var((0, 2, 3)) for s in seen]).mean(0),
                               rtol=1e-4, atol=1e-5)
    assert cut[1].momentum == 0.1 and not cut.training  # settings and mode as they were
    with torch.no_grad():
        torch.testing.assert_close(cut(batches[0]), cut.eval()(batches[0]))
    assert remeasure_norm_statistics(nn.Sequential(nn.Linear(3, 2)), iter(batches)) == 0  # nothing to measure
