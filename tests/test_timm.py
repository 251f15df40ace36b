"""timm models as a builder source: built from pnp's data arguments, pruned exactly, saved and reloaded, named in configs."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

from pnp.cli.config import ConfigError, validate  # noqa: E402
from pnp.core.artifacts import load_pruned, save_pruned  # noqa: E402
from pnp.core.builders import build_model, builder_allowed, timm_preprocessing  # noqa: E402
from pnp.core.groups import find_channel_groups  # noqa: E402
from pnp.core.surgery import apply_surgery  # noqa: E402
from test_pipeline import compose_config  # noqa: E402
from test_torchvision_models import random_keep  # noqa: E402

# name -> what the data says (pnp's keyword arguments); every model is untrained
MODELS = {
    "resnet18": {"in_channels": 1, "num_classes": 10, "input_size": 32},
    "mobilenetv3_small_050": {"in_channels": 3, "num_classes": 10, "input_size": 32},
}


def built(name: str, randomize_norms, **kwargs):
    """``(model, groups, example input)`` for the timm model ``name``."""
    kwargs = {**MODELS[name], **kwargs}
    torch.manual_seed(0)
    model = randomize_norms(build_model(f"timm:{name}", **kwargs).eval(), seed=1)
    x = torch.randn(2, kwargs["in_channels"], 32, 32, generator=torch.Generator().manual_seed(2))
    return model, find_channel_groups(model, x), x


def test_builder_translates_pnp_data_arguments_to_timm(randomize_norms):
    resnet = build_model("timm:resnet18", in_channels=1, num_classes=7, input_size=28)
    assert resnet.conv1.in_channels == 1
    assert resnet.fc.out_features == 7  # num_classes resets timm's classifier

    # a ViT fixes its input size, so it takes the data's image side; a convnet pools any size
    vit = build_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=5, input_size=32)
    assert vit.patch_embed.img_size == (32, 32)
    with torch.no_grad():
        assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_builder_refuses_to_download_weights_and_conflicting_arguments():
    with pytest.raises(ValueError, match="untrained; leave out pretrained=True"):
        build_model("timm:resnet18", pretrained=True)
    with pytest.raises(ValueError, match="both in_channels= and timm's in_chans="):
        build_model("timm:resnet18", in_channels=1, in_chans=3)


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"builder 'timm:resnet19': timm has no model 'resnet19'; close names: resnet18"):
        build_model("timm:resnet19")


def test_timm_builders_are_on_the_artifact_allow_list():
    assert builder_allowed("timm:resnet18")


def test_preprocessing_comes_from_timm_pretrained_config():
    vit = timm_preprocessing("vit_tiny_patch16_224")
    assert vit["mean"] == vit["std"] == [0.5, 0.5, 0.5]
    assert vit["input_size"] == [3, 224, 224]
    assert timm_preprocessing("resnet18")["mean"] == pytest.approx([0.485, 0.456, 0.406])
    with pytest.raises(ValueError, match="timm has no model 'resnet19'"):
        timm_preprocessing("resnet19")


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_timm_model_matches_gated_model(name, randomize_norms, gated_output):
    model, groups, x = built(name, randomize_norms)
    assert len(groups) > 0, f"no prunable groups found; excluded: {groups.excluded}"
    assert all(re.search(r"model's output", why) for why in groups.excluded.values()), groups.excluded
    keep = random_keep(groups, seed=0, low=0.3, high=0.9)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legalize_keep's notes on grouped convolutions
        pruned = apply_surgery(model, groups, keep, x, verify=True)

    expected = gated_output(model, groups, keep, x)
    with torch.no_grad():
        actual = pruned(x)
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4 * max(1.0, float(expected.abs().max())))
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_pruned_timm_model_saves_and_reloads(randomize_norms, tmp_path):
    kwargs = MODELS["mobilenetv3_small_050"]
    model, groups, x = built("mobilenetv3_small_050", randomize_norms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = apply_surgery(model, groups, random_keep(groups, seed=1, low=0.3, high=0.9), x).eval()
    save_pruned(pruned, tmp_path / "model", builder="timm:mobilenetv3_small_050", builder_kwargs=kwargs,
                metadata={"preprocessing": timm_preprocessing("mobilenetv3_small_050")})

    loaded = load_pruned(tmp_path / "model")  # from the file's builder: timm is on the allow-list

    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert loaded.pnp_channel_spec == pruned.pnp_channel_spec
    assert loaded.pnp_metadata["preprocessing"]["input_size"] == [3, 224, 224]


def test_cli_config_builds_timm_model_for_the_data():
    cfg = compose_config("train", ["model=timm", "model.builder=timm:mobilenetv3_small_050"])
    validate(cfg, "train")
    cfg = compose_config("train", ["model=timm", "model.name=vit_tiny_patch16_224"])
    validate(cfg, "train")
    assert cfg.model.builder == "timm:vit_tiny_patch16_224"  # the builder follows model.name

    # what pnp.cli.stages.build_data passes for Fashion-MNIST's 1x28x28 images
    data = {"in_channels": 1, "num_classes": 10, "input_size": 28}
    vit = build_model(cfg.model.builder, **{k: data[k] for k in cfg.model.data_kwargs})
    with torch.no_grad():
        assert vit(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_cli_config_names_an_unknown_timm_model():
    cfg = compose_config("train", ["model=timm", "model.builder=timm:resnet19"])
    with pytest.raises(ConfigError, match=r"^model\.builder='timm:resnet19': timm has no model 'resnet19'; close names"):
        validate(cfg, "train")
