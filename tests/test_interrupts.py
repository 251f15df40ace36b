"""Killed or interrupted runs of pnp-pipeline resume when the same command is run again."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_pipeline import quick_overrides, write_fashion_mnist

REPO = Path(__file__).resolve().parents[1]


def pipeline_command(data_root: Path, out: Path) -> list[str]:
    overrides = quick_overrides(data_root, out)
    overrides = [o for o in overrides if not o.startswith(("train.epochs", "pruner.epochs", "finetune.epochs",
                                                           "trainer.limit_train_batches"))]
    # stages of several epochs, so that each can be stopped between its checkpoints
    return [sys.executable, str(REPO / "tools" / "pipeline.py"), *overrides, "train.epochs=3", "pruner.epochs=6",
            "finetune.epochs=3", "trainer.limit_train_batches=4", "data.batch_size=25", "data.val_size=50"]


def wait_for_checkpoints(path: Path, count: int, process: subprocess.Popen, timeout: float = 180) -> None:
    """Until ``path`` has been written ``count`` times (one per epoch)."""
    deadline, seen = time.monotonic() + timeout, set()
    while len(seen) < count and process.poll() is None and time.monotonic() < deadline:
        if path.exists():
            seen.add(path.stat().st_mtime_ns)
        time.sleep(0.02)
    assert len(seen) >= count, f"{path} was written {len(seen)} times, not {count} (exit {process.poll()})"


@pytest.mark.parametrize(
    "stage, how",
    [("train", "SIGKILL"), ("train_pruner", "SIGTERM"), ("finetune", "SIGKILL")],
)
def test_a_stopped_stage_resumes_and_the_pipeline_finishes_consistent(tmp_path, stage, how):
    data_root = write_fashion_mnist(tmp_path / "fashion", n_train=300, n_test=50)
    out = tmp_path / "run"
    command = pipeline_command(data_root, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # a random point of the stage: just after the checkpoint of a randomly chosen epoch, not its last
    epochs = {"train": 3, "train_pruner": 6, "finetune": 3}[stage]
    after = random.Random(f"{stage}-{how}").randint(1, epochs - 1)
    wait_for_checkpoints(out / stage / "checkpoints" / "last.ckpt", after, first)
    first.send_signal(getattr(signal, how))
    _, err = first.communicate(timeout=120)
    if how == "SIGTERM":  # a scheduler's stop: a checkpoint, a message and 143, never a silent 0
        assert first.returncode == 143, err[-2000:]
        assert "interrupted; run the same command again to resume" in err
    else:
        assert first.returncode == -signal.SIGKILL
    if (out / stage / "report.json").exists():
        pytest.skip(f"the {stage} stage finished before the signal arrived")

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resuming stage {stage!r}" in second.stdout
    report = json.loads((out / "report.json").read_text())
    finished = json.loads((out / stage / "report.json").read_text())
    assert finished["status"] == "done"
    assert finished["epochs"] == {"train": 3, "train_pruner": 6, "finetune": 3}[stage]
    assert report["status"] == "done" and report["after"]["flops"] == report["pruned"]["flops"] < report["before"]["flops"]
    # the architecture the report gives is the saved model's and the keep decisions'
    from pnp.core.artifacts import load_pruned

    model = load_pruned(out / "finetune" / "model")
    keep = json.loads((out / "prune" / "keep.json").read_text())
    kept = {name: len(idx) for name, idx in model.pnp_channel_spec.groups.items()}
    assert kept == report["channels_kept"] == {name: len(idx) for name, idx in keep["groups"].items()}


def test_an_unreadable_checkpoint_is_set_aside_and_the_stage_starts_again(tmp_path, capsys):
    from pnp.cli.stages import readable_checkpoint
    from pnp.training.runs import StageDir

    stage = StageDir(tmp_path / "train", "train", {})
    ckpt = stage.path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04truncated")  # what a full disk or a kill mid-write leaves behind
    assert readable_checkpoint(stage) is None
    assert not ckpt.exists() and (ckpt.parent / "last.ckpt.unreadable").exists()
    assert "cannot be read" in capsys.readouterr().out and stage.check() == "new"


def test_long_epochs_also_save_the_resume_point_every_n_steps(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from pnp.cli.stages import make_trainer
    from pnp.training.runs import LAST_CHECKPOINT, StageDir
    from test_pipeline import compose_config

    def resume_points(overrides):
        cfg = compose_config("train", [f"out_dir={tmp_path}", *overrides])
        trainer = make_trainer(cfg, StageDir(tmp_path / "train", "train", {}), 1, None)
        return [(c.dirpath, c.filename, c._every_n_train_steps, c._every_n_epochs)
                for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]

    directory = str(tmp_path / "train" / LAST_CHECKPOINT.parent)
    assert resume_points([]) == [(directory, "last", 0, 1)]
    assert resume_points(["trainer.checkpoint_every_n_steps=500"]) == [(directory, "last", 0, 1), (directory, "last", 500, 0)]
