"""Pruned-model artifacts: save_pruned writes a directory that load_pruned rebuilds without tracing."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision
from safetensors import safe_open

from pnp.core.artifacts import ArtifactError, load_pruned, save_pruned
from pnp.core.builders import register_builder
from pnp.core.groups import find_channel_groups, keep_from_ratio
from pnp.core.surgery import apply_surgery

RESNET = {"builder": "torchvision:resnet18", "builder_kwargs": {"num_classes": 10}}


def prune(model: nn.Module, x: torch.Tensor, seed: int, groups=None) -> nn.Module:
    groups = find_channel_groups(model, x) if groups is None else groups
    keep = keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legalize_keep's notes on grouped convolutions
        return apply_surgery(model, groups, keep, x).eval()


class GroupedConvNet(nn.Module):
    """A grouped (not depthwise) convolution between prunable layers."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(
            nn.Conv2d(16, 12, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, num_classes)
        )

    def forward(self, x):
        return self.head(self.grouped(self.stem(x)))


class TiedNet(nn.Module):
    """Two layers sharing one weight tensor."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(6, 6)
        self.decode = nn.Linear(6, 6)
        self.decode.weight = self.encode.weight

    def forward(self, x):
        return self.decode(torch.relu(self.encode(x)))


register_builder("test-serialization-grouped")(GroupedConvNet)
register_builder("test-serialization-tied")(TiedNet)


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet(x):
    """The original resnet18, its channel groups, and a randomly pruned copy."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    groups = find_channel_groups(model, x)
    return model, groups, prune(model, x, seed=0, groups=groups)


@pytest.fixture(scope="module")
def artifact(resnet, tmp_path_factory):
    """A saved pruned resnet18; tests that change it work on a copy (see ``copy_of``)."""
    directory = tmp_path_factory.mktemp("saved") / "resnet18-pruned"
    save_pruned(resnet[2], directory, metadata={"keep_ratio": 0.5, "tags": ["cifar10"]}, **RESNET)
    return directory


@pytest.fixture
def copy_of(artifact, tmp_path):
    target = tmp_path / "artifact"
    shutil.copytree(artifact, target)
    return target


def load_without_tracing(directory: Path, **kwargs) -> nn.Module:
    """load_pruned, with torch-pruning's graph builder made to fail: loading must not trace."""

    def refuse(*args, **kwargs):
        raise AssertionError("load_pruned traced the model")

    with mock.patch.object(tp.DependencyGraph, "build_dependency", refuse):
        return load_pruned(directory, **kwargs)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def edit_channels(directory: Path, change) -> None:
    path = directory / "channels.json"
    channels = json.loads(path.read_text())
    change(channels)
    path.write_text(json.dumps(channels))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_resnet18_reloads_with_identical_outputs(resnet, x, seed, tmp_path):
    original, groups, _ = resnet
    pruned = prune(original, x, seed=seed, groups=groups)
    save_pruned(pruned, tmp_path / "model", **RESNET)

    loaded = load_without_tracing(tmp_path / "model")

    assert not loaded.training
    batch = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
        assert torch.equal(loaded(batch), pruned(batch))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    assert loaded.layer1[0].conv1.out_channels == pruned.layer1[0].conv1.out_channels < 64
    assert loaded.fc.in_features == pruned.fc.in_features < 512
    assert loaded.pnp_channel_spec == pruned.pnp_channel_spec


def test_mobilenet_v2_with_depthwise_convolutions_reloads_with_identical_outputs(x, tmp_path):
    original = torchvision.models.mobilenet_v2(num_classes=10).eval()
    pruned = prune(original, x, seed=2)
    depthwise = pruned.features[2].conv[1][0]
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels < 96
    save_pruned(pruned, tmp_path / "model", builder="torchvision:mobilenet_v2", builder_kwargs={"num_classes": 10})

    loaded = load_without_tracing(tmp_path / "model")

    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    reloaded = loaded.features[2].conv[1][0]
    assert (reloaded.groups, reloaded.in_channels, reloaded.out_channels) == (depthwise.groups,) * 3


def test_grouped_convolution_keeps_its_blocks_after_reload(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    pruned = prune(GroupedConvNet().eval(), x, seed=0)
    save_pruned(pruned, tmp_path / "model", builder="pnp:test-serialization-grouped")

    loaded = load_without_tracing(tmp_path / "model")

    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert loaded.grouped[0].weight.shape == pruned.grouped[0].weight.shape
    assert loaded.grouped[0].groups == 2


def test_load_returns_metadata_and_the_channel_spec(artifact, resnet):
    loaded = load_pruned(artifact)
    assert loaded.pnp_metadata == {"keep_ratio": 0.5, "tags": ["cifar10"]}
    assert loaded.pnp_channel_spec == resnet[2].pnp_channel_spec


def test_unpruned_model_with_tied_weights_round_trips_and_stores_them_once(tmp_path):
    model = TiedNet()
    assert not hasattr(model, "pnp_channel_spec")
    save_pruned(model, tmp_path / "model", builder="pnp:test-serialization-tied")

    with safe_open(str(tmp_path / "model" / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    loaded = load_pruned(tmp_path / "model")

    assert "encode.weight" in stored and "decode.weight" not in stored
    assert json.loads((tmp_path / "model" / "channels.json").read_text())["modules"] == {}
    assert loaded.decode.weight is loaded.encode.weight
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_half_precision_model_comes_back_in_half_precision(resnet, tmp_path):
    pruned = resnet[2]
    half = copy.deepcopy(pruned).half()
    save_pruned(half, tmp_path / "model", **RESNET)

    loaded = load_pruned(tmp_path / "model")

    assert loaded.conv1.weight.dtype == torch.float16
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), half.state_dict().values()))


def test_saved_files_are_readable_by_others_like_any_new_file(artifact):
    channels_mode = (artifact / "channels.json").stat().st_mode & 0o777
    assert (artifact / "model.safetensors").stat().st_mode & 0o777 == channels_mode


# ---------------------------------------------------------------- channels.json


def test_channels_json_records_kept_channels_under_original_names(artifact, resnet):
    original, _, pruned = resnet
    channels = json.loads((artifact / "channels.json").read_text())
    spec = pruned.pnp_channel_spec

    assert channels["format"] == "pnp.pruned/1"
    assert channels["builder"] == "torchvision:resnet18"
    assert channels["builder_kwargs"] == {"num_classes": 10}
    assert set(channels["modules"]) == set(spec.modules)
    assert set(channels["modules"]) <= set(dict(original.named_modules()))
    conv = channels["modules"]["layer1.0.conv1"]
    assert conv["kept_out"] == spec.modules["layer1.0.conv1"]["kept_out"]
    assert conv["out_channels"] == pruned.layer1[0].conv1.out_channels == len(conv["kept_out"])
    assert channels["modules"]["fc"] == {"kept_in": spec.modules["fc"]["kept_in"], "in_channels": pruned.fc.in_features}
    assert channels["groups"] == spec.groups
    assert channels["group_sizes"] == spec.group_sizes
    assert channels["metadata"] == {"keep_ratio": 0.5, "tags": ["cifar10"]}


# ---------------------------------------------------------------- errors when loading


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist") as err:
        load_pruned(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)


def test_missing_channels_json_is_named(copy_of):
    (copy_of / "channels.json").unlink()
    with pytest.raises(ArtifactError, match=r"channels\.json is missing"):
        load_pruned(copy_of)


def test_channels_json_that_is_not_json_is_named(copy_of):
    (copy_of / "channels.json").write_text('{"format": "pnp.pruned/1", "modules": {')
    with pytest.raises(ArtifactError, match=r"channels\.json .*is not valid JSON"):
        load_pruned(copy_of)


@pytest.mark.parametrize(
    "fmt, advice",
    [("keras.h5", "not written by"), ("pnp.pruned/2", "upgrade pnp"), (None, "not written by")],
)
def test_unknown_format_is_named_with_its_value(copy_of, fmt, advice):
    edit_channels(copy_of, lambda c: c.update(format=fmt))
    with pytest.raises(ArtifactError, match="format") as err:
        load_pruned(copy_of)
    assert repr(fmt) in str(err.value) and advice in str(err.value)


def test_missing_builder_says_to_pass_one_and_passing_it_loads(resnet, x, tmp_path):
    pruned = resnet[2]
    save_pruned(pruned, tmp_path / "model")  # no builder recorded

    with pytest.raises(ArtifactError, match=r"no builder.*builder="):
        load_pruned(tmp_path / "model")
    loaded = load_pruned(tmp_path / "model", **RESNET)

    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_missing_weights_file_is_named(copy_of):
    (copy_of / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"model\.safetensors is missing"):
        load_pruned(copy_of)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_file_is_named(copy_of, damage):
    path = copy_of / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64 + data[64:])
    with pytest.raises(ArtifactError, match=r"model\.safetensors .*corrupt or truncated"):
        load_pruned(copy_of)


def test_module_missing_from_the_built_model_is_named(copy_of):
    edit_channels(copy_of, lambda c: c["modules"].update({"layer1.0.conv9": c["modules"].pop("layer1.0.conv1")}))
    with pytest.raises(ArtifactError, match=r"modules\['layer1\.0\.conv9'\]: .* has no module 'layer1\.0\.conv9'"):
        load_pruned(copy_of)


def test_kept_index_out_of_range_is_named_with_field_and_value(copy_of):
    edit_channels(copy_of, lambda c: c["modules"]["layer1.0.conv1"]["kept_out"].append(999))
    with pytest.raises(ArtifactError) as err:
        load_pruned(copy_of)
    message = str(err.value)
    assert "modules['layer1.0.conv1'].kept_out" in message and "999" in message and "0..63" in message


def test_kept_indices_that_are_not_a_list_of_ints_are_named(copy_of):
    edit_channels(copy_of, lambda c: c["modules"]["bn1"].update(kept_out="all"))
    with pytest.raises(ArtifactError, match=r"modules\['bn1'\]\.kept_out is 'all', not a list of channel indices"):
        load_pruned(copy_of)


def test_weight_shapes_that_do_not_match_are_named(artifact):
    # builder_kwargs given to load_pruned override the saved ones: a 5-class head no longer fits
    with pytest.raises(ArtifactError) as err:
        load_pruned(artifact, builder_kwargs={"num_classes": 5})
    message = str(err.value)
    assert "model.safetensors" in message and "'fc.weight'" in message
    assert "(10, 256)" in message and "(5, 256)" in message


def test_builder_that_cannot_build_is_named(artifact):
    with pytest.raises(ArtifactError, match=r"torchvision:resnet999"):
        load_pruned(artifact, builder="torchvision:resnet999")


# ---------------------------------------------------------------- errors and safety when saving


def test_existing_artifact_is_not_overwritten_without_overwrite(artifact, resnet, x):
    before = snapshot(artifact)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(resnet[0], artifact, **RESNET)
    assert snapshot(artifact) == before
    assert leftovers(artifact.parent) == []
    with torch.no_grad():
        assert torch.equal(load_pruned(artifact)(x), resnet[2](x))


def test_overwrite_replaces_the_artifact(copy_of, resnet, x):
    original, groups, _ = resnet
    other = prune(original, x, seed=5, groups=groups)

    save_pruned(other, copy_of, overwrite=True, **RESNET)

    with torch.no_grad():
        assert torch.equal(load_pruned(copy_of)(x), other(x))
    assert leftovers(copy_of.parent) == []


def test_overwrite_refuses_a_directory_that_is_not_an_artifact(tmp_path, resnet):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.log").write_text("epoch 1")
    with pytest.raises(FileExistsError, match=r"no channels\.json"):
        save_pruned(resnet[2], tmp_path / "run", overwrite=True, **RESNET)
    assert snapshot(tmp_path / "run") == {"train.log": b"epoch 1"}


def test_save_into_an_existing_empty_directory(tmp_path, resnet, x):
    (tmp_path / "empty").mkdir()
    save_pruned(resnet[2], tmp_path / "empty", **RESNET)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "empty")(x), resnet[2](x))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"metadata": {"stats": {"mean": torch.tensor(0.5)}}}, "metadata['stats']['mean'] is a Tensor"),
        ({"metadata": {"loss": float("nan")}}, "metadata['loss'] is nan"),
        ({"metadata": {1: "epoch"}}, "metadata has the key 1"),
        ({"builder_kwargs": {"norm_layer": nn.BatchNorm2d}}, "builder_kwargs['norm_layer'] is a type"),
    ],
)
def test_failed_save_names_the_field_and_leaves_the_old_artifact_intact(copy_of, resnet, kwargs, field):
    before = snapshot(copy_of)
    arguments = {**RESNET, **kwargs}
    with pytest.raises(ArtifactError) as err:
        save_pruned(resnet[2], copy_of, overwrite=True, **arguments)
    assert field in str(err.value)
    assert snapshot(copy_of) == before
    assert leftovers(copy_of.parent) == []


def test_failure_while_writing_leaves_the_old_artifact_intact(copy_of, resnet, monkeypatch):
    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pnp.core.artifacts.save_file", disk_full)
    before = snapshot(copy_of)
    with pytest.raises(OSError, match="No space left"):
        save_pruned(resnet[2], copy_of, overwrite=True, **RESNET)
    assert snapshot(copy_of) == before
    assert leftovers(copy_of.parent) == []


def test_spec_that_does_not_describe_the_model_is_refused(resnet, tmp_path):
    original, _, pruned = resnet
    with pytest.raises(ArtifactError, match=r"spec\.modules\['bn1'\]\.kept_out keeps \d+ channels, but the layer has 64"):
        save_pruned(original, tmp_path / "model", spec=pruned.pnp_channel_spec, **RESNET)
    assert not (tmp_path / "model").exists()


def test_an_artifact_cannot_make_pnp_run_code(tmp_path):
    """channels.json may name any 'module:function'; pnp refuses to import one a file names unless allowed."""
    import json

    from pnp.core.builders import allow_builder

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    directory = save_pruned(model, tmp_path / "model", builder="torchvision:resnet18", overwrite=True)
    marker = tmp_path / "ran"
    channels = json.loads((directory / "channels.json").read_text())
    channels.update(builder="os:system", builder_kwargs={"command": f"touch {marker}"})
    (directory / "channels.json").write_text(json.dumps(channels))
    with pytest.raises(ArtifactError, match="'os:system', which is not on pnp's allow-list"):
        load_pruned(directory)
    assert not marker.exists()

    # a builder the caller names, or one allowed in code, is the caller's say-so
    channels.update(builder="test_serialization:small_linear", builder_kwargs={})
    (directory / "channels.json").write_text(json.dumps(channels))
    with pytest.raises(ArtifactError, match="not on pnp's allow-list"):
        load_pruned(directory)
    assert isinstance(load_pruned(directory, trust_builder=True), torch.nn.Sequential)
    allow_builder("test_serialization:small_linear")
    assert isinstance(load_pruned(directory), torch.nn.Sequential)


def small_linear():
    return torch.nn.Sequential(torch.nn.Linear(3, 2))


# ---------------------------------------------------------------- state-dict metadata


@pytest.fixture
def mnasnet_artifact(x, tmp_path):
    """A pruned mnasnet0_5, whose _load_from_state_dict refuses weights without the module's version."""
    pruned = prune(torchvision.models.mnasnet0_5(num_classes=10).eval(), x, seed=0)
    directory = save_pruned(pruned, tmp_path / "model", builder="torchvision:mnasnet0_5", builder_kwargs={"num_classes": 10})
    return pruned, directory


def test_module_versions_of_the_state_dict_survive_the_round_trip(mnasnet_artifact, x):
    pruned, directory = mnasnet_artifact
    stored = json.loads((directory / "channels.json").read_text())["state_dict_metadata"]
    assert stored == {prefix: dict(entry) for prefix, entry in pruned.state_dict()._metadata.items()}
    assert stored[""]["version"] == 2

    loaded = load_without_tracing(directory)

    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    # the stored version, not the rebuilt model's, is what the modules are loaded with
    edit_channels(directory, lambda channels: channels["state_dict_metadata"][""].update(version=3))
    with pytest.raises(ValueError, match="version should be set to 1 or 2 instead of 3"):
        load_pruned(directory)


def test_artifact_saved_without_module_versions_loads_with_the_models_own(mnasnet_artifact, x):
    pruned, directory = mnasnet_artifact
    edit_channels(directory, lambda channels: channels.pop("state_dict_metadata"))  # as pnp wrote before keeping them

    loaded = load_pruned(directory)

    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
