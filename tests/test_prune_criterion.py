"""pnp-prune criterion=<name>: the target's channels ranked by a criterion, cut to the read-out's budget."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pnp.cli.config import ConfigError
from pnp.cli.main import run
from pnp.core.artifacts import load_pruned
from test_cli import REPO, data_root, lenet_dir, snapshot  # noqa: F401  (the fixtures are shared)
from test_pipeline import compose_config


def prune_overrides(data_root: Path, target: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={data_root}", "data.val_size=50", f"target={target}", f"out_dir={out}",
            "report.latency_batch_sizes=[1]", "report.latency_repeats=2", *extra]


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_criterion_prunes_to_the_budget(tmp_path, data_root, lenet_dir, criterion):
    out = tmp_path / "out"
    cfg = compose_config("prune", prune_overrides(data_root, lenet_dir, out, f"criterion={criterion}", "readout.budget=0.5"))
    report = run("prune", cfg, out)

    assert report["readout"]["criterion"] == criterion
    assert "inherit" not in report  # the criterion picked the channels: nothing inherited
    assert 0.45 < report["after"]["flops"] / report["before"]["flops"] <= 0.5
    model = load_pruned(out / "model")
    assert {name: len(idx) for name, idx in model.pnp_channel_spec.groups.items()} == report["channels_kept"]

    # done: the same command runs nothing, and inheritance settings (unused here) do not refuse it
    before = snapshot(out)
    run("prune", compose_config("prune", prune_overrides(data_root, lenet_dir, out, f"criterion={criterion}",
                                                         "readout.budget=0.5", "inherit.steps=7")), out)
    assert snapshot(out) == before


def test_criterion_keeps_the_best_ranked_channels(tmp_path, data_root, lenet_dir):
    from pnp.cli import stages
    from pnp.core.criteria import rank_channels

    out = tmp_path / "out"
    cfg = compose_config("prune", prune_overrides(data_root, lenet_dir, out, "criterion=l1", "readout.budget=0.5"))
    run("prune", cfg, out)
    kept = load_pruned(out / "model").pnp_channel_spec.groups
    target = load_pruned(lenet_dir / "model")
    scores = rank_channels(target, stages.find_groups(cfg, stages.build_data(cfg), target), "l1")
    for name, idx in kept.items():
        dropped = sorted(set(range(len(scores[name]))) - set(idx))
        if dropped:  # every kept channel ranks above every dropped one of its group
            assert float(scores[name][idx].min()) > float(scores[name][dropped].max())


def test_unknown_criterion_is_refused_naming_the_field(tmp_path, data_root, lenet_dir):
    cfg = compose_config("prune", prune_overrides(data_root, lenet_dir, tmp_path / "out", "criterion=l2norm"))
    with pytest.raises(ConfigError, match=r"^criterion='l2norm': must be one of l1, magnitude, taylor, bn_scale, random"):
        run("prune", cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_criterion_that_scores_nothing_is_refused_naming_the_field(tmp_path, data_root, lenet_dir):
    cfg = compose_config("prune", prune_overrides(data_root, lenet_dir, tmp_path / "out", "criterion=bn_scale"))
    with pytest.raises(ConfigError, match=r"^criterion='bn_scale': .*pick another criterion"):
        run("prune", cfg, tmp_path / "out")  # LeNet-5 has no BatchNorm


def test_command_line_names_the_bad_criterion(tmp_path, data_root, lenet_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "prune.py"), *prune_overrides(data_root, lenet_dir, out, "criterion=l2")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "pnp-prune: error: criterion='l2': must be one of" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("sources", [
    ["criterion=l1", "keep={keep}"],
    ["criterion=l1", "pruner_run={run}"],
    ["pruner_run={run}", "keep={keep}"],
    [],
])
def test_exactly_one_source_of_keep_decisions(tmp_path, data_root, lenet_dir, sources):
    keep = tmp_path / "keep.json"
    keep.write_text('{"groups": {"features.0": [0, 1]}}')
    given = [s.format(keep=keep, run=lenet_dir) for s in sources]
    cfg = compose_config("prune", prune_overrides(data_root, lenet_dir, tmp_path / "out", *given))
    with pytest.raises(ConfigError, match="give exactly one of pruner_run=.*, keep=.* or criterion=") as info:
        run("prune", cfg, tmp_path / "out")
    if len(sources) > 1:  # the error names the sources that were given
        assert all(s.split("=")[0] in str(info.value) for s in sources)
    assert not (tmp_path / "out").exists()
