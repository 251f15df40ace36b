"""Bad keep decisions get clear errors, and surgery never changes the original."""

from __future__ import annotations

import math

import pytest
import torch

from pnp.core.gating import GatedModel
from pnp.core.groups import check_keep_ratio, find_channel_groups, keep_from_ratio
from pnp.core.surgery import SurgeryMismatchError, apply_surgery, verify_surgery


@pytest.fixture
def case(small_cnn):
    model, x = small_cnn
    groups = find_channel_groups(model, x)
    assert groups.names == ["conv1", "conv2", "head"]  # network order; the tests below rely on it
    return model, groups, x


def test_unknown_group_name_is_named_with_a_suggestion(case):
    model, groups, x = case
    with pytest.raises(KeyError, match=r"unknown group name 'conv_1'.*did you mean 'conv1'"):
        apply_surgery(model, groups, {"conv_1": torch.ones(12, dtype=torch.bool)}, x)
    with pytest.raises(KeyError, match=r"unknown group name 'conv_1'"):
        GatedModel(model, groups)(x, masks={"conv_1": torch.ones(12)})


def test_left_out_group_name_says_why_it_was_left_out(case):
    model, groups, x = case
    with pytest.raises(KeyError, match=r"'fc' \(it was left out: its channels are the model's output"):
        apply_surgery(model, groups, {"fc": torch.ones(5, dtype=torch.bool)}, x)


def test_wrong_mask_length_names_group_and_expected_length(case):
    model, groups, x = case
    with pytest.raises(ValueError, match=r"keep\['conv1'\] has shape \(8,\), but group 'conv1' has 12 channels"):
        apply_surgery(model, groups, {"conv1": torch.ones(8, dtype=torch.bool)}, x)
    with pytest.raises(ValueError, match=r"mask for group 'conv1' has shape \(8,\); expected \[12\] or \[batch, 12\]"):
        GatedModel(model, groups)(x, masks={"conv1": torch.ones(8)})


def test_dropping_every_channel_of_a_group_is_refused(case):
    model, groups, x = case
    with pytest.raises(ValueError, match=r"keep\['conv2'\] drops all 8 channels"):
        apply_surgery(model, groups, {"conv2": torch.zeros(8, dtype=torch.bool)}, x)


def test_keep_that_is_not_a_mapping_is_refused(case):
    model, groups, x = case
    with pytest.raises(TypeError, match="keep must map group names"):
        apply_surgery(model, groups, [torch.ones(12, dtype=torch.bool)], x)


@pytest.mark.parametrize("ratio", [0.0, -0.2, 1.7, math.nan])
def test_keep_ratio_outside_zero_one_is_refused_with_its_value(case, ratio):
    _, groups, _ = case
    with pytest.raises(ValueError, match=rf"keep ratio {ratio} is outside \(0, 1\]"):
        keep_from_ratio(groups, ratio)
    with pytest.raises(ValueError, match=r"budget .* is outside \(0, 1\]"):
        check_keep_ratio(ratio, "budget")


def test_keep_ratio_that_is_not_a_number_is_refused():
    with pytest.raises(ValueError, match=r"keep ratio 'half' is not a number"):
        check_keep_ratio("half")


@pytest.mark.parametrize("ratio", [1e-6, 0.5, 1.0])
def test_keep_from_ratio_keeps_that_fraction_and_at_least_one_channel(case, ratio):
    _, groups, _ = case
    assert check_keep_ratio(ratio) == ratio
    keep = keep_from_ratio(groups, ratio, generator=torch.Generator().manual_seed(0))
    for g in groups:
        assert int(keep[g.name].sum()) == max(1, round(g.size * ratio))


def test_surgery_leaves_the_original_model_untouched(case):
    model, groups, x = case
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))

    pruned = apply_surgery(model, groups, keep, x, verify=True)

    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert model.training and not any(m is p for m in model.modules() for p in pruned.modules())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    assert (model.conv1.out_channels, model.head.out_channels) == (12, 16)
    assert not hasattr(model, "pnp_channel_spec")


@pytest.mark.parametrize(
    "layer, corrupt",
    [
        ("conv1", lambda m: m.conv1.weight.data.add_(0.5)),
        ("bn2", lambda m: m.bn2.running_mean.add_(1.0)),
        ("head", lambda m: m.head.bias.data.add_(1.0)),
    ],
)
def test_mismatch_error_names_the_first_corrupted_layer(case, layer, corrupt):
    model, groups, x = case
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))
    pruned = apply_surgery(model, groups, keep, x, verify=True)
    assert verify_surgery(model, pruned, groups, keep, x) < 1e-4
    corrupt(pruned)
    with pytest.raises(SurgeryMismatchError, match=rf"first at layer '{layer}'"):
        verify_surgery(model, pruned, groups, keep, x)


def test_mismatch_error_when_a_layer_kept_the_wrong_channels(case):
    model, groups, x = case
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))
    pruned = apply_surgery(model, groups, keep, x)
    other = {name: k.roll(1) for name, k in keep.items()}  # same counts, other channels
    with pytest.raises(SurgeryMismatchError, match=r"first at layer '"):
        verify_surgery(model, pruned, groups, other, x)


@pytest.mark.parametrize("values", [[0.9, 0.2], [float("nan"), 1.0]])
def test_probabilities_are_not_keep_decisions(case, values):
    model, groups, x = case
    keep = torch.ones(12)
    keep[:2] = torch.tensor(values)
    with pytest.raises(ValueError, match=r"keep\['conv1'\] holds .*: keep decisions are booleans \(or exactly 0/1\)"):
        apply_surgery(model, groups, {"conv1": keep}, x)
    keep01 = torch.ones(12)
    keep01[:4] = 0.0  # exactly 0/1 floats are decisions
    assert apply_surgery(model, groups, {"conv1": keep01}, x).pnp_channel_spec.groups["conv1"] == list(range(4, 12))
