"""Detector checkpoints as pnp artifacts: safetensors weights, channels.json, the detectron2 config.

:func:`save_pruned_detector` writes a pruned (or unpruned) detector with
:func:`pnp.save_pruned`: ``model.safetensors``, and ``channels.json`` whose builder
rebuilds the original detector from the saved detectron2 config and whose module
entries are the kept channels of every pruned layer (backbone, FPN, heads).
``config.yaml`` beside them is the config of the pruned detector, for people and
``--config-file``: its width fields (``MODEL.FPN.OUT_CHANNELS``, ``MODEL.RPN.CONV_DIMS``,
``MODEL.ROI_BOX_HEAD.FC_DIM`` where one width fits every layer) are the pruned
layers' widths. :func:`load_pruned_detector` rebuilds,
shrinks and loads without unpickling anything, and refuses a checkpoint whose
meta-architecture, backbone or categories do not match what the caller's config or
dataset expects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from pnp.core.artifacts import CHANNELS_FILE, ArtifactError, load_pruned, save_pruned
from pnp.core.builders import allow_builder
from pnp.core.surgery import ChannelSpec
from pnp.detection.compat import import_detectron2
from pnp.detection.pruning import pruned_config, sync_output_shapes
from pnp.core.io import write_text_atomic

BUILDER = allow_builder("pnp.detection.checkpoint:detector_from_config")  # detection artifacts name it
CONFIG_FILE = "config.yaml"


class DetectorCheckpointError(ArtifactError):
    """A detector checkpoint does not fit the config or dataset it is used with."""


def detector_from_config(config: str) -> nn.Module:
    """Build the (unpruned) detector a dumped detectron2 config describes, on the CPU."""
    cfg = config_from_text(config)
    cfg.MODEL.DEVICE = "cpu"
    import_detectron2()
    from detectron2.modeling import build_model

    return build_model(cfg)


def config_from_text(text: str):
    """A detectron2 ``CfgNode`` from the text of ``cfg.dump()``."""
    import_detectron2()
    from detectron2.config import CfgNode

    return CfgNode(CfgNode.load_cfg(text))


def save_pruned_detector(
    model: nn.Module,
    cfg,
    directory: str | os.PathLike,
    thing_classes: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (a detectron2 detector, pruned by :func:`prune_detector` or not) to ``directory``.

    ``cfg`` is the config the *unpruned* detector was built from. ``thing_classes``
    (default: the metadata of ``cfg.DATASETS.TRAIN[0]`` when registered) is stored
    so that loading can check a dataset's categories.
    """
    spec = getattr(model, "pnp_channel_spec", None) or ChannelSpec({}, {}, {}, {})
    if thing_classes is None:
        thing_classes = _dataset_classes(cfg.DATASETS.TRAIN[0]) if len(cfg.DATASETS.TRAIN) else None
    num_classes = num_classes_of(cfg)
    if thing_classes is not None and len(thing_classes) != num_classes:
        raise DetectorCheckpointError(
            f"thing_classes has {len(thing_classes)} names but {classes_field(cfg)} is {num_classes}; "
            "pass the class names the detector was trained on"
        )
    info = {
        "depth": int(cfg.MODEL.RESNETS.DEPTH),
        "num_classes": num_classes,
        "thing_classes": list(thing_classes) if thing_classes is not None else None,
        **dict(metadata or {}),
    }
    text = cfg.dump()
    directory = save_pruned(
        model, directory, builder=BUILDER, builder_kwargs={"config": text}, spec=spec,
        metadata=info, overwrite=overwrite,
    )
    write_text_atomic(directory / CONFIG_FILE, pruned_config(cfg, model).dump())
    return directory


def classes_field(cfg) -> str:
    """The config field that holds the number of classes of ``cfg``'s meta-architecture."""
    return "MODEL.RETINANET.NUM_CLASSES" if cfg.MODEL.META_ARCHITECTURE == "RetinaNet" else "MODEL.ROI_HEADS.NUM_CLASSES"


def num_classes_of(cfg) -> int:
    return int(cfg.MODEL.RETINANET.NUM_CLASSES if cfg.MODEL.META_ARCHITECTURE == "RetinaNet" else cfg.MODEL.ROI_HEADS.NUM_CLASSES)


def saved_config(directory: str | os.PathLike):
    """The detectron2 config stored in a checkpoint's ``channels.json``."""
    path = Path(directory) / CHANNELS_FILE
    if not path.is_file():
        raise DetectorCheckpointError(
            f"checkpoint directory {str(directory)!r} has no {CHANNELS_FILE}; pass a directory written by "
            "save_pruned_detector (tools/train_net.py writes baseline/, pruned/ and finetuned/)"
        )
    try:
        channels = json.loads(path.read_text(encoding="utf-8"))
        text = channels["builder_kwargs"]["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DetectorCheckpointError(
            f"{path} holds no detectron2 config (builder_kwargs.config: {exc}); it was not written by save_pruned_detector"
        ) from None
    return config_from_text(text)


def load_pruned_detector(
    directory: str | os.PathLike,
    cfg=None,
    dataset: str | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild the detector saved in ``directory``, in eval mode.

    With ``cfg`` (the config of the run that uses the checkpoint), a backbone of
    another depth or a different number of classes is refused. With ``dataset`` (a
    registered detectron2 dataset name), categories that differ from the ones the
    checkpoint was trained on are refused. The model carries ``pnp_config`` (the
    saved config), ``pnp_metadata`` and ``pnp_channel_spec`` (names as in the detector).
    """
    saved = saved_config(directory)
    if cfg is not None:
        check_same_architecture(saved, cfg, directory)
    model = load_pruned(directory, map_location=map_location)
    metadata = model.pnp_metadata
    if dataset is not None:
        check_categories(metadata.get("thing_classes"), num_classes_of(saved), dataset, directory)
    sync_output_shapes(model)
    saved.MODEL.DEVICE = str(torch.device(map_location))
    model.pnp_config = saved
    return model


_ARCHITECTURE_FIELDS = (
    ("MODEL.META_ARCHITECTURE", lambda c: c.MODEL.META_ARCHITECTURE),
    ("MODEL.RESNETS.DEPTH", lambda c: int(c.MODEL.RESNETS.DEPTH)),
    ("MODEL.BACKBONE.NAME", lambda c: c.MODEL.BACKBONE.NAME),
    ("MODEL.FPN.OUT_CHANNELS", lambda c: int(c.MODEL.FPN.OUT_CHANNELS)),
    ("number of classes", num_classes_of),
)


def check_same_architecture(saved, cfg, directory) -> None:
    """Raise unless the checkpoint's config builds the detector ``cfg`` describes."""
    for field, read in _ARCHITECTURE_FIELDS:
        have, want = read(saved), read(cfg)
        if have != want:
            if field == "number of classes":
                field = classes_field(cfg)
            raise DetectorCheckpointError(
                f"checkpoint {str(directory)!r} was saved with {field}={have!r}, but the config asks for "
                f"{field}={want!r}; use a checkpoint of this architecture or set {field} {have!r}"
            )


def check_categories(thing_classes, num_classes: int, dataset: str, directory="the checkpoint") -> None:
    """Raise unless dataset ``dataset`` has the categories the checkpoint was trained on."""
    names = _dataset_classes(dataset)
    if names is None:
        raise DetectorCheckpointError(f"dataset {dataset!r} is not registered with detectron2, so its categories are unknown")
    if len(names) != num_classes:
        raise DetectorCheckpointError(
            f"dataset {dataset!r} has {len(names)} categories but checkpoint {str(directory)!r} predicts "
            f"{num_classes} classes; use a checkpoint trained on this dataset's categories"
        )
    if thing_classes is not None and list(thing_classes) != list(names):
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(thing_classes, names)) if a != b]
        raise DetectorCheckpointError(
            f"dataset {dataset!r} thing_classes differ from checkpoint {str(directory)!r}'s at "
            f"{[f'{i}: {b!r} (checkpoint {a!r})' for i, a, b in diff[:3]]}; the class indices would not mean the same"
        )


def _dataset_classes(name: str) -> list[str] | None:
    import_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        return None
    meta = MetadataCatalog.get(name)
    if not hasattr(meta, "thing_classes"):
        DatasetCatalog.get(name)  # COCO registration fills the metadata when the json is first read
    return list(getattr(meta, "thing_classes", []) or []) or None
