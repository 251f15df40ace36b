"""A quick part of the model-coverage zoo (benchmarks/model_coverage.py runs all of it): every group offered is exact.

Each model is untrained, with random norm statistics, biases and scales; half of every group is cut at
random and the pruned model must compute what the gated original computes, and save
and reload to the same outputs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("timm")

from pnp.core.artifacts import load_pruned, save_pruned  # noqa: E402
from pnp.core.builders import build_model  # noqa: E402
from pnp.core.groups import find_channel_groups  # noqa: E402
from pnp.core.surgery import apply_surgery  # noqa: E402
from test_torchvision_models import random_keep  # noqa: E402

# one of each structure the full zoo covers, picked for speed (one to a few seconds each at 64 px)
QUICK_ZOO = {
    "dla34": "aggregation trees (concatenations of many levels)",
    "regnety_002": "grouped convolutions with squeeze-excitation",
    "repvgg_a0": "re-parameterisable branches with identity BatchNorm",
    "lcnet_050": "depthwise-separable blocks",
    "convnext_atto": "channels-last blocks: permute, Linear, per-channel scale",
    "pvt_v2_b0": "tokens laid back out as maps for a depthwise convolution",
    "mobilevit_xxs": "convolutions and attention heads in one network",
    "efficientvit_b0": "linear attention with multi-scale aggregation",
    "mixnet_s": "inputs split into fixed-size sections, one convolution each (split sizes the module holds)",
    "ghostnet_100": "a map and its depthwise copy concatenated, then sliced (channels tied in pairs)",
}
# CNNs of which pnp prunes every group but the classifier's
WHOLLY_PRUNABLE = {"dla34", "regnety_002", "repvgg_a0", "lcnet_050", "mixnet_s", "ghostnet_100"}


@pytest.mark.parametrize("name", list(QUICK_ZOO))
def test_every_offered_group_cuts_exactly_and_reloads(name, randomize_norms, gated_output, tmp_path):
    kwargs = {"in_channels": 3, "num_classes": 10, "input_size": 64}
    torch.manual_seed(0)
    model = randomize_norms(build_model(f"timm:{name}", **kwargs).eval(), seed=1)
    with torch.no_grad():  # zero biases and 1e-6 layer scales at init would hide a channel mix-up
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    groups = find_channel_groups(model, x, prove=True)
    assert len(groups) > 0, groups.excluded
    if name in WHOLLY_PRUNABLE:
        assert all("model's output" in why for why in groups.excluded.values()), groups.excluded
    keep = random_keep(groups, seed=0, low=0.3, high=0.7)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legalize_keep's notes on grouped convolutions
        pruned = apply_surgery(model, groups, keep, x, verify=True).eval()

    expected = gated_output(model, groups, keep, x)
    with torch.no_grad():
        actual = pruned(x)
    scale = float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= 1e-4 * scale, name
    save_pruned(pruned, tmp_path / name, builder=f"timm:{name}", builder_kwargs=kwargs)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / name)(x), actual)


def test_weight_standardised_nf_resnet_is_refused_with_the_reason_naming_its_layers():
    """NF-ResNet's ScaledStdConv2d normalises each output channel's weights over its inputs: cutting inputs is inexact."""
    model = build_model("timm:nf_resnet26", in_channels=3, num_classes=10, input_size=64).eval()
    groups = find_channel_groups(model, torch.randn(2, 3, 64, 64))
    assert len(groups) == 0
    why = groups.excluded["stages.0.0.conv1"]
    assert "weight standardisation" in why and "'stages.0.0.conv2' (ScaledStdConv2d)" in why, why
    assert not any("shuffle" in reason for reason in groups.excluded.values())
