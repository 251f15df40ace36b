"""Killed or interrupted runs of pnp-pipeline resume when the same command is run again."""

from __future__ import annotations

import json
import os
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
    overrides = [o for o in overrides if not o.startswith(("pruner.epochs", "trainer.limit_train_batches"))]
    # a pruner stage of several epochs, so that it can be stopped between its checkpoints
    return [sys.executable, str(REPO / "tools" / "pipeline.py"), *overrides, "pruner.epochs=6",
            "trainer.limit_train_batches=4", "data.batch_size=25", "data.val_size=50"]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.exists(), f"{path} never appeared (exit {process.poll()})"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_pruner_stage_resumes_after_being_stopped(tmp_path, how):
    data_root = write_fashion_mnist(tmp_path / "fashion", n_train=300, n_test=50)
    out = tmp_path / "run"
    command = pipeline_command(data_root, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "train_pruner" / "checkpoints" / "last.ckpt", first)  # the pruner's first epoch is saved
    first.send_signal(getattr(signal, how))
    _, err = first.communicate(timeout=120)
    if how == "SIGTERM":  # a scheduler's stop: a checkpoint, a message and 143, never a silent 0
        assert first.returncode == 143, err[-2000:]
        assert "interrupted; run the same command again to resume" in err
    else:
        assert first.returncode == -signal.SIGKILL
    assert not (out / "train_pruner" / "report.json").exists()

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming stage 'train_pruner'" in second.stdout
    report = json.loads((out / "report.json").read_text())
    pruner = json.loads((out / "train_pruner" / "report.json").read_text())
    assert pruner["status"] == "done" and pruner["epochs"] == 6
    assert report["status"] == "done" and report["after"]["flops"] == report["pruned"]["flops"] < report["before"]["flops"]


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
