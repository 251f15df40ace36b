"""torch-pruning's criteria on pnp's groups, their global ranking, and the methods benchmark end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pnp.core.cost import count_flops_params
from pnp.core.criteria import (
    CRITERIA,
    CriterionNotApplicableError,
    channel_importance,
    check_criterion,
    global_rank,
    rank_channels,
)
from pnp.core.groups import find_channel_groups
from pnp.core.readout import decide_keep
from pnp.core.surgery import apply_surgery
from pnp.models import lenet5, resnet20

from test_pipeline import write_fashion_mnist


def _batches(n: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = resnet20().eval()
    x = torch.randn(2, 1, 28, 28)
    return model, find_channel_groups(model, x), x


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    model = lenet5().eval()
    x = torch.randn(2, 1, 28, 28)
    return model, find_channel_groups(model, x), x


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_every_criterion_scores_every_channel_of_every_group(criterion, resnet, lenet):
    for model, groups, _ in (resnet, lenet):
        if criterion == "bn_scale" and model is lenet[0]:
            continue  # LeNet-5 has no BatchNorm: see test_bn_scale_without_batchnorm_is_not_applicable
        importance = channel_importance(model, groups, criterion, batches=_batches())
        assert set(importance) == set(groups.names)
        for g in groups:
            assert importance[g.name].shape == (g.size,)
            assert bool(torch.isfinite(importance[g.name]).all())
        ranked = global_rank(groups, importance)
        joined = torch.cat([ranked[g.name] for g in groups])
        assert bool(((joined > 0) & (joined < 1)).all())
        assert len(joined.unique()) == len(joined)  # one rank per channel


def test_scoring_leaves_the_model_as_it_was(resnet):
    model, groups, x = resnet
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rank_channels(model, groups, "taylor", batches=_batches())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("criterion", ["l1", "taylor", "random"])
def test_global_ranking_meets_a_flops_budget(criterion, resnet):
    model, groups, x = resnet
    scores = rank_channels(model, groups, criterion, batches=_batches())
    keep, info = decide_keep(groups, scores, budget=0.5, metric="flops")
    assert 0.45 < info["flops_fraction"] <= 0.5
    pruned = apply_surgery(model, groups, keep, x, verify=True)
    measured = count_flops_params(pruned, x).flops / count_flops_params(model, x).flops
    assert measured == pytest.approx(info["flops_fraction"], rel=1e-6)


def test_l1_ranks_a_zeroed_filter_last_in_its_group(lenet):
    _, groups, _ = lenet
    model = lenet5().eval()
    model.load_state_dict(lenet[0].state_dict())
    with torch.no_grad():
        model.features[3].weight[7].zero_()
    scores = rank_channels(model, groups, "l1")
    assert int(scores["features.3"].argmin()) == 7


def test_l1_reads_only_the_filter_not_the_next_layer(lenet):
    _, groups, _ = lenet
    model = lenet5().eval()
    model.load_state_dict(lenet[0].state_dict())
    with torch.no_grad():  # the inputs that channel 7 feeds are zero, its filter is not
        model.classifier[1].weight.view(500, 50, 4, 4)[:, 7].zero_()
    scores = rank_channels(model, groups, "l1")
    assert int(scores["features.3"].argmin()) != 7


def test_bn_scale_ranks_a_zeroed_gamma_last_in_its_group(resnet):
    _, groups, _ = resnet
    model = resnet20().eval()
    model.load_state_dict(resnet[0].state_dict())
    with torch.no_grad():
        model.layer2[1].bn1.weight[5] = 0.0
    scores = rank_channels(model, groups, "bn_scale")
    assert int(scores["layer2.1.conv1"].argmin()) == 5


def test_bn_scale_without_batchnorm_is_not_applicable(lenet):
    model, groups, _ = lenet
    with pytest.raises(CriterionNotApplicableError, match="bn_scale"):
        channel_importance(model, groups, "bn_scale")


def test_random_is_reproducible_with_a_seed_and_differs_across_seeds(resnet):
    model, groups, _ = resnet
    before = torch.get_rng_state()
    a = rank_channels(model, groups, "random", seed=3)
    b = rank_channels(model, groups, "random", seed=3)
    c = rank_channels(model, groups, "random", seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[n], b[n]) for n in groups.names)
    assert not all(torch.equal(a[n], c[n]) for n in groups.names)


def test_taylor_needs_batches(resnet):
    model, groups, _ = resnet
    with pytest.raises(ValueError, match="batches"):
        channel_importance(model, groups, "taylor")


def test_taylor_follows_the_task_loss(lenet):
    model, groups, _ = lenet
    custom = channel_importance(model, groups, "taylor", batches=_batches(), loss_fn=lambda out, y: out[:, 0].sum())
    default = channel_importance(model, groups, "taylor", batches=_batches(), loss_fn=F.cross_entropy)
    assert not torch.allclose(custom["classifier.1"], default["classifier.1"])


def test_unknown_criterion_names_the_value_and_the_valid_names(resnet):
    model, groups, _ = resnet
    with pytest.raises(ValueError, match=r"'l2norm'.*'l1', 'magnitude', 'taylor', 'bn_scale', 'random'"):
        rank_channels(model, groups, "l2norm")
    assert check_criterion("taylor") == "taylor"


def test_groups_without_scores_are_ranked_to_keep(resnet):
    _, groups, _ = resnet
    partial = {g.name: torch.arange(g.size, dtype=torch.float) for g in list(groups)[1:]}
    ranked = global_rank(groups, partial)
    assert bool((ranked[groups[0].name] == 1.0).all())
    with pytest.raises(ValueError, match=groups[1].name):
        global_rank(groups, {groups[1].name: torch.zeros(3)})


# ---------------------------------------------------------------- the benchmark harness


def _bench_module(script: str = "bench_methods"):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(script, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path, for its methods package
    return module


RECORD_FIELDS = {"model", "dataset", "method", "budget", "seed", "accuracy", "accuracy_pruned", "baseline_accuracy",
                 "flops", "params", "flops_kept", "latency_ms", "wall_s", "select_s", "finetune_s", "settings"}


def _stamps(directory: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def test_bench_methods_smoke_writes_records_table_and_plot(tmp_path):
    bench = _bench_module()
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=600, n_test=200)
    out = tmp_path / "out"
    argv = ["--profile", "smoke", "--data-root", str(data), "--out", str(out), "--methods", "pnp", "l1", "bn_scale",
            "control"]
    results = bench.main(argv)

    runs = sorted((out / "runs" / "lenet5-fashion_mnist").glob("*.json"))
    assert [p.name for p in runs] == ["bn_scale-r50-s0.json", "control-r00-s0.json", "l1-r50-s0.json", "pnp-r50-s0.json"]
    assert "no BatchNorm" in json.loads(runs.pop(0).read_text())["not_applicable"]
    control = json.loads(runs.pop(0).read_text())
    seed_dir = out / "stages" / "lenet5-fashion_mnist-s0"
    baseline = json.loads((seed_dir / "baseline" / "report.json").read_text())["model"]
    for path in runs:
        record = json.loads(path.read_text())
        assert RECORD_FIELDS <= set(record)
        assert record["budget"] == 0.5 and record["seed"] == 0 and record["model"] == "lenet5"
        assert 0.0 <= record["accuracy"] <= 100.0 and record["baseline_accuracy"] == baseline["accuracy"]
        assert record["flops"] <= 0.5 * baseline["flops"] * 1.0001
        assert record["flops_kept"] == pytest.approx(record["predicted_flops_kept"], rel=1e-6)
        assert record["wall_s"] == pytest.approx(record["select_s"] + record["finetune_s"])
        # the shipped recipe with the profile's overrides: pnp-pipeline's stages ran it
        settings = record["settings"]
        assert settings["train"]["epochs"] == 1 and settings["finetune"]["kd_weight"] == 0
        assert settings["readout"]["budget"] == 0.5 and settings["readout"]["fill"] is True
        assert (out / record["stages"]["finetune"] / "model").is_dir()
    assert len(results["records"]) == 3 and len(results["not_applicable"]) == 1
    assert results["environment"]["torch"] == torch.__version__
    pnp_record = json.loads((out / "runs" / "lenet5-fashion_mnist" / "pnp-r50-s0.json").read_text())
    assert pnp_record["settings"]["pruner"]["budget"] == 0.5  # the pruner learns at the budget surgery cuts to
    assert {"pruner_training_s", "prune_s"} <= set(pnp_record["select_steps_s"])  # whichever widths won
    tried = pnp_record["inherit"]["lookahead_accuracy"]  # the weight-inheritance look-ahead ran and chose
    assert set(tried) == {"learned", "magnitude", "widths:magnitude"} and pnp_record["inherit"]["choice"] in tried
    l1_record = json.loads((out / "runs" / "lenet5-fashion_mnist" / "l1-r50-s0.json").read_text())
    assert l1_record["settings"]["criterion"] == "l1" and "inherit" not in l1_record
    # the control: the baseline itself through stages.finetune, by the methods' schedule, nothing cut
    assert RECORD_FIELDS <= set(control) and control["budget"] == 0.0 and control["flops_kept"] == 1.0
    assert control["accuracy_pruned"] == control["baseline_accuracy"] == baseline["accuracy"]
    assert control["select_s"] == 0.0 and control["wall_s"] == control["finetune_s"]
    assert set(control["stages"]) == {"train", "finetune"} and (out / control["stages"]["finetune"] / "model").is_dir()
    assert control["settings"]["finetune"] == l1_record["settings"]["finetune"] and "readout" not in control["settings"]
    table = (out / "table.md").read_text()
    # each record names the code it ran with, and the table the commits of its runs (not only the report's)
    code = pnp_record["code"]
    assert code["torch"] == torch.__version__ and code == l1_record["code"] == control["code"]
    if code["commit"]:  # a git checkout
        assert f"Runs made at commit {code['commit'][:12]} (3 runs)" in table
    assert "| pnp |" in table and "L1 (Li+17)" in table and "| lenet5 | fashion_mnist | 50% |" in table
    assert "n/a: bn_scale on lenet5" in table
    assert "| control (baseline fine-tuned) | pnp |" in table  # a column beside the baseline
    assert "| lenet5 | fashion_mnist | 50% | L1 (Li+17) | 1 |" in table and "(one seed)" in table
    assert (out / "accuracy_vs_flops.png").read_bytes().startswith(b"\x89PNG")

    # a second run finds every record and stage on disk and trains nothing
    stamps = _stamps(out / "runs") | _stamps(out / "stages")
    bench.main(argv)
    assert _stamps(out / "runs") | _stamps(out / "stages") == stamps
    # a run whose fine-tuning was lost runs that stage only, on the baseline and choice on disk
    shutil.rmtree(seed_dir / "l1-r50" / "finetune")
    (out / "runs" / "lenet5-fashion_mnist" / "l1-r50-s0.json").unlink()
    bench.main(argv)
    lost = seed_dir / "l1-r50" / "finetune"
    kept = {p: t for p, t in stamps.items() if lost not in p.parents and p.name != "l1-r50-s0.json"}
    assert {p: t for p, t in (_stamps(out / "runs") | _stamps(out / "stages")).items() if p in kept} == kept
    assert json.loads((out / "runs" / "lenet5-fashion_mnist" / "l1-r50-s0.json").read_text())["accuracy"] == l1_record["accuracy"]
    # a changed setting is refused, naming the field and both values, before anything is written
    stamps = _stamps(out / "runs") | _stamps(out / "stages")
    with pytest.raises(SystemExit, match=r"finetune\.epochs: 1 -> 2"):
        bench.main(argv + ["--set", "finetune.epochs=2"])
    assert _stamps(out / "runs") | _stamps(out / "stages") == stamps


def test_bench_methods_runs_seeds_side_by_side_and_resumes_when_stopped(tmp_path):
    """--jobs 2: a process a seed, one report over both; stopped, it exits 143 and the same command finishes."""
    import os
    import signal
    import subprocess
    import time

    data = write_fashion_mnist(tmp_path / "fmnist", n_train=600, n_test=200)
    out = tmp_path / "out"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_methods.py"
    command = [sys.executable, str(script), "--profile", "smoke", "--data-root", str(data), "--out", str(out),
               "--methods", "l1", "--seeds", "0", "1", "--jobs", "2", "--set", "finetune.epochs=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    baselines = [out / "stages" / f"lenet5-fashion_mnist-s{s}" / "baseline" for s in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(b.exists() for b in baselines) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    records = out / "runs" / "lenet5-fashion_mnist"
    assert first.returncode == 143, err
    assert "run the same command again to resume" in err
    assert not (out / "table.md").exists()  # nothing reported for a stopped run

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in records.glob("*.json")) == ["l1-r50-s0.json", "l1-r50-s1.json"]
    for seed in (0, 1):  # each seed's own baseline, stopped and resumed or reused
        record = json.loads((records / f"l1-r50-s{seed}.json").read_text())
        baseline = json.loads((baselines[seed] / "report.json").read_text())["model"]
        assert record["seed"] == seed and record["baseline_accuracy"] == baseline["accuracy"]
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["seed"] for r in results["records"]) == [0, 1]
    assert "(n=2)" in (out / "table.md").read_text()  # one row over both seeds


def test_benchmark_scripts_end_bad_input_with_a_message_and_status_2(tmp_path):
    import subprocess

    bad = tmp_path / "replay.json"
    bad.write_text("{not json")
    scripts = Path(__file__).resolve().parents[1] / "benchmarks"
    for argv, message in (
        (["replay_table.py", str(bad)], f"replay_table: {bad} cannot be read as a replay's JSON"),
        (["bench_methods.py", "--profile", "smoke", "--out", str(tmp_path / "out"), "--jobs", "0"],
         "bench_methods: --jobs 0: must be at least 1"),
    ):
        done = subprocess.run([sys.executable, str(scripts / argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_bench_methods_full_profile_runs_in_miniature(tmp_path):
    """The GPU profile's four entries (VGG-16-BN, ResNet-56; Fashion-MNIST and CIFAR-10) run pnp end to end.

    (The criteria's path, the same but for the pruner, runs in the smoke test.)
    """
    from test_data import write_cifar

    bench = _bench_module()
    fashion = write_fashion_mnist(tmp_path / "fmnist", n_train=120, n_test=20)
    write_cifar(tmp_path / "cifar", per_batch=24, n_test=20)
    # small images and no validation split (no validation passes, no best-epoch checkpoints) keep it short
    tiny = [
        "data.batch_size=16", "data.image_size=16", "data.val_size=0", "trainer.limit_train_batches=2",
        "train.epochs=1", "finetune.epochs=1", "pruner.epochs=1", "pruner.min_steps=0", "pruner.calibration_samples=16", "inherit.steps=2",
        "inherit.eval_samples=16", "report.latency_repeats=1", "report.latency_batch_sizes=[1,2]",
    ]
    out = tmp_path / "out"
    argv = ["--profile", "full", "--data-root", str(fashion), "--cifar10-root", str(tmp_path / "cifar"),
            "--out", str(out), "--methods", "pnp", "--budgets", "0.5", "--seeds", "0"]
    results = bench.main(argv + [a for item in tiny for a in ("--set", item)])

    made = {(r["model"], r["dataset"], r["method"]) for r in results["records"]}
    assert made == {(m, d, "pnp") for m in ("vgg16_bn", "resnet56") for d in ("fashion_mnist", "cifar10")}
    for record in results["records"]:
        assert record["flops_kept"] <= 0.5 + 1e-6 and record["settings"]["readout"]["fill"] is True
        assert record["latency_batch"] == 2 and record["settings"]["data"]["augment"] == (record["dataset"] == "cifar10")
    assert "| resnet56 | cifar10 | 50% |" in (out / "table.md").read_text()
    shutil.rmtree(out / "stages")  # VGG-16's checkpoints: a gigabyte and a half


def test_bench_methods_refuses_bad_settings(tmp_path):
    bench = _bench_module()
    for argv, message in (
        (["--methods", "l2norm"], "l2norm"),
        (["--budgets", "1.5"], "1.5"),
        (["--set", "lenet5:finetune.epoch=2"], r"full_key: finetune\.epoch\b"),
        (["--set", "finetune.epochs=two"], "'two'"),
        (["--set", "train.lr=-1"], r"train\.lr=-1"),
        (["--set", "slim.rgg=1"], r"full_key: slim\.rgg"),
        (["--set", "alexnet:train.lr=1"], "'alexnet' is not a model of this profile"),
        (["--set", "seed=3"], "--seeds"),
        (["--models", "alexnet"], "alexnet"),
        (["--confidence", "1.5"], r"--confidence 1\.5: must be between 0 and 1"),
    ):
        with pytest.raises(SystemExit, match=message):
            bench.main(["--profile", "quick", "--out", str(tmp_path), "--report-only", *argv])


def test_replay_lookahead_reproduces_the_stored_choice_and_tries_other_settings_without_training(tmp_path):
    bench, replay = _bench_module(), _bench_module("replay_lookahead")
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=600, n_test=200)
    out = tmp_path / "out"
    bench.main(["--profile", "smoke", "--data-root", str(data), "--out", str(out), "--methods", "pnp"])
    stored = json.loads((out / "runs" / "lenet5-fashion_mnist" / "pnp-r50-s0.json").read_text())
    common = ["--profile", "smoke", "--data-root", str(data), "--out", str(out)]
    stamps = _stamps(out)

    [same] = replay.main(common + ["--json", str(tmp_path / "same.json")])
    assert same["choice"] == stored["inherit"]["choice"]
    assert same["lookahead_accuracy"] == stored["inherit"]["lookahead_accuracy"]  # the same look-ahead, replayed
    assert same["accuracy"] == stored["accuracy"]
    # the record is named relative to the JSON's folder, so the rows can move with it
    assert not Path(same["record"]).is_absolute()
    assert (tmp_path / same["record"]).resolve() == (out / "runs" / "lenet5-fashion_mnist" / "pnp-r50-s0.json").resolve()
    assert json.loads((tmp_path / "same.json").read_text()) == [same]

    # run again, it resumes: the row written is kept, not replayed (a sentinel in it survives)
    (tmp_path / "same.json").write_text(json.dumps([{**same, "lookahead_s": -1.0}]))
    [again] = replay.main(common + ["--json", str(tmp_path / "same.json")])
    assert again == {**same, "lookahead_s": -1.0}
    # rows of runs not visited this time stay in the file (seed 1 has no stages: skipped)
    assert replay.main(common + ["--seeds", "1", "--json", str(tmp_path / "same.json")]) == []
    assert json.loads((tmp_path / "same.json").read_text()) == [again]
    # another --set never mixes with the rows there
    with pytest.raises(SystemExit, match=r"other --set"):
        replay.main(common + ["--set", "inherit.steps=2", "--json", str(tmp_path / "same.json")])
    assert json.loads((tmp_path / "same.json").read_text()) == [again]

    [fewer] = replay.main(common + ["--set", "inherit.candidates=[magnitude]", "--set", "inherit.steps=2",
                                    "--json", str(tmp_path / "fewer.json")])
    assert set(fewer["lookahead_accuracy"]) == {"magnitude", "widths:magnitude"}
    assert fewer["choice"] in fewer["lookahead_accuracy"]
    if fewer["choice"] != stored["inherit"]["choice"]:  # that model was never fine-tuned here: no figure is made up
        assert fewer["accuracy"] is None and fewer["record"] is None
    assert _stamps(out) == stamps  # nothing under the benchmark was trained or rewritten

    shutil.rmtree(out / "stages" / "lenet5-fashion_mnist-s0" / "pruner-k50")
    assert replay.main(common + ["--json", str(tmp_path / "none.json")]) == []  # skipped, not trained


def test_replay_table_reads_the_replayed_choices_against_the_criteria_beside_them(tmp_path, capsys):
    table = _bench_module("replay_table")
    runs = tmp_path / "bench" / "runs" / "resnet20-fashion_mnist"
    runs.mkdir(parents=True)
    accuracy = {  # seed -> method -> accuracy at 70% of the FLOPs removed
        0: {"pnp_learned": 90.4, "pnp": 90.0, "magnitude": 90.1, "taylor": 89.5},
        1: {"pnp_learned": 90.6, "pnp": 90.3, "magnitude": 90.2, "taylor": 89.9},
        2: {"pnp_learned": 90.5, "pnp": 90.2, "magnitude": 90.1, "taylor": 90.3},
    }
    for seed, by_method in accuracy.items():
        for method, acc in by_method.items():
            (runs / f"{method}-r70-s{seed}.json").write_text(json.dumps({"method": method, "seed": seed, "budget": 0.7,
                                                                          "accuracy": acc}))
    rows = [{"model": "resnet20", "seed": s, "budget": 0.7, "choice": "learned", "accuracy": accuracy[s]["pnp_learned"],
             "record": f"bench/runs/resnet20-fashion_mnist/pnp_learned-r70-s{s}.json"} for s in (0, 1, 2)]
    rows.append({"model": "resnet20", "seed": 3, "budget": 0.7, "choice": "magnitude", "accuracy": None, "record": None})
    (tmp_path / "K.json").write_text(json.dumps(rows))

    [best] = table.main([str(tmp_path / "K.json"), "--json", str(tmp_path / "out.json")])
    # magnitude has the higher mean of the two criteria; the picks' own method and pnp are not rivals
    assert (best["rival"], best["seeds"], best["n"]) == ("magnitude", [0, 1, 2], 3)
    assert best["diffs"] == pytest.approx([0.3, 0.4, 0.4]) and best["worst"] == pytest.approx(0.3)
    assert best["low"] > 0 and best["verdict"] == "ahead"
    assert json.loads((tmp_path / "out.json").read_text()) == [best]
    assert "1 replayed row(s) have no final accuracy" in capsys.readouterr().out

    [recorded] = table.main([str(tmp_path / "K.json"), "--rival", "pnp"])  # against the look-ahead the records ran
    assert recorded["rival"] == "recorded pnp" and recorded["diffs"] == pytest.approx([0.4, 0.3, 0.3])
    with pytest.raises(SystemExit, match="--rival 'nope' is not a method"):
        table.main([str(tmp_path / "K.json"), "--rival", "nope"])
    (tmp_path / "bad.json").write_text(json.dumps({"not": "rows"}))
    with pytest.raises(SystemExit, match="is not a replay's JSON"):
        table.main([str(tmp_path / "bad.json")])


@pytest.mark.parametrize("target_lr", [0.0, 0.001])
def test_bench_pnp_cuts_the_adapted_target_when_the_target_learned_beside_the_pruner(monkeypatch, target_lr):
    """As the pipeline does: with pruner.target_lr the adapted target is cut, else the baseline."""
    from types import SimpleNamespace

    _bench_module()
    from methods.methods import METHODS

    from pnp.cli import stages

    baseline, adapted = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    summary = {"accuracy": 90.0}
    trained = stages.StageResult({"time_s": 1.5}, model=adapted if target_lr else None, scores={"g": torch.ones(2)})
    monkeypatch.setattr(stages, "train_pruner", lambda *args, **kwargs: trained)
    monkeypatch.setattr(stages, "read_out", lambda cfg, groups, scores, source: ({"g": torch.ones(2)}, {"from": source}))
    ctx = SimpleNamespace(cfg=None, data=None, groups=None, dirs={"train_pruner": SimpleNamespace(path="run")},
                          states={"train_pruner": "new"}, baseline=baseline, baseline_summary=summary)
    choice = METHODS["pnp"].choose(ctx)
    assert choice.source is (adapted if target_lr else baseline)
    assert choice.before is summary  # the report compares with the baseline, as the pipeline's does
    assert choice.inherit and choice.times == {"pruner_training_s": 1.5}


def test_pool_batches_reads_each_batch_against_its_own_best_criterion_and_pools_the_differences(tmp_path, capsys):
    pool = _bench_module("pool_batches")
    accuracy = {  # batch -> seed -> method -> accuracy at 90% of the FLOPs removed
        "A": {0: {"pnp": 88.5, "magnitude": 88.0, "taylor": 87.0}, 1: {"pnp": 88.0, "magnitude": 88.2, "taylor": 87.5}},
        "B": {5: {"pnp": 90.0, "magnitude": 89.0, "taylor": 89.6}, 6: {"pnp": 89.6, "magnitude": 89.4, "taylor": 89.2},
              7: {"pnp": 89.0, "magnitude": 89.3, "taylor": 89.5}},
    }
    for batch, by_seed in accuracy.items():
        runs = tmp_path / batch / "runs" / "resnet20-fashion_mnist"
        runs.mkdir(parents=True)
        for seed, by_method in by_seed.items():
            for method, acc in by_method.items():
                (runs / f"{method}-r90-s{seed}.json").write_text(json.dumps(
                    {"model": "resnet20", "dataset": "fashion_mnist", "method": method, "budget": 0.9, "seed": seed,
                     "accuracy": acc}))
        (runs / "pnp-r70-s0.json").write_text(json.dumps(  # another budget, left out by --budgets
            {"model": "resnet20", "dataset": "fashion_mnist", "method": "pnp", "budget": 0.7, "seed": 0, "accuracy": 1.0}))

    found = pool.main([str(tmp_path / "A"), str(tmp_path / "B"), "--budgets", "0.9", "--json", str(tmp_path / "p.json")])
    a, b = found["rows"]
    assert (a["rival"], b["rival"]) == ("magnitude", "taylor")  # each batch against its own best criterion by mean
    assert a["diffs"] == pytest.approx([0.5, -0.2]) and b["diffs"] == pytest.approx([0.4, 0.4, -0.5])
    [together] = found["pools"]
    assert (together["n"], together["batches"], together["seeds"]) == (5, 2, [0, 1, 5, 6, 7])
    assert together["mean"] == pytest.approx(0.12) and together["worst"] == pytest.approx(-0.5)
    assert together["verdict"] == "level" and together["seeds_needed"] > 5
    assert json.loads((tmp_path / "p.json").read_text())["pools"][0]["mean"] == pytest.approx(0.12)
    assert "not a test" in capsys.readouterr().out

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="holds no run records"):
        pool.main([str(empty)])
    with pytest.raises(SystemExit, match="does not exist"):
        pool.main([str(tmp_path / "nowhere")])
    (tmp_path / "A" / "runs" / "resnet20-fashion_mnist" / "odd-r90-s0.json").write_text(json.dumps(
        {"model": "resnet20", "dataset": "fashion_mnist", "method": "odd", "budget": 0.9, "seed": 0, "accuracy": 1.0}))
    with pytest.raises(SystemExit, match="method 'odd'"):
        pool.main([str(tmp_path / "A")])


def test_sparsity_training_pulls_bn_scales_towards_zero_and_is_reused(tmp_path):
    _bench_module()
    from methods.methods import sparsity_trained
    from methods.profiles import Entry, Profile
    from methods.runner import Options, recipe, run_recipe

    from pnp.cli import stages
    from pnp.core.builders import build_model
    from pnp.training.runs import StageDir

    data_root = write_fashion_mnist(tmp_path / "fmnist", n_train=300, n_test=50)
    options = Options(tmp_path / "out", roots={"fashion_mnist": data_root})
    scales = {}
    for reg in (0.0, 0.5):
        entry = Entry("resnet20", overrides=("data.batch_size=32", "data.val_size=50", "trainer.limit_train_batches=2",
                                             "slim.epochs=1", "slim.lr=0.05", f"slim.reg={reg}"))
        cfg = run_recipe(recipe(Profile(entries=(entry,)), entry, options), entry, "bn_scale", 0, 0.5, options)
        data = stages.build_data(cfg)
        torch.manual_seed(0)
        baseline = build_model(data.builder, **data.builder_kwargs).eval()
        stage = StageDir(tmp_path / f"reg{reg}", "slim", stages.what_config(cfg, "slim"))
        trained = sparsity_trained(cfg, data, baseline, stage, stage.check())
        norms = [m for m in trained.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        scales[reg] = sum(float(m.weight.detach().abs().sum()) for m in norms)
        assert not torch.equal(trained.model.bn1.running_mean, baseline.bn1.running_mean)  # trained in train mode
        again = sparsity_trained(cfg, data, baseline, stage, stage.check())
        assert again.skipped and again.report == trained.report
        assert all(torch.equal(x, y) for x, y in zip(trained.model.state_dict().values(), again.model.state_dict().values()))
    assert scales[0.5] < 0.98 * scales[0.0]


# ---------------------------------------------------------------- the benchmark's statistics


def _records(diffs: dict[str, list[float]], budget: float = 0.5) -> list[dict]:
    """Hand-made run records of one model and budget: TP magnitude at 90 + seed, other methods that far from it."""
    out = []
    for method, offsets in diffs.items():
        for seed, offset in enumerate(offsets):
            out.append({"model": "resnet20", "dataset": "fashion_mnist", "method": method, "budget": budget,
                        "seed": seed, "accuracy": 90.0 + seed + offset, "accuracy_pruned": 50.0 + offset,
                        "baseline_accuracy": 95.0, "flops": 1e6, "flops_kept": 1 - budget, "baseline_flops": 2e6,
                        "select_s": 1.0, "wall_s": 10.0})
    return out


def test_t_quantiles_are_students():
    _bench_module()
    from methods.tables import t_975

    for df, expected in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042), (60, 2.000), (120, 1.980)):
        assert t_975(df) == pytest.approx(expected, abs=1e-3)
    with pytest.raises(ValueError, match="df=0"):
        t_975(0)


@pytest.mark.parametrize("pnp, verdict, interval", [
    ([0.3, 0.5, 0.4, 0.6, 0.2], "ahead", (0.2037, 0.5963)),  # 0.4 ± 2.776 * 0.1581 / sqrt(5)
    ([-0.3, -0.5, -0.4, -0.6, -0.2], "behind", (-0.5963, -0.2037)),
    ([0.5, -0.3, 0.2, -0.1, 0.4], "level", (-0.2773, 0.5573)),
])
def test_pnp_is_compared_with_the_best_criterion_paired_by_seed(pnp, verdict, interval):
    _bench_module()
    from methods.tables import against_best, format_table

    # taylor is behind magnitude; pnp's other form and the control are above all, but are no rivals
    records = _records({"magnitude": [0.0] * 5, "taylor": [-1.0] * 5, "pnp_learned": [3.0] * 5, "control": [4.0] * 5,
                        "pnp": pnp})
    paired = against_best(records[::-1])  # paired by seed, not by order
    assert paired.rival == "magnitude" and paired.seeds == (0, 1, 2, 3, 4)
    assert paired.mean == pytest.approx(sum(pnp) / 5) and paired.worst == pytest.approx(min(pnp))
    assert paired.interval == pytest.approx(interval, abs=1e-4)
    assert paired.verdict == verdict
    # a seed the rival lacks is left out of the pairs
    fewer = against_best([r for r in records if not (r["method"] == "magnitude" and r["seed"] == 4)])
    assert fewer.seeds == (0, 1, 2, 3) and fewer.diffs == pytest.approx(pnp[:4])

    table = format_table(records, ("pnp", "pnp_learned", "magnitude", "taylor", "control"), [], {}, "test")
    row = next(line for line in table.splitlines() if line.startswith("| resnet20 | fashion_mnist | 50% | TP group magnitude |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:] == ["5", f"{sum(pnp) / 5:+.2f} [{interval[0]:+.2f}, {interval[1]:+.2f}]", f"{min(pnp):+.2f}",
                         verdict if verdict == "level" else f"**{verdict}**"]


def test_a_second_look_reads_a_wider_interval_that_can_turn_ahead_into_level(tmp_path):
    """--confidence 0.975 (a second look at seeds already read): t's 0.9875 quantile, in the table and results.json."""
    bench = _bench_module()
    from methods.tables import against_best, t_975, t_quantile

    assert t_quantile(0.975, 9) == t_975(9)  # a 95% interval reads the table
    for p, df, expected in ((0.95, 1, 6.314), (0.95, 9, 1.833), (0.95, 30, 1.697),  # Student's t quantiles
                            (0.9875, 4, 3.495), (0.9875, 9, 2.685), (0.9875, 19, 2.433), (0.995, 9, 3.250)):
        assert t_quantile(p, df) == pytest.approx(expected, abs=1e-3)
    with pytest.raises(ValueError, match="p=1.0"):
        t_quantile(1.0, 5)

    # mean 0.35, sd 0.447: 2.47 standard errors, between t(0.975, 9) = 2.262 and t(0.9875, 9) = 2.685
    pnp = [0.95, -0.25, 0.65, -0.05, 0.85, 0.05, 0.55, -0.15, 0.75, 0.15]
    records = _records({"magnitude": [0.0] * 10, "taylor": [-1.0] * 10, "pnp": pnp})
    at_95, at_975 = against_best(records), against_best(records, confidence=0.975)
    half = lambda p: (p.interval[1] - p.interval[0]) / 2  # noqa: E731
    assert half(at_975) / half(at_95) == pytest.approx(2.685 / 2.262, rel=1e-3)
    assert (at_95.verdict, at_975.verdict) == ("ahead", "level")

    out = tmp_path / "out"
    for r in records:
        path = out / "runs" / f"{r['model']}-{r['dataset']}" / f"{r['method']}-r50-s{r['seed']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    argv = ["--profile", "quick", "--out", str(out), "--report-only", "--models", "resnet20", "--methods", "pnp",
            "magnitude", "taylor", "--budgets", "0.5", "--seeds", *map(str, range(10))]
    found = bench.main(argv + ["--confidence", "0.975"])["pnp_against_best"]
    assert [(p["confidence"], p["verdict"]) for p in found] == [(0.975, "level")]
    table = (out / "table.md").read_text()
    assert "97.5% t-interval (mean ± t(0.9875, n−1)" in table and "pnp − best, mean [97.5% CI]" in table
    assert bench.main(argv)["pnp_against_best"][0]["verdict"] == "ahead"
    assert "pnp − best, mean [95% CI]" in (out / "table.md").read_text()


def test_the_cost_against_the_criteria_comes_with_the_interval_its_timing_noise_leaves(tmp_path):
    """pnp's mean total over the criteria's is the cost bar's figure; seed by seed the multiple varies with the
    machine's load, and its t-interval says whether a reading near the bar is over it or only noise."""
    bench = _bench_module()
    from methods.tables import cost_ratio

    records = _records({"magnitude": [0.0] * 5, "taylor": [-1.0] * 5, "pnp": [0.5] * 5})
    pnp_totals = [150.0, 160.0, 140.0, 155.0, 145.0]  # 1.5x the criteria on average, 1.4x to 1.6x seed by seed
    for r in records:
        r["wall_s"] = pnp_totals[r["seed"]] if r["method"] == "pnp" else 100.0 + (10.0 if r["method"] == "taylor" else -10.0)
    cost = cost_ratio(records)
    assert cost.ratio == pytest.approx(1.5) and cost.seeds == (0, 1, 2, 3, 4)
    assert cost.per_seed == pytest.approx((1.5, 1.6, 1.4, 1.55, 1.45))
    assert cost.interval == pytest.approx((1.5 - 2.776 * 0.0791 / 5 ** 0.5, 1.5 + 2.776 * 0.0791 / 5 ** 0.5), abs=1e-3)
    assert cost.text() == "×1.50 [1.40, 1.60]"
    assert cost_ratio([r for r in records if r["method"] != "pnp"]) is None  # nothing to compare

    out = tmp_path / "out"
    for r in records:
        path = out / "runs" / f"{r['model']}-{r['dataset']}" / f"{r['method']}-r50-s{r['seed']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    found = bench.main(["--profile", "quick", "--out", str(out), "--report-only", "--models", "resnet20", "--methods",
                        "pnp", "magnitude", "taylor", "--budgets", "0.5", "--seeds", *map(str, range(5))])["pnp_cost"]
    assert [(c["ratio"], round(c["low"], 2), round(c["high"], 2)) for c in found] == [(pytest.approx(1.5), 1.4, 1.6)]
    assert "| ×1.50 [1.40, 1.60] |" in (out / "table.md").read_text()


def test_table_reports_accuracy_before_fine_tuning_and_times_against_the_criteria():
    _bench_module()
    from methods.tables import format_table

    records = _records({"magnitude": [0.0, 0.0], "taylor": [-1.0, -1.0], "pnp": [0.5, 0.5], "control": [2.0, 2.0]})
    for r in records:
        r["wall_s"] = {"pnp": 60.0, "magnitude": 10.0, "taylor": 20.0, "control": 8.0}[r["method"]]
        r["select_s"] = 0.0 if r["method"] == "control" else r["select_s"]
        if r["method"] == "control":
            r["budget"], r["flops_kept"] = 0.0, 1.0
    records[0]["code"] = {"commit": "a" * 40, "uncommitted_changes": True}
    records[1]["code"] = {"commit": "b" * 40}
    table = format_table(records, ("pnp", "magnitude", "taylor", "control"), [], {}, "test").splitlines()
    assert table[2].endswith(f"Runs made at commit {'a' * 12} (1 run), {'b' * 12} (1 run), 1 of them with uncommitted "
                             f"changes; {len(records) - 2} runs with no commit recorded.")
    start = table.index(next(line for line in table if "before fine-tuning" in line))
    assert "| resnet20 | fashion_mnist | 50% | **50.50** | 50.00 | 49.00 |" in table[start:]
    # pnp's 60 s against the criteria's mean of 15 s; the control fine-tunes only, once for every budget
    assert "| resnet20 | fashion_mnist | 50% | 0.0 / 8.0 | 1.0 / 60 | 1.0 / 10 | 1.0 / 20 | ×4.00 [4.00, 4.00] |" in table
    assert table[7].startswith("| resnet20 | fashion_mnist | 50% | 95.00 | 92.50 ± 0.71 (n=2) | **91.00 ± 0.71 (n=2)** |")


def test_standard_profile_is_the_one_the_issue_fixes(tmp_path):
    bench = _bench_module()
    from methods.profiles import PROFILES, Entry, Profile
    from methods.runner import Options, plan, recipe, resolve, run_recipe

    standard, quick = PROFILES["standard"], PROFILES["quick"]
    assert [(e.model, e.dataset) for e in standard.entries] == [
        ("lenet5", "fashion_mnist"), ("resnet20", "fashion_mnist"), ("resnet56", "fashion_mnist"),
        ("mobilenetv2", "fashion_mnist")]
    assert standard.budgets == (0.5, 0.7, 0.9) and standard.seeds == (0, 1, 2, 3, 4)
    assert standard.methods == ("pnp", "pnp_learned", "pnp_widths", "magnitude", "taylor", "control")
    options = Options(tmp_path)
    quick_cfg = resolve(quick, [], options).recipes
    cfgs = resolve(standard, [], options).recipes
    shipped = recipe(Profile(entries=(Entry("lenet5"),), overrides=()), Entry("lenet5"), options)
    for entry in standard.entries:
        like = quick_cfg["lenet5-fashion_mnist" if entry.model == "lenet5" else "resnet20-fashion_mnist"]
        cfg = cfgs[entry.name]
        assert cfg.finetune.epochs >= 5 * like.finetune.epochs
        assert cfg.trainer.limit_train_batches == like.trainer.limit_train_batches  # LeNet-5: all; the others: 79
        # distillation is the recipe's, and every method (the control too) fine-tunes by one schedule
        assert cfg.finetune.kd_weight == shipped.finetune.kd_weight
        schedules = {str(run_recipe(cfg, entry, m, 0, 0.7, options).finetune) for m in standard.methods}
        assert len(schedules) == 1
    # pnp's forms share one pruner stage per seed and budget and differ only in the channels
    # they inherit: pnp_widths fills the learned widths with magnitude's channels, no look-ahead
    resnet = cfgs["resnet20-fashion_mnist"]
    forms = {m: plan(resnet, standard.entries[1], 0, m, 0.7, options) for m in ("pnp", "pnp_learned", "pnp_widths")}
    assert len({str(run.dirs["train_pruner"].path) for run in forms.values()}) == 1
    assert [forms[m].cfg.inherit.choice for m in forms] == ["auto", "learned", "magnitude"]
    assert len({str(run.dirs["prune"].path) for run in forms.values()}) == 3
    # one --set changes it for every model and method alike
    off = resolve(standard, ["finetune.kd_weight=0"], options).recipes
    assert all(cfg.finetune.kd_weight == 0 for cfg in off.values())
    assert bench.parse_args(["--profile", "standard"]).profile == "standard"


def test_probe_head_width_holds_the_group_to_magnitudes_width_and_leaves_the_methods_as_they_were(tmp_path):
    bench, probe = _bench_module(), _bench_module("probe_head_width")
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=600, n_test=200)
    common = ["--profile", "smoke", "--data-root", str(data), "--out", str(tmp_path / "out"), "--no-reports"]
    bench.main(common + ["--methods", "pnp", "magnitude"])
    runs = tmp_path / "out" / "runs" / "lenet5-fashion_mnist"
    pnp, magnitude = (json.loads((runs / f"{m}-r50-s0.json").read_text())["channels_kept"] for m in ("pnp", "magnitude"))
    # the group the learned widths keep widest against magnitude (here a convolution's: the read-out's fill
    # cannot afford to add its cut channels back, as it can a cheap fully connected layer's)
    group = max(pnp, key=lambda g: pnp[g] / magnitude[g])
    assert pnp[group] > magnitude[group]
    probe.main(common + ["--group", group])
    capped = json.loads((runs / "pnp_headcap-r50-s0.json").read_text())["channels_kept"]
    assert capped[group] <= magnitude[group] < pnp[group]
    assert "pnp_headcap" not in bench.METHODS  # registered for the probe's run only
    with pytest.raises(SystemExit, match="--group 'nope' is not a channel group of lenet5"):
        probe.main([*common[:4], "--out", str(tmp_path / "other"), "--no-reports", "--group", "nope"])  # a new run


def test_an_interval_end_that_rounds_to_zero_shows_the_sign_that_decides_the_verdict():
    """An interval that clears 0 by less than 0.005 points reads ahead, and its table says why."""
    _bench_module()
    from methods.tables import against_best, format_table, t_975

    # sd 0.1581 over five seeds: the half-width is t(0.975, 4) * 0.0707; a mean 0.001 above it clears 0 by 0.001
    half = t_975(4) * statistics.stdev([0.2, 0.4, 0.3, 0.5, 0.1]) / math.sqrt(5)
    shift = half + 0.001 - 0.3
    pnp = [d + shift for d in (0.2, 0.4, 0.3, 0.5, 0.1)]
    records = _records({"magnitude": [0.0] * 5, "taylor": [-1.0] * 5, "pnp": pnp})
    paired = against_best(records)
    assert paired.interval[0] == pytest.approx(0.001, abs=1e-9) and paired.verdict == "ahead"
    table = format_table(records, ("pnp", "magnitude", "taylor"), [], {}, "test")
    row = next(line for line in table.splitlines() if line.startswith("| resnet20 | fashion_mnist | 50% | TP group magnitude |"))
    assert "[+0.001, " in row and "**ahead**" in row
    # ends away from 0 keep two decimals, and an end of exactly 0 is not dressed up
    assert f"{paired.interval[1]:+.2f}]" in row
    tied = _records({"magnitude": [0.0] * 5, "taylor": [-1.0] * 5, "pnp": [0.0] * 5})
    assert against_best(tied).interval == (0.0, 0.0) and against_best(tied).verdict == "level"
    assert "+0.00 [+0.00, +0.00] | +0.00 | level" in format_table(tied, ("pnp", "magnitude", "taylor"), [], {}, "test")
