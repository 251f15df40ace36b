"""The methods compared: how each chooses the channels that the shared surgery cuts.

Each method runs the product's stages (:mod:`pnp.cli.stages`) on the baseline:

    pnp          pnp as shipped: the learned pruner (``stages.train_pruner``, budget term at
                 the budget), read out at the budget, then weight inheritance at the learned
                 widths (``inherit.choice=auto``: the pruner's picks, L1 or magnitude, whichever
                 fine-tunes best in a look-ahead on validation images)
    pnp_learned  the learned pruner's own picks, cut as they are (``inherit.choice=learned``)
    pnp_widths   the learned pruner's widths filled with TP group magnitude's channels, no
                 look-ahead (``inherit.choice=magnitude``): the widths and the channels as two
                 explicit steps
    l1           L1 norm of each filter (Li et al., 2017)
    bn_scale     Network Slimming: L1 sparsity training of the BN scales, then |scale|
    random       random channels
    magnitude    torch-pruning's group magnitude (L2), global ranking
    taylor       torch-pruning's group Taylor, global ranking
    control      nothing cut: the baseline fine-tuned by the same schedule (``stages.finetune``
                 on it), once per model and seed, to show how far fine-tuning alone moves it

The criteria rank channels as ``pnp-prune criterion=<name>`` does
(``stages.criterion_scores``, torch-pruning's importance classes) and are read out by
the same ``readout`` section. Network Slimming's sparsity training is the one step
that exists only here.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from pnp.cli import stages
from pnp.cli.config import settings_before_added
from pnp.cli.loading import MODEL_DIR
from pnp.core.artifacts import load_pruned
from pnp.core.criteria import CriterionNotApplicableError
from pnp.core.groups import ChannelGroups
from pnp.training.runs import StageDir

# each setting as pnp ran before it existed: stages written before then still resume and skip
SETTINGS_BEFORE_ADDED = settings_before_added()


@dataclass
class Context:
    """What a method chooses from: the recipe, the data, the trained baseline, its channel groups."""

    cfg: DictConfig
    data: stages.Data
    baseline: nn.Module
    baseline_summary: dict
    groups: ChannelGroups
    dirs: dict[str, StageDir]  # the method's own stages (preparation), by name
    states: dict[str, str]  # "new", "resume" or "done", as StageDir.check said


@dataclass
class Choice:
    """Keep decisions, what surgery cuts them from, and the seconds each step took."""

    source: nn.Module
    keep: dict
    info: dict
    inherit: bool  # stages.prune picks the channels at keep's widths as ``inherit.*`` says
    times: dict[str, float] = field(default_factory=dict)
    before: dict | None = None  # the summary of ``source``, when known


class Method:
    """One way to choose channels. ``sections`` and ``overrides`` say what in the recipe decides it."""

    label: str
    prunes: bool = True  # False: the baseline goes to fine-tuning as it is, once per seed, with no budget
    overrides: tuple[str, ...] = ()  # recipe overrides that make this method (applied last)
    sections: tuple[str, ...] = ()  # recipe sections that decide its choice, beyond model, data, train, readout
    criterion: str | None = None

    def preparation(self, cfg: DictConfig, directory: Path) -> dict[str, StageDir]:
        """The stages the method runs before surgery, in ``directory`` (shared by the methods and budgets of a seed)."""
        return {}

    def choose(self, ctx: Context) -> Choice:
        raise NotImplementedError


class LearnedPruner(Method):
    """pnp: the pruner trained against the frozen baseline at the budget, read out at the budget."""

    sections = ("pruner", "inherit")

    def __init__(self, label: str, choice: str):
        self.label = label
        self.overrides = (f"inherit.choice={choice}",)

    def preparation(self, cfg, directory):
        # pnp, pnp_learned and pnp_widths train the same pruner: one stage serves them all
        kept = round(100 * cfg.readout.budget)
        config = stages.what_config(cfg, "model", "data", "train", "pruner")
        return {"train_pruner": StageDir(directory / f"pruner-k{kept:02d}", "train_pruner", config, defaults=SETTINGS_BEFORE_ADDED)}

    def choose(self, ctx):
        stage = ctx.dirs["train_pruner"]
        trained = stages.train_pruner(ctx.cfg, ctx.data, stage, ctx.states["train_pruner"], copy.deepcopy(ctx.baseline),
                                      readout=False)
        keep, info = self.read_out(ctx, trained.scores, ("pruner scores", str(stage.path)))
        times = {"pruner_training_s": trained.report["time_s"]}
        # with pruner.target_lr the gated target adapted while the pruner learned: it is what the
        # pipeline cuts, so the benchmark cuts it too (the look-ahead and fine-tuning still distil
        # from the baseline, and the report compares with it)
        source = trained.model if trained.model is not None else ctx.baseline
        return Choice(source, keep, info, inherit=True, times=times, before=ctx.baseline_summary)

    def read_out(self, ctx: Context, scores: dict, source: tuple[str, str]) -> tuple[dict, dict]:
        """Keep decisions from the pruner's scores, as the recipe's ``readout`` says (a probe may change them first)."""
        return stages.read_out(ctx.cfg, ctx.groups, scores, source)


class Criterion(Method):
    """A criterion of pnp.core.criteria ranks the baseline's channels; its best are kept as they are."""

    def __init__(self, label: str, criterion: str):
        self.label, self.criterion = label, criterion

    def choose(self, ctx):
        return self.ranked(ctx, ctx.baseline, ctx.baseline_summary)

    def ranked(self, ctx: Context, model: nn.Module, summary: dict | None) -> Choice:
        start = time.perf_counter()
        scores = stages.criterion_scores(ctx.cfg, ctx.data, model, ctx.groups, self.criterion)
        scoring_s = time.perf_counter() - start
        keep, info = stages.read_out(ctx.cfg, ctx.groups, scores, ("criterion", self.criterion))
        return Choice(model, keep, {**info, "criterion": self.criterion}, inherit=False,
                      times={"scoring_s": scoring_s}, before=summary)


class Slimming(Criterion):
    """Network Slimming: the baseline sparsity-trained on its BN scales (``slim.*``), then ranked by |scale|."""

    sections = ("slim",)

    def preparation(self, cfg, directory):
        return {"slim": StageDir(directory / "slim", "slim", stages.what_config(cfg, "model", "data", "train", "slim"), defaults=SETTINGS_BEFORE_ADDED)}

    def choose(self, ctx):
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ctx.baseline.modules()):
            raise CriterionNotApplicableError(
                f"{ctx.cfg.model.name} has no BatchNorm layer: Network Slimming has no scales to train or rank"
            )
        trained = sparsity_trained(ctx.cfg, ctx.data, ctx.baseline, ctx.dirs["slim"], ctx.states["slim"])
        choice = self.ranked(ctx, trained.model, None)
        choice.times = {"sparsity_training_s": trained.report["time_s"], **choice.times}
        return choice


def sparsity_trained(cfg: DictConfig, data: stages.Data, baseline: nn.Module, stage: StageDir, state: str) -> stages.StageResult:
    """The baseline after Network Slimming's sparsity training, trained as the recipe trains (stages.make_trainer)."""
    if state == "done":
        return stages.StageResult(stage.report(), model=load_pruned(stage.path / MODEL_DIR, trust_builder=data.builder),
                                  skipped=True)
    import torch_pruning as tp

    start = time.perf_counter()
    stage.start()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model = copy.deepcopy(baseline).eval()  # building torch-pruning's graph runs the model: keep the BN statistics
    pruner = tp.pruner.BNScalePruner(model, data.example_inputs, importance=tp.importance.BNScaleImportance(),
                                     reg=float(cfg.slim.reg))
    recipe = OmegaConf.merge(cfg.train, {"epochs": cfg.slim.epochs, "lr": cfg.slim.lr, "weight_decay": 0.0})
    module = stages._classifier(cfg, recipe, model)
    trainer = stages.make_trainer(cfg, stage, cfg.slim.epochs, monitor=None)
    trainer.callbacks.append(BNSparsity(pruner))
    stages.fit(trainer, module, data, stage, resume=state == "resume")
    model = module.model.to("cpu").eval()
    stages.save_model(model, stage, data, made_by="bench_methods (sparsity training)")
    report = stage.finish({"time_s": time.perf_counter() - start, "epochs": cfg.slim.epochs})
    return stages.StageResult(report, model=model)


class BNSparsity(pl.Callback):
    """torch-pruning's L1 subgradient on the BN scales after each backward pass."""

    def __init__(self, pruner):
        self.pruner = pruner  # a tp.pruner.BNScalePruner

    def on_after_backward(self, trainer, pl_module) -> None:
        self.pruner.regularize(pl_module.model)


class Control(Method):
    """The baseline fine-tuned as the pruned models are, nothing cut: how far that schedule alone moves it."""

    prunes = False

    def __init__(self, label: str):
        self.label = label


METHODS: dict[str, Method] = {
    "pnp": LearnedPruner("pnp", choice="auto"),
    "pnp_learned": LearnedPruner("pnp, pruner's picks", choice="learned"),
    "pnp_widths": LearnedPruner("pnp widths, magnitude channels", choice="magnitude"),
    "l1": Criterion("L1 (Li+17)", "l1"),
    "bn_scale": Slimming("BN-scale (Slimming)", "bn_scale"),
    "random": Criterion("random", "random"),
    "magnitude": Criterion("TP group magnitude", "magnitude"),
    "taylor": Criterion("TP group Taylor", "taylor"),
    "control": Control("control (baseline fine-tuned)"),
}
