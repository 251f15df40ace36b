"""Distilling an unpruned detector into its pruned copy while it fine-tunes.

detectron2's trainer minimises the sum of the model's loss dict, so distillation
is a model wrapper, not a change to the loop: :class:`DistillingDetector` runs the
student as it is, listens (forward hooks) to the inputs and outputs it needs, and
adds ``loss_kd_fpn`` (MSE between the student's and the frozen teacher's FPN
features; where pruning narrowed the pyramid, the teacher's channels the student
kept) and ``loss_kd_cls`` (KL between the RoI box head's class logits of both, on
the student's sampled proposals; R-CNN detectors only).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from pnp.core.losses import feature_distillation_loss, kd_loss
from pnp.detection.pruning import kept_feature_channels


class DistillingDetector(nn.Module):
    """``student`` trained with ``kd_fpn * loss_kd_fpn + kd_cls * loss_kd_cls`` added to its losses.

    In eval mode it is the student. The teacher is frozen and always in eval mode.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, kd_fpn: float = 1.0, kd_cls: float = 0.0,
                 temperature: float = 2.0):
        super().__init__()
        for field, value in (("kd_fpn", kd_fpn), ("kd_cls", kd_cls)):
            if float(value) < 0:
                raise ValueError(f"{field} {value} must be >= 0")
        if float(kd_fpn) == 0 and float(kd_cls) == 0:
            raise ValueError("kd_fpn and kd_cls are both 0: nothing to distil; train the student without the wrapper")
        if float(kd_cls) > 0 and not hasattr(student, "roi_heads"):
            raise ValueError(f"kd_cls {kd_cls}: {type(student).__name__} has no RoI box head whose class logits could "
                             "be distilled; use kd_fpn alone")
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.kd_fpn = float(kd_fpn)
        self.kd_cls = float(kd_cls)
        self.temperature = float(temperature)
        self._check_features()

    def _check_features(self) -> None:
        s, t = self.student.backbone.output_shape(), self.teacher.backbone.output_shape()
        self.channels = {k: torch.tensor(v) for k, v in kept_feature_channels(self.student).items()}
        expected = {k: (len(self.channels[k]) if k in self.channels else v.channels) for k, v in t.items()}
        if {k: v.channels for k, v in s.items()} != expected:
            raise ValueError(
                f"student FPN features {({k: v.channels for k, v in s.items()})} do not match the teacher's "
                f"{({k: v.channels for k, v in t.items()})} and the channels its pruning kept; distil from the "
                "unpruned detector of the same config"
            )

    @property
    def device(self) -> torch.device:
        return self.student.device

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, batched_inputs):
        if not self.training:
            return self.student(batched_inputs)
        seen: dict = {}
        with _recording(self.student, seen, self.kd_cls > 0):
            losses = self.student(batched_inputs)
        images, features = seen["images"], seen["features"]
        with torch.no_grad():
            teacher_features = self.teacher.backbone(images)
        if self.kd_fpn > 0:
            names = sorted(features)
            losses["loss_kd_fpn"] = self.kd_fpn * feature_distillation_loss(
                [features[n] for n in names], [self._kept(n, teacher_features[n]) for n in names]
            )
        if self.kd_cls > 0:
            heads = self.teacher.roi_heads
            with torch.no_grad():
                pooled = heads.box_pooler([teacher_features[f] for f in heads.box_in_features], seen["boxes"])
                teacher_logits, _ = heads.box_predictor(heads.box_head(pooled))
            losses["loss_kd_cls"] = self.kd_cls * kd_loss(seen["logits"], teacher_logits, self.temperature)
        return losses

    def _kept(self, name: str, feature: torch.Tensor) -> torch.Tensor:
        index = self.channels.get(name)
        return feature if index is None else feature.index_select(1, index.to(feature.device))


@contextlib.contextmanager
def _recording(student: nn.Module, seen: dict, with_boxes: bool):
    """Record the student's backbone input and features, and its RoI boxes and class logits."""

    def backbone_hook(module, args, output):
        seen["images"], seen["features"] = args[0], output

    def pooler_hook(module, args, output):
        seen["boxes"] = args[1]

    def predictor_hook(module, args, output):
        seen["logits"] = output[0]

    handles = [student.backbone.register_forward_hook(backbone_hook)]
    if with_boxes:
        handles.append(student.roi_heads.box_pooler.register_forward_hook(pooler_hook))
        handles.append(student.roi_heads.box_predictor.register_forward_hook(predictor_hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
