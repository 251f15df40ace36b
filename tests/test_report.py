"""Run reports: accuracy and cost figures, a readable table, JSON that is never half-written, real PNGs."""

import json
import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from pnp.core.builders import build_model
from pnp.training.report import (
    evaluate_accuracy,
    format_before_after_table,
    model_summary,
    plot_accuracy_vs_flops,
    plot_channels_per_layer,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FixedAnswer(nn.Module):
    """Predicts class 0 for every input."""

    def forward(self, x):
        out = torch.zeros(len(x), 3)
        out[:, 0] = 1.0
        return out


def test_accuracy_in_percent_and_mode_restored():
    y = torch.tensor([0, 0, 0, 1, 2, 0, 1, 0])  # five of eight are class 0
    loader = DataLoader(TensorDataset(torch.randn(8, 2), y), batch_size=3)
    model = FixedAnswer().train()
    assert evaluate_accuracy(model, loader) == pytest.approx(62.5)
    assert model.training


def test_model_summary_counts_lenet():
    model = build_model("pnp:lenet5")
    summary = model_summary(model, (1, 28, 28), batch_sizes=(1, 4), threads=(1,), warmup=1, repeats=2)
    # multiply-accumulates of conv1, conv2, fc1, fc2; the counter also adds biases, ReLUs and pools (~2%)
    macs = 20 * 25 * 576 + 50 * 500 * 64 + 800 * 500 + 5000
    assert macs < summary["flops"] < 1.03 * macs
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    assert [(l["batch_size"], l["threads"]) for l in summary["latency"]] == [(1, 1), (4, 1)]
    assert all(l["median_ms"] > 0 for l in summary["latency"])
    json.dumps(summary)


REPORT = {
    "baseline": {
        "accuracy": 91.23,
        "flops": 2_293_000,
        "params": 431_080,
        "latency": [{"batch_size": 1, "threads": 1, "median_ms": 0.5}, {"batch_size": 64, "threads": 1, "median_ms": 8.0}],
    },
    "pruned": {
        "accuracy": 70.5,
        "flops": 573_250,
        "params": 107_770,
        "latency": [{"batch_size": 1, "threads": 1, "median_ms": 0.25}, {"batch_size": 64, "threads": 1, "median_ms": 2.0}],
    },
    "finetuned": {
        "accuracy": 90.81,
        "flops": 573_250,
        "params": 107_770,
        "latency": [{"batch_size": 1, "threads": 1, "median_ms": 0.25}, {"batch_size": 64, "threads": 1, "median_ms": 2.0}],
    },
    "durations_s": {"baseline training": 30.0, "pruner training": 10.0, "fine-tuning": 20.0},
}


def test_table_shows_every_number_and_the_change():
    table = format_before_after_table(REPORT)
    lines = table.splitlines()
    assert lines[0].split() == ["baseline", "pruned", "fine-tuned", "change"]
    acc = next(l for l in lines if l.startswith("accuracy"))
    assert acc.split()[-5:] == ["91.23", "70.50", "90.81", "-0.42", "pts"]
    flops = next(l for l in lines if l.startswith("FLOPs"))
    assert "2.29 M" in flops and "573.25 K" in flops and "x4.00 smaller" in flops
    params = next(l for l in lines if l.startswith("params"))
    assert "431.08 K" in params and "x4.00 smaller" in params
    bs64 = next(l for l in lines if "batch 64" in l)
    assert "8.000" in bs64 and "2.000" in bs64 and "x4.00 faster" in bs64
    assert any(l.startswith("latency ms, batch 1 ") for l in lines)
    pruner = next(l for l in lines if l.startswith("pruner training"))
    assert pruner.split()[-2:] == ["10.0", "16.7%"]
    assert next(l for l in lines if l.startswith("total")).split()[1] == "60.0"


def test_table_without_fine_tuning_compares_the_pruned_model():
    partial = {k: REPORT[k] for k in ("baseline", "pruned")}
    acc = next(l for l in format_before_after_table(partial).splitlines() if l.startswith("accuracy"))
    assert acc.split()[-2:] == ["-20.73", "pts"] and " - " in acc
    with pytest.raises(ValueError, match="none of the stages"):
        format_before_after_table({"durations_s": {}})


def test_plots_are_png_files(tmp_path):
    sizes = {"features.3": 50, "classifier.1": 500, "features.0": 20}
    kept = {"features.3": 25, "classifier.1": 120, "features.0": 10}
    out = plot_channels_per_layer(kept, sizes, tmp_path / "plots" / "channels.png", order=["features.0", "features.3", "classifier.1"])
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    points = [
        {"label": "baseline", "flops": 2.29e6, "accuracy": 91.2},
        {"label": "learned 25%", "flops": 5.7e5, "accuracy": 90.8, "series": "learned"},
        {"label": "learned 10%", "flops": 2.1e5, "accuracy": 88.0, "series": "learned"},
        {"label": "uniform 25%", "flops": 5.7e5, "accuracy": 89.9, "series": "uniform"},
    ]
    out = plot_accuracy_vs_flops(points, tmp_path / "acc_flops.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(os.listdir(tmp_path)) == ["acc_flops.png", "plots"]  # no temporaries left
    with pytest.raises(KeyError, match="without a size"):
        plot_channels_per_layer({"nope": 1}, sizes, tmp_path / "bad.png")
    with pytest.raises(KeyError, match="'accuracy'"):
        plot_accuracy_vs_flops([{"label": "a", "flops": 1}], tmp_path / "bad.png")
