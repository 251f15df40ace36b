"""The task seam: a task that is neither classification nor detection gets the whole engine by stating what differs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pnp
from pnp.core.task import ClassificationTask, PruningTask, calibrate_keep_scores, pruner_terms


class TinySegmenter(nn.Module):
    """Per-pixel class logits from a dict input: what a segmentation model looks like to pnp."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                     nn.Conv2d(12, 16, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(16, 3, 1)
        self.fc = nn.Linear(16, 1)  # what the pruner's head replaces: the pooled encoder feature

    def forward(self, image):
        return self.classifier(self.encoder(image))


class PooledEncoder(nn.Module):
    def __init__(self, seg: TinySegmenter):
        super().__init__()
        self.encoder, self.fc = seg.encoder, seg.fc

    def forward(self, image):
        return self.fc(self.encoder(image).mean(dim=(2, 3)))


class SegmentationTask(PruningTask):
    def example_inputs(self, model):
        return {"image": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))}

    def pruner_input(self, model, batch):
        return batch["image"]

    def output(self, model, batch):
        return model(batch["image"]), batch["mask"]


def test_a_new_task_gets_groups_pruner_training_readout_and_exact_surgery():
    torch.manual_seed(0)
    model = TinySegmenter().eval()
    task = SegmentationTask()
    groups = task.find_groups(model)
    assert set(groups.names) == {"encoder.0", "encoder.3"} and "classifier" in groups.excluded

    pruner = pnp.PrunerNetwork(PooledEncoder(model), groups, example_inputs=task.example_inputs(model)["image"],
                               head_layer="fc", mask_mode="batch")
    gate = pnp.GatedModel(task.prunable(model), groups, freeze=True)
    loss = pnp.PrunerLoss(groups, task_loss=lambda out, y: F.cross_entropy(out, y), budget=0.5)
    batch = {"image": torch.randn(4, 1, 8, 8), "mask": torch.randint(0, 3, (4, 8, 8))}
    terms = pruner_terms(task, model, gate, pruner, loss, batch)
    terms["loss"].backward()
    assert terms["output"].shape == (4, 3, 8, 8) and torch.isfinite(terms["loss"])
    assert pruner.head.linear.weight.grad.abs().sum() > 0  # the task loss reaches the pruner through the gates
    assert all(p.grad is None for p in model.parameters())  # the target stays frozen
    gate.remove()

    scores = calibrate_keep_scores(task, model, pruner, groups, [batch, batch])
    keep, info = pnp.decide_keep(groups, scores, budget=0.5)
    pruned = task.surgery(model, groups, keep)  # verified against the gated original
    assert info["flops_fraction"] <= 0.5 and pruned.classifier.in_channels == int(keep["encoder.3"].sum())
    assert model.classifier.in_channels == 16  # the original is untouched


def test_classification_task_is_what_the_lightning_module_trains_with():
    from pnp.core.builders import build_model
    from pnp.training.pruner_module import PrunerModule

    model = build_model("pnp:lenet5", in_channels=1, num_classes=10, input_size=28)
    x = torch.randn(2, 1, 28, 28)
    task = ClassificationTask(x)
    groups = task.find_groups(model)
    module = PrunerModule(model, groups, task=task, budget=0.5, mask_mode="batch", kd_weight=1.0)
    loss = module.training_step((x, torch.tensor([1, 2])), 0)
    loss.backward()
    assert torch.isfinite(loss) and module.pruner.head.linear.weight.grad.abs().sum() > 0


def test_an_adapting_target_learns_while_the_distillation_reference_stays_as_trained():
    """pruner target_lr: the gated target gets an optimizer group and learns; kd distils from a frozen copy."""
    from pnp.core.builders import build_model
    from pnp.training.pruner_module import PrunerModule

    torch.manual_seed(0)
    model = build_model("pnp:resnet20", in_channels=1, num_classes=10, input_size=16)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([1, 2, 3, 4])
    task = ClassificationTask(x)
    groups = task.find_groups(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    module = PrunerModule(model, groups, task=task, budget=0.5, mask_mode="batch", kd_weight=1.0, target_lr=0.01)
    module.train()
    assert module.gated.target.training and not module.reference.training  # BN statistics adapt; the reference's do not
    optimizer = module.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in optimizer.param_groups][-1] == 0.01
    for _ in range(2):
        optimizer.zero_grad()
        module.training_step((x, y), 0).backward()
        optimizer.step()
    assert not torch.equal(model.conv1.weight, original["conv1.weight"])
    assert not torch.equal(model.bn1.running_mean, original["bn1.running_mean"])
    assert all(torch.equal(v, original[k]) for k, v in module.reference.state_dict().items())

    still = build_model("pnp:resnet20", in_channels=1, num_classes=10, input_size=16)
    frozen = PrunerModule(still, task.find_groups(still), task=task, budget=0.5, kd_weight=1.0)
    assert frozen.reference is None and not any(p.requires_grad for p in still.parameters())


def test_with_a_budget_warmup_the_pruners_steps_aim_at_a_falling_budget_and_validation_at_the_budget():
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from pnp.core.builders import build_model
    from pnp.training.pruner_module import PrunerModule

    torch.manual_seed(0)
    model = build_model("pnp:lenet5", in_channels=1, num_classes=10, input_size=28)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    task = ClassificationTask(x[:2])
    module = PrunerModule(model, task.find_groups(model), task=task, budget=0.2, budget_warmup=0.5, mask_mode="batch")
    aims = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            aims.append(pl_module.budget_now())

    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    trainer = pl.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Record()], accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(module, loader, loader)
    assert aims[0] == pytest.approx(1.0) and aims[3] > 0.2 and aims[4:] == [pytest.approx(0.2)] * 4
    assert trainer.callback_metrics["val/budget_loss"] == pytest.approx(
        abs(float(trainer.callback_metrics["val/flops_kept"]) / 0.2 - 1), rel=1e-4)
    with pytest.raises(ValueError, match="needs a budget"):
        PrunerModule(model, task.find_groups(model), task=task, budget_warmup=0.5)
