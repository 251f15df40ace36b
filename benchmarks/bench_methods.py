"""Pruning methods compared at the same FLOPs: accuracy, cost, and the time each takes.

For each model: one baseline per seed, then for every method and budget (fraction
of FLOPs removed) the channels the method chooses, cut by the same surgery engine
to the same FLOPs (each method's ranking is thresholded by bisection to the budget, then
what is left of it filled with the best-ranked channels that fit), fine-tuned
by the same schedule and evaluated the same way. Methods:

    pnp          pnp as shipped: the learned pruner (budget term at 1 - removed, one decision
                 per batch), then weight inheritance at the learned widths (inherit.choice=auto:
                 the pruner's picks, L1 or magnitude, whichever fine-tunes best in a look-ahead
                 of inherit_steps steps on validation images)
    pnp_learned  the learned pruner's own picks, cut as they are (inherit.choice=learned)
    l1         L1 norm of each filter (Li et al., 2017)
    bn_scale   Network Slimming: L1 sparsity training of the BN scales, then |scale|
    random     random channels
    magnitude  torch-pruning's group magnitude (L2), global ranking
    taylor     torch-pruning's group Taylor, global ranking

Scores come from torch-pruning's importance classes (pnp.core.criteria).

    python benchmarks/bench_methods.py --profile quick                  # CPU, about an hour on 2 cores
    python benchmarks/bench_methods.py --profile full --device cuda --cifar10-root DIR
    python benchmarks/bench_methods.py --models lenet5 --methods pnp l1 --budgets 0.7 --seeds 0
    python benchmarks/bench_methods.py --set resnet20.finetune_epochs=3 --set latency_repeats=20

Writes, under --out: one JSON per run (``runs/<model>-<dataset>/<method>-r<removed %>-s<seed>.json``),
the baselines (``baselines/``, reused when present), ``results.json`` (every record,
the machine, the commit), ``table.md`` and ``accuracy_vs_flops.png``. A run whose
JSON exists is not run again; one made with other settings is refused.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch
import torch.nn as nn

# ------------------------------------------------------------------ profiles
# Everything that decides a result is here; --set FIELD=VALUE or MODEL.FIELD=VALUE overrides it.


@dataclass(frozen=True)
class Schedule:
    """How one model is trained, pruned and fine-tuned. Epochs count ``train_images`` each."""

    model: str  # pnp builder name
    dataset: str = "fashion_mnist"
    batch_size: int = 128
    train_images: int | None = None  # images per training epoch (a fresh draw each epoch); None: all
    test_images: int | None = None  # the first N test images; None: the whole test split
    val_size: int = 5000  # held out of the training split, as in pnp-train
    augment: bool = False
    # after bisecting each method's threshold to the budget, add its best-ranked channels
    # that still fit (pnp.core.readout.decide_keep(fill=True)), so every method keeps close
    # to the same FLOPs
    budget_fill: bool = True
    weight_decay: float = 5e-4
    baseline_epochs: int = 8
    baseline_lr: float = 0.05
    finetune_epochs: int = 3
    finetune_lr: float = 0.01
    pruner_epochs: int = 1  # pnp
    pruner_lr: float = 1e-3
    calibration_images: int = 2048
    inherit_steps: int = 200  # pnp: fine-tuning steps of each candidate in the weight-inheritance look-ahead
    inherit_eval_images: int = 5000  # pnp: validation images the candidates are compared on
    taylor_images: int = 1024  # taylor: images whose loss gradients are summed
    # bn_scale: Network Slimming's sparsity training, here a short phase from the baseline.
    # slim_reg (torch-pruning's BNScalePruner reg) is set per schedule so that the L1 push
    # on each BN scale, reg x the sum of the learning rates over the phase, is about 0.05
    # (torch-pruning's CIFAR benchmark: about 0.02; the Network Slimming paper's CIFAR runs: 0.07 to 0.7).
    slim_epochs: int = 1
    slim_lr: float = 0.05
    slim_reg: float = 1e-3


@dataclass(frozen=True)
class Profile:
    schedules: tuple[Schedule, ...]
    methods: tuple[str, ...] = ("pnp", "pnp_learned", "l1", "bn_scale", "random", "magnitude", "taylor")
    budgets: tuple[float, ...] = (0.5, 0.7, 0.9)  # fraction of FLOPs removed
    seeds: tuple[int, ...] = (0, 1)
    latency_batch: int = 64  # latency_ms is the median at this batch size
    latency_threads: int = 1  # CPU threads while timing (fewer threads, less noise on a shared machine)
    latency_repeats: int = 10
    kd_weight: float = 0.0  # distillation from the baseline while fine-tuning; 0 for every method by default


PROFILES: dict[str, Profile] = {
    # CPU: about 30 core-minutes a seed (one process per model runs them side by side on 2 cores);
    # LeNet-5 on all of Fashion-MNIST, ResNet-20 on 10k images an epoch; pruner epochs as pnp-pipeline ships (3)
    "quick": Profile(
        schedules=(
            Schedule("lenet5", baseline_epochs=8, finetune_epochs=3, pruner_epochs=3),
            Schedule(
                "resnet20", train_images=10_000, baseline_epochs=8, baseline_lr=0.1,
                finetune_epochs=2, pruner_epochs=3, slim_epochs=1, slim_reg=2.5e-2, inherit_steps=60,
            ),
        ),
    ),
    # one GPU; the CIFAR-10 entries run when --cifar10-root is given
    "full": Profile(
        schedules=(
            Schedule("vgg16_bn", baseline_epochs=30, finetune_epochs=10, pruner_epochs=3, slim_epochs=5, slim_reg=1e-3),
            Schedule(
                "resnet56", baseline_epochs=30, baseline_lr=0.1, finetune_epochs=10, pruner_epochs=3, slim_epochs=5,
                slim_reg=1e-3,
            ),
            Schedule(
                "vgg16_bn", dataset="cifar10", augment=True, baseline_epochs=160, baseline_lr=0.1,
                finetune_epochs=40, pruner_epochs=5, slim_epochs=20, slim_reg=2.5e-4,
            ),
            Schedule(
                "resnet56", dataset="cifar10", augment=True, baseline_epochs=160, baseline_lr=0.1,
                finetune_epochs=40, pruner_epochs=5, slim_epochs=20, slim_reg=2.5e-4,
            ),
        ),
        seeds=(0, 1, 2),
    ),
    # seconds: the harness's own test
    "smoke": Profile(
        schedules=(
            Schedule(
                "lenet5", batch_size=64, train_images=256, test_images=200, val_size=100, baseline_epochs=1,
                finetune_epochs=1, calibration_images=128, taylor_images=128, inherit_steps=3, inherit_eval_images=50,
            ),
        ),
        methods=("pnp", "l1"),
        budgets=(0.5,),
        seeds=(0,),
        latency_batch=8,
        latency_repeats=2,
    ),
}

METHOD_LABELS = {
    "pnp": "pnp",
    "pnp_learned": "pnp, pruner's picks",
    "l1": "L1 (Li+17)",
    "bn_scale": "BN-scale (Slimming)",
    "random": "random",
    "magnitude": "TP group magnitude",
    "taylor": "TP group Taylor",
}
# settings that only some methods read; the rest of a Schedule decides every run
METHOD_FIELDS = {
    "pnp": ("pruner_epochs", "pruner_lr", "calibration_images", "inherit_steps", "inherit_eval_images"),
    "pnp_learned": ("pruner_epochs", "pruner_lr", "calibration_images"),
    "taylor": ("taylor_images",),
    "bn_scale": ("slim_epochs", "slim_lr", "slim_reg"),
}
BASELINE_FIELDS = (
    "model", "dataset", "batch_size", "train_images", "val_size", "augment", "weight_decay",
    "baseline_epochs", "baseline_lr",
)
RESULTS_DIR = Path(__file__).resolve().parent / "results" / "methods"


class BenchmarkError(RuntimeError):
    """A setting or an earlier result the harness cannot use; the message says what to do."""


# ------------------------------------------------------------------ arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--models", nargs="+", help="only these models (e.g. lenet5 resnet20)")
    parser.add_argument("--methods", nargs="+", help=f"only these methods, of {list(METHOD_LABELS)}")
    parser.add_argument("--budgets", nargs="+", type=float, help="fractions of FLOPs removed, e.g. 0.5 0.7")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--data-root", type=Path, help="Fashion-MNIST folder; default: the usual places")
    parser.add_argument("--cifar10-root", type=Path, help="CIFAR-10 python batches; without it, CIFAR-10 is skipped")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--kd-weight", type=float, help="distil from the baseline while fine-tuning (all methods)")
    parser.add_argument("--set", action="append", default=[], metavar="[MODEL.]FIELD=VALUE", help="override a setting")
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.json, table.md and the plot")
    return parser.parse_args(argv)


def resolve_profile(args: argparse.Namespace) -> Profile:
    """The chosen profile with --set overrides and the --models/--methods/--budgets/--seeds filters applied."""
    profile = apply_overrides(PROFILES[args.profile], args.set)
    schedules = profile.schedules
    if args.models:
        known = sorted({s.model for s in schedules})
        unknown = [m for m in args.models if m not in known]
        if unknown:
            raise BenchmarkError(f"--models {unknown} not in profile {args.profile!r}; it has {known}")
        schedules = tuple(s for s in schedules if s.model in args.models)
    methods = tuple(args.methods) if args.methods else profile.methods
    unknown = [m for m in methods if m not in METHOD_LABELS]
    if unknown:
        raise BenchmarkError(f"--methods {unknown} are not methods; use some of {list(METHOD_LABELS)}")
    budgets = tuple(args.budgets) if args.budgets else profile.budgets
    for b in budgets:
        if not 0.0 < b < 1.0:
            raise BenchmarkError(f"--budgets {b} is outside (0, 1): it is the fraction of FLOPs removed, e.g. 0.7")
    seeds = tuple(args.seeds) if args.seeds is not None else profile.seeds
    kd_weight = profile.kd_weight if args.kd_weight is None else float(args.kd_weight)
    if kd_weight < 0:
        raise BenchmarkError(f"--kd-weight {kd_weight} must be >= 0")
    return replace(profile, schedules=schedules, methods=methods, budgets=budgets, seeds=seeds, kd_weight=kd_weight)


def apply_overrides(profile: Profile, assignments: list[str]) -> Profile:
    """``FIELD=VALUE`` sets a profile field or a field of every schedule; ``MODEL.FIELD=VALUE`` one model's."""
    schedule_fields = {f.name: f for f in dataclasses.fields(Schedule)}
    profile_fields = {f.name: f for f in dataclasses.fields(Profile) if f.name != "schedules"}
    for text in assignments:
        key, sep, raw = text.partition("=")
        if not sep:
            raise BenchmarkError(f"--set {text!r} is not FIELD=VALUE or MODEL.FIELD=VALUE")
        model, _, name = key.rpartition(".")
        if not model and name in profile_fields:
            profile = replace(profile, **{name: _parse_value(text, profile_fields[name], raw)})
            continue
        if name not in schedule_fields or name == "model":
            valid = sorted(set(schedule_fields) - {"model"} | set(profile_fields))
            raise BenchmarkError(f"--set {text!r}: unknown field {name!r}; valid fields: {valid}")
        models = {s.model for s in profile.schedules}
        if model and model not in models:
            raise BenchmarkError(f"--set {text!r}: model {model!r} is not in the profile; it has {sorted(models)}")
        value = _parse_value(text, schedule_fields[name], raw)
        schedules = [replace(s, **{name: value}) if model in ("", s.model) else s for s in profile.schedules]
        profile = replace(profile, schedules=tuple(schedules))
    return profile


def _parse_value(text: str, spec: dataclasses.Field, raw: str):
    kind = str(spec.type)
    try:
        if raw.lower() in ("none", "null") and "None" in kind:
            return None
        if kind.startswith("tuple"):
            item = float if "float" in kind else int if "int" in kind else str
            return tuple(item(v) for v in raw.split(","))
        if kind.startswith("bool"):
            if raw.lower() not in ("true", "false"):
                raise ValueError(raw)
            return raw.lower() == "true"
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        return raw
    except ValueError:
        raise BenchmarkError(f"--set {text!r}: {raw!r} is not a valid {kind}") from None


# ------------------------------------------------------------------ data, models, training


@dataclass
class Bench:
    """One model on one dataset for one seed: its data and its baseline."""

    schedule: Schedule
    seed: int
    data: object  # ClassificationDataModule
    builder_kwargs: dict
    example_inputs: torch.Tensor
    baseline: nn.Module | None = None
    baseline_record: dict = field(default_factory=dict)
    groups: object = None

    @property
    def name(self) -> str:
        return f"{self.schedule.model}-{self.schedule.dataset}"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.input_shape)


def build_bench(schedule: Schedule, seed: int, roots: dict[str, Path | None]) -> Bench:
    from pnp.training.data import build_datamodule

    dm = build_datamodule(
        schedule.dataset, root=roots.get(schedule.dataset), batch_size=schedule.batch_size,
        val_size=schedule.val_size, seed=seed, augment=schedule.augment,
    )
    shape = dm.input_shape
    kwargs = {"in_channels": int(shape[0]), "num_classes": int(dm.num_classes), "input_size": int(shape[-1])}
    example = torch.randn(2, *dm.input_shape, generator=torch.Generator().manual_seed(seed))
    return Bench(schedule, seed, dm, kwargs, example)


def make_trainer(epochs: int, bench: Bench, device: str, callbacks=()):
    """Same Trainer for every training phase: no validation, logging or checkpoints."""
    s = bench.schedule
    train_batches = 1.0 if s.train_images is None else max(1, math.ceil(s.train_images / s.batch_size))
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=int(epochs),
        limit_train_batches=train_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        r".*does not have many workers.*",
        r".*module\(s\) in eval mode.*",
        r".*smaller than the logging interval.*",
        r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
        r".*You defined a `validation_step` but have no `val_dataloader`.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def train_classifier(
    model: nn.Module, bench: Bench, epochs: int, lr: float, device: str,
    teacher=None, kd_weight: float = 0.0, callbacks=(), weight_decay: float | None = None,
) -> nn.Module:
    """The one recipe (SGD, cosine) for baselines, sparsity training and fine-tuning; returns the model on CPU."""
    from pnp.training.classifier import ClassifierModule

    pl.seed_everything(bench.seed, workers=True, verbose=False)
    module = ClassifierModule(
        model, lr=lr, weight_decay=bench.schedule.weight_decay if weight_decay is None else weight_decay,
        epochs=int(epochs), schedule="cosine",
        teacher=teacher if kd_weight > 0 else None, kd_weight=kd_weight,
    )
    model.train()  # Lightning keeps the modes it is given, and baselines and their copies are in eval mode
    make_trainer(epochs, bench, device, callbacks).fit(module, datamodule=bench.data)
    return module.model.to("cpu").eval()


def held_out_loader(bench: Bench):
    from torch.utils.data import DataLoader, Subset

    n = bench.schedule.test_images
    if n is None:
        return bench.data.test_dataloader()
    dataset = bench.data.test_dataset
    return DataLoader(Subset(dataset, range(min(n, len(dataset)))), batch_size=bench.schedule.batch_size)


def measure(model: nn.Module, bench: Bench, profile: Profile, device: str) -> dict:
    """Test accuracy, FLOPs and params per sample, and CPU (and GPU) latency of ``model``."""
    from pnp.core.cost import count_flops_params, measure_latency
    from pnp.training.report import evaluate_accuracy

    model = model.to("cpu").eval()
    cost = count_flops_params(model, bench.example_inputs)
    out = {"flops": int(cost.flops), "params": int(cost.params)}
    out["accuracy"] = evaluate_accuracy(model.to(device), held_out_loader(bench), device)
    timing = dict(batch_sizes=sorted({1, profile.latency_batch}), repeats=profile.latency_repeats)
    timings = [
        {"device": "cpu", "batch_size": t.batch_size, "threads": t.threads, "median_ms": t.median_ms}
        for t in measure_latency(model.to("cpu"), bench.input_shape, threads=(profile.latency_threads,), **timing)
    ]
    if device == "cuda":
        gpu = measure_latency(model.to(device), bench.input_shape, device=device, **timing)
        timings += [{"device": "cuda", "batch_size": t.batch_size, "median_ms": t.median_ms} for t in gpu]
        model.to("cpu")
    out["latency"] = timings
    for key, where in (("latency_ms", "cpu"), ("latency_gpu_ms", "cuda")):
        at_batch = [t["median_ms"] for t in timings if (t["device"], t["batch_size"]) == (where, profile.latency_batch)]
        if at_batch:
            out[key] = at_batch[0]
    return out


# ------------------------------------------------------------------ baselines


def baseline_dir(out: Path, bench: Bench) -> Path:
    return out / "baselines" / f"{bench.name}-s{bench.seed}"


def settings_of(schedule: Schedule, names) -> dict:
    values = asdict(schedule)
    return {n: values[n] for n in names}


def check_same_settings(path: Path, stored: dict, current: dict) -> None:
    changed = {k: (stored.get(k), v) for k, v in current.items() if stored.get(k) != v}
    if changed:
        what = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
        raise BenchmarkError(f"{path} was made with {what}: pass another --out, or delete it to run it again")


def ensure_baseline(bench: Bench, out: Path, profile: Profile, device: str) -> None:
    """Train the baseline of ``bench`` or read it back from ``out``; fill bench.baseline and its record."""
    from pnp.core.artifacts import load_pruned, save_pruned
    from pnp.core.io import write_json_atomic

    directory = baseline_dir(out, bench)
    record_path = directory / "baseline.json"
    settings = settings_of(bench.schedule, BASELINE_FIELDS)
    if record_path.is_file() and (directory / "model").is_dir():
        record = _read_json(record_path)
        check_same_settings(record_path, record.get("settings", {}), settings)
        bench.baseline = load_pruned(directory / "model").eval()
        bench.baseline_record = record
        print(f"[{bench.name} s{bench.seed}] baseline reused: {record['accuracy']:.2f}%", flush=True)
        return
    from pnp.core.builders import build_model

    s = bench.schedule
    start = time.perf_counter()
    pl.seed_everything(bench.seed, workers=True, verbose=False)  # the initial weights
    model = build_model(f"pnp:{s.model}", **bench.builder_kwargs)
    model = train_classifier(model, bench, s.baseline_epochs, s.baseline_lr, device)
    train_s = time.perf_counter() - start
    save_pruned(model, directory / "model", builder=f"pnp:{s.model}", builder_kwargs=bench.builder_kwargs,
                metadata={"dataset": s.dataset, "seed": bench.seed, "made_by": "bench_methods"}, overwrite=True)
    record = {"model": s.model, "dataset": s.dataset, "seed": bench.seed, "train_s": train_s, "settings": settings}
    record.update(measure(model, bench, profile, device))
    write_json_atomic(record_path, record)
    bench.baseline, bench.baseline_record = model, record
    print(f"[{bench.name} s{bench.seed}] baseline {record['accuracy']:.2f}% in {train_s:.0f} s", flush=True)


# ------------------------------------------------------------------ methods: choosing channels


@dataclass
class Choice:
    keep: dict[str, torch.Tensor]
    readout: dict
    times: dict[str, float]  # seconds of each step the method needed to choose
    source: nn.Module | None = None  # the model to cut, when the method changed the baseline's weights


def choose_pnp_with(inherit: bool):
    """pnp: train its pruner against the frozen baseline at the budget and read out at the budget.

    With ``inherit`` (pnp as shipped, ``inherit.choice=auto``), the channels kept at
    the learned widths are then chosen by a short fine-tuning look-ahead among the
    pruner's own picks, L1 and magnitude; without it, the pruner's own picks are cut.
    """

    def choose(bench: Bench, removed: float, device: str, out: Path) -> Choice:
        from pnp.core.readout import decide_keep
        from pnp.training.inherit import choose_inheritance
        from pnp.training.pruner_module import PrunerModule

        s = bench.schedule
        start = time.perf_counter()
        pl.seed_everything(bench.seed, workers=True, verbose=False)
        module = PrunerModule(
            copy.deepcopy(bench.baseline), bench.groups, lr=s.pruner_lr, epochs=s.pruner_epochs, sparsity="flops",
            sparsity_weight=0.0, budget=1.0 - removed, budget_metric="flops", budget_weight=1.0, mask_mode="batch",
        )
        trainer = make_trainer(s.pruner_epochs, bench, device)
        trainer.fit(module, datamodule=bench.data)
        samples = min(s.calibration_images, len(bench.data.train_indices))
        trainer.test(module, dataloaders=bench.data.calibration_dataloader(samples), verbose=False)
        times = {"pruner_training_s": time.perf_counter() - start}
        start = time.perf_counter()
        keep, info = decide_keep(
            bench.groups, module.keep_scores, budget=1.0 - removed, metric="flops", fill=s.budget_fill
        )
        times["readout_s"] = time.perf_counter() - start
        if inherit:
            start = time.perf_counter()
            dm = bench.data
            chosen = choose_inheritance(
                bench.baseline, bench.groups, keep, bench.example_inputs, ("learned", "l1", "magnitude"),
                dm.train_dataloader, dm.validation_subset_dataloader(s.inherit_eval_images), steps=s.inherit_steps,
                lr=s.finetune_lr, weight_decay=s.weight_decay, device=device, seed=bench.seed,
            )
            keep = chosen.keep
            info = {**info, "inherit": chosen.to_dict()}
            times["inherit_lookahead_s"] = time.perf_counter() - start
        return Choice(keep, info, times)

    return choose


def choose_by_criterion(criterion: str, prepare: Callable | None = None):
    """A method that ranks channels by a torch-pruning criterion, on the baseline or on what ``prepare`` makes of it."""

    def choose(bench: Bench, removed: float, device: str, out: Path) -> Choice:
        from pnp.core.criteria import rank_channels
        from pnp.core.readout import decide_keep

        times: dict[str, float] = {}
        model = bench.baseline
        if prepare is not None:
            model, times = prepare(bench, device, out)
        batches = None
        if criterion == "taylor":
            samples = min(bench.schedule.taylor_images, len(bench.data.train_indices))
            batches = bench.data.calibration_dataloader(samples)
        start = time.perf_counter()
        scoring_copy = copy.deepcopy(model).to(device)
        scores = rank_channels(scoring_copy, bench.groups, criterion, batches=batches, seed=bench.seed)
        times["scoring_s"] = time.perf_counter() - start
        start = time.perf_counter()
        keep, info = decide_keep(
            bench.groups, scores, budget=1.0 - removed, metric="flops", fill=bench.schedule.budget_fill
        )
        times["readout_s"] = time.perf_counter() - start
        return Choice(keep, info, times, source=model if prepare is not None else None)

    return choose


class BNSparsity(pl.Callback):
    """Network Slimming's sparsity training: torch-pruning's L1 subgradient on the BN scales after each backward."""

    def __init__(self, pruner):
        self.pruner = pruner  # a tp.pruner.BNScalePruner

    def on_after_backward(self, trainer, pl_module) -> None:
        self.pruner.regularize(pl_module.model)


def sparsity_trained(bench: Bench, device: str, out: Path) -> tuple[nn.Module, dict[str, float]]:
    """The baseline after Network Slimming's sparsity training; trained once per model and seed, then reused."""
    import torch_pruning as tp

    from pnp.core.artifacts import load_pruned, save_pruned
    from pnp.core.criteria import CriterionNotApplicableError
    from pnp.core.io import write_json_atomic

    s = bench.schedule
    directory = baseline_dir(out, bench) / "slim"
    record_path = directory / "slim.json"
    settings = settings_of(s, BASELINE_FIELDS + METHOD_FIELDS["bn_scale"])
    if record_path.is_file() and (directory / "model").is_dir():
        record = _read_json(record_path)
        check_same_settings(record_path, record.get("settings", {}), settings)
        return load_pruned(directory / "model").eval(), {"sparsity_training_s": record["train_s"]}
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in bench.baseline.modules()):
        raise CriterionNotApplicableError(
            f"{s.model} has no BatchNorm layer: Network Slimming has no scales to train or rank"
        )
    model = copy.deepcopy(bench.baseline)
    start = time.perf_counter()
    model.eval()  # building torch-pruning's graph runs the model; keep the BN statistics as they are
    pruner = tp.pruner.BNScalePruner(
        model, bench.example_inputs, importance=tp.importance.BNScaleImportance(), reg=s.slim_reg
    )
    # as in torch-pruning's benchmark, the L1 term replaces weight decay while it trains
    model = train_classifier(
        model, bench, s.slim_epochs, s.slim_lr, device, callbacks=[BNSparsity(pruner)], weight_decay=0.0
    )
    train_s = time.perf_counter() - start
    save_pruned(
        model, directory / "model", builder=f"pnp:{s.model}", builder_kwargs=bench.builder_kwargs, overwrite=True
    )
    write_json_atomic(record_path, {"train_s": train_s, "settings": settings})
    return model, {"sparsity_training_s": train_s}


METHODS: dict[str, Callable[[Bench, float, str, Path], Choice]] = {
    "pnp": choose_pnp_with(inherit=True),
    "pnp_learned": choose_pnp_with(inherit=False),
    "l1": choose_by_criterion("l1"),
    "bn_scale": choose_by_criterion("bn_scale", prepare=sparsity_trained),
    "random": choose_by_criterion("random"),
    "magnitude": choose_by_criterion("magnitude"),
    "taylor": choose_by_criterion("taylor"),
}


# ------------------------------------------------------------------ one run


def run_path(out: Path, bench: Bench, method: str, removed: float) -> Path:
    return out / "runs" / bench.name / f"{method}-r{round(removed * 100):02d}-s{bench.seed}.json"


def run_settings(bench: Bench, method: str, profile: Profile) -> dict:
    names = BASELINE_FIELDS + ("test_images", "budget_fill", "finetune_epochs", "finetune_lr")
    names += METHOD_FIELDS.get(method, ())
    return {**settings_of(bench.schedule, names), "kd_weight": profile.kd_weight}


def run_one(bench: Bench, method: str, removed: float, profile: Profile, device: str, out: Path) -> dict:
    """Choose channels, cut them, fine-tune, measure: one record."""
    from pnp.core.surgery import apply_surgery
    from pnp.training.report import evaluate_accuracy

    s = bench.schedule
    choice = METHODS[method](bench, removed, device, out)
    select_s = sum(choice.times.values())
    start = time.perf_counter()
    source = bench.baseline if choice.source is None else choice.source
    pruned = apply_surgery(source, bench.groups, choice.keep, bench.example_inputs, verify=True)
    surgery_s = time.perf_counter() - start
    accuracy_pruned = evaluate_accuracy(pruned.to(device), held_out_loader(bench), device)
    spec = pruned.pnp_channel_spec
    start = time.perf_counter()
    teacher = copy.deepcopy(bench.baseline) if profile.kd_weight > 0 else None
    tuned = train_classifier(
        pruned, bench, s.finetune_epochs, s.finetune_lr, device, teacher=teacher, kd_weight=profile.kd_weight
    )
    finetune_s = time.perf_counter() - start
    after = measure(tuned, bench, profile, device)
    base = bench.baseline_record
    return {
        "model": s.model,
        "dataset": s.dataset,
        "method": method,
        "budget": removed,
        "seed": bench.seed,
        "accuracy": after["accuracy"],
        "accuracy_pruned": accuracy_pruned,
        "baseline_accuracy": base["accuracy"],
        "flops": after["flops"],
        "params": after["params"],
        "flops_kept": after["flops"] / base["flops"],
        "params_kept": after["params"] / base["params"],
        "baseline_flops": base["flops"],
        "baseline_params": base["params"],
        "latency_ms": after["latency_ms"],
        "latency_batch": profile.latency_batch,
        "latency_threads": profile.latency_threads,
        "baseline_latency_ms": base["latency_ms"],
        **({"latency_gpu_ms": after["latency_gpu_ms"]} if "latency_gpu_ms" in after else {}),
        "latency": after["latency"],
        "wall_s": select_s + finetune_s,
        "select_s": select_s,
        "select_steps_s": choice.times,
        "finetune_s": finetune_s,
        "surgery_s": surgery_s,
        "predicted_flops_kept": choice.readout["flops_fraction"],
        **({"inherit": choice.readout["inherit"]} if "inherit" in choice.readout else {}),
        "channels_kept": {name: len(idx) for name, idx in spec.groups.items()},
        "channels_total": dict(spec.group_sizes),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "settings": run_settings(bench, method, profile),
    }


# ------------------------------------------------------------------ the whole benchmark


def run_benchmark(profile: Profile, args: argparse.Namespace) -> None:
    """Every (model, seed, method, budget) run not on disk yet, each written as it finishes.

    A method that does not apply to a model (BN scales without BatchNorm) is written
    as a record with ``not_applicable`` and its reason, so that it is not tried again.
    """
    from pnp.core.criteria import CriterionNotApplicableError
    from pnp.core.groups import find_channel_groups
    from pnp.core.io import write_json_atomic

    quiet_lightning()
    roots = {"fashion_mnist": args.data_root, "cifar10": args.cifar10_root}
    for schedule in profile.schedules:
        if schedule.dataset not in ("fashion_mnist",) and roots.get(schedule.dataset) is None:
            print(f"[{schedule.model}-{schedule.dataset}] skipped: no --{schedule.dataset}-root given", flush=True)
            continue
        for seed in profile.seeds:
            bench = build_bench(schedule, seed, roots)
            pending = [
                (m, b) for m in profile.methods for b in profile.budgets
                if not _reuse(run_path(args.out, bench, m, b), run_settings(bench, m, profile))
            ]
            if not pending:
                continue
            ensure_baseline(bench, args.out, profile, args.device)
            bench.groups = find_channel_groups(bench.baseline, bench.example_inputs)
            for method, removed in pending:
                tag = f"[{bench.name} s{seed}] {method} -{removed:.0%} FLOPs"
                try:
                    record = run_one(bench, method, removed, profile, args.device, args.out)
                except CriterionNotApplicableError as exc:
                    print(f"{tag}: not applicable: {exc}", flush=True)
                    record = {
                        "model": schedule.model, "dataset": schedule.dataset, "method": method, "budget": removed,
                        "seed": seed, "not_applicable": str(exc), "settings": run_settings(bench, method, profile),
                    }
                    write_json_atomic(run_path(args.out, bench, method, removed), record)
                    continue
                write_json_atomic(run_path(args.out, bench, method, removed), record)
                print(
                    f"{tag}: {record['accuracy']:.2f}% (pruned {record['accuracy_pruned']:.2f}%, baseline "
                    f"{record['baseline_accuracy']:.2f}%), FLOPs kept {record['flops_kept']:.3f}, "
                    f"{record['wall_s']:.0f} s",
                    flush=True,
                )


def _reuse(path: Path, settings: dict) -> bool:
    if not path.is_file():
        return False
    check_same_settings(path, _read_json(path).get("settings", {}), settings)
    return True


def collect_records(out: Path, profile: Profile) -> tuple[list[dict], list[dict]]:
    """The run records under ``out`` of ``profile``'s models, methods, budgets and seeds: ``(done, not applicable)``."""
    wanted = {(s.model, s.dataset) for s in profile.schedules}
    records = [
        r for r in (_read_json(p) for p in sorted((out / "runs").glob("*/*.json")))
        if (r["model"], r["dataset"]) in wanted and r["method"] in profile.methods
        and any(abs(r["budget"] - b) < 1e-9 for b in profile.budgets) and r["seed"] in profile.seeds
    ]
    return [r for r in records if "not_applicable" not in r], [r for r in records if "not_applicable" in r]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def environment(device: str) -> dict:
    import torch_pruning as tp

    env = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_pruning": getattr(tp, "__version__", None),
        "device": device,
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _git(*args: str) -> str | None:
    try:
        here = Path(__file__).resolve().parent
        done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# ------------------------------------------------------------------ table and plot


def summarize(records: list[dict]) -> dict[tuple, dict]:
    """Per (model, dataset, budget, method): mean and std over seeds of accuracy, FLOPs kept and time."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["model"], r["dataset"], round(r["budget"], 6), r["method"]), []).append(r)
    out = {}
    for key, rs in cells.items():
        acc = [r["accuracy"] for r in rs]
        out[key] = {
            "n": len(rs),
            "accuracy": statistics.fmean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "flops": statistics.fmean(r["flops"] for r in rs),
            "flops_kept": statistics.fmean(r["flops_kept"] for r in rs),
            "wall_s": statistics.fmean(r["wall_s"] for r in rs),
            "baseline_accuracy": statistics.fmean(r["baseline_accuracy"] for r in rs),
            "baseline_flops": rs[0]["baseline_flops"],
        }
    return out


def format_table(
    records: list[dict], methods: tuple[str, ...], skipped: list[dict], env: dict, profile_name: str
) -> str:
    """Markdown: accuracy (mean ± std over seeds, best in bold) per model and budget, then each method's time."""
    summary = summarize(records)
    rows = sorted({(m, d, b) for (m, d, b, _) in summary})
    methods = [m for m in methods if any(k[3] == m for k in summary)] or list(methods)
    not_applicable = {(s["model"], s["dataset"], s["method"]) for s in skipped}
    lines = [
        f"# Pruning methods at equal FLOPs ({profile_name} profile)",
        "",
        f"torch {env.get('torch')}, torch-pruning {env.get('torch_pruning')}, {env.get('device')}, "
        f"commit {str(env.get('commit'))[:12]}" + (" (with uncommitted changes)." if env.get("uncommitted_changes") else "."),
        "Test accuracy (%) after the same fine-tuning, mean ± std over seeds (n = seeds); best of each row in bold.",
        "",
    ]
    labels = [METHOD_LABELS[m] for m in methods]
    header = ["model", "data", "FLOPs removed", "baseline", *labels, "FLOPs kept (measured)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, dataset, budget in rows:
        cells = {m: summary.get((model, dataset, budget, m)) for m in methods}
        best = max((c["accuracy"] for c in cells.values() if c), default=None)
        any_cell = next(c for c in cells.values() if c)
        row = [model, dataset, f"{budget:.0%}", f"{any_cell['baseline_accuracy']:.2f}"]
        for m in methods:
            c = cells[m]
            if c is None:
                row.append("n/a" if (model, dataset, m) in not_applicable else "-")
                continue
            text = f"{c['accuracy']:.2f} ± {c['accuracy_std']:.2f} (n={c['n']})"
            row.append(f"**{text}**" if c["accuracy"] == best else text)
        kept = [c["flops_kept"] for c in cells.values() if c]
        row.append(f"{min(kept):.1%}–{max(kept):.1%}")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Seconds each method spent, mean over seeds: choosing channels (pruner or sparsity training, "
        "gradient passes) plus fine-tuning.",
        "",
    ]
    header = ["model", "data", "FLOPs removed", *labels]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, dataset, budget in rows:
        row = [model, dataset, f"{budget:.0%}"]
        for m in methods:
            c = summary.get((model, dataset, budget, m))
            row.append(_seconds(c["wall_s"]) if c else ("n/a" if (model, dataset, m) in not_applicable else "-"))
        lines.append("| " + " | ".join(row) + " |")
    reasons = sorted({(s["model"], s["method"], s["not_applicable"]) for s in skipped})
    if reasons:
        lines += ["", "n/a: " + "; ".join(f"{m} on {model}: {why}" for model, m, why in reasons)]
    return "\n".join(lines) + "\n"


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def plot_methods(records: list[dict], methods: tuple[str, ...], path: Path) -> Path:
    """Accuracy against FLOPs, one panel per model and dataset, one line per method, baseline as a star."""
    from pnp.training.report import format_flops_axis, new_figure, save_png

    summary = summarize(records)
    panels = sorted({(m, d) for (m, d, _, _) in summary})
    if not panels:
        raise BenchmarkError("no run records to plot")
    fig = new_figure(5.2 * len(panels), 4.2)
    for i, (model, dataset) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        base = None
        for m in methods:
            cells = [c for k, c in summary.items() if k[:2] == (model, dataset) and k[3] == m]
            if not cells:
                continue
            cells.sort(key=lambda c: c["flops"])
            base = cells[0]
            ax.errorbar([c["flops"] for c in cells], [c["accuracy"] for c in cells],
                        yerr=[c["accuracy_std"] for c in cells], marker="o", capsize=3, label=METHOD_LABELS[m])
        if base is not None:
            ax.plot([base["baseline_flops"]], [base["baseline_accuracy"]], marker="*", markersize=12, color="black",
                    linestyle="none", label="baseline")
        format_flops_axis(ax)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model} on {dataset}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path)


def write_reports(profile: Profile, args: argparse.Namespace) -> dict:
    """``results.json``, ``table.md`` and ``accuracy_vs_flops.png`` from the run records on disk."""
    from pnp.core.io import write_json_atomic

    records, skipped = collect_records(args.out, profile)
    env = environment(args.device)
    results = {
        "profile": args.profile, "settings": asdict(profile), "environment": env,
        "records": records, "not_applicable": skipped,
    }
    write_json_atomic(args.out / "results.json", results)
    if records:
        table = format_table(records, profile.methods, skipped, env, args.profile)
        (args.out / "table.md").write_text(table, encoding="utf-8")
        plot_methods(records, profile.methods, args.out / "accuracy_vs_flops.png")
        print(table)
    print(f"wrote {args.out / 'results.json'}" + (", table.md and accuracy_vs_flops.png" if records else " (no runs yet)"))
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        profile = resolve_profile(args)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise BenchmarkError("--device cuda, but torch sees no CUDA device; use --device cpu")
        if not args.report_only:
            run_benchmark(profile, args)
        return write_reports(profile, args)
    except BenchmarkError as exc:
        raise SystemExit(f"bench_methods: {exc}") from None


if __name__ == "__main__":
    main()
