"""The config schema of every command, and the checks run on it before any work.

The dataclasses are registered in Hydra's ConfigStore and are the first default of
each primary config in ``configs/``, so an unknown key or a value of the wrong type
is rejected while the config is composed (OmegaConf names the full key). What a
type cannot say (ranges, choices, paths that must exist) :func:`validate` checks,
raising :class:`ConfigError` with the field and the value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pnp.core.gating import NORM_STATS
from pnp.core.losses import BUDGET_METRICS, SPARSITY_KINDS
from pnp.core.pruner import MASK_MODES
from pnp.core.readout import MIN_SHARE
from pnp.training.classifier import OPTIMIZERS, SCHEDULES

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder")
DATA_KWARGS = ("in_channels", "num_classes", "input_size")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
PRECISIONS = (
    "64", "64-true", "32", "32-true", "16", "16-mixed", "16-true",
    "bf16", "bf16-mixed", "bf16-true", "transformer-engine", "transformer-engine-float16",
)


class InputError(ValueError):
    """Input a command cannot use, found before any work started; the message names it."""


class ConfigError(InputError):
    """A config field has a value the command cannot use."""

    def __init__(self, key: str, value: Any, why: str):
        self.key, self.value = key, value
        super().__init__(f"{key}={value!r}: {why}")


@dataclass
class ModelConfig:
    name: str = "lenet5"
    builder: str = "pnp:lenet5"
    # which keyword arguments the builder takes from the data (pnp builders take all three)
    data_kwargs: list[str] = field(default_factory=lambda: list(DATA_KWARGS))
    kwargs: dict[str, Any] = field(default_factory=dict)
    # fnmatch patterns of layers whose output channels are never pruned
    ignore: list[str] = field(default_factory=list)
    # a builder outside pnp:, torchvision: and timm: ("package.module:function") is imported
    # and called only when this is true: a config file cannot make pnp run code by itself
    trust_builder: bool = False


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: Optional[str] = None
    batch_size: int = 128
    num_workers: int = 0
    val_size: int = 5000
    seed: int = 0
    channels: Optional[int] = None
    image_size: Optional[int] = None
    augment: bool = False


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    sync_batchnorm: bool = False
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    limit_test_batches: Any = 1.0
    log_every_n_steps: int = 50
    enable_progress_bar: bool = True
    deterministic: bool = False
    # long epochs: also write the resume point every N optimizer steps (null: after each epoch only)
    checkpoint_every_n_steps: Optional[int] = None
    # train in channels-last memory format, faster convolutions on CPUs and recent GPUs
    # (as pnp.training.layout.CHANNELS_LAST); saved weights keep the usual layout
    channels_last: bool = True


@dataclass
class OptimConfig:
    """Training of a classifier: the baseline target, or the pruned model's fine-tuning."""

    epochs: int = 10
    # sgd (with momentum), adam, or adamw: decoupled weight decay on weight matrices and
    # filters only, biases and normalisation scales undecayed (for transformers)
    optimizer: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    # the learning rate rises linearly over the first N epochs (a fraction allowed): deep
    # networks started at a large rate (ResNet-56 at 0.1) can otherwise diverge
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    kd_weight: float = 0.0
    kd_temperature: float = 4.0


@dataclass
class PrunerConfig:
    """The pruner's recipe: what ``pnp-train-pruner`` and ``pnp-pipeline`` both train."""

    epochs: int = 1
    # and at least this many optimizer steps: where `epochs` are fewer (a small dataset, or
    # trainer.limit_train_batches) it trains exactly this many, the last epoch stopping
    # part-way; 0 lets epochs alone decide
    min_steps: int = 120
    lr: float = 1e-3
    # the trunk starts from the target's weights; null: lr / 10
    trunk_lr: Optional[float] = None
    # > 0: the gated target's weights learn too, at this rate, and the pruned model is cut
    # from the adapted target (0: the target stays frozen)
    target_lr: float = 0.0
    weight_decay: float = 0.0
    sparsity: str = "flops"
    # null: 0 when there is a budget (the budget term holds the pruner at it), 1.0 without one
    sparsity_weight: Optional[float] = None
    # the read-out's budget, so the pruner learns at the budget surgery will cut to
    budget: Optional[float] = "${oc.select:readout.budget,null}"  # type: ignore[assignment]
    budget_metric: str = "flops"
    budget_weight: float = 1.0
    # > 0: the budget the pruner aims at falls from the whole model to `budget` over this share
    # of its steps (cubic, fast at first), instead of holding it from the first step (0);
    # without a budget there is nothing to fall to and it does nothing
    budget_warmup: float = 0.5
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    temperature: float = 1.0
    init_keep: float = 0.9
    # logistic noise on the keep logits: with mask_mode=batch a channel is then kept with its
    # keep probability (one draw per batch), so the decisions fall to the budget gradually
    # instead of all at once, and every channel keeps being tried (0: a hard threshold)
    noise: float = 1.0
    # one decision per batch learns the static architecture surgery will cut (per-sample
    # decisions, averaged later, start fine-tuning lower)
    mask_mode: str = "batch"
    # with mask_mode=batch: the batch's decision is made from its first N images, so the
    # pruner's own forward and backward cost N images (null: the whole batch); the gated
    # target still runs every image. Per-sample decisions (mask_mode=sample) use every image
    input_samples: Optional[int] = 32
    # the statistics the gated target's BatchNorm layers normalise with: batch (each gated
    # batch's own, as the cut network's would be measured again; the running statistics stay
    # as they are) or running (the unpruned network's, which at a small budget leave the gated
    # target at chance and the pruner without a task signal)
    norm_stats: str = "batch"
    head_layer: Optional[str] = None
    # calibration samples whose keep probabilities are averaged for the read-out
    calibration_samples: int = 2048


def pruner_budget_warmup(pruner: DictConfig) -> float:
    """``pruner.budget_warmup`` where there is a budget to fall to; 0 without one."""
    return float(pruner.budget_warmup) if pruner.budget is not None else 0.0


def pruner_sparsity_weight(pruner: DictConfig) -> float:
    """``pruner.sparsity_weight``, with null resolved (0 with a budget, 1.0 without)."""
    if pruner.sparsity_weight is not None:
        return float(pruner.sparsity_weight)
    return 0.0 if pruner.budget is not None else 1.0


@dataclass
class ReadoutConfig:
    threshold: float = 0.5
    min_channels: int = 1
    round_to: int = 1
    budget: Optional[float] = None
    metric: str = "flops"
    # with a budget: after the threshold is bisected, add the best-scored channels that
    # still fit, so the pruned model uses the budget it was given
    fill: bool = True
    # with a budget: every group keeps at least this share of the keep ratio that pruning all
    # groups alike would need for the budget, so no layer is starved by scores that rate it low
    # (0: no floor, 1: uniform widths)
    min_share: float = MIN_SHARE


@dataclass
class InheritConfig:
    # which channels carry their weights into the pruned model, at the widths the pruner
    # learned: "learned" (the pruner's own picks), a criterion of pnp.core.criteria
    # ("l1", "magnitude", ...), or "auto": each of `candidates` is cut and fine-tuned
    # for `steps` SGD steps, and the best accuracy on held-out images wins. The default
    # look-ahead (the pruner's picks and magnitude's channels, distilled from the target)
    # won two declared tests against the plain one without the picks: +0.22 points at 70%
    # of the FLOPs removed (12 ResNet-20/56 seeds), level at 90% (+0.05, 12 seeds), and
    # level to slightly above on the LeNet-5 main job (docs/method.md)
    choice: str = "auto"
    candidates: list[str] = field(default_factory=lambda: ["learned", "magnitude"])
    # with a budget and "auto": these criteria's own read-outs (their widths and channels, at
    # readout.budget) compete in the look-ahead too, so learned widths that starve a layer
    # lose to a criterion's instead of reaching fine-tuning ([]: the learned widths only)
    widths_from: list[str] = field(default_factory=lambda: ["magnitude"])
    steps: int = 200
    lr: float = 0.01
    # > 0: each candidate is distilled from the unpruned target while it fine-tunes, as a
    # distilled fine-tuning would (the loss adds kd_weight x the distillation loss, T = 4);
    # 0: plain cross-entropy
    kd_weight: float = 1.0
    # held-out images the candidates are compared on (the validation split; without one,
    # training images)
    eval_samples: int = 5000


# fine-tuning of the pruned model, distilled from the unpruned target (pnp-finetune and pnp-pipeline)
FINETUNE = OptimConfig(epochs=20, lr=0.01, kd_weight=1.0)


@dataclass
class ReportConfig:
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    latency_threads: list[int] = field(default_factory=lambda: [1])
    latency_repeats: int = 10


@dataclass
class CommonConfig:
    out_dir: str = MISSING
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


@dataclass
class TrainCommand(CommonConfig):
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    train: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class TrainPrunerCommand(CommonConfig):
    target: str = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)


@dataclass
class PruneCommand(CommonConfig):
    target: str = MISSING
    # exactly one of: a pnp-train-pruner run directory, a keep-decisions JSON file, or a
    # criterion of pnp.core.criteria ("l1", "taylor", ...) that ranks the target's channels
    pruner_run: Optional[str] = None
    keep: Optional[str] = None
    criterion: Optional[str] = None
    verify: bool = True
    # training images the cut model's BatchNorm statistics are measured again on, before it
    # is saved and evaluated (0: it keeps the unpruned network's)
    norm_samples: int = 2048
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)
    inherit: InheritConfig = field(default_factory=InheritConfig)


@dataclass
class FinetuneCommand(CommonConfig):
    pruned: str = MISSING
    # the unpruned target to distil from (needed when finetune.kd_weight > 0)
    teacher: Optional[str] = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    finetune: OptimConfig = field(default_factory=lambda: replace(FINETUNE))


@dataclass
class PipelineCommand(CommonConfig):
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)
    inherit: InheritConfig = field(default_factory=InheritConfig)
    verify: bool = True
    # as pnp-prune's: images the cut model's BatchNorm statistics are measured again on (0: none)
    norm_samples: int = 2048
    finetune: OptimConfig = field(default_factory=lambda: replace(FINETUNE))


SCHEMAS = {
    "train": TrainCommand,
    "train_pruner": TrainPrunerCommand,
    "prune": PruneCommand,
    "finetune": FinetuneCommand,
    "pipeline": PipelineCommand,
}


# settings whose default changed after they were added, at the value pnp ran with before
# they existed: a stage that did not record one was made with this, not today's default
BEFORE_ADDED = {"pruner": {"budget_warmup": 0.0}}


def settings_before_added() -> dict:
    """Every setting a stage records, at the value pnp ran with before the setting existed.

    Stages compare their config with the one a previous run recorded; a setting that run
    did not know is no change where it is set to this value (see
    :class:`pnp.training.runs.StageDir`). That is the setting's default (the pipeline's
    schema holds them all: a setting is added with a default that keeps what pnp did),
    except for the settings of :data:`BEFORE_ADDED`, whose default has changed since.
    """
    values = OmegaConf.to_container(OmegaConf.structured(PipelineCommand), resolve=False)
    for section, settings in BEFORE_ADDED.items():
        values[section].update(settings)
    return values


def register_schemas() -> None:
    """Put each command's schema in Hydra's ConfigStore as ``schema/<command>``."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="schema", name=name, node=schema)


# ---------------------------------------------------------------- validation


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(key, value, why)


def _choice(cfg: DictConfig, key: str, choices) -> None:
    value = OmegaConf.select(cfg, key)
    _require(value in choices, key, value, f"must be one of {', '.join(map(str, choices))}")


def _number(cfg: DictConfig, key: str, low=None, high=None, low_open=False, high_open=False, optional=False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "must be a number")
    _require(not math.isnan(value), key, value, "must be a number")
    if low is not None:
        if low_open:
            _require(value > low, key, value, f"must be > {low}")
        else:
            _require(value >= low, key, value, f"must be >= {low}")
    if high is not None:
        if high_open:
            _require(value < high, key, value, f"must be < {high}")
        else:
            _require(value <= high, key, value, f"must be <= {high}")


def _fraction(cfg: DictConfig, key: str, optional=True) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    _require(isinstance(value, (int, float)) and 0.0 < value <= 1.0, key, value, "must be a fraction in (0, 1]")


def _limit(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    ok = (isinstance(value, float) and 0.0 < value <= 1.0) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    _require(ok, key, value, "must be a fraction in (0, 1] or a number of batches >= 1")


def _existing(cfg: DictConfig, key: str, what: str, optional=False) -> Path | None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return None
    _require(isinstance(value, str) and value != "", key, value, f"must be the path of {what}")
    path = Path(value).expanduser()
    _require(path.exists(), key, value, f"{what} does not exist")
    return path


def _check_model(cfg: DictConfig) -> None:
    builder = cfg.model.builder
    _require(isinstance(builder, str) and ":" in builder, "model.builder", builder,
             "must look like 'pnp:<name>', 'torchvision:<name>', 'timm:<name>' or 'package.module:function'")
    source, name = builder.split(":", 1)
    if source == "pnp":
        from pnp.core.builders import registered_builders

        known = registered_builders()
        _require(builder in known, "model.builder", builder, f"is not registered; known: {', '.join(known)}")
    elif source == "torchvision":
        import torchvision

        _require(name in torchvision.models.list_models(module=torchvision.models), "model.builder", builder,
                 "torchvision has no classification model of that name")
    elif source == "timm":
        from pnp.core.builders import timm_name_error

        why = timm_name_error(name)
        _require(why is None, "model.builder", builder, why)
    else:  # the user's own module: imported and called only when the command line says so
        from pnp.core.builders import SAFE_SOURCES

        _require(bool(cfg.model.trust_builder), "model.builder", builder,
                 f"is not from {', '.join(s + ':' for s in SAFE_SOURCES)}; pnp imports and calls a function of "
                 "another module only when asked: add model.trust_builder=true if you trust it")
    for i, k in enumerate(cfg.model.data_kwargs):
        _require(k in DATA_KWARGS, f"model.data_kwargs[{i}]", k, f"must be one of {', '.join(DATA_KWARGS)}")


def _check_data(cfg: DictConfig) -> None:
    _choice(cfg, "data.name", DATASETS)
    if cfg.data.root is None:
        _require(cfg.data.name == "fashion_mnist", "data.root", None,
                 f"data {cfg.data.name!r} has no default location: set data.root=<dataset directory>")
    else:
        _existing(cfg, "data.root", "the dataset directory")
    _number(cfg, "data.batch_size", low=1)
    _number(cfg, "data.num_workers", low=0)
    _number(cfg, "data.val_size", low=0)
    _number(cfg, "data.channels", low=1, optional=True)
    _number(cfg, "data.image_size", low=8, optional=True)


def _check_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    _choice(cfg, "trainer.accelerator", ACCELERATORS)
    _require(str(t.precision) in PRECISIONS, "trainer.precision", t.precision, f"must be one of {', '.join(PRECISIONS)}")
    devices = t.devices
    ok = (
        devices == "auto"
        or (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1))
        or (isinstance(devices, str) and devices.replace(",", "").strip().isdigit())
        or (OmegaConf.is_list(devices) and len(devices) > 0 and all(isinstance(d, int) and d >= 0 for d in devices))
    )
    _require(ok, "trainer.devices", devices, "must be a count >= 1, -1 (all), 'auto' or a list of device indices")
    _require(isinstance(t.strategy, str) and t.strategy != "", "trainer.strategy", t.strategy,
             "must name a Lightning strategy such as auto, ddp, ddp_spawn, fsdp")
    _number(cfg, "trainer.num_nodes", low=1)
    _number(cfg, "trainer.log_every_n_steps", low=1)
    _number(cfg, "trainer.checkpoint_every_n_steps", low=1, optional=True)
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        _limit(cfg, f"trainer.{key}")


def _check_optim(cfg: DictConfig, section: str) -> None:
    _number(cfg, f"{section}.epochs", low=1)
    _choice(cfg, f"{section}.optimizer", OPTIMIZERS)
    _choice(cfg, f"{section}.schedule", SCHEDULES)
    _number(cfg, f"{section}.lr", low=0, low_open=True)
    _number(cfg, f"{section}.weight_decay", low=0)
    _number(cfg, f"{section}.momentum", low=0, high=1, high_open=True)
    _number(cfg, f"{section}.warmup_epochs", low=0)
    warmup, epochs = OmegaConf.select(cfg, f"{section}.warmup_epochs"), OmegaConf.select(cfg, f"{section}.epochs")
    _require(warmup < epochs, f"{section}.warmup_epochs", warmup, f"must be below {section}.epochs ({epochs})")
    _number(cfg, f"{section}.label_smoothing", low=0, high=1, high_open=True)
    _number(cfg, f"{section}.kd_weight", low=0)
    _number(cfg, f"{section}.kd_temperature", low=0, low_open=True)


def _check_pruner(cfg: DictConfig) -> None:
    _number(cfg, "pruner.epochs", low=1)
    _number(cfg, "pruner.min_steps", low=0)
    _number(cfg, "pruner.lr", low=0, low_open=True)
    _number(cfg, "pruner.trunk_lr", low=0, optional=True)
    _number(cfg, "pruner.target_lr", low=0)
    _number(cfg, "pruner.weight_decay", low=0)
    _choice(cfg, "pruner.sparsity", SPARSITY_KINDS)
    _number(cfg, "pruner.sparsity_weight", low=0, optional=True)
    _fraction(cfg, "pruner.budget")
    _choice(cfg, "pruner.budget_metric", BUDGET_METRICS)
    _number(cfg, "pruner.budget_weight", low=0)
    _number(cfg, "pruner.budget_warmup", low=0, high=1, high_open=True)
    _number(cfg, "pruner.kd_weight", low=0)
    _number(cfg, "pruner.kd_temperature", low=0, low_open=True)
    _number(cfg, "pruner.temperature", low=0, low_open=True)
    init_keep = cfg.pruner.init_keep
    _require(isinstance(init_keep, float) and 0.0 < init_keep < 1.0, "pruner.init_keep", init_keep, "must be in (0, 1)")
    _number(cfg, "pruner.noise", low=0)
    _choice(cfg, "pruner.mask_mode", MASK_MODES)
    _number(cfg, "pruner.input_samples", low=1, optional=True)
    _choice(cfg, "pruner.norm_stats", NORM_STATS)
    _number(cfg, "pruner.calibration_samples", low=1)


def _check_readout(cfg: DictConfig) -> None:
    _number(cfg, "readout.threshold", low=0, high=1)
    _number(cfg, "readout.min_channels", low=1)
    _number(cfg, "readout.round_to", low=1)
    _fraction(cfg, "readout.budget")
    _choice(cfg, "readout.metric", BUDGET_METRICS)
    _number(cfg, "readout.min_share", low=0, high=1)


def _check_inherit(cfg: DictConfig) -> None:
    from pnp.core.criteria import CRITERIA

    valid = ("learned", *CRITERIA)
    _choice(cfg, "inherit.choice", ("auto", *valid))
    if cfg.inherit.choice == "auto":
        candidates = list(cfg.inherit.candidates)
        _require(len(candidates) > 0, "inherit.candidates", candidates, f"name at least one of {', '.join(valid)}")
        for i, name in enumerate(candidates):
            _require(name in valid, f"inherit.candidates[{i}]", name, f"must be one of {', '.join(valid)}")
        for i, name in enumerate(cfg.inherit.widths_from):
            _require(name in CRITERIA, f"inherit.widths_from[{i}]", name, f"must be one of {', '.join(CRITERIA)}")
    _number(cfg, "inherit.steps", low=1)
    _number(cfg, "inherit.lr", low=0, low_open=True)
    _number(cfg, "inherit.kd_weight", low=0)
    _number(cfg, "inherit.eval_samples", low=1)


PRUNE_SOURCES = ("pruner_run", "keep", "criterion")


def _check_prune_source(cfg: DictConfig) -> None:
    """Exactly one source of keep decisions, and that one usable."""
    from pnp.core.criteria import CRITERIA

    given = [k for k in PRUNE_SOURCES if cfg[k] is not None]
    key = given[-1] if given else "pruner_run"
    also = f" (given: {', '.join(given)})" if len(given) > 1 else ""
    _require(len(given) == 1, key, cfg[key],
             "give exactly one of pruner_run=<pnp-train-pruner run directory>, keep=<keep decisions JSON> "
             f"or criterion=<{'|'.join(CRITERIA)}>{also}")
    _existing(cfg, "pruner_run", "the pnp-train-pruner run directory", optional=True)
    _existing(cfg, "keep", "the keep decisions file", optional=True)
    if cfg.criterion is not None:
        _choice(cfg, "criterion", tuple(CRITERIA))


def _check_report(cfg: DictConfig) -> None:
    for i, b in enumerate(cfg.report.latency_batch_sizes):
        _require(b >= 1, f"report.latency_batch_sizes[{i}]", b, "must be >= 1")
    for i, n in enumerate(cfg.report.latency_threads):
        _require(n >= 1, f"report.latency_threads[{i}]", n, "must be >= 1")
    _number(cfg, "report.latency_repeats", low=1)


def validate(cfg: DictConfig, command: str) -> None:
    """Raise :class:`ConfigError` for the first field ``command`` cannot use."""
    _require(isinstance(cfg.out_dir, str) and cfg.out_dir.strip() != "", "out_dir", cfg.out_dir, "must be a directory path")
    _check_model(cfg)
    _check_data(cfg)
    _check_report(cfg)
    if command != "prune":
        _check_trainer(cfg)
    if command in ("train", "pipeline"):
        _check_optim(cfg, "train")
    if command in ("train_pruner", "prune", "pipeline"):
        _check_readout(cfg)  # before the pruner, whose budget follows readout.budget
    if command in ("train_pruner", "pipeline"):
        _check_pruner(cfg)
    if command in ("prune", "pipeline"):
        _check_inherit(cfg)
        _number(cfg, "norm_samples", low=0)
    if command in ("finetune", "pipeline"):
        _check_optim(cfg, "finetune")
    if command in ("train_pruner", "prune"):
        _existing(cfg, "target", "the trained target (a pnp-train run directory or a checkpoint file)")
    if command == "prune":
        _check_prune_source(cfg)
    if command == "finetune":
        _existing(cfg, "pruned", "the pruned model (a pnp-prune run directory or a saved pruned model)")
        _existing(cfg, "teacher", "the teacher (a pnp-train run directory or a checkpoint file)", optional=True)
        _require(cfg.finetune.kd_weight == 0 or cfg.teacher is not None, "teacher", cfg.teacher,
                 f"finetune.kd_weight={cfg.finetune.kd_weight} distils from a teacher: set teacher=<pnp-train run directory>, "
                 "or finetune.kd_weight=0 to fine-tune without one")


def config_dir() -> Path:
    """The ``configs/`` tree: ``$PNP_CONFIG_DIR``, else the installed package's, else the checkout's."""
    env = os.environ.get("PNP_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    package = Path(__file__).resolve().parents[1]
    candidates += [package / "configs", package.parent / "configs"]
    for path in candidates:
        if (path / "pipeline.yaml").is_file():
            return path
    raise FileNotFoundError(
        f"pnp's config tree was not found (looked in {', '.join(map(str, candidates))}); "
        "set PNP_CONFIG_DIR to the configs/ directory of a pnp checkout"
    )
