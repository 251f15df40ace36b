"""Files: atomic writes, and the one keep-score and keep-decision format every task uses."""

from __future__ import annotations

import json
import os

import pytest
import torch

import pnp
from pnp.core import io
from pnp.core.io import load_keep_scores, save_keep_scores, write_json_atomic, write_keep_decisions


def test_json_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "run" / "report.json"
    write_json_atomic(path, {"acc": torch.tensor(91.5), "keep": torch.tensor([1, 0]), "where": tmp_path})
    assert json.loads(path.read_text()) == {"acc": 91.5, "keep": [1, 0], "where": str(tmp_path)}

    # a write that fails midway leaves the old file whole and no temporary behind
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"acc": 0.0})
    assert json.loads(path.read_text())["acc"] == 91.5
    assert os.listdir(path.parent) == ["report.json"]
    with pytest.raises(TypeError, match="cannot write object"):
        write_json_atomic(tmp_path / "x.json", {"bad": object()})
    assert not (tmp_path / "x.json").exists()


def test_keep_scores_and_decisions_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3))
    groups = pnp.find_channel_groups(model, torch.randn(1, 1, 8, 8))
    scores = {"0": torch.linspace(0, 1, 6)}
    save_keep_scores(tmp_path / "keep_scores.safetensors", scores)
    assert torch.equal(load_keep_scores(tmp_path / "keep_scores.safetensors")["0"], scores["0"])
    keep = {"0": scores["0"] > 0.5}
    write_keep_decisions(tmp_path / "keep.json", groups, keep, {"budget": 0.5})
    text = (tmp_path / "keep.json").read_text()
    assert '"0": [3, 4, 5]' in text  # one line per group
    assert json.loads(text) == {"groups": {"0": [3, 4, 5]}, "group_sizes": {"0": 6}, "readout": {"budget": 0.5}}
