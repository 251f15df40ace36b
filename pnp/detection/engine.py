"""Training in detectron2's trainers: the detector (baseline, fine-tuning) and the detector's pruner.

:class:`DetectionTrainer` is detectron2's ``DefaultTrainer`` for a model handed
over (a pruned detector) instead of one built from the config, optionally
wrapped in :class:`DistillingDetector`; it evaluates with ``COCOEvaluator``
(``use_fast_impl=False``: no compiled ops needed), writes TensorBoard events and
periodic checkpoints (``SOLVER.CHECKPOINT_PERIOD``) that ``resume_or_load`` resumes
from. :func:`train_pruner` runs detectron2's ``SimpleTrainer`` on the pruner's
objective with the same hooks, checkpoints and resume. Neither rewrites the loop.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn as nn

from pnp.core.groups import ChannelGroups
from pnp.core.losses import PrunerLoss
from pnp.core.pruner import PrunerNetwork
from pnp.detection.compat import import_detectron2
from pnp.detection.distillation import DistillingDetector
from pnp.detection.pruning import DetectionPrunerObjective, build_detection_pruner, pruner_optimizer, summed_detection_losses

import_detectron2()
from detectron2.checkpoint import Checkpointer  # noqa: E402
from detectron2.data import build_detection_test_loader, build_detection_train_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, SimpleTrainer, hooks  # noqa: E402
from detectron2.engine.defaults import default_writers  # noqa: E402
from detectron2.evaluation import COCOEvaluator, inference_on_dataset  # noqa: E402


def coco_evaluator(dataset: str, output_dir: str | None = None, distributed: bool = True) -> COCOEvaluator:
    """Box AP (AP, AP50, AP75, ...) with pycocotools' own evaluation, which needs no compiled ops."""
    return COCOEvaluator(dataset, tasks=("bbox",), distributed=distributed, output_dir=output_dir, use_fast_impl=False)


def evaluate_detector(model: nn.Module, cfg, dataset: str, output_dir: str | None = None) -> dict[str, float]:
    """Box AP of ``model`` on the registered dataset ``dataset`` (the ``bbox`` results of COCOEvaluator)."""
    loader = build_detection_test_loader(cfg, dataset)
    results = inference_on_dataset(model, loader, coco_evaluator(dataset, output_dir, distributed=False))
    return dict(results["bbox"])


class DetectionTrainer(DefaultTrainer):
    """``DefaultTrainer`` for ``model`` (default: built from ``cfg``), distilled from ``teacher`` if given.

    The stage's result is written by :func:`pnp.detection.checkpoint.save_pruned_detector`
    (safetensors); detectron2's periodic checkpoints serve only to resume an
    interrupted run (torch reads them back with ``weights_only=True``).
    """

    def __init__(self, cfg, model: nn.Module | None = None, teacher: nn.Module | None = None,
                 kd_fpn: float = 0.0, kd_cls: float = 0.0, kd_temperature: float = 2.0):
        self._given_model = model
        self._teacher = teacher
        self._kd = {"kd_fpn": kd_fpn, "kd_cls": kd_cls, "temperature": kd_temperature}
        super().__init__(cfg)

    def build_model(self, cfg) -> nn.Module:  # an instance method: the model may be handed over
        model = super().build_model(cfg) if self._given_model is None else self._given_model.to(cfg.MODEL.DEVICE)
        if self._teacher is not None:
            model = DistillingDetector(model, self._teacher.to(cfg.MODEL.DEVICE), **self._kd)
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return coco_evaluator(dataset_name, output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))

    @property
    def student(self) -> nn.Module:
        """The detector being trained, without its distillation or DDP wrappers."""
        model = getattr(self.model, "module", self.model)
        return model.student if isinstance(model, DistillingDetector) else model


def train_pruner(
    cfg,
    detector: nn.Module,
    groups: ChannelGroups,
    iterations: int,
    lr: float = 1e-3,
    trunk_lr: float | None = None,
    loss: Mapping | None = None,
    pruner: Mapping | None = None,
    output_dir: str | None = None,
    log_period: int = 20,
    checkpoint_period: int | None = None,
) -> PrunerNetwork:
    """Train a backbone pruner for ``iterations`` steps on ``cfg.DATASETS.TRAIN``; return it.

    ``loss`` holds :class:`PrunerLoss` arguments (``sparsity_weight``, ``budget``,
    ...) and ``pruner`` :class:`PrunerNetwork` arguments (``temperature``,
    ``init_keep``, ``noise``, ``mask_mode``). The detector is frozen. With
    ``output_dir`` the pruner's losses and kept fractions go to its
    ``metrics.json`` and TensorBoard events, and with ``checkpoint_period`` the
    pruner, its optimizer and schedule are checkpointed there every that many steps;
    a run that finds such a checkpoint resumes from it.
    """
    if int(iterations) < 1:
        raise ValueError(f"pruner iterations {iterations} must be >= 1")
    network = build_detection_pruner(detector, groups, **dict(pruner or {}))
    objective = DetectionPrunerObjective(
        detector, groups, network, PrunerLoss(groups, task_loss=summed_detection_losses, **dict(loss or {}))
    )
    optimizer = pruner_optimizer(network, lr, trunk_lr)
    trainer = SimpleTrainer(objective, build_detection_train_loader(cfg), optimizer)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(iterations))
    steps = [hooks.IterationTimer(), hooks.LRScheduler(optimizer, schedule)]
    start = 0
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        if checkpoint_period:
            checkpointer = Checkpointer(objective.pruner, output_dir, optimizer=optimizer, scheduler=schedule)
            if checkpointer.has_checkpoint():
                start = int(checkpointer.resume_or_load("", resume=True).get("iteration", -1)) + 1
            steps.append(hooks.PeriodicCheckpointer(checkpointer, int(checkpoint_period), max_iter=int(iterations)))
        steps.append(hooks.PeriodicWriter(default_writers(output_dir, int(iterations)), period=log_period))
    trainer.register_hooks(steps)
    try:
        trainer.train(start, int(iterations))
    finally:
        objective.gate.remove()
    network.eval()
    return network
