"""torch-pruning's criteria on pnp's groups, their global ranking, and the methods benchmark end to end."""

from __future__ import annotations

import importlib.util
import dataclasses
import json
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
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


RECORD_FIELDS = {"model", "method", "budget", "accuracy", "flops", "params", "latency_ms", "seed", "wall_s"}


def test_bench_methods_smoke_writes_records_table_and_plot(tmp_path):
    bench = _bench_module()
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=600, n_test=200)
    out = tmp_path / "out"
    argv = ["--profile", "smoke", "--data-root", str(data), "--out", str(out), "--methods", "pnp", "l1", "bn_scale"]
    results = bench.main(argv)

    runs = sorted((out / "runs" / "lenet5-fashion_mnist").glob("*.json"))
    assert [p.name for p in runs] == ["bn_scale-r50-s0.json", "l1-r50-s0.json", "pnp-r50-s0.json"]
    assert "no BatchNorm" in json.loads(runs.pop(0).read_text())["not_applicable"]
    baseline = json.loads((out / "baselines" / "lenet5-fashion_mnist-s0" / "baseline.json").read_text())
    for path in runs:
        record = json.loads(path.read_text())
        assert RECORD_FIELDS <= set(record)
        assert record["budget"] == 0.5 and record["seed"] == 0 and record["model"] == "lenet5"
        assert 0.0 <= record["accuracy"] <= 100.0
        assert record["flops"] <= 0.5 * baseline["flops"] * 1.0001
        assert record["flops_kept"] == pytest.approx(record["predicted_flops_kept"], rel=1e-6)
        assert record["wall_s"] == pytest.approx(record["select_s"] + record["finetune_s"])
    assert len(results["records"]) == 2 and len(results["not_applicable"]) == 1
    assert results["environment"]["torch"] == torch.__version__
    table = (out / "table.md").read_text()
    pnp_record = json.loads((out / "runs" / "lenet5-fashion_mnist" / "pnp-r50-s0.json").read_text())
    tried = pnp_record["inherit"]["lookahead_accuracy"]  # the weight-inheritance look-ahead ran and chose
    assert set(tried) == {"learned", "l1", "magnitude"} and pnp_record["inherit"]["choice"] in tried
    assert "| pnp |" in table and "L1 (Li+17)" in table and "| lenet5 | fashion_mnist | 50% |" in table
    assert "n/a: bn_scale on lenet5" in table
    assert (out / "accuracy_vs_flops.png").read_bytes().startswith(b"\x89PNG")

    # a second run finds every record on disk and trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    bench.main(argv)
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    # a changed setting is refused, naming the field
    with pytest.raises(SystemExit, match="finetune_epochs"):
        bench.main(argv + ["--set", "finetune_epochs=2"])


def test_bench_methods_full_profile_runs_in_miniature(tmp_path):
    """The GPU profile's four schedules (VGG-16-BN, ResNet-56; Fashion-MNIST and CIFAR-10) run end to end."""
    from test_data import write_cifar

    bench = _bench_module()
    fashion = write_fashion_mnist(tmp_path / "fmnist", n_train=120, n_test=20)
    write_cifar(tmp_path / "cifar", per_batch=24, n_test=20)
    tiny = {
        "batch_size": 16, "train_images": 32, "test_images": 20, "val_size": 40, "baseline_epochs": 1,
        "finetune_epochs": 1, "pruner_epochs": 1, "calibration_images": 32, "inherit_steps": 2,
        "inherit_eval_images": 16, "latency_repeats": 1, "latency_batch": 2,
    }
    out = tmp_path / "out"
    argv = ["--profile", "full", "--data-root", str(fashion), "--cifar10-root", str(tmp_path / "cifar"),
            "--out", str(out), "--methods", "pnp", "magnitude", "--budgets", "0.5", "--seeds", "0"]
    results = bench.main(argv + [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")])

    made = {(r["model"], r["dataset"], r["method"]) for r in results["records"]}
    assert made == {(m, d, method) for m in ("vgg16_bn", "resnet56") for d in ("fashion_mnist", "cifar10")
                    for method in ("pnp", "magnitude")}
    for record in results["records"]:
        assert record["flops_kept"] <= 0.5 + 1e-6 and record["settings"]["budget_fill"] is True
    assert "| resnet56 | cifar10 | 50% |" in (out / "table.md").read_text()


def test_bench_methods_refuses_bad_settings(tmp_path):
    bench = _bench_module()
    for argv, message in (
        (["--methods", "l2norm"], "l2norm"),
        (["--budgets", "1.5"], "1.5"),
        (["--set", "lenet5.finetune_epoch=2"], "finetune_epoch"),
        (["--set", "finetune_epochs=two"], "'two'"),
        (["--models", "alexnet"], "alexnet"),
    ):
        with pytest.raises(SystemExit, match=message):
            bench.main(["--profile", "quick", "--out", str(tmp_path), "--report-only", *argv])


def test_sparsity_training_pulls_bn_scales_towards_zero_and_is_reused(tmp_path):
    bench = _bench_module()
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=300, n_test=50)
    schedule = bench.Schedule("resnet20", batch_size=32, train_images=64, val_size=50, slim_epochs=1, slim_lr=0.05)
    scales, times = {}, {}
    for reg in (0.0, 0.5):
        b = bench.build_bench(dataclasses.replace(schedule, slim_reg=reg), 0, {"fashion_mnist": data})
        torch.manual_seed(0)
        b.baseline = resnet20()
        model, times[reg] = bench.sparsity_trained(b, "cpu", tmp_path / f"reg{reg}")
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        scales[reg] = sum(float(m.weight.detach().abs().sum()) for m in norms)
        assert not torch.equal(model.bn1.running_mean, b.baseline.bn1.running_mean)  # trained in train mode
        again, times_again = bench.sparsity_trained(b, "cpu", tmp_path / f"reg{reg}")
        assert times_again == times[reg]
        assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), again.state_dict().values()))
    assert scales[0.5] < 0.98 * scales[0.0]
