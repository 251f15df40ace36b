"""Every (model, seed, method, budget) run of a profile, through the product's stages and their records.

A run's recipe is the shipped ``pipeline`` config composed with the profile's
overrides, the command line's ``--set`` dotlists, the method's own overrides, and the
run's seed, budget and output directory. Its stages are ``pnp.cli.stages``' functions,
each in a :class:`~pnp.training.runs.StageDir`: the baseline (``stages.train``, one per
model and seed), the method's preparation (the pruner, or sparsity training), surgery
(``stages.prune``) and fine-tuning (``stages.finetune``). A finished stage is reused,
an interrupted one resumes from its last checkpoint, and one that ran with other
settings is refused before anything trains.

Under ``--out``: ``stages/<model>-<dataset>-s<seed>/`` (``baseline/``, ``pruner-k<kept %>/``,
``slim/``, ``<method>-r<removed %>/prune`` and ``/finetune``, ``control/finetune``) and one
record per run, ``runs/<model>-<dataset>/<method>-r<removed %>-s<seed>.json`` (the control,
which removes nothing, once per model and seed: ``control-r00-s<seed>.json``).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from methods.environment import code_version
from methods.methods import METHODS, SETTINGS_BEFORE_ADDED, Context
from methods.profiles import Entry, Profile, SlimConfig
from pnp.cli import stages
from pnp.cli.config import ConfigError, config_dir, register_schemas, validate
from pnp.core.criteria import CriterionNotApplicableError
from pnp.core.io import read_json, write_json_atomic
from pnp.training.runs import StageConflictError, StageDir

RECIPE = "pipeline"
# keys the command line's own flags set for every run
RESERVED = {
    "seed": "--seeds", "data.seed": "--seeds", "readout.budget": "--budgets", "pruner.budget": "--budgets",
    "out_dir": "--out", "data.root": "--data-root or --cifar10-root", "model": "--models",
    "data": "the profile's entries", "inherit.choice": "the method (pnp: auto, pnp_learned: learned, pnp_widths: magnitude)",
}
ROOT_FLAGS = {"fashion_mnist": "--data-root", "cifar10": "--cifar10-root"}


class BenchmarkError(RuntimeError):
    """A setting or an earlier result the harness cannot use; the message says what to do."""


@dataclass(frozen=True)
class Options:
    out: Path
    device: str = "cpu"
    roots: dict | None = None  # dataset name -> data.root

    def root(self, dataset: str) -> Path | None:
        return (self.roots or {}).get(dataset)


# ---------------------------------------------------------------- the recipe of one run


@dataclass(frozen=True)
class Benchmark:
    """A profile as the command line narrowed it, and each of its entries' composed recipe (by entry name)."""

    profile: Profile
    recipes: dict[str, DictConfig]


def resolve(profile: Profile, sets: list[str], options: Options, models=None, methods=None, budgets=None,
            seeds=None) -> Benchmark:
    """``profile`` narrowed to the given models, methods, budgets and seeds, each entry with its ``--set`` dotlists.

    Every entry's recipe is composed and checked here, so a bad key or value is refused before any work.
    """
    entries = profile.entries
    if models:
        known = sorted({e.model for e in entries})
        unknown = [m for m in models if m not in known]
        if unknown:
            raise BenchmarkError(f"--models {unknown} are not in this profile; it has {known}")
        entries = tuple(e for e in entries if e.model in models)
    methods = tuple(methods) if methods else profile.methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BenchmarkError(f"--methods {unknown} are not methods; use some of {list(METHODS)}")
    budgets = tuple(budgets) if budgets else profile.budgets
    for b in budgets:
        if not 0.0 < b < 1.0:
            raise BenchmarkError(f"--budgets {b} is outside (0, 1): it is the fraction of FLOPs removed, e.g. 0.7")
    seeds = tuple(seeds) if seeds is not None else profile.seeds
    entries = tuple(replace(e, overrides=e.overrides + _sets_for(e, sets, profile.entries)) for e in entries)
    resolved = replace(profile, entries=entries, methods=methods, budgets=budgets, seeds=seeds)
    recipes = {e.name: recipe(resolved, e, options) for e in entries if not skipped(e, options)}
    for entry in entries:
        if entry.name in recipes:
            for method in methods:  # with each method's overrides and a run's values
                run_recipe(recipes[entry.name], entry, method, seeds[0], budgets[0], options)
    return Benchmark(resolved, recipes)


def _sets_for(entry: Entry, sets: list[str], entries: tuple[Entry, ...]) -> tuple[str, ...]:
    """The ``--set`` dotlists for ``entry``: ``KEY=VALUE`` for every entry, ``MODEL:KEY=VALUE`` (or ``MODEL-DATASET:``) for one."""
    mine = []
    for text in sets:
        key, sep, _ = text.partition("=")
        if not sep or not key.strip():
            raise BenchmarkError(f"--set {text!r} is not KEY=VALUE or MODEL:KEY=VALUE (e.g. resnet20:finetune.epochs=3)")
        prefix, colon, key = key.rpartition(":")
        if key.lstrip("+~") in RESERVED:
            raise BenchmarkError(f"--set {text!r}: {key} is set by {RESERVED[key.lstrip('+~')]}, not by --set")
        names = {e.model for e in entries} | {e.name for e in entries}
        if colon and prefix not in names:
            raise BenchmarkError(f"--set {text!r}: {prefix!r} is not a model of this profile; it has {sorted(names)}")
        if not colon or prefix in (entry.model, entry.name):
            mine.append(text[len(prefix) + 1:] if colon else text)
    return tuple(mine)


def skipped(entry: Entry, options: Options) -> bool:
    """An entry whose dataset has no default location and was given none."""
    return entry.dataset != "fashion_mnist" and options.root(entry.dataset) is None


def recipe(profile: Profile, entry: Entry, options: Options) -> DictConfig:
    """The composed, checked config of an entry: the shipped recipe, then the profile's and the entry's overrides."""
    from hydra import compose, initialize_config_dir

    machine = [f"out_dir={options.out}"] + (["trainer.accelerator=gpu"] if options.device == "cuda" else [])
    if options.root(entry.dataset) is not None:
        machine.append(f"data.root={options.root(entry.dataset)}")
    overrides = [f"model={entry.model}", f"data={entry.dataset}", *machine, *profile.overrides, *entry.overrides]
    slim = [o for o in overrides if o.startswith("slim.")]
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(RECIPE, overrides=[o for o in overrides if not o.startswith("slim.")])
        benchmark_only = OmegaConf.merge({"slim": OmegaConf.structured(SlimConfig)}, OmegaConf.from_dotlist(slim))
        with open_dict(cfg):
            cfg.slim = benchmark_only.slim
        validate(cfg, RECIPE)
        _check_slim(cfg)
    except ConfigError as exc:
        raise BenchmarkError(f"{entry.name}: {exc}") from None
    except (HydraException, OmegaConfBaseException) as exc:  # composition errors: the key is in the cause
        why = [str(e).strip().splitlines() for e in (exc, exc.__cause__) if e is not None]
        where = "".join(f" ({line.strip()})" for lines in why for line in lines[1:] if "full_key" in line)
        said = ": ".join(lines[0].rstrip(".") for lines in why)
        raise BenchmarkError(f"{entry.name}: the recipe refuses an override: {said}{where}") from None
    return cfg


def run_recipe(base: DictConfig, entry: Entry, method: str, seed: int, removed: float, options: Options) -> DictConfig:
    """An entry's recipe (:func:`recipe`) with the method's overrides and the run's seed, budget and directory.

    A method that cuts nothing (the control) has no budget: ``readout.budget`` is null.
    """
    budget = kept(removed) if METHODS[method].prunes else "null"
    run = [*METHODS[method].overrides, f"seed={seed}", f"data.seed={seed}", f"readout.budget={budget}",
           f"out_dir={stage_root(options.out, entry, seed)}"]
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(run))  # plain values of the schema: no group to compose
    try:
        validate(cfg, RECIPE)
    except ConfigError as exc:
        raise BenchmarkError(f"{entry.name}: {exc}") from None
    return cfg


def _check_slim(cfg: DictConfig) -> None:
    s = cfg.slim
    for key, ok, why in (("epochs", s.epochs >= 1, "must be >= 1"), ("lr", s.lr > 0, "must be > 0"),
                         ("reg", s.reg >= 0, "must be >= 0")):
        if not ok:
            raise ConfigError(f"slim.{key}", s[key], why)


def kept(removed: float) -> float:
    """The read-out's budget (fraction of FLOPs kept) for a fraction removed."""
    return round(1.0 - removed, 6)


# ---------------------------------------------------------------- where each run lives


def stage_root(out: Path, entry: Entry, seed: int) -> Path:
    return out / "stages" / f"{entry.name}-s{seed}"


def record_path(out: Path, entry: Entry, method: str, removed: float, seed: int) -> Path:
    return out / "runs" / entry.name / f"{method}-r{round(removed * 100):02d}-s{seed}.json"


@dataclass
class Run:
    entry: Entry
    seed: int
    method: str
    removed: float
    cfg: DictConfig
    dirs: dict[str, StageDir]  # train (the baseline), the method's preparation, prune, finetune
    record: Path
    out: Path

    @property
    def tag(self) -> str:
        cut = f"-{self.removed:.0%} FLOPs" if "prune" in self.dirs else "(nothing cut)"
        return f"[{self.entry.name} s{self.seed}] {self.method} {cut}"

    @property
    def settings(self) -> dict:
        """Everything that decides the run's result: its last stage's config."""
        return self.dirs["finetune"].config


def plan(base: DictConfig, entry: Entry, seed: int, method: str, removed: float, options: Options) -> Run:
    """A run's recipe, its stages and its record; a method that cuts nothing runs with ``removed`` 0."""
    m = METHODS[method]
    removed = removed if m.prunes else 0.0
    cfg = run_recipe(base, entry, method, seed, removed, options)
    root = stage_root(options.out, entry, seed)
    record = record_path(options.out, entry, method, removed, seed)
    dirs = {"train": StageDir(root / "baseline", "train", stages.what_config(cfg, "model", "data", "train"), defaults=SETTINGS_BEFORE_ADDED)}
    if not m.prunes:  # the baseline itself is fine-tuned
        config = stages.what_config(cfg, "model", "data", "train", "finetune", method=method)
        dirs["finetune"] = StageDir(root / method / "finetune", "finetune", config, defaults=SETTINGS_BEFORE_ADDED)
        return Run(entry, seed, method, removed, cfg, dirs, record, options.out)
    run_dir = root / f"{method}-r{round(removed * 100):02d}"
    # each stage's record holds everything upstream of it, so a stale stage is refused, not reused
    sections = ("model", "data", "train", *m.sections, "readout")
    chosen_by = {"method": method, "verify": cfg.verify, "norm_samples": cfg.norm_samples, **({"criterion": m.criterion} if m.criterion else {})}
    dirs.update(m.preparation(cfg, root))
    dirs["prune"] = StageDir(run_dir / "prune", "prune", stages.what_config(cfg, *sections, **chosen_by), defaults=SETTINGS_BEFORE_ADDED)
    dirs["finetune"] = StageDir(run_dir / "finetune", "finetune", stages.what_config(cfg, *sections, "finetune", **chosen_by), defaults=SETTINGS_BEFORE_ADDED)
    return Run(entry, seed, method, removed, cfg, dirs, record, options.out)


def states(run: Run) -> dict[str, str]:
    """Each stage's state; raise if one ran with other settings."""
    try:
        return {name: d.check() for name, d in run.dirs.items()}
    except StageConflictError as exc:
        raise BenchmarkError(f"{exc} (the benchmark's out_dir is its --out)") from None


def finished(run: Run) -> bool:
    """True when the run's record stands for the stages on disk; raise if it cannot be trusted."""
    if not run.record.is_file():
        return False
    record = read_json(run.record)
    if "not_applicable" in record:  # nothing was trained for it: decided again when its settings changed
        return record.get("settings") == json.loads(json.dumps(run.settings))
    if any(state != "done" for state in states(run).values()):
        raise BenchmarkError(
            f"{run.record} has no finished stages under {run.dirs['finetune'].path.parents[1]} to stand for "
            "(made by an earlier harness, or its stages were deleted): pass another --out, or delete the record"
        )
    return True


# ---------------------------------------------------------------- running


def run_benchmark(bench: Benchmark, options: Options) -> None:
    """Every run of the benchmark without a finished record, each record written as its run finishes."""
    profile = bench.profile
    for entry in profile.entries:
        if skipped(entry, options):
            print(f"[{entry.name}] skipped: no {ROOT_FLAGS.get(entry.dataset, 'data root')} given", flush=True)
            continue
        base = bench.recipes[entry.name]
        for seed in profile.seeds:
            runs = [plan(base, entry, seed, m, b, options) for m in profile.methods
                    for b in (profile.budgets if METHODS[m].prunes else (0.0,))]
            pending = [r for r in runs if not finished(r)]
            for r in pending:
                states(r)  # refuse any stage with other settings before anything trains
            if len(pending) < len(runs):
                print(f"[{entry.name} s{seed}] {len(runs) - len(pending)} of {len(runs)} runs finished earlier, reused",
                      flush=True)
            if pending:
                run_seed(pending)


def run_seed(runs: list[Run]) -> None:
    """The baseline of one model and seed, then each run on it."""
    first = runs[0]
    data = stages.build_data(first.cfg)
    # an unreachable budget is refused before training
    for budget in sorted({r.cfg.readout.budget for r in runs if "prune" in r.dirs}):
        stages.check_readout(next(r.cfg for r in runs if r.cfg.readout.budget == budget), data)
    stage = first.dirs["train"]
    state = stage.check()
    baseline = stages.train(first.cfg, data, stage, state)
    how = "reused" if baseline.skipped else f"trained in {baseline.report['time_s']:.0f} s"
    print(f"[{first.entry.name} s{first.seed}] baseline {baseline.report['model']['accuracy']:.2f}%, {how}", flush=True)
    groups = stages.find_groups(first.cfg, data, baseline.model)
    for run in runs:
        try:
            record = run_one(run, data, baseline, groups)
        except CriterionNotApplicableError as exc:
            print(f"{run.tag}: not applicable: {exc}", flush=True)
            record = {"model": run.cfg.model.name, "dataset": run.cfg.data.name, "method": run.method,
                      "budget": run.removed, "seed": run.seed, "not_applicable": str(exc), "settings": run.settings}
            write_json_atomic(run.record, record)
            continue
        write_json_atomic(run.record, record)
        print(f"{run.tag}: {record['accuracy']:.2f}% (before fine-tuning {record['accuracy_pruned']:.2f}%, baseline "
              f"{record['baseline_accuracy']:.2f}%), FLOPs kept {record['flops_kept']:.3f}, {record['wall_s']:.0f} s",
              flush=True)


def run_one(run: Run, data: stages.Data, baseline: stages.StageResult, groups) -> dict:
    """Choose channels, cut them, fine-tune, measure: one record. The control fine-tunes the baseline as it is."""
    cfg, dirs = run.cfg, run.dirs
    state = states(run)
    pruned = None
    # the look-ahead and the fine-tuning distil from the baseline: its logits are computed once for both
    shared = stages.shared_teacher_outputs(cfg, data, baseline.model, state) if "prune" in dirs else None
    if "prune" in dirs:
        source = keep = info = None
        inherit, before, times = True, None, None
        if state["prune"] != "done":
            prepared = [name for name in dirs if name not in ("train", "prune", "finetune")]
            ctx = Context(cfg, data, baseline.model, baseline.report["model"], groups,
                          {n: dirs[n] for n in prepared}, {n: state[n] for n in prepared})
            choice = METHODS[run.method].choose(ctx)
            source, keep, inherit, before = copy.deepcopy(choice.source), choice.keep, choice.inherit, choice.before
            info, times = choice.info, {"select_steps_s": choice.times}  # kept in the prune stage's report
        # the look-ahead distils from the baseline, as fine-tuning does (also when an adapted target is cut)
        pruned = stages.prune(cfg, data, dirs["prune"], state["prune"], source, groups, keep, info, before=before,
                              inherit_weights=inherit, extra=times, teacher=baseline.model, shared=shared)
    teacher = copy.deepcopy(baseline.model) if cfg.finetune.kd_weight > 0 else None
    start = pruned.model if pruned is not None else baseline.model
    tuned = stages.finetune(cfg, data, dirs["finetune"], state["finetune"], copy.deepcopy(start), teacher, shared=shared)
    return record(run, baseline.report, pruned.report if pruned is not None else None, tuned.report, tuned.model,
                  data.input_shape)


def record(run: Run, base: dict, pruned: dict | None, tuned: dict, model, input_shape) -> dict:
    """The run's record, from its stages' reports (and GPU latency, measured here, with --device cuda).

    Without a prune stage (the control) nothing was chosen or cut: no selection time, all FLOPs kept,
    and the accuracy before fine-tuning is the baseline's.
    """
    cfg = run.cfg
    before, after = base["model"], tuned["model"]
    batch, threads = max(cfg.report.latency_batch_sizes), cfg.report.latency_threads[0]
    # stages made before the times had their own field kept them in the read-out's record
    steps = {**pruned.get("select_steps_s", pruned["readout"].get("select_steps_s", {})), "prune_s": pruned["time_s"]} if pruned else {}
    select_s = sum(steps.values())
    out = {
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "method": run.method,
        "budget": run.removed,
        "seed": run.seed,
        "accuracy": after["accuracy"],
        "accuracy_pruned": (pruned["after"] if pruned else before)["accuracy"],
        "baseline_accuracy": before["accuracy"],
        "flops": after["flops"],
        "params": after["params"],
        "flops_kept": after["flops"] / before["flops"],
        "params_kept": after["params"] / before["params"],
        "baseline_flops": before["flops"],
        "baseline_params": before["params"],
        "latency_ms": latency_at(after, batch, threads),
        "latency_batch": batch,
        "latency_threads": threads,
        "baseline_latency_ms": latency_at(before, batch, threads),
        "latency": [{"device": "cpu", **t} for t in after["latency"]],
        "wall_s": select_s + tuned["time_s"],
        "select_s": select_s,
        "select_steps_s": steps,
        "finetune_s": tuned["time_s"],
        "predicted_flops_kept": pruned["readout"]["flops_fraction"] if pruned else 1.0,
        **({"inherit": pruned["inherit"]} if pruned and "inherit" in pruned else {}),
        **({"channels_kept": pruned["channels_kept"], "channels_total": pruned["channels_total"]} if pruned else {}),
        "device": "cuda" if cfg.trainer.accelerator == "gpu" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "code": code_version(),  # the commit the run finished at; the table names it
        "stages": {name: d.path.relative_to(run.out).as_posix() for name, d in run.dirs.items()},  # under --out
        "settings": run.settings,
    }
    if out["device"] == "cuda":
        out.update(gpu_latency(model, input_shape, cfg, batch))
    return out


def latency_at(summary: dict, batch: int, threads: int) -> float | None:
    return next((t["median_ms"] for t in summary["latency"] if (t["batch_size"], t["threads"]) == (batch, threads)), None)


def gpu_latency(model, input_shape, cfg: DictConfig, batch: int) -> dict:
    """The fine-tuned model's GPU latency at the report's batch sizes (the product reports CPU latency only)."""
    from pnp.core.cost import measure_latency

    timings = measure_latency(model.to("cuda"), list(input_shape), batch_sizes=list(cfg.report.latency_batch_sizes), device="cuda",
                              repeats=int(cfg.report.latency_repeats))
    model.to("cpu")
    gpu = [{"device": "cuda", "batch_size": t.batch_size, "median_ms": t.median_ms} for t in timings]
    return {"latency_gpu_ms": next(t["median_ms"] for t in gpu if t["batch_size"] == batch), "latency_gpu": gpu}
