"""pnp-pipeline end to end on a tiny Fashion-MNIST-format set: outputs, reloading, resuming."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pnp.cli.config import config_dir, register_schemas
from pnp.cli.main import run
from pnp.training.runs import StageConflictError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_idx(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def write_fashion_mnist(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """The four Fashion-MNIST IDX files, with a faint class-dependent block over noise (learnable, not trivially)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 140, (n, 28, 28))
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 5)
            images[i, 4 + r * 12 : 12 + r * 12, 1 + col * 5 : 6 + col * 5] += 45
        write_idx(root / f"{part}-images-idx3-ubyte", images.clip(0, 255))
        write_idx(root / f"{part}-labels-idx1-ubyte", labels)
    return root


def compose_config(command: str, overrides: list[str]):
    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(command, overrides=overrides)


def quick_overrides(data_root: Path, out_dir: Path) -> list[str]:
    """One short epoch per stage on the tiny set."""
    return [
        f"data.root={data_root}",
        f"out_dir={out_dir}",
        "data.val_size=100",
        "data.batch_size=50",
        "train.epochs=1",
        "train.lr=0.05",
        "pruner.epochs=1",
        "pruner.min_steps=0",
        "pruner.calibration_samples=100",
        "finetune.epochs=1",
        "inherit.steps=3",
        "trainer.limit_train_batches=6",
        "trainer.enable_progress_bar=false",
        "report.latency_batch_sizes=[1]",
        "report.latency_repeats=2",
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    data_root = write_fashion_mnist(base / "fashion")
    out = base / "run"
    # 6 batches an epoch: the pruner's 1 epoch grows to exactly 9 optimizer steps, stopping part-way into a second
    overrides = [o for o in quick_overrides(data_root, out) if not o.startswith("pruner.min_steps")]
    overrides += ["finetune.kd_weight=0.5", "pruner.min_steps=9"]
    report = run("pipeline", compose_config("pipeline", overrides), out)
    return out, overrides, report


def _tensorboard_tags(directory: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in directory.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_pipeline_writes_report_plots_logs_and_config(finished_run):
    out, _, report = finished_run
    saved = json.loads((out / "report.json").read_text())
    assert saved["status"] == "done"
    for key in ("before", "pruned", "after"):
        summary = saved[key]
        assert 0.0 <= summary["accuracy"] <= 100.0
        assert summary["flops"] > 0 and summary["params"] > 0
        assert summary["latency"] and summary["latency"][0]["median_ms"] > 0
    assert saved["after"]["flops"] < saved["before"]["flops"]
    assert saved["after"]["params"] < saved["before"]["params"]
    assert set(saved["stages"]) == {"train", "train_pruner", "prune", "finetune"}
    assert all(s["time_s"] > 0 for s in saved["stages"].values())
    pruner = json.loads((out / "train_pruner" / "report.json").read_text())
    assert (pruner["epochs"], pruner["steps"]) == (2, 9)  # pruner.epochs=1, but exactly pruner.min_steps where more
    assert {"val/acc", "val/flops_kept"} <= set(pruner["metrics"])  # validated once it stopped, part-way into epoch 2
    assert pruner["input_samples"] == 32  # the batch's decision is made from its first 32 images
    signal = pruner["task_signal"]  # how much of the task the gated target still did when the pruner stopped
    assert signal["val_acc"] == pruner["metrics"]["val/acc"] and signal["chance"] == 10.0
    assert signal["low"] == (signal["val_acc"] < 32.5) and signal["adapting_target"] is False
    # and whether its masks pruned past the budget they learned at (the read-out's, with its warmup)
    assert signal["budget"] == 0.1 and signal["budget_warmup"] == 0.5  # the main job's readout.budget, and the default warmup
    assert signal["under_budget"] == (signal["flops_kept"] < 0.5 * signal["budget"])
    prune = json.loads((out / "prune" / "report.json").read_text())
    inherit = prune["inherit"]  # weights inherited as the look-ahead chose: at the learned widths, or magnitude's own
    assert set(inherit["lookahead_accuracy"]) == {"learned", "magnitude", "widths:magnitude"}
    assert inherit["choice"] == max(inherit["lookahead_accuracy"], key=inherit["lookahead_accuracy"].get)
    assert prune["readout"]["channels_kept"] == sum(prune["channels_kept"].values())
    if inherit["choice"] == "widths:magnitude":  # the read-out that was cut, with the pruner's beside it
        assert prune["readout"]["criterion"] == "magnitude" and "threshold" in prune["readout"]["learned"]
    else:
        assert "criterion" not in prune["readout"]

    for plot in ("channels_per_layer.png", "accuracy_vs_flops.png"):
        assert (out / plot).read_bytes()[:8] == PNG_MAGIC

    assert {"train/loss_epoch", "val/acc"} <= _tensorboard_tags(out / "train" / "tb")
    assert {"train/sparsity_loss_epoch", "train/flops_kept_epoch"} <= _tensorboard_tags(out / "train_pruner" / "tb")
    assert "train/kd_loss_epoch" in _tensorboard_tags(out / "finetune" / "tb")
    # unaugmented data: the teacher's logits were computed once, not at every step, and once for the run: the
    # look-ahead before the fine-tuning read them too, and the pass counts as the fine-tuning's time
    finetune = json.loads((out / "finetune" / "report.json").read_text())
    assert finetune["teacher_outputs"] == "computed once"
    shared = finetune["teacher_outputs_from"]
    assert shared["stage"] == "prune" and shared["seconds"] == prune["teacher_outputs_for_finetune_s"] > 0
    assert finetune["time_s"] > shared["seconds"]
    assert (out / "train" / "checkpoints" / "last.ckpt").is_file()

    resolved = OmegaConf.load(out / ".hydra" / "config.yaml")
    assert resolved.finetune.kd_weight == 0.5 and resolved.train.epochs == 1


def test_pruned_model_reloads_with_the_reported_accuracy(finished_run):
    from pnp.core.artifacts import load_pruned
    from pnp.training.data import build_datamodule
    from pnp.training.report import evaluate_accuracy

    out, _, report = finished_run
    model = load_pruned(out / "finetune" / "model")
    meta = model.pnp_metadata
    assert meta["input_shape"] == [1, 28, 28] and meta["num_classes"] == 10
    assert set(meta["preprocessing"]) >= {"mean", "std", "size", "channels"}

    keep = json.loads((out / "prune" / "keep.json").read_text())
    assert model.pnp_channel_spec.groups == keep["groups"]
    assert sum(p.numel() for p in model.parameters()) == report["after"]["params"]

    cfg = OmegaConf.load(out / ".hydra" / "config.yaml")
    dm = build_datamodule("fashion_mnist", root=cfg.data.root, batch_size=64, val_size=cfg.data.val_size)
    assert evaluate_accuracy(model, dm.test_dataloader()) == pytest.approx(report["after"]["accuracy"])


def test_rerun_skips_finished_stages_and_refuses_a_changed_config(finished_run):
    out, overrides, _ = finished_run
    weights = out / "finetune" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    records = {p: p.read_bytes() for p in (out / "report.json", out / ".hydra" / "config.yaml")}
    # settings that do not change results (here the logging interval) run nothing, and the recorded
    # config and report stay those of the run that made the results
    again = run("pipeline", compose_config("pipeline", overrides + ["trainer.log_every_n_steps=7"]), out)
    assert again == json.loads(records[out / "report.json"])
    assert {p: p.read_bytes() for p in records} == records
    assert weights.stat().st_mtime_ns == stamp

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StageConflictError, match=r"train\.epochs: 1 -> 2"):
        run("pipeline", compose_config("pipeline", overrides + ["train.epochs=2"]), out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_stages_written_before_a_setting_existed_are_kept_while_it_keeps_what_pnp_did_then(finished_run):
    """A newer pnp that added a setting resumes and skips an older run's stages while the setting does what pnp did before."""
    out, overrides, _ = finished_run
    stage_files = sorted(out.glob("*/stage.json"))
    written = {f: f.read_bytes() for f in stage_files}

    def as_older_pnp_wrote_them(*missing):
        for f in stage_files:
            older = json.loads(written[f])
            for key in missing:
                older["config"].get("pruner", {}).pop(key, None)
            f.write_text(json.dumps(older))

    try:
        # an added setting at its default, which keeps what pnp did before it: nothing runs again
        as_older_pnp_wrote_them("target_lr")
        results = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        run("pipeline", compose_config("pipeline", overrides), out)
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == results
        with pytest.raises(StageConflictError, match=r"pruner\.target_lr \(new: 0\.001\)"):
            run("pipeline", compose_config("pipeline", overrides + ["pruner.target_lr=0.001"]), out)

        # the budget warmup was off before it existed and is on by default now: the stages an
        # older pnp wrote were made without it, so today's default is a changed config
        as_older_pnp_wrote_them("budget_warmup")
        results = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        with pytest.raises(StageConflictError, match=r"pruner\.budget_warmup \(new: 0\.5\)"):
            run("pipeline", compose_config("pipeline", overrides), out)
        run("pipeline", compose_config("pipeline", overrides + ["pruner.budget_warmup=0"]), out)
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == results
    finally:
        for f, content in written.items():
            f.write_bytes(content)


def test_interrupted_stage_resumes_from_its_last_checkpoint(finished_run):
    from safetensors.torch import load_file

    out, overrides, _ = finished_run
    weights = out / "finetune" / "model" / "model.safetensors"
    trained = load_file(str(weights))
    # a run that stopped after its last checkpoint but before the stage finished
    (out / "finetune" / "report.json").unlink()

    report = run("pipeline", compose_config("pipeline", overrides), out)
    assert [n for n, s in report["stages"].items() if not s["skipped"]] == ["finetune"]
    resumed = load_file(str(weights))
    # every epoch was already done, so the weights come back from last.ckpt unchanged
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)
    assert json.loads((out / "finetune" / "report.json").read_text())["status"] == "done"


def test_a_target_that_adapts_beside_the_pruner_is_what_both_prune_commands_cut(tmp_path):
    """pruner.target_lr: the gated target learns with the pruner; the pipeline and pnp-prune cut that adapted target."""
    from pnp.core.artifacts import load_pruned
    from safetensors.torch import load_file

    data_root = write_fashion_mnist(tmp_path / "fashion", n_train=300, n_test=50)
    out = tmp_path / "run"
    overrides = quick_overrides(data_root, out) + ["pruner.target_lr=0.01", "inherit.choice=learned"]
    run("pipeline", compose_config("pipeline", overrides), out)

    original = load_file(str(out / "train" / "model" / "model.safetensors"))
    adapted = load_file(str(out / "train_pruner" / "adapted" / "model.safetensors"))
    assert set(adapted) == set(original)
    assert any(not torch.equal(adapted[k], original[k]) for k in original)  # it learned

    pruned = load_pruned(out / "prune" / "model")
    kept = pruned.pnp_channel_spec.groups["features.0"]
    cut = pruned.state_dict()["features.0.weight"]
    assert torch.equal(cut, adapted["features.0.weight"][kept])  # cut from the adapted weights, not the original
    assert not torch.equal(cut, original["features.0.weight"][kept])
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["accuracy"] == json.loads((out / "train" / "report.json").read_text())["model"]["accuracy"]

    # the single command, pointed at the same pruner run, cuts the same adapted target
    single = tmp_path / "single"
    cfg = compose_config("prune", [f"data.root={data_root}", f"out_dir={single}", "data.val_size=100",
                                   f"target={out / 'train'}", f"pruner_run={out / 'train_pruner'}",
                                   "readout.budget=0.1", "inherit.choice=learned", "report.latency_batch_sizes=[1]",
                                   "report.latency_repeats=2"])
    run("prune", cfg, single)
    again = load_pruned(single / "model").state_dict()
    assert all(torch.equal(again[k], v) for k, v in pruned.state_dict().items())


def test_an_adapted_target_with_batchnorm_is_saved_with_statistics_of_its_own_weights(tmp_path):
    """With norm_stats=batch the gated target's running statistics are never updated while its weights learn:
    the adapted target is saved with statistics measured for its weights, not the unadapted network's."""
    from pnp.cli import stages
    from pnp.core.artifacts import load_pruned

    data_root = write_fashion_mnist(tmp_path / "fashion", n_train=300, n_test=50)
    out = tmp_path / "run"
    overrides = quick_overrides(data_root, out) + ["model=resnet20", "pruner.target_lr=0.01", "inherit.choice=learned",
                                                   "trainer.limit_train_batches=2", "norm_samples=100"]
    cfg = compose_config("pipeline", overrides)
    run("pipeline", cfg, out)
    original = load_pruned(out / "train" / "model").state_dict()
    adapted = load_pruned(out / "train_pruner" / "adapted")
    measured = copy.deepcopy(adapted)
    stages.remeasure_norms(cfg, stages.build_data(cfg), measured)
    stats = [k for k in original if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.allclose(adapted.state_dict()[k], measured.state_dict()[k], atol=1e-5) for k in stats)
    assert any(not torch.allclose(adapted.state_dict()[k], original[k]) for k in stats)


def test_without_a_budget_the_criterions_widths_are_skipped_and_say_why(finished_run, tmp_path):
    """A criterion's own widths are read out at a budget: pnp-prune without one names the rival it could not try."""
    out, overrides, _ = finished_run
    data_root = next(o.split("=", 1)[1] for o in overrides if o.startswith("data.root="))
    single = tmp_path / "single"
    cfg = compose_config("prune", [f"data.root={data_root}", f"out_dir={single}", "data.val_size=100",
                                   f"target={out / 'train'}", f"pruner_run={out / 'train_pruner'}", "inherit.steps=2",
                                   "report.latency_batch_sizes=[1]", "report.latency_repeats=2"])
    run("prune", cfg, single)
    inherit = json.loads((single / "report.json").read_text())["inherit"]
    # the candidates at the learned widths are still compared; the rival is not among them
    assert set(inherit["lookahead_accuracy"]) == {"learned", "magnitude"} and inherit["steps"] == 2
    assert inherit["choice"] == max(inherit["lookahead_accuracy"], key=inherit["lookahead_accuracy"].get)
    assert "no readout.budget" in inherit["skipped"]["widths:magnitude"]


def test_an_adapting_target_is_refused_a_negative_rate(tmp_path):
    from pnp.cli.config import ConfigError

    cfg = compose_config("pipeline", [f"out_dir={tmp_path / 'run'}", "pruner.target_lr=-0.1"])
    with pytest.raises(ConfigError, match=r"^pruner\.target_lr=-0\.1:"):
        run("pipeline", cfg, tmp_path / "run")


def test_the_budget_warmup_is_on_by_default_and_does_nothing_without_a_budget(tmp_path):
    from pnp.cli.config import pruner_budget_warmup, validate

    with_budget = compose_config("pipeline", [f"out_dir={tmp_path / 'run'}"])
    assert pruner_budget_warmup(with_budget.pruner) == 0.5
    # nothing to fall to: accepted, and the pruner trains without a warmup
    without = compose_config("pipeline", [f"out_dir={tmp_path / 'run'}", "readout.budget=null"])
    validate(without, "pipeline")
    assert without.pruner.budget is None and pruner_budget_warmup(without.pruner) == 0.0


@pytest.mark.parametrize("epochs, min_steps, batches, expected", [
    (1, 200, 430, (430, 1)),  # a long epoch: min_steps adds nothing
    (1, 200, 79, (200, 3)),  # short epochs: exactly 200 steps, the third epoch stopping part-way
    (3, 100, 79, (237, 3)),  # the epochs already give more steps
    (2, 0, 6, (12, 2)),  # 0: the epochs alone decide
])
def test_the_pruner_trains_its_epochs_or_exactly_min_steps(epochs, min_steps, batches, expected):
    from pnp.cli.stages import pruner_schedule

    assert pruner_schedule(epochs, min_steps, batches) == expected


def test_a_pruner_that_learned_against_a_target_near_chance_is_told_it_had_little_task_signal():
    from pnp.cli.stages import task_signal, task_signal_line

    # ResNet-56 gated to 2% of its FLOPs by a frozen-target pruner ended at 15.9% on 10 classes
    frozen = task_signal({"val/acc": 15.9, "val/flops_kept": 0.021}, classes=10, adapts=False)
    assert frozen["low"]
    line = task_signal_line(frozen)
    assert "15.9% validation accuracy with 2.1% of its FLOPs kept (chance 10.0%)" in line
    assert "pruner.target_lr" in line
    # the same, with the target already adapting: nothing to suggest
    assert "pruner.target_lr" not in task_signal_line(task_signal({"val/acc": 15.9}, classes=10, adapts=True))
    # a gated network that still works (MobileNetV2 at 10% of its FLOPs: 53.6%) is not flagged
    assert not task_signal({"val/acc": 53.6, "val/flops_kept": 0.099}, classes=10, adapts=False)["low"]
    # chance depends on the classes: 55% of two classes is little, of ten it is plenty
    assert task_signal({"val/acc": 55.0}, classes=2, adapts=False)["low"]
    assert not task_signal({"val/acc": 55.0}, classes=10, adapts=False)["low"]
    # a run that never validated (no val/acc) is not flagged
    assert not task_signal({}, classes=10, adapts=False)["low"]


def test_a_pruner_whose_masks_pruned_past_their_budget_is_told_the_option_that_holds_them():
    from pnp.cli.stages import task_signal, task_signal_line

    # ResNet-56 aimed at 10% of its FLOPs from the first step: its masks fell to 1.3%, its target to chance
    collapsed = task_signal({"val/acc": 13.3, "val/flops_kept": 0.013}, classes=10, adapts=False, budget=0.1, warmup=0.0)
    assert collapsed["under_budget"] and collapsed["low"]
    line = task_signal_line(collapsed)
    assert line.startswith("[pnp] the gated target ended the pruner's training at 13.3%")
    assert "kept 1.3% of the FLOPs against a budget of 10.0%: they pruned past it" in line
    assert "pruner.budget_warmup (0.5, the default)" in line and "pruner.target_lr" not in line
    # the warmup already on: it is not suggested again, a gentler one or more steps are
    warm = task_signal_line(task_signal({"val/acc": 13.3, "val/flops_kept": 0.013}, classes=10, adapts=False,
                                        budget=0.1, warmup=0.5))
    assert "(0.5, the default)" not in warm and "pruner.min_steps" in warm
    # under the budget while the gated target still works: only the budget is named
    working = task_signal_line(task_signal({"val/acc": 60.0, "val/flops_kept": 0.03}, classes=10, adapts=False, budget=0.1))
    assert working.startswith("[pnp] the pruner's masks kept 3.0% of the FLOPs") and "task signal" not in working
    # ResNet-20's masks back at the budget after dipping under it, its target working: nothing to say
    held = task_signal({"val/acc": 52.1, "val/flops_kept": 0.098}, classes=10, adapts=False, budget=0.1)
    assert not held["low"] and not held["under_budget"]
    # half the budget is the line; without a budget masks are never under it
    assert not task_signal({"val/flops_kept": 0.05}, classes=10, adapts=False, budget=0.1)["under_budget"]
    assert task_signal({"val/flops_kept": 0.049}, classes=10, adapts=False, budget=0.1)["under_budget"]
    assert not task_signal({"val/acc": 60.0, "val/flops_kept": 0.01}, classes=10, adapts=False)["under_budget"]
