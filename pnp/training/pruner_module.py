"""Training the pruner network against a frozen target, in Lightning."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from pnp.core.gating import GatedModel
from pnp.core.groups import ChannelGroups
from pnp.core.losses import PrunerLoss, budget_at
from pnp.core.pruner import PrunerNetwork
from pnp.core.readout import KeepScores
from pnp.core.task import ClassificationTask, PruningTask, pruner_terms
from pnp.training.classifier import log_step_and_epoch
from pnp.training.layout import CHANNELS_LAST, ChannelsLastModule

# the objective's terms and the names they are logged under
_LOGGED = {"loss": "loss", "task": "task_loss", "sparsity": "sparsity_loss", "flops_kept": "flops_kept",
           "budget": "budget_loss", "kd": "kd_loss"}


class PrunerModule(ChannelsLastModule):
    """Learns keep decisions: task loss through the gated, frozen target plus sparsity.

    ``trainer.fit`` trains the pruner; ``trainer.test(module, calibration_loader)``
    averages its keep probabilities over the loader (across all processes) into
    ``module.keep_scores``, ready for :func:`pnp.decide_keep`. With ``budget_warmup``
    the budget its training steps aim at falls from the whole model to ``budget`` over
    that share of the trainer's steps (:func:`pnp.core.losses.budget_at`); validation
    always measures against ``budget``.
    """

    def __init__(
        self,
        target: nn.Module,
        groups: ChannelGroups,
        lr: float = 1e-3,
        trunk_lr: float | None = None,
        target_lr: float = 0.0,
        weight_decay: float = 0.0,
        epochs: int = 5,
        sparsity: str = "flops",
        sparsity_weight: float = 1.0,
        budget: float | None = None,
        budget_metric: str = "flops",
        budget_weight: float = 10.0,
        budget_warmup: float = 0.0,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
        temperature: float = 1.0,
        init_keep: float = 0.9,
        noise: float = 0.0,
        mask_mode: str = "sample",
        input_samples: int | None = None,
        norm_stats: str = "running",
        head_layer: str | None = None,
        task: PruningTask | None = None,
        channels_last: bool = CHANNELS_LAST,
    ):
        super().__init__(channels_last)
        if lr <= 0:
            raise ValueError(f"lr {lr} must be > 0")
        if trunk_lr is not None and trunk_lr < 0:
            raise ValueError(f"trunk_lr {trunk_lr} must be >= 0")
        if target_lr < 0:
            raise ValueError(f"target_lr {target_lr} must be >= 0")
        if int(epochs) < 1:
            raise ValueError(f"epochs {epochs} must be >= 1")
        if not 0.0 <= budget_warmup < 1.0:
            raise ValueError(f"budget_warmup {budget_warmup} must be in [0, 1): the share of the steps the budget falls over")
        if budget_warmup > 0 and budget is None:
            raise ValueError(f"budget_warmup {budget_warmup} needs a budget to fall to")
        self.save_hyperparameters(ignore=["target", "groups", "task", "channels_last"])
        self.groups = groups
        self.task = task or ClassificationTask(groups.example_inputs)
        self.pruner = PrunerNetwork(
            target,
            groups,
            head_layer=head_layer,
            temperature=temperature,
            init_keep=init_keep,
            noise=noise,
            mask_mode=mask_mode,
            input_samples=input_samples,
        )
        # with target_lr the gated target learns too, as fine-tuning will let it: the
        # pruner then weighs each channel by what the adapted network still needs of it
        self.adapts = float(target_lr) > 0
        # norm_stats="batch": the frozen target's BatchNorm normalises with each gated batch's own
        # statistics, as the cut network's would be measured again, rather than the unpruned ones
        self.gated = GatedModel(target, groups, freeze=not self.adapts, norm_stats=norm_stats)
        self.reference = None
        if self.adapts and kd_weight > 0:
            self.reference = copy.deepcopy(target).eval().requires_grad_(False)
        self.objective = PrunerLoss(
            groups,
            sparsity=sparsity,
            sparsity_weight=sparsity_weight,
            budget=budget,
            budget_metric=budget_metric,
            budget_weight=budget_weight,
            kd_weight=kd_weight,
            kd_temperature=kd_temperature,
        )
        self._scores = KeepScores(groups)
        self._val_kept: dict[str, torch.Tensor] = {}
        self._val_count = 0
        self._total_steps: int | None = None
        self.keep_scores: dict[str, torch.Tensor] | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:  # the unpruned target distils as it was trained
            self.reference.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.pruner(x)

    def on_train_start(self) -> None:
        self._total_steps = max(1, int(self.trainer.estimated_stepping_batches))

    def budget_now(self) -> float | None:
        """The budget this training step aims at: ``budget``, or on its way there during the warmup."""
        budget = self.objective.budget
        if budget is None or self._total_steps is None:
            return budget
        return budget_at(budget, self.global_step / self._total_steps, float(self.hparams.budget_warmup))

    def _step(self, batch, stage: str) -> torch.Tensor:
        budget = self.budget_now() if stage == "train" else None
        terms = pruner_terms(self.task, self.gated.target, self.gated, self.pruner, self.objective, batch,
                             reference_model=self.reference, budget=budget)
        logits, y, masks = terms["output"], terms["target"], terms["masks"]
        acc = (logits.argmax(-1) == y).float().mean() * 100.0
        keys = ["loss", "task", "sparsity", "flops_kept"]
        if self.objective.budget is not None:
            keys.append("budget")
        if self.objective.kd_weight > 0:
            keys.append("kd")
        # epoch figures are means over every process (a no-op on one device)
        for key in keys:
            name = f"{stage}/{_LOGGED[key]}"
            if stage == "train":
                log_step_and_epoch(self, name, terms[key], prog_bar=key == "flops_kept")
            else:
                self.log(name, terms[key], on_epoch=True, prog_bar=key == "flops_kept", sync_dist=True)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/channels_kept", terms["channels_kept"], on_step=False, on_epoch=True, sync_dist=True)
        if stage == "train" and self.hparams.budget_warmup > 0:
            self.log("train/budget_aim", budget, on_step=True, on_epoch=False)
        if stage == "val":
            n = y.shape[0]
            for name, m in masks.items():  # fraction kept, weighted by batch size
                self._val_kept[name] = self._val_kept.get(name, 0) + m.detach().float().mean() * n
            self._val_count += n
        return terms["loss"]

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self._val_kept, self._val_count = {}, 0

    def on_validation_epoch_end(self) -> None:
        if not self._val_count:
            return
        for name, kept in self._val_kept.items():
            self.log(f"keep/{name}", kept / self._val_count, sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self._scores.reset()

    def test_step(self, batch, batch_idx):
        self._scores.update(self.pruner.keep_probabilities(self.task.pruner_input(self.gated.target, batch)))

    def on_test_epoch_end(self) -> None:
        self.keep_scores = self._scores.compute()

    def configure_optimizers(self):
        groups = self.pruner.param_groups(self.hparams.lr, self.hparams.trunk_lr)
        if self.adapts:
            groups.append({"params": list(self.gated.target.parameters()), "lr": self.hparams.target_lr})
        optimizer = torch.optim.Adam(groups, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(self.hparams.epochs)))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
