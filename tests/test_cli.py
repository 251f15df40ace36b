"""The pnp-* commands reject bad input before any work, naming the field and the value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from pnp.cli.config import ConfigError, InputError
from pnp.cli.main import run
from pnp.core.artifacts import save_pruned
from pnp.core.builders import build_model
from test_pipeline import compose_config, quick_overrides, write_fashion_mnist

LENET = {"in_channels": 1, "num_classes": 10, "input_size": 28}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("data") / "fashion", n_train=300, n_test=50)


@pytest.fixture(scope="module")
def lenet_dir(tmp_path_factory):
    """A saved (untrained) LeNet-5, as pnp-train leaves it in <run>/model."""
    run_dir = tmp_path_factory.mktemp("lenet_run")
    save_pruned(build_model("pnp:lenet5", **LENET), run_dir / "model", builder="pnp:lenet5", builder_kwargs=LENET)
    return run_dir


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("pruner.sparsity_weight=-1", "pruner.sparsity_weight", "-1.0"),
        ("pruner.sparsity=latency", "pruner.sparsity", "'latency'"),
        ("readout.threshold=1.5", "readout.threshold", "1.5"),
        ("readout.budget=0", "readout.budget", "0.0"),
        ("inherit.choice=best", "inherit.choice", "'best'"),
        ("inherit.candidates=[learned,l7]", "inherit.candidates[1]", "'l7'"),
        ("inherit.widths_from=[magnitude,l9]", "inherit.widths_from[1]", "'l9'"),
        ("inherit.steps=0", "inherit.steps", "0"),
        ("inherit.kd_weight=-1", "inherit.kd_weight", "-1.0"),
        ("pruner.input_samples=0", "pruner.input_samples", "0"),
        ("pruner.norm_stats=moving", "pruner.norm_stats", "'moving'"),
        ("norm_samples=-1", "norm_samples", "-1"),
        ("trainer.devices=0", "trainer.devices", "0"),
        ("trainer.precision=8", "trainer.precision", "'8'"),
        ("train.optimizer=lbfgs", "train.optimizer", "'lbfgs'"),
        ("finetune.momentum=1.0", "finetune.momentum", "1.0"),
        ("train.warmup_epochs=-1", "train.warmup_epochs", "-1.0"),
        ("finetune.warmup_epochs=99", "finetune.warmup_epochs", "99.0"),
        ("pruner.budget_warmup=1.0", "pruner.budget_warmup", "1.0"),
        ("data.name=mnist", "data.name", "'mnist'"),
        ("model.builder=pnp:lenet7", "model.builder", "'pnp:lenet7'"),
    ],
)
def test_bad_value_error_names_field_and_value(tmp_path, data_root, override, field, value):
    cfg = compose_config("pipeline", quick_overrides(data_root, tmp_path / "run") + [override])
    with pytest.raises(ConfigError) as info:
        run("pipeline", cfg, tmp_path / "run")
    assert str(info.value).startswith(f"{field}={value}:")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, full_key",
    [("pruner.sparsity_weigt=1", "pruner.sparsity_weigt"), ("train.epochs=1.5", "train.epochs"), ("data.augment=maybe", "data.augment")],
)
def test_unknown_key_or_wrong_type_is_rejected_while_composing(tmp_path, override, full_key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("pipeline", [f"out_dir={tmp_path}", override])
    assert f"full_key: {full_key}" in str(info.value.__cause__)


def test_command_line_rejects_bad_data_root_and_leaves_out_dir_untouched(tmp_path):
    out = tmp_path / "run"
    (out / "train").mkdir(parents=True)
    (out / "report.json").write_text('{"status": "done"}\n')
    (out / "train" / "stage.json").write_text('{"stage": "train", "config": {}}\n')
    before = snapshot(out)
    missing = tmp_path / "no_such_dir"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "pipeline.py"), f"data.root={missing}", f"out_dir={out}"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"pnp-pipeline: error: data.root='{missing}': the dataset directory does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "train"]


def test_command_line_names_an_unknown_key(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), "train.epocs=3", f"out_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2  # bad input, like every config error
    assert "full_key: train.epocs" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_data_value_the_dataset_cannot_meet(tmp_path, data_root):
    cfg = compose_config("train", quick_overrides_for(data_root, tmp_path) + ["data.val_size=300"])
    with pytest.raises(InputError, match=r"^data\.val_size=300 leaves no training images"):
        run("train", cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_target_checkpoint(tmp_path, data_root):
    missing = tmp_path / "runs" / "nothing_here"
    cfg = compose_config("train_pruner", quick_overrides_for(data_root, tmp_path) + [f"target={missing}"])
    with pytest.raises(ConfigError, match=rf"^target='{missing}': the trained target .* does not exist"):
        run("train_pruner", cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_target_is_required(tmp_path, data_root):
    cfg = compose_config("prune", quick_overrides_for(data_root, tmp_path) + ["keep=x.json"])
    with pytest.raises(ConfigError, match=r"^target='\?\?\?': is required"):
        run("prune", cfg, tmp_path / "out")


def test_directory_without_a_saved_model_is_not_a_target(tmp_path, data_root):
    (tmp_path / "empty_run").mkdir()
    cfg = compose_config("train_pruner", quick_overrides_for(data_root, tmp_path) + [f"target={tmp_path / 'empty_run'}"])
    with pytest.raises(ConfigError, match=r"^target='.*empty_run': holds no saved model"):
        run("train_pruner", cfg, tmp_path / "out")


def test_saved_model_of_another_architecture(tmp_path, data_root, lenet_dir):
    cfg = compose_config("train_pruner", quick_overrides_for(data_root, tmp_path) + [f"target={lenet_dir}", "model=resnet20"])
    with pytest.raises(ConfigError) as info:
        run("train_pruner", cfg, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"target='{lenet_dir}':") and "model.builder='pnp:resnet20'" in message
    assert not (tmp_path / "out").exists()


def test_lightning_checkpoint_of_another_architecture(tmp_path, data_root):
    lenet = build_model("pnp:lenet5", **LENET)
    ckpt = tmp_path / "lenet.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in lenet.state_dict().items()}}, ckpt)
    cfg = compose_config("prune", quick_overrides_for(data_root, tmp_path) + [f"target={ckpt}", f"keep={ckpt}", "model=vgg16_bn"])
    with pytest.raises(ConfigError) as info:
        run("prune", cfg, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"target='{ckpt}': this checkpoint does not fit the model built by model.builder='pnp:vgg16_bn'")
    assert "shape" in message or "missing" in message


def test_matching_lightning_checkpoint_loads(tmp_path, data_root):
    """The same kind of file, with the right architecture, is accepted and its weights used."""
    from pnp.cli.loading import load_target

    lenet = build_model("pnp:lenet5", **LENET)
    ckpt = tmp_path / "lenet.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in lenet.state_dict().items()}}, ckpt)
    loaded = load_target("target", str(ckpt), "pnp:lenet5", LENET)
    assert all(torch.equal(a, b) for a, b in zip(lenet.state_dict().values(), loaded.state_dict().values()))


def test_checkpoint_that_needs_unpickling_code_is_refused(tmp_path, data_root):
    ckpt = tmp_path / "pickled.pt"
    torch.save({"model": build_model("pnp:lenet5", **LENET)}, ckpt)  # a whole module, not weights
    cfg = compose_config("train_pruner", quick_overrides_for(data_root, tmp_path) + [f"target={ckpt}"])
    with pytest.raises(ConfigError, match=r"^target='.*pickled\.pt': cannot be read as a weights-only torch checkpoint"):
        run("train_pruner", cfg, tmp_path / "out")


def test_keep_file_naming_an_unknown_group(tmp_path, data_root, lenet_dir):
    keep = tmp_path / "keep.json"
    keep.write_text('{"groups": {"features.9": [0, 1]}}')
    cfg = compose_config("prune", quick_overrides_for(data_root, tmp_path) + [f"target={lenet_dir}", f"keep={keep}"])
    with pytest.raises(ConfigError, match=r"^keep='.*keep\.json': unknown group name 'features\.9'"):
        run("prune", cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prune_from_given_keep_decisions(tmp_path, data_root, lenet_dir):
    """pnp-prune with keep=<json> cuts exactly the listed channels and writes a loadable model."""
    from pnp.core.artifacts import load_pruned

    keep = tmp_path / "keep.json"
    keep.write_text('{"groups": {"features.0": [0, 2, 4, 6], "features.3": [1, 3, 5, 7, 9, 11]}}')
    out = tmp_path / "out"
    cfg = compose_config("prune", quick_overrides_for(data_root, tmp_path) + [
        f"target={lenet_dir}", f"keep={keep}", "report.latency_batch_sizes=[1]", "report.latency_repeats=2"])
    report = run("prune", cfg, out)
    model = load_pruned(out / "model")
    assert model.pnp_channel_spec.groups["features.0"] == [0, 2, 4, 6]
    assert model.pnp_channel_spec.groups["features.3"] == [1, 3, 5, 7, 9, 11]
    assert report["after"]["flops"] < report["before"]["flops"]
    assert (out / "channels_per_layer.png").is_file() and (out / ".hydra" / "config.yaml").is_file()

    # the same command again: done, nothing rewritten; an edited keep file is a different input, refused
    from pnp.training.runs import StageConflictError

    before = snapshot(out)
    run("prune", cfg, out)
    assert snapshot(out) == before
    keep.write_text('{"groups": {"features.0": [0, 1, 2, 3], "features.3": [1, 3, 5, 7, 9, 11]}}')
    with pytest.raises(StageConflictError, match=r"keep\.content"):
        run("prune", cfg, out)
    assert snapshot(out) == before


def quick_overrides_for(data_root: Path, tmp_path: Path) -> list[str]:
    return [f"data.root={data_root}", f"out_dir={tmp_path / 'out'}", "data.val_size=50"]


def test_installed_wheel_carries_the_config_tree(tmp_path):
    """A non-editable install has no checkout beside it: its wheel must hold every config."""
    import zipfile

    import shutil

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(root / name, source / name)
    for name in ("pnp", "configs"):
        shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("pnp-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("pnp/configs/")}
    expected = {f"pnp/configs/{p.relative_to(root / 'configs').as_posix()}" for p in (root / "configs").rglob("*.yaml")}
    assert expected and expected <= shipped


def test_single_stage_commands_run_the_pipelines_recipe():
    """Every default is written once: each command composes the same settings as pnp-pipeline's stage."""
    from omegaconf import OmegaConf

    pipeline = compose_config("pipeline", [])
    budget = pipeline.readout.budget
    same = {
        "train": (compose_config("train", []), ("train", "trainer", "model", "data")),
        "train_pruner": (compose_config("train_pruner", ["target=x", f"readout.budget={budget}"]), ("pruner", "readout")),
        "prune": (compose_config("prune", ["target=x", f"readout.budget={budget}"]), ("readout", "inherit")),
        "finetune": (compose_config("finetune", ["pruned=x"]), ("finetune",)),
    }
    for command, (cfg, sections) in same.items():
        for section in sections:
            assert OmegaConf.to_container(cfg[section], resolve=True) == OmegaConf.to_container(pipeline[section], resolve=True), \
                (command, section)
    # the pruner learns at the budget the read-out cuts to, whichever it is
    assert compose_config("pipeline", ["readout.budget=0.3"]).pruner.budget == 0.3
