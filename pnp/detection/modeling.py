"""Faster R-CNN and RetinaNet detectors with a ResNet + FPN backbone, configured in code.

The installed detectron2 lacks its model-zoo YAML files and no pretrained
weights can be fetched here, so :func:`detector_config` writes the Faster R-CNN
R-FPN and RetinaNet R-FPN recipes onto ``get_cfg()`` itself, for training from scratch: the whole
backbone learns (``FREEZE_AT=0``) and uses trainable BatchNorm, which pnp's
channel groups and surgery can prune (detectron2's ``FrozenBN`` cannot be).
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from pnp.detection.compat import import_detectron2

DEPTHS = (18, 34, 50, 101)
# mean and std of the Fashion-MNIST composite (128 px, 2-5 items), the same in each channel
FASHION_DETECTION_PIXEL_MEAN = (24.2, 24.2, 24.2)
FASHION_DETECTION_PIXEL_STD = (60.9, 60.9, 60.9)
FPN_LEVELS = ("res2", "res3", "res4", "res5")
RETINANET_LEVELS = ("res3", "res4", "res5")
# meta-architectures pnp configures: name -> detectron2's META_ARCHITECTURE
META_ARCHITECTURES = {"faster_rcnn": "GeneralizedRCNN", "retinanet": "RetinaNet"}


def detector_config(
    depth: int = 18,
    num_classes: int = 10,
    image_size: int = 128,
    device: str = "cpu",
    fpn_channels: int = 256,
    anchor_sizes: Sequence[int] = (16, 32, 64, 128, 256),
    pixel_mean: Sequence[float] = FASHION_DETECTION_PIXEL_MEAN,
    pixel_std: Sequence[float] = FASHION_DETECTION_PIXEL_STD,
    train_datasets: Sequence[str] = (),
    test_datasets: Sequence[str] = (),
    meta_architecture: str = "faster_rcnn",
):
    """A detectron2 ``CfgNode`` for a ResNet-``depth`` + FPN detector trained from scratch.

    ``meta_architecture`` is ``"faster_rcnn"`` or ``"retinanet"``. Images are resized
    so their shorter side is ``image_size`` (train and test); ``anchor_sizes`` gives
    one anchor size per pyramid level (P2-P6 for Faster R-CNN, P3-P7 for RetinaNet,
    which adds two more scales per octave), suited to objects of a small image. Proposal and RoI counts are cut down from the COCO recipe so
    a step is quick on a CPU; the remaining ``cfg`` fields are detectron2's defaults.
    """
    import_detectron2()
    from detectron2.config import get_cfg

    if meta_architecture not in META_ARCHITECTURES:
        raise ValueError(f"meta_architecture={meta_architecture!r} is not one of {list(META_ARCHITECTURES)}")
    if depth not in DEPTHS:
        raise ValueError(f"depth={depth!r} is not a ResNet depth detectron2 builds; use one of {list(DEPTHS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size={image_size!r} must be an integer of at least 32 pixels")
    if len(anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes={list(anchor_sizes)} needs one size per pyramid level (5 values)")
    for field, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
        if len(value) != 3:
            raise ValueError(f"{field}={list(value)} needs one value per BGR channel (3 values)")

    cfg = get_cfg()
    cfg.MODEL.DEVICE = device
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.PIXEL_MEAN = [float(v) for v in pixel_mean]
    cfg.MODEL.PIXEL_STD = [float(v) for v in pixel_std]

    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0  # from scratch: every stage learns
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = list(FPN_LEVELS)
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # stride in the 3x3 conv, as torchvision's ResNet
    cfg.MODEL.RESNETS.NUM_GROUPS = 1
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 64
    cfg.MODEL.FPN.IN_FEATURES = list(FPN_LEVELS)
    cfg.MODEL.FPN.OUT_CHANNELS = int(fpn_channels)

    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[int(s)] for s in anchor_sizes]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 1000
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 500
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 500
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 200
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 128
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 512
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7

    if meta_architecture == "retinanet":
        _retinanet(cfg, num_classes, anchor_sizes)

    cfg.INPUT.MIN_SIZE_TRAIN = (image_size,)
    cfg.INPUT.MAX_SIZE_TRAIN = 4 * image_size
    cfg.INPUT.MIN_SIZE_TEST = image_size
    cfg.INPUT.MAX_SIZE_TEST = 4 * image_size
    cfg.DATASETS.TRAIN = tuple(train_datasets)
    cfg.DATASETS.TEST = tuple(test_datasets)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 8
    cfg.SOLVER.BASE_LR = 0.02
    cfg.SOLVER.WARMUP_ITERS = 100
    cfg.SOLVER.CHECKPOINT_PERIOD = 100  # resume points of an interrupted stage (removed when it finishes)
    return cfg


def _retinanet(cfg, num_classes: int, anchor_sizes: Sequence[int]) -> None:
    """RetinaNet on P3-P7 (P6 and P7 from res5), its head shared by every level."""
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = list(RETINANET_LEVELS)
    cfg.MODEL.FPN.IN_FEATURES = list(RETINANET_LEVELS)
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[float(s) * 2 ** (i / 3) for i in range(3)] for s in anchor_sizes]
    cfg.MODEL.RETINANET.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 500


def build_detector(cfg) -> nn.Module:
    """Build the detector ``cfg`` describes (``detectron2.modeling.build_model``), on ``cfg.MODEL.DEVICE``."""
    import_detectron2()
    from detectron2.modeling import build_model

    return build_model(cfg)
