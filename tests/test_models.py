"""pnp's model zoo: right output shapes, and every model survives one-shot surgery exactly."""

import pytest
import torch

from pnp.core.builders import build_model, registered_builders
from pnp.core.groups import find_channel_groups, keep_from_ratio
from pnp.core.surgery import apply_surgery

MODELS = ["lenet5", "vgg16_bn", "resnet20", "resnet56", "mobilenetv2"]


@pytest.mark.parametrize("name", MODELS)
def test_registered_as_pnp_builder(name):
    assert f"pnp:{name}" in registered_builders()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_channels,size,classes", [(1, 28, 10), (3, 32, 100)])
def test_output_shape(name, in_channels, size, classes):
    model = build_model(f"pnp:{name}", in_channels=in_channels, num_classes=classes, input_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(3, in_channels, size, size))
    assert out.shape == (3, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_half_the_channels_removed_and_outputs_match(name, randomize_norms):
    torch.manual_seed(0)
    model = randomize_norms(build_model(f"pnp:{name}", num_classes=10))  # BN shifts that must go with their channels
    x = torch.randn(2, 1, 28, 28)
    groups = find_channel_groups(model, x)
    assert len(groups) >= 3
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))
    pruned = apply_surgery(model, groups, keep, verify=True)  # raises if outputs differ from the gated original
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(pruned) < 0.5 * params(model)
    assert pruned.eval()(x).shape == (2, 10)


def test_resnet_residual_channels_are_pruned_together():
    model = build_model("pnp:resnet20")
    groups = find_channel_groups(model, torch.randn(2, 1, 28, 28))
    # option-B shortcut: the projection and the block's last conv feed one add
    stage2 = next(g for g in groups if "layer2.0.shortcut.0" in g.producers)
    assert {"layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2"} <= set(stage2.producers)
    # the first stage keeps identity shortcuts, so the stem is coupled to every block output
    stage1 = next(g for g in groups if "conv1" in g.producers)
    assert "layer1.2.conv2" in stage1.producers


def test_vgg_works_on_small_inputs_and_rejects_bad_arguments():
    model = build_model("pnp:vgg16_bn", input_size=16).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="num_classes=0"):
        build_model("pnp:lenet5", num_classes=0)
    with pytest.raises(ValueError, match="input_size=8"):
        build_model("pnp:lenet5", input_size=8)


def test_mobilenetv2_cifar_form_downsamples_three_times_and_is_cut_exactly(randomize_norms, gated_output):
    from pnp.core.cost import CostModel, count_flops_params
    from pnp.core.groups import legalize_keep

    torch.manual_seed(0)
    model = randomize_norms(build_model("pnp:mobilenetv2", num_classes=10)).eval()
    with torch.no_grad():
        assert model.blocks(model.stem(torch.randn(1, 1, 32, 32))).shape[-2:] == (4, 4)  # stem and stage 2 at stride 1
    x = torch.randn(2, 1, 28, 28)
    groups = find_channel_groups(model, x)
    assert set(groups.excluded) == {"fc"}  # only the classifier's outputs are left out
    # a block's expansion, depthwise conv and their norms lose the same channels
    expanded = next(g for g in groups if "blocks.3.conv.3" in g.producers)
    assert {"blocks.3.conv.0", "blocks.3.conv.1", "blocks.3.conv.4"} <= set(expanded.producers)
    # residual adds tie each stage's block outputs together
    stage = next(g for g in groups if "blocks.1.conv.6" in g.producers)
    assert "blocks.2.conv.6" in stage.producers

    gen = torch.Generator().manual_seed(1)
    keep = {g.name: torch.rand(g.size, generator=gen) < 0.6 for g in groups}
    keep, _ = legalize_keep(groups, keep)
    pruned = apply_surgery(model, groups, keep, x, verify=True)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), gated_output(model, groups, keep, x), rtol=1e-3, atol=1e-4)
    depthwise = pruned.blocks[3].conv[3]
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == int(keep[expanded.name].sum())
    assert float(CostModel(groups).flops(keep)) == pytest.approx(count_flops_params(pruned, x).flops, rel=1e-3)
