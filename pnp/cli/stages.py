"""The four stages (train, train-pruner, prune, finetune), each into its own directory.

Every stage function takes the composed config, the data, its :class:`StageDir`
and what earlier stages produced (in memory), and returns a :class:`StageResult`.
A stage that finished before in the same directory is not run again: its outputs
are read back from disk. Work that touches files runs on rank 0 only; everything
a later stage needs is computed on every rank, so each process of a
distributed run walks through the same Trainer calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from pnp.cli.config import ConfigError, InputError, PrunerConfig, pruner_budget_warmup, pruner_sparsity_weight, settings_before_added
from pnp.cli.loading import MODEL_DIR, load_pruned_model, load_target
from pnp.training.runs import INTERRUPTED_CHECKPOINT, StageDir, is_global_zero
from pnp.core.artifacts import CHANNELS_FILE, load_pruned, save_pruned
from pnp.core.io import KEEP_FILE, KEEP_SCORES_FILE, load_keep_scores, save_keep_scores, save_tensors_atomic, write_keep_decisions

PRUNER_FILE = "pruner.safetensors"
# the target as it learned beside the pruner (pruner.target_lr > 0): what the prune stage cuts
ADAPTED_DIR = "adapted"
CHANNELS_PLOT = "channels_per_layer.png"
ACCURACY_PLOT = "accuracy_vs_flops.png"
# data fields that say where and how fast data is read, not what is learned from it
_DATA_HOW = ("root", "num_workers")


@dataclass
class Data:
    """The data module and what a model built for it needs."""

    module: Any
    builder: str
    builder_kwargs: dict
    example_inputs: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.module.input_shape)

    def metadata(self, **extra) -> dict:
        dm = self.module
        meta = {
            "preprocessing": dm.preprocessing,
            "input_shape": list(dm.input_shape),
            "num_classes": int(dm.num_classes),
            "dataset": dm.name,
        }
        if getattr(dm, "class_names", None):
            meta["class_names"] = list(dm.class_names)
        return {**meta, **extra}


@dataclass
class StageResult:
    report: dict
    model: nn.Module | None = None
    scores: dict[str, torch.Tensor] | None = None
    keep: dict[str, torch.Tensor] | None = None
    skipped: bool = False
    extras: dict = field(default_factory=dict)


# ---------------------------------------------------------------- shared pieces


def build_data(cfg: DictConfig) -> Data:
    """Read the dataset the config names; raise before any work if it is not there."""
    from pnp.training.data import build_datamodule

    d = cfg.data
    try:
        dm = build_datamodule(
            d.name,
            root=d.root,
            batch_size=d.batch_size,
            num_workers=d.num_workers,
            val_size=d.val_size,
            seed=d.seed,
            channels=d.channels,
            image_size=d.image_size,
            augment=d.augment,
        )
    except ValueError as exc:  # the data module's messages name the data.* field
        raise InputError(str(exc)) from None
    available = {"in_channels": int(dm.input_shape[0]), "num_classes": int(dm.num_classes), "input_size": int(dm.input_shape[-1])}
    kwargs = {k: available[k] for k in cfg.model.data_kwargs}
    kwargs.update(OmegaConf.to_container(cfg.model.kwargs, resolve=True))
    generator = torch.Generator().manual_seed(int(cfg.seed))
    example = torch.randn(2, *dm.input_shape, generator=generator)
    return Data(dm, cfg.model.builder, kwargs, example)


def check_fits(model: nn.Module, data: Data, field: str, value: Any) -> None:
    """Raise a :class:`ConfigError` on ``field`` unless ``model`` takes the data's images and scores all its classes."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(data.example_inputs)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(field, value, f"the model cannot take the data's images (shape {data.input_shape}): {first}. "
                                        "Set data.channels and data.image_size to what the model takes, "
                                        "or choose a model for this data") from None
    finally:
        model.train(was_training)
    classes = int(data.module.num_classes)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] < classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(field, value, f"the model gives outputs of shape {got} for a batch of {len(data.example_inputs)}, "
                                        f"but data {data.module.name!r} has {classes} classes: build it with "
                                        f"num_classes={classes} (model.data_kwargs or model.kwargs)")


def what_config(cfg: DictConfig, *sections: str, **extra) -> dict:
    """The part of ``cfg`` that decides a stage's result (not where or on what hardware it runs)."""
    out: dict[str, Any] = {"seed": cfg.seed}
    for name in sections:
        value = OmegaConf.to_container(cfg[name], resolve=True)
        if name == "data":
            value = {k: v for k, v in value.items() if k not in _DATA_HOW}
        out[name] = value
    out.update(extra)
    return out


def make_trainer(cfg: DictConfig, stage: StageDir, epochs: int, monitor: str | None):
    """A Lightning Trainer as the ``trainer`` section says, logging and checkpointing into the stage."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint, OnExceptionCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from pnp.training.data import TrainOrderInCheckpoints

    _quiet_lightning()
    t = cfg.trainer
    devices = OmegaConf.to_container(t.devices) if OmegaConf.is_list(t.devices) else t.devices
    directory = stage.path / "checkpoints"
    # the resume point: last.ckpt after every epoch, and when the run is interrupted
    callbacks = [
        ModelCheckpoint(dirpath=directory, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                        save_on_train_epoch_end=True, enable_version_counter=False),
        OnExceptionCheckpoint(dirpath=directory, filename=INTERRUPTED_CHECKPOINT.stem),
        TrainOrderInCheckpoints(),  # a resumed stage trains on the batches a run never stopped would have
    ]
    if t.checkpoint_every_n_steps:  # long epochs: the same resume point, also every N steps
        callbacks.append(ModelCheckpoint(dirpath=directory, filename="last", monitor=None, save_top_k=1,
                                         every_n_train_steps=int(t.checkpoint_every_n_steps),
                                         enable_version_counter=False))
    if monitor:
        callbacks.append(ModelCheckpoint(dirpath=directory, filename="best", monitor=monitor, mode="max", save_top_k=1,
                                         enable_version_counter=False))
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        sync_batchnorm=t.sync_batchnorm,
        max_epochs=int(epochs),
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        limit_test_batches=t.limit_test_batches,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        logger=TensorBoardLogger(save_dir=str(stage.path), name="tb", version="", default_hp_metric=False),
        callbacks=callbacks,
        default_root_dir=str(stage.path),
        enable_model_summary=False,
    )


# Lightning warnings that pnp's stages cause on purpose
_EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",  # the frozen target or teacher
    r"Checkpoint directory .* exists and is not empty",  # a resumed stage
    r"The number of training batches .* is smaller than the logging interval",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own, under torch >= 2.9
    r"You have overridden `on_after_batch_transfer` in `LightningModule`",  # channels-last batches (pnp.training.layout)
    # a fresh stage with the interrupt checkpoint callback: Lightning looks for a "last" checkpoint to resume
    r"`\.fit\(ckpt_path=None\)` was called without a model",
    r"\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint available",
    # a stage resumed mid-epoch: TrainOrderInCheckpoints puts the training order back where it stopped
    r"You're resuming from a checkpoint that ended before the epoch ended",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _quiet_lightning() -> None:
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in log.filters):
        log.addFilter(_DropTips())


# what each finished stage leaves in its directory: a stage whose report says "done"
# but lacks one of them runs again
OUTPUTS = {
    "train": (MODEL_DIR,),
    "train_pruner": (KEEP_SCORES_FILE,),
    "prune": (MODEL_DIR, KEEP_FILE),
    "finetune": (MODEL_DIR,),
}


def stage_dir(path: Path, name: str, config: dict, data: Data) -> StageDir:
    """The directory of stage ``name`` (a key of :data:`OUTPUTS`) on ``data``, recorded with ``config``.

    The data files' contents (not where they are) join the config, so a stage is redone
    only with the same data; ``stage.json`` also records each file's path and size.
    """
    content = [{k: v for k, v in f.items() if k != "path"} | {"name": Path(f["path"]).name} for f in data.module.files]
    return StageDir(path, name, {**config, "data_content": content}, outputs=OUTPUTS[name],
                    record={"data_files": data.module.files}, defaults=settings_before_added())


# what Lightning reads back from a checkpoint it resumes from
CHECKPOINT_KEYS = ("pytorch-lightning_version", "state_dict", "epoch", "global_step", "loops")


def readable_checkpoint(stage: StageDir) -> Path | None:
    """The stage's ``last.ckpt`` if it can be read; an unreadable one (a full disk, a kill mid-write) is set aside."""
    ckpt = stage.last_checkpoint
    if ckpt is None:
        return None
    try:
        content = torch.load(ckpt, map_location="cpu", weights_only=True)
        missing = [key for key in CHECKPOINT_KEYS if not isinstance(content, dict) or key not in content]
        why = f"lacks {missing[0]!r}: not a checkpoint of this stage" if missing else None
    except Exception as exc:  # any reader error means the file cannot be resumed from
        why = f"cannot be read ({type(exc).__name__})"
    if why is None:
        return ckpt
    if is_global_zero():
        aside = ckpt.with_name(ckpt.name + ".unreadable")
        ckpt.replace(aside)
        print(f"[pnp] {ckpt} {why}; set aside as {aside.name}, stage {stage.name!r} starts again", flush=True)
    return None


@contextlib.contextmanager
def _expected_warnings_silenced():
    with warnings.catch_warnings():
        for pattern in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def fit(trainer, module, data: Data, stage: StageDir, resume: bool) -> None:
    ckpt = readable_checkpoint(stage) if resume else None
    if ckpt is not None and is_global_zero():
        print(f"[pnp] resuming stage {stage.name!r} from {ckpt}", flush=True)
    with _expected_warnings_silenced():
        trainer.fit(module, datamodule=data.module, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)


def validate(trainer, module, data: Data) -> None:
    with _expected_warnings_silenced():
        trainer.validate(module, datamodule=data.module, verbose=False)


def calibrate(trainer, module, loader) -> None:
    with _expected_warnings_silenced():
        trainer.test(module, dataloaders=loader, verbose=False)


def summarize(model: nn.Module, data: Data, cfg: DictConfig) -> dict | None:
    """Test accuracy, FLOPs, params and CPU latency of ``model`` (rank 0 only; None elsewhere)."""
    if not is_global_zero():
        return None
    from pnp.training.report import evaluate_accuracy, model_summary

    model = model.to("cpu").eval()
    summary = model_summary(
        model,
        data.input_shape,
        batch_sizes=list(cfg.report.latency_batch_sizes),
        threads=list(cfg.report.latency_threads),
        repeats=int(cfg.report.latency_repeats),
    )
    summary["accuracy"] = float(evaluate_accuracy(model, data.module.test_dataloader()))
    return summary


def save_model(model: nn.Module, stage: StageDir, data: Data, **metadata) -> Path:
    directory = stage.path / MODEL_DIR
    if is_global_zero():
        save_pruned(
            model.to("cpu"), directory, builder=data.builder, builder_kwargs=data.builder_kwargs,
            metadata=data.metadata(**metadata), overwrite=True,
        )
    return directory


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _classifier(cfg: DictConfig, cfg_section, model: nn.Module, teacher: nn.Module | None = None):
    """The Lightning module that trains ``model`` by ``cfg_section`` (``cfg.train``, ``cfg.finetune``, ...)."""
    from pnp.training.classifier import ClassifierModule

    return ClassifierModule(
        model,
        lr=cfg_section.lr,
        weight_decay=cfg_section.weight_decay,
        momentum=cfg_section.momentum,
        optimizer=cfg_section.optimizer,
        epochs=cfg_section.epochs,
        schedule=cfg_section.schedule,
        warmup_epochs=cfg_section.warmup_epochs,
        label_smoothing=cfg_section.label_smoothing,
        teacher=teacher,
        kd_weight=cfg_section.kd_weight if teacher is not None else 0.0,
        kd_temperature=cfg_section.kd_temperature,
        channels_last=cfg.trainer.channels_last,
    )


def _monitor(data: Data) -> str | None:
    return "val/acc" if data.module.val_size else None


# ---------------------------------------------------------------- 1. baseline training


def train(cfg: DictConfig, data: Data, stage: StageDir, state: str) -> StageResult:
    """Train the target from scratch; save it as ``model/`` with its test summary."""
    from pnp.core.builders import build_model

    if state == "done":
        return StageResult(stage.report(), model=load_pruned(stage.path / MODEL_DIR, trust_builder=data.builder), skipped=True)
    import pytorch_lightning as pl

    start = time.perf_counter()
    stage.start()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model = build_model(data.builder, **data.builder_kwargs)
    module = _classifier(cfg, cfg.train, model)
    trainer = make_trainer(cfg, stage, cfg.train.epochs, _monitor(data))
    fit(trainer, module, data, stage, resume=state == "resume")
    model = module.model.to("cpu").eval()
    save_model(model, stage, data, made_by="pnp-train")
    summary = summarize(model, data, cfg)
    report = stage.finish({"model": summary, "time_s": time.perf_counter() - start, "epochs": cfg.train.epochs})
    return StageResult(report, model=model)


# ---------------------------------------------------------------- 2. pruner training


def keep_digest(keep: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(keep):
        h.update(name.encode())
        h.update(keep[name].to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _gather(value: str) -> list[str]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, value)
        return out
    return [value]


def train_pruner(cfg: DictConfig, data: Data, stage: StageDir, state: str, target: nn.Module, readout: bool) -> StageResult:
    """Train the pruner against the frozen target; average its keep probabilities on calibration data.

    With ``readout`` the keep decisions are read out too (``keep.json``), and every
    rank's decisions are compared: the report lists one digest per rank.
    """
    if state == "done":
        report = stage.report()
        return StageResult(report, model=adapted_target(stage.path, data), scores=load_keep_scores(stage.path / KEEP_SCORES_FILE),
                           skipped=True)
    import pytorch_lightning as pl

    from pnp.training.pruner_module import PrunerModule

    start = time.perf_counter()
    stage.start()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    groups = find_groups(cfg, data, target)
    p = cfg.pruner
    trainer = make_trainer(cfg, stage, p.epochs, monitor=None)
    batches = train_batches_per_epoch(trainer, len(data.module.train_dataloader()))
    steps, epochs = pruner_schedule(int(p.epochs), int(p.min_steps), batches)
    trainer.fit_loop.max_epochs = epochs
    trainer.fit_loop.epoch_loop.max_steps = steps  # a short dataset stops mid-epoch, at min_steps
    trainer.check_val_every_n_epoch = epochs  # validated once, when it has learned
    module = PrunerModule(
        target, groups, task=task_of(data), lr=p.lr, trunk_lr=p.trunk_lr, target_lr=p.target_lr, weight_decay=p.weight_decay, epochs=epochs, sparsity=p.sparsity,
        sparsity_weight=pruner_sparsity_weight(p), budget=p.budget, budget_metric=p.budget_metric,
        budget_weight=p.budget_weight, budget_warmup=pruner_budget_warmup(p), kd_weight=p.kd_weight, kd_temperature=p.kd_temperature,
        temperature=p.temperature, init_keep=p.init_keep, noise=p.noise, mask_mode=p.mask_mode,
        input_samples=pruner_input_samples(p), norm_stats=p.norm_stats, head_layer=p.head_layer, channels_last=cfg.trainer.channels_last,
    )
    fit(trainer, module, data, stage, resume=state == "resume")
    if steps % batches:  # the last epoch stopped part-way, before its validation
        validate(trainer, module, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/")) and v.numel() == 1}
    signal = task_signal(metrics, int(data.module.num_classes), adapts=module.adapts,
                         budget=p.budget if p.budget_metric == "flops" else None, warmup=pruner_budget_warmup(p))
    if (signal["low"] or signal["under_budget"]) and is_global_zero():
        print(task_signal_line(signal), flush=True)
    samples = min(int(p.calibration_samples), len(data.module.train_indices))
    calibrate(trainer, module, data.module.calibration_dataloader(samples))
    scores = {k: v.detach().float().cpu() for k, v in module.keep_scores.items()}
    adapted = module.gated.target.to("cpu").eval() if module.adapts else None
    if adapted is not None:
        # its BatchNorm statistics are the unadapted network's (norm_stats=batch never updates them) or
        # the gated batches' (running): measure them for its own weights, so that the adapted target
        # saved and reported is a network that works on its own
        remeasure_norms(cfg, data, adapted)
    if is_global_zero():
        save_keep_scores(stage.path / KEEP_SCORES_FILE, scores)
        save_tensors_atomic(module.pruner.state_dict(), stage.path / PRUNER_FILE)
        if adapted is not None:
            save_pruned(adapted, stage.path / ADAPTED_DIR, builder=data.builder,
                        builder_kwargs=data.builder_kwargs, metadata=data.metadata(made_by="pnp-train-pruner"), overwrite=True)
    report: dict[str, Any] = {
        "time_s": None,
        "epochs": epochs,
        "steps": int(trainer.global_step),
        "calibration_samples": samples,
        "input_samples": pruner_input_samples(p),
        "metrics": metrics,
        "task_signal": signal,
        "world_size": trainer.world_size,
    }
    keep = None
    if readout:
        keep, info = read_out(cfg, groups, scores)
        digests = _gather(keep_digest(keep))
        report["readout"] = info
        report["keep_digest_per_rank"] = digests
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks read out different keep decisions (digests {digests}); please report this as a bug")
        write_keep(stage.path / KEEP_FILE, groups, keep, info)
    report["time_s"] = time.perf_counter() - start
    return StageResult(stage.finish(report), model=adapted, scores=scores, keep=keep)


# the gated target's validation accuracy at the pruner's end counts as little task signal below this
# share of the way from chance to 100%: at 90% fewer FLOPs a frozen ResNet-56 ended at 16-28% on 10
# classes on four seeds of five (its widths then carried little of the task); at 70%, and LeNet-5 and
# MobileNetV2 at 90%, at 40-83%
LOW_SIGNAL_SHARE = 0.25
# the pruner's masks count as under their budget below this share of it: aimed at 10% of its FLOPs from
# the first step, a frozen ResNet-56's fell to 0.7-1.3% and stayed there (the warmup held them at 8-10%),
# while ResNet-20's dipped to 4.5% at step 20 and were back at 10-14% by step 30
UNDER_BUDGET_SHARE = 0.5


def task_signal(metrics: dict, classes: int, adapts: bool, budget: float | None = None, warmup: float = 0.0) -> dict:
    """How much of the task the gated target still did when the pruner stopped learning, and at what FLOPs.

    ``low`` when its validation accuracy (``val/acc``, under the pruner's masks) is nearer chance
    than :data:`LOW_SIGNAL_SHARE` of the way to 100%: the pruner then learned its widths from a
    network that no longer solves the task. Chance is one class in ``classes`` (balanced classes).
    ``under_budget`` when its masks keep less than :data:`UNDER_BUDGET_SHARE` of the FLOPs ``budget``
    (``val/flops_kept``): they pruned past the budget, and the read-out fills back to it in whatever
    order that left. ``warmup`` is the ``pruner.budget_warmup`` it trained with.
    """
    acc, kept = metrics.get("val/acc"), metrics.get("val/flops_kept")
    chance = 100.0 / max(1, classes)
    low = acc is not None and acc < chance + LOW_SIGNAL_SHARE * (100.0 - chance)
    under = kept is not None and budget is not None and kept < UNDER_BUDGET_SHARE * float(budget)
    return {"val_acc": acc, "flops_kept": kept, "chance": chance, "low": bool(low), "adapting_target": bool(adapts),
            "budget": None if budget is None else float(budget), "under_budget": bool(under), "budget_warmup": float(warmup)}


def task_signal_line(signal: dict) -> str:
    """The stage's notice for a low :func:`task_signal` or masks under their budget, naming the option that helps."""
    parts = []
    if signal["low"]:
        kept = "" if signal["flops_kept"] is None else f" with {100 * signal['flops_kept']:.1f}% of its FLOPs kept"
        parts.append(f"the gated target ended the pruner's training at {signal['val_acc']:.1f}% validation accuracy{kept} "
                     f"(chance {signal['chance']:.1f}%): the widths were learned with little task signal")
    if signal["under_budget"]:
        under = (f"the pruner's masks kept {100 * signal['flops_kept']:.1f}% of the FLOPs against a budget of "
                 f"{100 * signal['budget']:.1f}%: they pruned past it, and the read-out fills back to it in the order that left")
        if not signal["budget_warmup"]:
            under += (f"; pruner.budget_warmup ({PrunerConfig.budget_warmup}, the default) lowers the budget gradually "
                      "so that they hold it (docs/method.md)")
        else:
            under += "; a longer pruner.budget_warmup or more pruner steps (pruner.min_steps) lowers it more gently"
        parts.append(under)
    elif signal["low"] and not signal["adapting_target"]:
        parts.append("pruner.target_lr (e.g. 0.001) lets the target adapt beside the pruner (docs/method.md)")
    return "[pnp] " + "; ".join(parts)


def pruner_schedule(epochs: int, min_steps: int, batches: int) -> tuple[int, int]:
    """The pruner's optimizer steps and the epochs they span: ``epochs`` whole epochs of ``batches`` steps,
    or exactly ``min_steps`` where those are fewer (the last epoch then stops part-way)."""
    steps = max(epochs * batches, min_steps)
    return steps, math.ceil(steps / batches)


def pruner_input_samples(pruner: DictConfig) -> int | None:
    """The images of a batch the pruner decides from: ``pruner.input_samples`` in batch-mask mode; every one (None)
    with per-sample decisions, which need the pruner's output for each image."""
    return pruner.input_samples if pruner.mask_mode == "batch" else None


def train_batches_per_epoch(trainer, batches: int) -> int:
    """Optimizer steps in one epoch of ``batches`` batches, on each of the trainer's processes, within its limit."""
    per_rank = math.ceil(batches / max(1, trainer.num_nodes * trainer.num_devices))
    limit = trainer.limit_train_batches
    per_rank = min(per_rank, int(limit)) if isinstance(limit, int) else int(per_rank * float(limit))
    return max(1, per_rank)


def adapted_target(run: Path, data: Data) -> nn.Module | None:
    """The target as it learned beside the pruner in the pruner run ``run`` (``pruner.target_lr`` > 0), else None."""
    directory = Path(run) / ADAPTED_DIR
    if not (directory / CHANNELS_FILE).is_file():
        return None
    return load_target("pruner_run", str(directory), data.builder, data.builder_kwargs)


def task_of(data: Data):
    """The engine's view of a classifier on ``data`` (see :mod:`pnp.core.task`)."""
    from pnp.core.task import ClassificationTask

    return ClassificationTask(data.example_inputs)


def find_groups(cfg: DictConfig, data: Data, model: nn.Module):
    """The target's channel groups, each proven to cut exactly (one surgery more, once a run)."""
    return task_of(data).find_groups(model, ignore=list(cfg.model.ignore), prove=True)


def read_out(cfg: DictConfig, groups, scores, source: tuple[str, str] = ("pruner_run", "")) -> tuple[dict[str, torch.Tensor], dict]:
    """Keep decisions from mean keep probabilities, as the ``readout`` section says.

    ``source`` names the field (and value) the scores came from, for the error
    raised when they belong to another model's groups.
    """
    from pnp.core.readout import decide_keep

    wrong = [g.name for g in groups if g.name not in scores or tuple(scores[g.name].shape) != (g.size,)]
    if wrong:
        raise ConfigError(*source, f"its keep scores do not fit the target's channel groups (e.g. {wrong[0]!r}): "
                                   "was the pruner trained for another model?")
    r = cfg.readout
    try:
        keep, info = decide_keep(groups, scores, threshold=r.threshold, min_channels=r.min_channels,
                                 round_to=r.round_to, budget=r.budget, metric=r.metric, fill=r.fill,
                                 min_share=r.min_share)
    except ValueError as exc:
        raise ConfigError("readout.budget", r.budget, str(exc)) from None
    return keep, info


# training images whose task-loss gradients a gradient criterion (taylor) sums
GRADIENT_SAMPLES = 1024


def criterion_batches(data: Data):
    """The first training images, unaugmented: what a gradient criterion sums the task loss over."""
    dm = data.module
    return dm.calibration_dataloader(min(GRADIENT_SAMPLES, len(dm.train_indices)))


def criterion_scores(cfg: DictConfig, data: Data, target: nn.Module, groups, name: str) -> dict[str, torch.Tensor]:
    """The target's channels ranked by criterion ``name`` (:func:`pnp.core.criteria.rank_channels`), for :func:`read_out`."""
    from pnp.core.criteria import CRITERIA, CriterionNotApplicableError, rank_channels

    batches = criterion_batches(data) if CRITERIA[name].needs_gradients else None
    try:
        return rank_channels(target, groups, name, batches=batches, seed=int(cfg.seed))
    except CriterionNotApplicableError as exc:
        raise ConfigError("criterion", name, str(exc)) from None


def check_builder(data: Data) -> None:
    """Raise now, before any file is written, if the model the config builds does not fit the data."""
    from pnp.core.builders import build_model

    try:
        model = build_model(data.builder, **data.builder_kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError("model.builder", data.builder, f"could not build the model with {data.builder_kwargs}: {exc}. "
                                                         "Check model.kwargs and model.data_kwargs") from None
    if not isinstance(model, nn.Module):
        raise ConfigError("model.builder", data.builder, f"built a {type(model).__name__}, not a torch.nn.Module")
    check_fits(model, data, "model.builder", data.builder)


def check_readout(cfg: DictConfig, data: Data) -> None:
    """Raise now, not after training, if ``readout.budget`` cannot be met by this architecture."""
    if cfg.readout.budget is None:
        return
    from pnp.core.builders import build_model

    # sizes and costs are all this needs: the groups are proven on the trained target later
    groups = task_of(data).find_groups(build_model(data.builder, **data.builder_kwargs), ignore=list(cfg.model.ignore))
    read_out(cfg, groups, {g.name: torch.zeros(g.size) for g in groups})


def write_keep(path: Path, groups, keep: dict[str, torch.Tensor], info: dict | None = None) -> None:
    """``keep.json`` (:func:`pnp.core.io.write_keep_decisions`), on rank 0."""
    if is_global_zero():
        write_keep_decisions(path, groups, keep, info)


# ---------------------------------------------------------------- 3. surgery


def _broadcast(value):
    """Rank 0's ``value`` on every rank (the value itself when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


def inherit(cfg: DictConfig, data: Data, target: nn.Module, groups, keep: dict[str, torch.Tensor],
            teacher: nn.Module | None = None, shared: SharedTeacherOutputs | None = None):
    """Keep decisions at the learned widths, their channels picked as ``cfg.inherit`` says; and what was decided.

    With ``inherit.choice=auto`` every candidate is cut and fine-tuned briefly on the
    same batches; with a budget, the read-outs of the ``inherit.widths_from`` criteria
    (their own widths) compete too. Rank 0's choice is used on every rank. Returns the
    decisions, the record, and the read-out's info when a criterion's widths won (else None).
    The look-ahead distils from ``teacher`` (default ``target``) as ``inherit.kd_weight`` says,
    reading its logits from ``shared`` when given (the pass the fine-tuning needs too).
    """
    from pnp.core.criteria import rank_channels
    from pnp.training.inherit import LEARNED, Inheritance, candidate_keeps, choose_inheritance, rival_widths
    from pnp.training.layout import CHANNELS_LAST

    c = cfg.inherit
    if c.choice == LEARNED:
        return keep, Inheritance(LEARNED, keep).to_dict(), None
    dm = data.module
    gradient_batches = criterion_batches(data)
    if c.choice != "auto":
        keeps, skipped = candidate_keeps(target, groups, keep, [c.choice], gradient_batches)
        if not keeps:
            raise ValueError(f"inherit.choice {c.choice!r} does not apply to this model: {skipped[c.choice]}")
        return keeps[c.choice], Inheritance(c.choice, keeps[c.choice]).to_dict(), None
    if dm.val_size:
        eval_loader, evaluated_on = dm.validation_subset_dataloader(int(c.eval_samples)), "validation split"
    else:
        eval_loader, evaluated_on = dm.calibration_dataloader(min(int(c.eval_samples), len(dm.train_indices))), "training images"
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    chosen = None
    if is_global_zero():
        rivals, unusable = rival_widths(c.widths_from, cfg.readout.budget, lambda name: read_out(
            cfg, groups, rank_channels(target, groups, name, batches=gradient_batches, seed=int(cfg.seed)),
            ("inherit.widths_from", name)), budget_field="readout.budget")
        outputs = shared.get("prune") if shared is not None and float(c.kd_weight) > 0 else None
        with dm.train_outputs(outputs) if outputs is not None else contextlib.nullcontext():
            found = choose_inheritance(
                target, groups, keep, data.example_inputs, list(c.candidates), dm.train_dataloader, eval_loader,
                steps=int(c.steps), lr=float(c.lr), device=device, seed=int(cfg.seed), gradient_batches=gradient_batches,
                rivals={name: k for name, (k, _) in rivals.items()}, kd_weight=float(c.kd_weight),
                # pnp-prune has no trainer section: the look-ahead then trains in the trainer's default layout
                channels_last=bool(OmegaConf.select(cfg, "trainer.channels_last", default=CHANNELS_LAST)), teacher=teacher,
            )
        record = {**found.to_dict(), "evaluated_on": evaluated_on}
        record["skipped"].update(unusable)
        rival = rivals.get(found.choice)
        chosen = ({k: v.cpu() for k, v in found.keep.items()}, record, rival[1] if rival else None)
    return _broadcast(chosen)


def prune(
    cfg: DictConfig,
    data: Data,
    stage: StageDir,
    state: str,
    target: nn.Module,
    groups,
    keep: dict[str, torch.Tensor],
    info: dict,
    before: dict | None = None,
    inherit_weights: bool = True,
    extra: dict | None = None,
    teacher: nn.Module | None = None,
    shared: SharedTeacherOutputs | None = None,
) -> StageResult:
    """Cut out what ``keep`` drops, save the pruned model, its keep decisions and a plot of them.

    With ``inherit_weights`` the channels kept at ``keep``'s widths are chosen as
    ``cfg.inherit`` says (see :func:`inherit`); its look-ahead distils from ``teacher``
    (default ``target``: pass the original when ``target`` adapted beside the pruner), and reads
    the teacher's logits from ``shared`` when given: the pass is the fine-tuning's, so the
    stage's time leaves it out. ``extra`` fields go into the stage's report.
    """
    if state == "done":
        return StageResult(stage.report(), model=load_pruned(stage.path / MODEL_DIR, trust_builder=data.builder), skipped=True)
    start = time.perf_counter()
    stage.start()
    if info.get("floored") and is_global_zero():
        print(_floor_line(info), flush=True)
    inherited = None
    if inherit_weights:
        from pnp.training.inherit import channels_changed, inheritance_line

        learned = keep
        keep, inherited, rival = inherit(cfg, data, target, groups, keep, teacher=teacher, shared=shared)
        if rival is not None:  # a criterion's own widths won the look-ahead: its read-out is what was cut
            info = {**rival, "learned": info}
        if is_global_zero():
            inherited["channels_changed"] = channels_changed(learned, keep)
            print(inheritance_line(inherited, "fine-tuning steps", "accuracy on the", "%"), flush=True)
    pruned = task_of(data).surgery(target, groups, keep, verify=bool(cfg.verify))
    norm_batches = remeasure_norms(cfg, data, pruned)
    save_model(pruned, stage, data, made_by="pnp-prune")
    write_keep(stage.path / KEEP_FILE, groups, keep, info)
    report: dict[str, Any] = {"readout": info, "norm_batches": norm_batches, **(extra or {})}
    if inherited is not None:
        report["inherit"] = inherited
    if is_global_zero():
        if before is None:
            before = summarize(target, data, cfg)
        after = summarize(pruned, data, cfg)
        spec = pruned.pnp_channel_spec
        kept = {name: len(idx) for name, idx in spec.groups.items()}
        report.update({
            "before": before,
            "after": after,
            "channels_kept": kept,
            "channels_total": dict(spec.group_sizes),
            "plots": write_plots(stage.path, target, kept, dict(spec.group_sizes), [("baseline", before), ("pruned", after)]),
        })
    report["time_s"] = time.perf_counter() - start
    if shared is not None and shared.computed_in == "prune" and shared.outputs is not None:
        report["time_s"] -= shared.seconds
        report["teacher_outputs_for_finetune_s"] = shared.seconds
    return StageResult(stage.finish(report), model=pruned, keep=keep)


def remeasure_norms(cfg: DictConfig, data: Data, pruned: nn.Module) -> int:
    """Measure the cut model's BatchNorm statistics again on ``norm_samples`` training images; the batches used.

    The cut layers see other statistics than the unpruned network's, so a model that
    keeps the old ones is judged (and starts fine-tuning) below what its weights can do.
    """
    from pnp.core.surgery import remeasure_norm_statistics

    samples = min(int(cfg.norm_samples), len(data.module.train_indices))
    if samples < 1:
        return 0
    return remeasure_norm_statistics(pruned, (batch[0] for batch in data.module.calibration_dataloader(samples)))


def _floor_line(info: dict) -> str:
    lifted = info["floored"]
    shown = ", ".join(f"{name} {v['by_scores']} -> {v['floor']}" for name, v in list(lifted.items())[:4])
    more = f" and {len(lifted) - 4} more" if len(lifted) > 4 else ""
    return (f"[pnp] {len(lifted)} group(s) kept at the width floor (readout.min_share={info['min_share']} of the uniform "
            f"keep ratio {info['uniform_keep_ratio']:.3f}) where the scores kept fewer: {shown}{more}")


def write_plots(directory: Path, original: nn.Module, kept: dict, sizes: dict, models: list[tuple[str, dict | None]]) -> dict:
    """Channels kept per group (in the original's layer order) and accuracy vs FLOPs; returns their paths."""
    from pnp.training.report import plot_accuracy_vs_flops, plot_channels_per_layer

    paths = {"channels_per_layer": directory / CHANNELS_PLOT, "accuracy_vs_flops": directory / ACCURACY_PLOT}
    order = [name for name, _ in original.named_modules()]
    plot_channels_per_layer(kept, sizes, paths["channels_per_layer"], order=order)
    points = [{"label": label, "flops": s["flops"], "accuracy": s["accuracy"]} for label, s in models if s]
    plot_accuracy_vs_flops(points, paths["accuracy_vs_flops"])
    return {k: str(v) for k, v in paths.items()}


# ---------------------------------------------------------------- 4. fine-tuning


class SharedTeacherOutputs:
    """The unpruned target's logits on every training image, computed once for a run's look-ahead and fine-tuning.

    Both distil from the same frozen teacher on the same unaugmented images (``inherit.kd_weight``,
    ``finetune.kd_weight``): whichever stage needs them first runs the teacher over the training
    split (:func:`~pnp.training.classifier.fixed_teacher_outputs`) and the other reads them, so the
    look-ahead no longer runs a teacher pass of its own. ``seconds`` is what the pass took and
    ``computed_in`` the stage that ran it; the fine-tuning's time counts the pass wherever it ran.
    """

    def __init__(self, teacher: nn.Module, data: Data, channels_last: bool):
        self.teacher, self.data, self.channels_last = teacher, data, bool(channels_last)
        self.outputs: torch.Tensor | None = None
        self.computed_in: str | None = None
        self.seconds = 0.0

    def get(self, stage: str) -> torch.Tensor | None:
        """The logits (None where they cannot be fixed: augmented or too large data); computed on the first call."""
        from pnp.training.classifier import fixed_teacher_outputs

        if self.computed_in is None:
            start = time.perf_counter()
            self.outputs = fixed_teacher_outputs(self.teacher, self.data.module, self.channels_last)
            self.seconds, self.computed_in = time.perf_counter() - start, stage
        return self.outputs


def shared_teacher_outputs(cfg: DictConfig, data: Data, teacher: nn.Module, states: dict[str, str]) -> SharedTeacherOutputs | None:
    """A :class:`SharedTeacherOutputs` for a run whose look-ahead and fine-tuning both distil from ``teacher``, else None.

    Only where both stages are still to run: a look-ahead alone needs the teacher on its
    own few batches, far fewer than the whole training split.
    """
    look_ahead = cfg.inherit.choice == "auto" and float(cfg.inherit.kd_weight) > 0
    if not (look_ahead and float(cfg.finetune.kd_weight) > 0) or "done" in (states.get("prune", "done"), states["finetune"]):
        return None
    return SharedTeacherOutputs(teacher, data, bool(cfg.trainer.channels_last))


def finetune(
    cfg: DictConfig,
    data: Data,
    stage: StageDir,
    state: str,
    pruned: nn.Module,
    teacher: nn.Module | None,
    before: dict | None = None,
    shared: SharedTeacherOutputs | None = None,
) -> StageResult:
    """Fine-tune the pruned model (distilling from ``teacher`` when given); save it as ``model/``.

    ``before`` (the pruned model's summary before fine-tuning) is kept in the report. ``shared``:
    the teacher's logits on the training split, when the look-ahead before computed them from
    the same teacher (see :func:`shared_teacher_outputs`).
    """
    if state == "done":
        return StageResult(stage.report(), model=load_pruned(stage.path / MODEL_DIR, trust_builder=data.builder), skipped=True)
    import pytorch_lightning as pl

    from pnp.training.classifier import fixed_teacher_outputs

    start = time.perf_counter()
    stage.start()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    spec = getattr(pruned, "pnp_channel_spec", None)
    module = _classifier(cfg, cfg.finetune, pruned, teacher=teacher if cfg.finetune.kd_weight > 0 else None)
    trainer = make_trainer(cfg, stage, cfg.finetune.epochs, _monitor(data))
    # without augmentation the frozen teacher's logits are the same every epoch: computed once
    outputs, earlier_s = None, 0.0
    if module.uses_teacher and shared is not None and shared.channels_last == module.channels_last:
        outputs = shared.get("finetune")
        earlier_s = shared.seconds if shared.computed_in != "finetune" and outputs is not None else 0.0
    elif module.uses_teacher:
        outputs = fixed_teacher_outputs(module.teacher, data.module, module.channels_last)
    with data.module.train_outputs(outputs) if outputs is not None else contextlib.nullcontext():
        fit(trainer, module, data, stage, resume=state == "resume")
    model = module.model.to("cpu").eval()
    if spec is not None:
        model.pnp_channel_spec = spec
    save_model(model, stage, data, made_by="pnp-finetune")
    summary = summarize(model, data, cfg)
    # a teacher pass the look-ahead ran for both stages is this stage's cost, as it would have run it anyway
    report = {"model": summary, "time_s": time.perf_counter() - start + earlier_s, "epochs": cfg.finetune.epochs,
              "teacher_outputs": "computed once" if outputs is not None else ("every step" if module.uses_teacher else None)}
    if earlier_s:
        report["teacher_outputs_from"] = {"stage": shared.computed_in, "seconds": earlier_s}
    if before is not None:
        report["before"] = before
    return StageResult(stage.finish(report), model=model)


# ---------------------------------------------------------------- inputs of the single-stage commands


def target_from(cfg: DictConfig, data: Data, field: str = "target") -> nn.Module:
    model = load_target(field, cfg[field], data.builder, data.builder_kwargs)
    check_fits(model, data, field, cfg[field])
    return model


def pruned_from(cfg: DictConfig, data: Data) -> nn.Module:
    model = load_pruned_model("pruned", cfg.pruned, trusted_builder=data.builder)
    shape = (model.pnp_metadata or {}).get("input_shape")
    if shape is not None and tuple(shape) != data.input_shape:
        raise ConfigError("pruned", cfg.pruned, f"the model takes inputs of shape {tuple(shape)}, but data {cfg.data.name!r} gives {data.input_shape}")
    check_fits(model, data, "pruned", cfg.pruned)
    return model


def scores_from(cfg: DictConfig) -> dict[str, torch.Tensor]:
    path = Path(cfg.pruner_run) / KEEP_SCORES_FILE
    if not path.is_file():
        raise ConfigError("pruner_run", cfg.pruner_run, f"holds no {KEEP_SCORES_FILE}: pass the directory of a finished pnp-train-pruner run")
    return load_keep_scores(path)


def json_dump(obj) -> str:
    return json.dumps(obj, indent=2)
