"""Learned pruning of a detector's backbone: channel groups, gates, the pruner and its read-out, surgery.

Channel groups are found on ``model.backbone`` (ResNet bottom-up + FPN). Block
internals are groups of their own; a stage's output channels form one group with
every block of the stage, the next stage's input and the FPN lateral that reads
them. The FPN's outputs are the backbone's outputs and are left out, so the RPN
and RoI heads keep their input widths and are never cut.

The pruner sees what the backbone sees (the normalised, padded image batch) and
is trained with the detector's own losses through the gated, frozen detector plus
:class:`pnp.PrunerLoss`'s sparsity and budget terms.
"""

from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from pnp.core.gating import GatedModel
from pnp.core.groups import ChannelGroups, find_channel_groups
from pnp.core.losses import PrunerLoss
from pnp.core.pruner import PrunerNetwork
from pnp.core.readout import KeepScores, decide_keep
from pnp.core.surgery import apply_surgery
from pnp.detection.compat import import_detectron2

PRUNER_FEATURE = "res5"  # the bottom-up feature the pruner's head reads


def example_image_batch(model: nn.Module, image_size: int) -> torch.Tensor:
    """A normalised image batch of one ``image_size`` square, padded as the detector pads."""
    divisor = max(1, int(model.backbone.size_divisibility))
    side = -(-int(image_size) // divisor) * divisor
    return torch.zeros(1, 3, side, side, device=model.device)


def find_backbone_groups(model: nn.Module, image_size: int, ignore: Iterable[str] = ()) -> ChannelGroups:
    """The prunable channel groups of ``model.backbone``, traced on a normalised image of ``image_size``."""
    return find_channel_groups(model.backbone, example_image_batch(model, image_size), ignore=tuple(ignore))


class PooledBottomUp(nn.Module):
    """The detector's bottom-up network with its ``feature`` map pooled into a Linear layer.

    Only the pruner's trunk is built from it: :class:`PrunerNetwork` replaces the
    Linear layer by its multitask head, so the head reads the pooled top feature
    and the trunk takes images of any size.
    """

    def __init__(self, bottom_up: nn.Module, feature: str = PRUNER_FEATURE):
        super().__init__()
        shapes = bottom_up.output_shape()
        if feature not in shapes:
            raise ValueError(f"the backbone has no feature {feature!r}; it gives {sorted(shapes)}")
        self.bottom_up = bottom_up
        self.feature = feature
        self.fc = nn.Linear(shapes[feature].channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bottom_up(images)[self.feature].mean(dim=(2, 3)))


def build_detection_pruner(model: nn.Module, groups: ChannelGroups, **pruner_kwargs) -> PrunerNetwork:
    """A :class:`PrunerNetwork` whose trunk is a copy of ``model``'s trained bottom-up network."""
    pruner_kwargs.setdefault("mask_mode", "batch")
    target = PooledBottomUp(model.backbone.bottom_up)
    example = groups.example_inputs
    pruner = PrunerNetwork(target, groups, example_inputs=example, head_layer="fc", **pruner_kwargs)
    return pruner.to(example.device)


def summed_detection_losses(loss_dict: Mapping[str, torch.Tensor], _targets=None) -> torch.Tensor:
    """The detector's task loss: the sum of its loss dict (what detectron2's trainer minimises)."""
    return sum(loss_dict.values())


class DetectionPrunerObjective(nn.Module):
    """What the pruner's trainer optimises: ``forward(batched_inputs)`` returns ``{"loss_pruner": ...}``.

    The detector is frozen (its backbone's BatchNorm uses running statistics) but
    runs in training mode so that it returns its losses; its backbone is gated by
    the pruner's masks. The pruner's loss is :class:`PrunerLoss` with the summed
    detection losses as its task term; its parts go to detectron2's event storage.
    """

    def __init__(self, detector: nn.Module, groups: ChannelGroups, pruner: PrunerNetwork, loss: PrunerLoss):
        super().__init__()
        self.pruner = pruner
        self.groups = groups
        self.loss = loss
        detector.requires_grad_(False)
        # not a submodule: the trainer's optimizer and checkpoints see the pruner only
        self.__dict__["detector"] = detector
        self.__dict__["gate"] = GatedModel(detector.backbone, groups, freeze=True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.detector.train()  # the detector returns its losses only in training mode
        self.detector.backbone.eval()
        return self

    def forward(self, batched_inputs: list[dict]) -> dict[str, torch.Tensor]:
        import_detectron2()
        from detectron2.utils.events import get_event_storage

        images = self.detector.preprocess_image(batched_inputs).tensor
        masks = self.pruner(images)
        with self.gate.masked(masks):
            detection_losses = self.detector(batched_inputs)
        terms = self.loss(detection_losses, None, masks)
        scalars = {f"pruner/{k}": float(terms[k].detach()) for k in ("task", "sparsity", "budget", "flops_kept", "channels_kept")}
        scalars.update({f"pruner/{k}": float(v.detach()) for k, v in detection_losses.items()})
        get_event_storage().put_scalars(**scalars, smoothing_hint=False)  # the detector needs a storage too
        return {"loss_pruner": terms["loss"]}


def pruner_optimizer(pruner: PrunerNetwork, lr: float, trunk_lr: float | None = None, weight_decay: float = 0.0):
    """Adam with the fresh head at ``lr`` and the trained trunk at ``trunk_lr`` (default ``lr / 10``), as for classifiers."""
    if lr <= 0:
        raise ValueError(f"pruner lr {lr} must be > 0")
    return torch.optim.Adam(pruner.param_groups(lr, trunk_lr), weight_decay=weight_decay)


@torch.no_grad()
def backbone_keep_scores(
    detector: nn.Module, pruner: PrunerNetwork, groups: ChannelGroups, data_loader, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """Mean keep probability of every channel over ``data_loader`` (detectron2 batches)."""
    scores = KeepScores(groups)
    was_training = pruner.training
    pruner.eval()
    try:
        for i, batched_inputs in enumerate(data_loader):
            if max_batches is not None and i >= max_batches:
                break
            images = detector.preprocess_image(batched_inputs).tensor
            scores.update(pruner.keep_probabilities(images))
    finally:
        pruner.train(was_training)
    return scores.compute()


def decide_backbone_keep(groups: ChannelGroups, scores, budget: float | None = None, **kwargs):
    """Static keep decisions; with ``budget`` the pruned backbone keeps at most that fraction of its FLOPs."""
    return decide_keep(groups, scores, budget=budget, metric="flops", **kwargs)


def prune_detector(model: nn.Module, groups: ChannelGroups, keep: Mapping[str, torch.Tensor], verify: bool = True) -> nn.Module:
    """A copy of ``model`` whose backbone has every channel that ``keep`` drops removed.

    With ``verify`` the pruned backbone is checked against the gated original on
    the groups' example input. The pruned backbone carries its
    :class:`pnp.ChannelSpec` as ``backbone.pnp_channel_spec`` (module names
    relative to the backbone).
    """
    was_training = model.training
    model.eval()
    try:
        backbone = apply_surgery(model.backbone, groups, keep, verify=verify)
    finally:
        model.train(was_training)
    backbone.train(was_training)
    original, model.backbone = model.backbone, None
    try:
        pruned = copy.deepcopy(model)
    finally:
        model.backbone = original
    pruned.backbone = backbone
    sync_output_shapes(backbone)
    return pruned


def sync_output_shapes(backbone: nn.Module) -> nn.Module:
    """Make the widths a detectron2 backbone reports match its (possibly pruned) layers.

    Surgery changes layers, not the bookkeeping built from the config: ResNet's
    ``_out_feature_channels`` and each block's ``in_channels``/``out_channels``.
    FPN outputs are never pruned, so the FPN's own shapes stay as they are; a
    pruned FPN output would be an error here.
    """
    import_detectron2()
    from detectron2.layers import CNNBlockBase

    bottom_up = getattr(backbone, "bottom_up", backbone)
    for module in bottom_up.modules():
        if isinstance(module, CNNBlockBase):
            convs = [m for name, m in module.named_children() if name.startswith("conv") and isinstance(m, nn.Conv2d)]
            if convs:
                module.in_channels = convs[0].in_channels
                module.out_channels = convs[-1].out_channels
    channels = dict(bottom_up._out_feature_channels)
    if "stem" in channels:
        channels["stem"] = bottom_up.stem.out_channels
    for name in channels:
        stage = getattr(bottom_up, name, None)
        if name != "stem" and stage is not None:
            channels[name] = stage[-1].out_channels
    bottom_up._out_feature_channels = channels
    if backbone is not bottom_up:
        outputs = [m for n, m in backbone.named_children() if n.startswith("fpn_output")]
        widths = {m.out_channels for m in outputs}
        expected = set(backbone._out_feature_channels.values())
        if widths and widths != expected:
            raise ValueError(
                f"the FPN's output convolutions give {sorted(widths)} channels but the heads expect {sorted(expected)}; "
                "FPN outputs must not be pruned"
            )
    return backbone
