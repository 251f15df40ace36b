"""Detection data: a COCO-format set composed from real Fashion-MNIST items, and COCO registration.

:func:`compose_fashion_mnist_detection` places several Fashion-MNIST items per
image on a black canvas, at varied sizes and positions, some overlapping, and
writes the images (PNG) and ``annotations/instances_{split}.json`` (COCO format)
under ``out_dir``. The train split takes Fashion-MNIST's training items, the val
split its test items, so no item is in both. The output depends only on the
arguments: the same seed gives the same files.

:func:`register_coco` registers any COCO-format dataset (an image folder and an
``instances_*.json``) with detectron2's ``DatasetCatalog`` and ``MetadataCatalog``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from pnp.training.data import FASHION_MNIST_CLASSES, find_fashion_mnist, load_fashion_mnist, resize
from pnp.core.io import write_text_atomic

SPLIT_ITEMS = {"train": "train", "val": "test"}  # split written -> Fashion-MNIST split its items come from
GENERATOR = "pnp.detection.data.compose_fashion_mnist_detection"
PLACEMENT_TRIES = 50


class CocoSplit(NamedTuple):
    """Where a COCO-format split lives: its image folder and its annotation file."""

    image_root: Path
    json_file: Path


def coco_split_paths(out_dir: str | Path, split: str) -> CocoSplit:
    """COCO's own layout: ``out_dir/{split}/`` and ``out_dir/annotations/instances_{split}.json``."""
    out = Path(out_dir)
    return CocoSplit(out / split, out / "annotations" / f"instances_{split}.json")


def compose_fashion_mnist_detection(
    out_dir: str | Path,
    split: str = "train",
    num_images: int = 1000,
    seed: int = 0,
    image_size: int | Sequence[int] = 128,
    min_objects: int = 2,
    max_objects: int = 5,
    scale_range: Sequence[float] = (0.15, 0.45),
    overlap_fraction: float = 0.3,
    max_iou: float = 0.5,
    root: str | Path | None = None,
    overwrite: bool = False,
) -> CocoSplit:
    """Write a detection split composed from Fashion-MNIST items; return its paths.

    Each image holds ``min_objects`` to ``max_objects`` items. An item's side is a
    fraction (``scale_range``) of the image's shorter side; it may be mirrored. About
    ``overlap_fraction`` of the items after the first are placed to overlap an
    earlier one (box IoU above 0 and at most ``max_iou``); the others overlap none
    when there is room. Items are drawn with a pixel-wise maximum, so an overlapped
    item stays visible. A box is the extent of the item's non-zero pixels after
    scaling, ``area`` its number of non-zero pixels (COCO's area is that of the
    object's mask), and categories are the 10 Fashion-MNIST classes (ids 1-10).

    ``root`` is where Fashion-MNIST's IDX files are (as ``data.root``; the Debian
    package's folder is searched too). A split already written with the same
    arguments is kept as it is; one written with other arguments is replaced only
    with ``overwrite=True``. Files are written to a temporary place first and moved
    into place, so an interrupted run leaves no partial split.
    """
    if split not in SPLIT_ITEMS:
        raise ValueError(f"split={split!r} is not a split this generator writes; use one of {list(SPLIT_ITEMS)}")
    height, width = _check_image_size(image_size)
    _check_positive_int("num_images", num_images)
    _check_positive_int("min_objects", min_objects)
    _check_positive_int("max_objects", max_objects)
    if max_objects < min_objects:
        raise ValueError(f"max_objects={max_objects} is below min_objects={min_objects}; use max_objects >= min_objects")
    low, high = _check_scale_range(scale_range)
    if not 0.0 <= overlap_fraction <= 1.0:
        raise ValueError(f"overlap_fraction={overlap_fraction} is outside [0, 1]")
    if not 0.0 < max_iou <= 1.0:
        raise ValueError(f"max_iou={max_iou} is outside (0, 1]")

    paths = coco_split_paths(out_dir, split)
    settings = {
        "split": split, "num_images": num_images, "seed": seed, "image_size": [height, width],
        "min_objects": min_objects, "max_objects": max_objects, "scale_range": [low, high],
        "overlap_fraction": overlap_fraction, "max_iou": max_iou,
    }
    existing = _written_settings(paths)
    if existing == settings:
        return paths
    if existing is not None or paths.image_root.exists() or paths.json_file.exists():
        if not overwrite:
            raise FileExistsError(
                f"{paths.json_file} or {paths.image_root} already exists and was not written with these arguments "
                f"({settings}); pass overwrite=True to replace it, or choose another out_dir"
            )

    train_x, train_y, test_x, test_y = load_fashion_mnist(find_fashion_mnist(None if root is None else Path(root)))
    items, labels = (train_x, train_y) if SPLIT_ITEMS[split] == "train" else (test_x, test_y)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    paths.image_root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=paths.image_root.parent))
    try:
        for index in range(num_images):
            canvas, objects = _compose_image(rng, items, labels, height, width, min_objects, max_objects,
                                             (low, high), overlap_fraction, max_iou)
            file_name = f"{index:06d}.png"
            Image.fromarray(canvas, mode="L").save(staging / file_name)
            image_id = index + 1
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            for label, box, area in objects:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                    "bbox": box, "area": area, "iscrowd": 0,
                })
        coco = {
            "info": {"description": f"Fashion-MNIST items composed into detection images ({split})",
                     "generator": GENERATOR, "settings": settings},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(FASHION_MNIST_CLASSES)],
        }
        _replace_dir(staging, paths.image_root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_text_atomic(paths.json_file, json.dumps(coco))
    return paths


def _compose_image(rng, items, labels, height, width, min_objects, max_objects, scale_range, overlap_fraction, max_iou):
    canvas = np.zeros((height, width), dtype=np.uint8)
    objects: list[tuple[int, list[float], int]] = []
    boxes: list[tuple[int, int, int, int]] = []  # x0, y0, x1, y1 (exclusive) of placed items
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        pick = int(rng.integers(len(items)))
        side = max(4, int(round(rng.uniform(*scale_range) * min(height, width))))
        item = resize(items[pick : pick + 1].float().div(255.0), (side, side))[0, 0]
        item = item.mul(255.0).round().to(torch.uint8).numpy()
        if rng.random() < 0.5:
            item = item[:, ::-1]
        rows, cols = np.nonzero(item)
        if len(rows) == 0:
            continue  # a blank item has nothing to detect
        extent = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
        want_overlap = bool(boxes) and rng.random() < overlap_fraction
        top, left = _place(rng, side, height, width, extent, boxes, want_overlap, max_iou)
        region = canvas[top : top + side, left : left + side]
        np.maximum(region, item, out=region)
        box = (left + extent[0], top + extent[1], left + extent[2], top + extent[3])
        boxes.append(box)
        xywh = [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]
        objects.append((int(labels[pick]), xywh, int(len(rows))))
    return canvas, objects


def _place(rng, side, height, width, extent, boxes, want_overlap, max_iou):
    """Top-left corner for an item: overlapping an earlier box when asked, else clear of all; best try otherwise."""
    best, best_score = None, None
    for _ in range(PLACEMENT_TRIES):
        if want_overlap:
            x0, y0, x1, y1 = boxes[int(rng.integers(len(boxes)))]
            cx = rng.uniform(x0 - side / 2, x1 - side / 2)
            cy = rng.uniform(y0 - side / 2, y1 - side / 2)
            left, top = int(np.clip(round(cx), 0, width - side)), int(np.clip(round(cy), 0, height - side))
        else:
            left, top = int(rng.integers(width - side + 1)), int(rng.integers(height - side + 1))
        box = (left + extent[0], top + extent[1], left + extent[2], top + extent[3])
        worst = max((box_iou(box, b) for b in boxes), default=0.0)
        if (0.0 < worst <= max_iou) if want_overlap else worst == 0.0:
            return top, left
        score = worst if worst <= max_iou else 2.0 + worst  # fall back to an overlap within max_iou
        if best_score is None or score < best_score:
            best, best_score = (top, left), score
    return best


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes given as (x0, y0, x1, y1)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _written_settings(paths: CocoSplit) -> dict | None:
    """The generator settings recorded in an existing split's json, or None."""
    if not paths.json_file.is_file() or not paths.image_root.is_dir():
        return None
    try:
        with open(paths.json_file) as f:
            info = json.load(f).get("info", {})
    except (OSError, ValueError, AttributeError):
        return None
    return info.get("settings") if info.get("generator") == GENERATOR else None


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def _check_positive_int(field: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field}={value!r} must be a positive integer")


def _check_image_size(image_size) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 32 for s in size):
        raise ValueError(f"image_size={image_size!r} must be an int or a pair [H, W] of at least 32 pixels")
    return size


def _check_scale_range(scale_range) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        raise ValueError(f"scale_range={scale_range!r} must be a pair (low, high) of fractions of the image side") from None
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"scale_range={scale_range!r} must satisfy 0 < low <= high <= 1 (fractions of the image side)")
    return low, high


# --------------------------------------------------------------------------- registration


COCO_LISTS = ("images", "annotations", "categories")  # what a COCO instances json must hold
COCO_CHECK_BYTES = 64 << 20


def check_coco_json(path: Path, name: str) -> None:
    """Raise ValueError naming ``path`` unless it is JSON holding COCO's image, annotation and category lists.

    Files over :data:`COCO_CHECK_BYTES` (full COCO) are left to detectron2's reader,
    which reads them once anyway.
    """
    if path.stat().st_size > COCO_CHECK_BYTES:
        return
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"json_file={str(path)!r} for dataset {name!r} is not valid JSON ({exc}); "
                         "point it at the COCO instances_*.json of the split") from None
    missing = [key for key in COCO_LISTS if not isinstance(content, dict) or not isinstance(content.get(key), list)]
    if missing:
        raise ValueError(f"json_file={str(path)!r} for dataset {name!r} has no {missing[0]!r} list: a COCO instances "
                         f"json holds {', '.join(COCO_LISTS)}")


def register_coco(name: str, image_root: str | Path, json_file: str | Path) -> str:
    """Register a COCO-format dataset with detectron2's catalogs under ``name``; return the name.

    Registering the same name with the same files again does nothing; registering
    it with other files is refused.
    """
    from pnp.detection.compat import import_detectron2

    import_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    json_path, image_path = Path(json_file), Path(image_root)
    if not json_path.is_file():
        what = "is a folder, not a file" if json_path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"json_file={str(json_file)!r} for dataset {name!r} {what}; point it at the COCO instances_*.json of the split"
        )
    check_coco_json(json_path, name)
    if not image_path.is_dir():
        what = "is a file, not a folder" if image_path.exists() else "does not exist"
        raise FileNotFoundError(
            f"image_root={str(image_root)!r} for dataset {name!r} {what}; point it at the folder holding the "
            "images named by the json's file_name fields"
        )
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        same = getattr(meta, "json_file", None) == str(json_path) and getattr(meta, "image_root", None) == str(image_path)
        if same:
            return name
        raise ValueError(
            f"dataset name {name!r} is already registered with json_file={getattr(meta, 'json_file', None)!r} and "
            f"image_root={getattr(meta, 'image_root', None)!r}; choose another name"
        )
    register_coco_instances(name, {}, str(json_path), str(image_path))
    return name
