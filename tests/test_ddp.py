"""pnp-train-pruner on two processes (DDP, gloo, CPU): every rank reads out the same architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from pnp.cli.stages import keep_digest
from pnp.core.artifacts import save_pruned
from pnp.core.builders import build_model
from pnp.core.groups import find_channel_groups
from pnp.core.readout import decide_keep
from test_pipeline import write_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
LENET = {"in_channels": 1, "num_classes": 10, "input_size": 28}


def test_two_ranks_read_out_the_same_keep_decisions(tmp_path):
    data_root = write_fashion_mnist(tmp_path / "fashion", n_train=400, n_test=50)
    torch.manual_seed(0)
    target = build_model("pnp:lenet5", **LENET)
    save_pruned(target, tmp_path / "target" / "model", builder="pnp:lenet5", builder_kwargs=LENET)
    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO / "tools" / "train_pruner.py"),
        f"target={tmp_path / 'target'}", f"data.root={data_root}", f"out_dir={out}",
        "data.val_size=100", "data.batch_size=50",
        "pruner.epochs=1", "pruner.min_steps=0", "pruner.calibration_samples=200",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    digests = report["keep_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]

    # keep.json (written by rank 0) is what every rank decided, and what the saved scores give
    saved = json.loads((out / "keep.json").read_text())
    keep = {}
    for name, kept in saved["groups"].items():
        mask = torch.zeros(saved["group_sizes"][name], dtype=torch.bool)
        mask[kept] = True
        keep[name] = mask
    assert keep_digest(keep) == digests[0]
    groups = find_channel_groups(target, torch.randn(2, 1, 28, 28))
    again, _ = decide_keep(groups, load_file(str(out / "keep_scores.safetensors")))
    assert all(torch.equal(again[name], keep[name]) for name in keep)


def test_pipeline_on_two_ranks_cuts_the_same_inherited_channels(tmp_path):
    """The weight-inheritance look-ahead runs on rank 0; every rank cuts what it chose (else DDP fine-tuning fails)."""
    data_root = write_fashion_mnist(tmp_path / "fashion", n_train=400, n_test=50)
    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO / "tools" / "pipeline.py"), f"data.root={data_root}", f"out_dir={out}",
        "data.val_size=100", "data.batch_size=50", "train.epochs=1", "pruner.epochs=1", "pruner.min_steps=0",
        "pruner.calibration_samples=100", "finetune.epochs=1", "inherit.steps=3",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        "report.latency_batch_sizes=[1]", "report.latency_repeats=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert json.loads((out / "train_pruner" / "report.json").read_text())["world_size"] == 2
    inherit = json.loads((out / "prune" / "report.json").read_text())["inherit"]
    assert set(inherit["lookahead_accuracy"]) == {"learned", "magnitude", "widths:magnitude"}
    from pnp.core.artifacts import load_pruned

    keep = json.loads((out / "prune" / "keep.json").read_text())["groups"]
    assert load_pruned(out / "finetune" / "model").pnp_channel_spec.groups == keep
