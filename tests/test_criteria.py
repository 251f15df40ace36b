"""torch-pruning's criteria on pnp's groups, their global ranking, and the methods benchmark end to end."""

from __future__ import annotations

import importlib.util
import json
import shutil
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


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_methods.py"
    spec = importlib.util.spec_from_file_location("bench_methods", path)
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
    argv = ["--profile", "smoke", "--data-root", str(data), "--out", str(out), "--methods", "pnp", "l1", "bn_scale"]
    results = bench.main(argv)

    runs = sorted((out / "runs" / "lenet5-fashion_mnist").glob("*.json"))
    assert [p.name for p in runs] == ["bn_scale-r50-s0.json", "l1-r50-s0.json", "pnp-r50-s0.json"]
    assert "no BatchNorm" in json.loads(runs.pop(0).read_text())["not_applicable"]
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
    assert len(results["records"]) == 2 and len(results["not_applicable"]) == 1
    assert results["environment"]["torch"] == torch.__version__
    pnp_record = json.loads((out / "runs" / "lenet5-fashion_mnist" / "pnp-r50-s0.json").read_text())
    assert pnp_record["settings"]["pruner"]["budget"] == 0.5  # the pruner learns at the budget surgery cuts to
    tried = pnp_record["inherit"]["lookahead_accuracy"]  # the weight-inheritance look-ahead ran and chose
    assert set(tried) == {"learned", "l1", "magnitude"} and pnp_record["inherit"]["choice"] in tried
    l1_record = json.loads((out / "runs" / "lenet5-fashion_mnist" / "l1-r50-s0.json").read_text())
    assert l1_record["settings"]["criterion"] == "l1" and "inherit" not in l1_record
    table = (out / "table.md").read_text()
    assert "| pnp |" in table and "L1 (Li+17)" in table and "| lenet5 | fashion_mnist | 50% |" in table
    assert "n/a: bn_scale on lenet5" in table
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
        "train.epochs=1", "finetune.epochs=1", "pruner.epochs=1", "pruner.calibration_samples=16", "inherit.steps=2",
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
    ):
        with pytest.raises(SystemExit, match=message):
            bench.main(["--profile", "quick", "--out", str(tmp_path), "--report-only", *argv])


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
