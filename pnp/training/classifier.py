"""Training a classifier: the baseline before pruning and the fine-tuning after it."""

from __future__ import annotations

import math
from functools import partial

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from pnp.core.losses import kd_loss
from pnp.training.layout import CHANNELS_LAST, ChannelsLastModule, forward_layout, in_layout

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
# a frozen teacher's outputs on the training split are computed once when they take at most this
TEACHER_OUTPUTS_MAX_BYTES = 256 << 20


def log_step_and_epoch(module: pl.LightningModule, name: str, value: torch.Tensor, prog_bar: bool = False) -> None:
    """Log ``<name>_step``, this process's value at every step, and ``<name>_epoch``, the epoch mean over every process.

    Only the epoch mean is all-reduced: a step value synced across processes would
    cost one collective per metric per training step.
    """
    module.log(f"{name}_step", value, on_step=True, on_epoch=False, prog_bar=prog_bar)
    module.log(f"{name}_epoch", value, on_step=False, on_epoch=True, sync_dist=True)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """``model``'s trainable parameters in two optimizer groups: weight matrices and filters decayed, the rest not.

    Biases, normalisation scales and other 1-D parameters (and scalars) are left out
    of the decay, the usual recipe for AdamW on transformers and CNNs alike.
    """
    decayed, kept = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decayed if p.ndim >= 2 else kept).append(p)
    return [g for g in ({"params": decayed, "weight_decay": float(weight_decay)},
                        {"params": kept, "weight_decay": 0.0}) if g["params"]]


def lr_factor(schedule: str, total: int, warmup: int, step: int) -> float:
    """The multiple of the base learning rate at optimizer step ``step`` of ``total``.

    ``schedule`` as in :class:`ClassifierModule`; over the first ``warmup`` steps it is
    scaled by ``(step + 1) / warmup``.
    """
    if schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    elif schedule == "step":
        factor = 0.1 ** ((step >= 0.5 * total) + (step >= 0.75 * total))
    else:
        factor = 1.0
    return factor * min(1.0, (step + 1) / warmup) if warmup > 0 else factor


class ClassifierModule(ChannelsLastModule):
    """Cross-entropy training of ``model``, optionally distilled from a frozen ``teacher``.

    The loss is ``cross_entropy + kd_weight * kd_loss(student, teacher, kd_temperature)``;
    the teacher is only run when ``kd_weight > 0``, and not at all when a batch
    carries its outputs as a third item (see :func:`fixed_teacher_outputs`). The learning rate follows
    ``schedule`` per step over ``epochs`` epochs: ``"cosine"`` decays to zero,
    ``"step"`` divides by 10 at 50% and 75%, ``"constant"`` keeps it. With ``warmup_epochs``
    the schedule is scaled by a factor that rises linearly to 1 over that many epochs (a
    fraction allowed), so a deep network starting at a large rate does not diverge.
    ``channels_last`` trains in that memory format (:class:`ChannelsLastModule`).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        epochs: int = 10,
        schedule: str = "cosine",
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        teacher: nn.Module | None = None,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
        channels_last: bool = CHANNELS_LAST,
    ):
        super().__init__(channels_last)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r} is not one of {OPTIMIZERS}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")
        if not float(lr) > 0:
            raise ValueError(f"lr {lr} must be > 0")
        if float(weight_decay) < 0 or not 0 <= float(momentum) < 1:
            raise ValueError(f"weight_decay {weight_decay} must be >= 0 and momentum {momentum} in [0, 1)")
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs {epochs!r} must be an integer >= 1")
        if not 0 <= float(warmup_epochs) < epochs:
            raise ValueError(f"warmup_epochs {warmup_epochs} must be >= 0 and below epochs ({epochs})")
        if not 0 <= float(label_smoothing) < 1:
            raise ValueError(f"label_smoothing {label_smoothing} must be in [0, 1)")
        if float(kd_weight) < 0:
            raise ValueError(f"kd_weight {kd_weight} must be >= 0")
        if float(kd_weight) > 0 and teacher is None:
            raise ValueError(f"kd_weight {kd_weight} > 0 needs a teacher model; pass teacher=... or set kd_weight=0")
        if float(kd_temperature) <= 0:
            raise ValueError(f"kd_temperature {kd_temperature} must be > 0")
        self.save_hyperparameters(ignore=["model", "teacher", "channels_last"])
        self.model = model
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None and self.hparams.kd_weight > 0

    def on_fit_start(self) -> None:
        # Lightning trains modules in the mode it finds them in; a model loaded or
        # pruned for inference arrives in eval mode, which would freeze its BatchNorm
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # a frozen teacher keeps its BatchNorm statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/ce_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        if self.uses_teacher:
            if len(batch) > 2:
                teacher_logits = batch[2]
            else:
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
            kd = kd_loss(logits, teacher_logits, self.hparams.kd_temperature)
            log_step_and_epoch(self, "train/kd_loss", kd)
            loss = loss + self.hparams.kd_weight * kd
        log_step_and_epoch(self, "train/loss", loss, prog_bar=True)
        self.log("train/acc", _accuracy(logits, y), on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", _accuracy(logits, y), on_epoch=True, prog_bar=True, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(decay_groups(self.model, hp.weight_decay), lr=hp.lr)
        else:
            optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = self._total_steps()
        warmup = round(total * float(hp.warmup_epochs) / hp.epochs)
        if hp.schedule == "constant" and warmup == 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, hp.schedule, total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        """Optimizer steps in ``epochs`` epochs of the trainer's training data."""
        trainer = self._trainer
        if trainer is None:
            return max(1, self.hparams.epochs)
        steps = trainer.estimated_stepping_batches
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(steps):
            steps = steps / trainer.max_epochs * self.hparams.epochs
        return max(1, int(round(steps)) if math.isfinite(steps) else self.hparams.epochs)


def fixed_teacher_outputs(teacher: nn.Module, datamodule, channels_last: bool = CHANNELS_LAST) -> torch.Tensor | None:
    """A frozen teacher's outputs on every image of ``datamodule``'s training split, in its fixed order.

    Without augmentation an image is the same at every epoch and so is what the
    frozen teacher (in eval mode) says about it: one pass replaces a teacher
    forward at every training step. None when the data is augmented, or when
    the outputs would take more than ``TEACHER_OUTPUTS_MAX_BYTES``. ``channels_last``
    runs the pass in that memory format, as the training that follows does (on a CPU a
    MobileNetV2 forward is about x1.9 faster); the teacher is given back in the usual layout.
    """
    count = len(datamodule.train_indices)
    if datamodule.augments or count * datamodule.num_classes * 4 > TEACHER_OUTPUTS_MAX_BYTES:
        return None
    was_training = teacher.training
    layout = forward_layout(channels_last)
    teacher.eval().to(memory_format=layout)
    device = next(teacher.parameters()).device
    outputs = []
    try:
        with torch.no_grad():
            for batch in datamodule.calibration_dataloader(count, batch_size=max(256, datamodule.batch_size)):
                outputs.append(teacher(in_layout(batch[0].to(device), layout)).float().cpu())
    finally:
        teacher.train(was_training).to(memory_format=torch.contiguous_format)
    return torch.cat(outputs)


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent."""
    return (logits.argmax(-1) == targets).float().mean() * 100.0
