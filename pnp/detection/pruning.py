"""Learned pruning of a whole detector: channel groups, gates, the pruner and its read-out, surgery.

Channel groups are found on :class:`DenseDetector`, the detector's dense path
(backbone, the proposal generator's head, the RoI box head on a fixed set of boxes,
or RetinaNet's shared head), whose module names are the detector's own. So the
groups reach every layer a detector spends its FLOPs in:

- the trunk: block internals, and each stage's channels with every block of the
  stage, the next stage's input and the FPN lateral that reads them;
- the FPN laterals, coupled across levels by the top-down additions;
- the FPN outputs, coupled across levels with every reader of the pyramid: the
  shared RPN (or RetinaNet) head's first convolutions and the RoI pooler into the
  box head's first fully connected layer;
- the RPN head's hidden channels, RetinaNet's subnet convolutions (shared by all
  levels), the box head's hidden widths.

Layers whose outputs are the detector's predictions are left out, with the reason.
``scope="backbone"`` keeps the old, narrower choice: only the backbone's groups,
with the FPN outputs (and so every head) left whole, and a budget on the
backbone's FLOPs.

The pruner sees what the backbone sees (the normalised, padded image batch) and
is trained with the detector's own losses through the gated, frozen detector plus
:class:`pnp.PrunerLoss`'s sparsity and budget terms.
"""

from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from pnp.core.cost import CostModel
from pnp.core.gating import GatedModel
from pnp.core.groups import ChannelGroups
from pnp.core.losses import PrunerLoss
from pnp.core.pruner import PrunerNetwork
from pnp.core.readout import decide_keep
from pnp.core.task import PruningTask, calibrate_keep_scores, pruner_terms
from pnp.detection.compat import import_detectron2

PRUNER_FEATURE = "res5"  # the bottom-up feature the pruner's head reads
SCOPES = ("detector", "backbone")
BACKBONE_PREFIX = "backbone."
# what a backbone-scoped pruning leaves whole: the FPN outputs and every head reading them
_OUTSIDE_BACKBONE = ("proposal_generator.*", "roi_heads.*", "head.*", "backbone.fpn_output*", "backbone.top_block.*")
# per-instance heads of R-CNN detectors, run on the same RoIs as the box head
_INSTANCE_HEADS = ("mask", "keypoint")
# box sizes (pixels) of the fixed RoIs the dense path pools: every FPN level gets some
_ROI_SIZES = (16.0, 32.0, 64.0, 128.0, 256.0, 512.0)


def check_scope(scope) -> str:
    if scope not in SCOPES:
        raise ValueError(f"pruning scope {scope!r} is not one of {list(SCOPES)}: 'detector' prunes the backbone, "
                         "FPN and heads under one budget; 'backbone' only the backbone")
    return scope


def meta_architecture(detector: nn.Module) -> str:
    """``"rcnn"`` (proposal generator + RoI heads) or ``"retinanet"`` (one dense head), else raise."""
    if hasattr(detector, "proposal_generator") and hasattr(detector, "roi_heads"):
        heads = detector.roi_heads
        missing = [f"{kind}_pooler" for kind in ("box", *_INSTANCE_HEADS)
                   if (kind == "box" or getattr(heads, f"{kind}_on", False)) and getattr(heads, f"{kind}_pooler", None) is None]
        if missing:
            raise ValueError(f"{type(heads).__name__} has no {missing[0]}: pnp prunes R-CNN detectors whose RoI heads "
                             "pool from the feature pyramid (StandardROIHeads); the shared-res5 RoI heads (Res5ROIHeads) "
                             "are not supported, use --scope backbone or a StandardROIHeads config")
        return "rcnn"
    if hasattr(detector, "head") and hasattr(detector, "head_in_features"):
        return "retinanet"
    raise ValueError(f"{type(detector).__name__} is neither an R-CNN (proposal_generator + roi_heads) nor a "
                     "RetinaNet-style detector (head + head_in_features); pnp cannot find its dense path")


class DenseDetector(nn.Module):
    """The dense path of a detectron2 detector as one module: ``forward(images, boxes)`` returns tensors.

    It shares the detector's children, so its module names are the detector's and
    gates or surgery on it act on the detector. R-CNN: the RPN head's outputs on
    every level, and the box predictor's (and a mask or keypoint head's) outputs for
    ``boxes`` (fixed RoIs of one image, pooled from the pyramid like proposals). RetinaNet:
    the head's outputs on every level (``boxes`` is unused). Proposal selection,
    NMS and post-processing are not part of it: they have no channels to prune.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.kind = meta_architecture(detector)
        for name, child in detector.named_children():
            self.add_module(name, child)
        self.head_in_features = list(getattr(detector, "head_in_features", []))
        self.training = detector.training  # whoever restores this module's mode restores the detector's

    def forward(self, images: torch.Tensor, boxes: torch.Tensor):
        import_detectron2()
        from detectron2.structures import Boxes

        features = self.backbone(images)
        if self.kind == "retinanet":
            logits, deltas = self.head([features[f] for f in self.head_in_features])
            return (*logits, *deltas)
        rpn, heads = self.proposal_generator, self.roi_heads
        rois = [Boxes(boxes)] * images.shape[0]
        objectness, anchor_deltas = rpn.rpn_head([features[f] for f in rpn.in_features])
        pooled = heads.box_pooler([features[f] for f in heads.box_in_features], rois)
        scores, box_deltas = heads.box_predictor(heads.box_head(pooled))
        outputs = [scores, box_deltas, *objectness, *anchor_deltas]
        for kind in _INSTANCE_HEADS:  # Mask R-CNN's and keypoint heads read the pyramid too
            if getattr(heads, f"{kind}_on", False):
                pooler, head = getattr(heads, f"{kind}_pooler"), getattr(heads, f"{kind}_head")
                outputs.append(head.layers(pooler([features[f] for f in getattr(heads, f"{kind}_in_features")], rois)))
        return tuple(outputs)


def example_image_batch(model: nn.Module, image_size: int) -> torch.Tensor:
    """A normalised image batch of one ``image_size`` square, padded as the detector pads."""
    divisor = max(1, int(model.backbone.size_divisibility))
    side = -(-int(image_size) // divisor) * divisor
    return torch.zeros(1, 3, side, side, device=model.device)


def example_boxes(image_size: int, count: int, device=None) -> torch.Tensor:
    """``count`` fixed boxes ``(x0, y0, x1, y1)`` of every size in :data:`_ROI_SIZES`, centred in the image.

    The RoI box head's cost is per box: ``count`` is the detector's number of
    proposals per image at inference (``MODEL.RPN.POST_NMS_TOPK_TEST``).
    """
    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor(_ROI_SIZES)[torch.arange(int(count)) % len(_ROI_SIZES)]
    centres = torch.rand(int(count), 2, generator=generator) * float(image_size)
    boxes = torch.cat([centres - sizes[:, None] / 2, centres + sizes[:, None] / 2], dim=1)
    return boxes.to(device) if device is not None else boxes


def proposals_per_image(model: nn.Module) -> int:
    """How many RoIs the box head sees per image at inference (1 for a detector without RoI heads)."""
    generator = getattr(model, "proposal_generator", None)
    if generator is None:
        return 1
    return int(generator.post_nms_topk[False])


def dense_example(model: nn.Module, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What :class:`DenseDetector` is traced and costed on: one image and its inference-time RoIs."""
    images = example_image_batch(model, image_size)
    return images, example_boxes(image_size, proposals_per_image(model), images.device)


class DetectionTask(PruningTask):
    """A detectron2 detector (R-CNN or RetinaNet) as a :class:`pnp.core.task.PruningTask`.

    The prunable part is :class:`DenseDetector`, traced on one ``image_size``
    image and the detector's inference-time RoIs; ``scope="backbone"`` leaves the FPN
    outputs and the heads whole. The pruner sees the normalised, padded image batch;
    the task output is the detector's loss dict (it must be in training mode).
    """

    def __init__(self, image_size: int, scope: str = "detector"):
        self.image_size = int(image_size)
        self.scope = check_scope(scope)

    def prunable(self, model: nn.Module) -> nn.Module:
        return DenseDetector(model)

    def example_inputs(self, model: nn.Module):
        return dense_example(model, self.image_size)

    def find_groups(self, model: nn.Module, ignore: Iterable[str] = ()) -> ChannelGroups:
        return super().find_groups(model, tuple(ignore) + (_OUTSIDE_BACKBONE if self.scope == "backbone" else ()))

    def pruner_input(self, model: nn.Module, batch) -> torch.Tensor:
        return model.preprocess_image(batch).tensor

    def output(self, model: nn.Module, batch):
        return model(batch), None

    def after_surgery(self, model: nn.Module, pruned: nn.Module) -> nn.Module:
        detector = _shell_copy(model)
        for name, child in pruned.named_children():
            setattr(detector, name, child)
        detector.pnp_channel_spec = pruned.pnp_channel_spec
        detector.train(pruned.training)
        return sync_output_shapes(detector)


def find_detector_groups(model: nn.Module, image_size: int, scope: str = "detector",
                         ignore: Iterable[str] = ()) -> ChannelGroups:
    """The prunable channel groups of ``model`` (names as in the detector), traced at ``image_size``.

    ``scope="detector"`` finds groups through the whole detector; ``"backbone"`` leaves
    out the FPN outputs and the heads (listed in ``excluded`` as ignored).
    """
    return DetectionTask(image_size, scope).find_groups(model, ignore)


def model_budget(groups: ChannelGroups, budget: float | None, scope: str, metric: str = "flops") -> float | None:
    """The fraction of the whole detector's ``metric`` that keeps ``budget`` of the scope's.

    With ``scope="backbone"`` the budget is a fraction of the backbone's cost and
    the heads' cost is fixed, so it maps to a larger fraction of the whole.
    """
    if budget is None or check_scope(scope) == "detector":
        return budget
    cost = CostModel(groups)
    full = groups.full_keep()
    per_layer = cost.per_layer_flops(full) if metric == "flops" else cost.per_layer_params(full)
    total = sum(per_layer.values())
    part = sum(v for k, v in per_layer.items() if k.startswith(BACKBONE_PREFIX))
    return (float(budget) * part + total - part) / total


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
    images = groups.example_inputs[0]
    pruner = PrunerNetwork(target, groups, example_inputs=images, head_layer="fc", **pruner_kwargs)
    return pruner.to(images.device)


def summed_detection_losses(loss_dict: Mapping[str, torch.Tensor], _targets=None) -> torch.Tensor:
    """The detector's task loss: the sum of its loss dict (what detectron2's trainer minimises)."""
    return sum(loss_dict.values())


class DetectionPrunerObjective(nn.Module):
    """What the pruner's trainer optimises: ``forward(batched_inputs)`` returns ``{"loss_pruner": ...}``.

    The detector is frozen (its backbone's BatchNorm uses running statistics) but
    runs in training mode so that it returns its losses; its layers are gated by
    the pruner's masks wherever the groups reach (backbone, FPN, heads). The
    pruner's loss is :class:`PrunerLoss` with the summed detection losses as its
    task term; its parts go to detectron2's event storage.
    """

    def __init__(self, detector: nn.Module, groups: ChannelGroups, pruner: PrunerNetwork, loss: PrunerLoss,
                 task: DetectionTask | None = None):
        super().__init__()
        self.pruner = pruner
        self.groups = groups
        self.loss = loss
        self.task = task or DetectionTask(groups.example_inputs[0].shape[-1])
        detector.requires_grad_(False)
        # not a submodule: the trainer's optimizer and checkpoints see the pruner only
        self.__dict__["detector"] = detector
        self.__dict__["gate"] = GatedModel(self.task.prunable(detector), groups, freeze=True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.detector.train()  # the detector returns its losses only in training mode
        self.detector.backbone.eval()
        return self

    def forward(self, batched_inputs: list[dict]) -> dict[str, torch.Tensor]:
        import_detectron2()
        from detectron2.utils.events import get_event_storage

        terms = pruner_terms(self.task, self.detector, self.gate, self.pruner, self.loss, batched_inputs)
        scalars = {f"pruner/{k}": float(terms[k].detach()) for k in ("task", "sparsity", "budget", "flops_kept", "channels_kept")}
        scalars.update({f"pruner/{k}": float(v.detach()) for k, v in terms["output"].items()})
        get_event_storage().put_scalars(**scalars, smoothing_hint=False)  # the detector needs a storage too
        return {"loss_pruner": terms["loss"]}


def pruner_optimizer(pruner: PrunerNetwork, lr: float, trunk_lr: float | None = None, weight_decay: float = 0.0):
    """Adam with the fresh head at ``lr`` and the trained trunk at ``trunk_lr`` (default ``lr / 10``), as for classifiers."""
    if lr <= 0:
        raise ValueError(f"pruner lr {lr} must be > 0")
    return torch.optim.Adam(pruner.param_groups(lr, trunk_lr), weight_decay=weight_decay)


def detector_keep_scores(
    detector: nn.Module, pruner: PrunerNetwork, groups: ChannelGroups, data_loader, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """Mean keep probability of every channel over ``data_loader`` (detectron2 batches)."""
    task = DetectionTask(groups.example_inputs[0].shape[-1])
    return calibrate_keep_scores(task, detector, pruner, groups, data_loader, max_batches)


def decide_detector_keep(groups: ChannelGroups, scores, budget: float | None = None, scope: str = "detector",
                         metric: str = "flops", **kwargs):
    """Static keep decisions; with ``budget`` the pruned scope keeps at most that fraction of its ``metric``.

    ``kwargs`` go to :func:`pnp.decide_keep` (``round_to``, ``min_channels``, ``fill``).
    The returned info says which scope the budget was on.
    """
    keep, info = decide_keep(groups, scores, budget=model_budget(groups, budget, scope, metric), metric=metric, **kwargs)
    info["scope"] = scope
    info["budget"] = budget
    return keep, info


def rank_detector_channels(detector: nn.Module, groups: ChannelGroups, criterion: str) -> dict[str, torch.Tensor]:
    """A data-free criterion's keep scores (``pnp.core.criteria``, e.g. ``"magnitude"``) for ``groups``.

    They go through the same read-out and surgery as the pruner's, so a criterion
    and the learned pruner are compared at the same budget on the same detector.
    """
    from pnp.core.criteria import CRITERIA, check_criterion, rank_channels

    if CRITERIA[check_criterion(criterion)].needs_gradients:
        raise ValueError(f"criterion {criterion!r} needs the task loss's gradients; detection supports data-free "
                         f"criteria ({[n for n, c in CRITERIA.items() if not c.needs_gradients]})")
    was_training = detector.training
    detector.eval()
    try:
        return rank_channels(DenseDetector(detector), groups, criterion)
    finally:
        detector.train(was_training)


def prune_detector(model: nn.Module, groups: ChannelGroups, keep: Mapping[str, torch.Tensor], verify: bool = True) -> nn.Module:
    """A copy of ``model`` with every channel that ``keep`` drops removed, wherever the groups reach.

    With ``verify`` the pruned dense path is checked against the gated original on
    the groups' example inputs. The pruned detector carries its
    :class:`pnp.ChannelSpec` as ``pnp_channel_spec`` (names as in the detector), and
    the widths detectron2 reports (``output_shape()``) are those of its layers.
    """
    images = groups.example_inputs[0]
    return DetectionTask(images.shape[-1]).surgery(model, groups, keep, verify=verify)


def _shell_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without copying its children (they are replaced next)."""
    children = dict(model._modules)
    model._modules = {}
    try:
        shell = copy.deepcopy(model)
    finally:
        model._modules = children
    if hasattr(shell, "pnp_channel_spec"):
        del shell.pnp_channel_spec
    return shell


def sync_output_shapes(model: nn.Module) -> nn.Module:
    """Make the widths a detectron2 detector reports match its (possibly pruned) layers.

    Surgery changes layers, not the bookkeeping built from the config: ResNet's and
    the FPN's ``_out_feature_channels``, each block's ``in_channels``/``out_channels``,
    the box head's ``_output_size``. Returns ``model``.
    """
    import_detectron2()
    from detectron2.layers import CNNBlockBase

    backbone = model.backbone
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
        widths = {f"p{int(n[len('fpn_output'):])}": m.out_channels for n, m in backbone.named_children()
                  if n.startswith("fpn_output")}
        top = getattr(backbone, "top_block", None)
        for name in backbone._out_feature_channels:
            if name not in widths and top is not None:
                convs = [m for m in top.modules() if isinstance(m, nn.Conv2d)]
                widths[name] = convs[-1].out_channels if convs else max(widths.values())  # P6 by max-pooling P5
        backbone._out_feature_channels = {k: widths.get(k, v) for k, v in backbone._out_feature_channels.items()}
    box_head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    if box_head is not None and hasattr(box_head, "_output_size"):
        fcs = [m for m in box_head.modules() if isinstance(m, nn.Linear)]
        if fcs:
            box_head._output_size = fcs[-1].out_features
    return model


def pruned_config(cfg, model: nn.Module):
    """``cfg`` with the width fields that describe the pruned ``model`` set to its layers' widths.

    ``MODEL.FPN.OUT_CHANNELS`` (one width for every level), ``MODEL.RPN.CONV_DIMS``
    and, when every fc layer of the box head keeps the same width,
    ``MODEL.ROI_BOX_HEAD.FC_DIM``. Widths no config field can express (per-layer
    trunk and subnet widths) live in the checkpoint's channel spec.
    """
    cfg = cfg.clone()
    cfg.defrost()
    fpn = [m.out_channels for n, m in model.backbone.named_children() if n.startswith("fpn_output")]
    if fpn and len(set(fpn)) == 1:
        cfg.MODEL.FPN.OUT_CHANNELS = fpn[0]
    rpn_head = getattr(getattr(model, "proposal_generator", None), "rpn_head", None)
    if rpn_head is not None and isinstance(getattr(rpn_head, "conv", None), nn.Module):
        convs = [m for m in rpn_head.conv.modules() if isinstance(m, nn.Conv2d)]
        cfg.MODEL.RPN.CONV_DIMS = [m.out_channels for m in convs]
    box_head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    if box_head is not None:
        fcs = [m.out_features for m in box_head.modules() if isinstance(m, nn.Linear)]
        if fcs and len(set(fcs)) == 1:
            cfg.MODEL.ROI_BOX_HEAD.FC_DIM = fcs[0]
    return cfg



def kept_feature_channels(model: nn.Module) -> dict[str, list[int]]:
    """For each backbone output feature that pruning narrowed, the original channels it kept.

    Read from ``model.pnp_channel_spec``: a pyramid level keeps what its output
    convolution (``fpn_output<k>``, or the top block's ``p6``/``p7``) kept; a level
    made by pooling the one below (Faster R-CNN's P6) keeps what that one kept.
    """
    spec = getattr(model, "pnp_channel_spec", None)
    if spec is None:
        return {}
    backbone = model.backbone
    producers = {f"p{n[len('fpn_output'):]}": f"{BACKBONE_PREFIX}{n}" for n, _ in backbone.named_children()
                 if n.startswith("fpn_output")}
    top = getattr(backbone, "top_block", None)
    if top is not None:
        producers.update({n: f"{BACKBONE_PREFIX}top_block.{n}" for n, m in top.named_children() if isinstance(m, nn.Conv2d)})
    kept: dict[str, list[int]] = {}
    previous = None
    for feature in backbone._out_feature_channels:  # in pyramid order, finest first
        producer = producers.get(feature, previous)
        previous = producer
        entry = spec.modules.get(producer, {}) if producer else {}
        if "kept_out" in entry:
            kept[feature] = list(entry["kept_out"])
    return kept
