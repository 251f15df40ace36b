"""Classification data for baseline training, pruning and fine-tuning, read from local files only.

:func:`build_datamodule` gives a :class:`ClassificationDataModule` for
Fashion-MNIST (IDX files), CIFAR-10/100 (the python pickled batches) or an
image folder (``root/train/<class>/*``, ``root/val/<class>/*``). Nothing is
downloaded. Fashion-MNIST and CIFAR are held in memory as uint8 tensors and
preprocessed a batch at a time, which keeps small models fast on a CPU.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import math
import pickle
import struct
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torchvision import datasets, transforms

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder")
_ALIASES = {
    "fashion_mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "cifar10": "cifar10",
    "cifar_10": "cifar10",
    "cifar100": "cifar100",
    "cifar_100": "cifar100",
    "imagefolder": "imagefolder",
    "image_folder": "imagefolder",
}

# Where the Debian package ``dataset-fashion-mnist`` installs the four IDX files.
SYSTEM_FASHION_MNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale
STATS_SAMPLE = 512  # image-folder images read to estimate mean and std
PRESIZE_BYTES = 1 << 30  # in-memory datasets are resized once when the result fits in this


class DatasetNotFoundError(FileNotFoundError):
    """The data a config points at is not on disk."""


# --------------------------------------------------------------------------- preprocessing


class BatchPreprocess:
    """uint8 images ``[B, C, H, W]`` to normalised float: channel change, resize, augmentation.

    Augmentation is a random crop from a zero-padded image (padding = size / 8)
    and a horizontal flip, as in the usual CIFAR recipe. Grayscale images are
    repeated to 3 channels last, so the work before it is done on one channel.
    """

    def __init__(self, channels: int, size: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean {list(mean)} and std {list(std)} must have one value per channel ({channels})")
        self.channels = channels
        self.size = tuple(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def to_unit(self, images: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """Images in [0, 1] with ``channels`` channels and ``size``, not normalised; grayscale stays 1 channel."""
        x = images.float().div_(255.0)
        if x.shape[1] == 3 and self.channels == 1:
            x = convert_channels(x, 1)
        if tuple(x.shape[-2:]) != self.size:
            x = resize(x, self.size)
        if augment:
            x = random_crop_flip(x)
        return x

    def __call__(self, images: torch.Tensor, augment: bool = False) -> torch.Tensor:
        x = self.to_unit(images, augment)
        if x.shape[1] == 1 and self.channels == 3:
            # repeated grayscale has the same statistics in every channel
            return ((x - self.mean[:, :1]) / self.std[:, :1]).expand(-1, 3, -1, -1).contiguous()
        return (x - self.mean) / self.std


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear, antialiased resize of float images ``[B, C, H, W]`` in [0, 1]."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


def resize_uint8(images: torch.Tensor, size: Sequence[int], chunk: int = 2000) -> torch.Tensor:
    """Resize a uint8 image tensor once, chunk by chunk, keeping uint8."""
    out = torch.empty((len(images), images.shape[1], *size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        x = resize(images[start : start + chunk].float().div_(255.0), size)
        out[start : start + chunk] = x.mul_(255.0).round_().to(torch.uint8)
    return out


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat grayscale to 3 channels, or reduce RGB to luminance; ``x`` is ``[B, C, H, W]``."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def random_crop_flip(x: torch.Tensor) -> torch.Tensor:
    """A random crop of each image, zero-padded by an eighth of its height, then a coin-flip mirror."""
    b, c, h, w = x.shape
    pad = max(1, round(h / 8))
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = torch.randint(0, 2 * pad + 1, (b, 1)) + torch.arange(h)
    cols = torch.randint(0, 2 * pad + 1, (b, 1)) + torch.arange(w)
    flip = torch.rand(b) < 0.5
    cols[flip] = cols[flip].flip(-1)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


class TensorImageDataset(Dataset):
    """Images held as one uint8 tensor ``[N, C, H, W]``, preprocessed when read.

    ``dataset[i]`` gives ``(image, label)``; the DataLoader fetches whole batches
    through ``__getitems__``, so preprocessing runs once per batch, not per image.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, preprocess: BatchPreprocess, augment: bool = False):
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.preprocess = preprocess
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.preprocess(self.images[index : index + 1], self.augment)[0], self.labels[index]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.preprocess(self.images[idx], self.augment)
        return list(zip(x.unbind(0), self.labels[idx].unbind(0)))


class WithOutputs(Dataset):
    """A dataset's ``(image, label)`` items with one precomputed output per item appended: ``(image, label, output)``."""

    def __init__(self, dataset: Dataset, outputs: torch.Tensor):
        if len(outputs) != len(dataset):
            raise ValueError(f"{len(outputs)} outputs for a dataset of {len(dataset)} items; give one per item")
        self.dataset = dataset
        self.outputs = outputs

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index][:2]
        return image, label, self.outputs[index]

    def __getitems__(self, indices: list[int]):
        if hasattr(self.dataset, "__getitems__"):
            items = self.dataset.__getitems__(indices)
        else:
            items = [self.dataset[i] for i in indices]
        return [(item[0], item[1], self.outputs[i]) for item, i in zip(items, indices)]


class ResumableShuffle(RandomSampler):
    """``shuffle=True``'s order, drawn as RandomSampler draws it from a seeded generator, that a resumed run takes up.

    Its loader shares ``generator`` (as ``DataLoader(shuffle=True, generator=...)`` does, drawing each
    iterator's worker seed from it), so a run never stopped sees the batches it saw before. A checkpoint
    keeps :meth:`position`; after :meth:`resume` the next epoch's order is the one a run never stopped
    would have drawn: the next epoch's, or, stopped mid-epoch, that epoch's less the batches trained on.
    """

    def __init__(self, data_source, seed: int, seed_drawn_each_epoch: bool = True):
        super().__init__(data_source, generator=torch.Generator().manual_seed(int(seed)))
        # the loader draws a worker seed before each epoch's order, unless its workers persist (one draw in all)
        self._seed_drawn_each_epoch = seed_drawn_each_epoch
        self._epoch_start = self.generator.get_state()  # just before the current epoch's order was drawn
        self._in_epoch = False  # an epoch's order is drawn and the epoch has not ended
        self._batches_done = 0  # of the current epoch, trained on
        self._pending: tuple[torch.Tensor, int, bool] | None = None  # (generator state, samples to leave out, new epoch)

    def batch_done(self) -> None:
        self._batches_done += 1

    def epoch_ended(self) -> None:
        self._in_epoch, self._batches_done = False, 0

    def position(self) -> dict:
        return {"epoch_start": self._epoch_start.clone(), "now": self.generator.get_state(),
                "mid_epoch": self._in_epoch, "batches_done": self._batches_done}

    def resume(self, position: dict, batch_size: int) -> None:
        """Put back a :meth:`position`; it takes effect when the next epoch's order is drawn."""
        if position["mid_epoch"]:
            self._pending = (position["epoch_start"], position["batches_done"] * batch_size, False)
            self._batches_done = position["batches_done"]
        else:
            self._pending = (position["now"], 0, True)

    def __iter__(self):
        skip = 0
        if self._pending is not None:
            state, skip, new_epoch = self._pending
            self._pending = None
            self.generator.set_state(state)
            if new_epoch and self._seed_drawn_each_epoch:  # as the loader would have, before the order
                torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        else:
            self._batches_done = 0
        self._epoch_start = self.generator.get_state()
        self._in_epoch = True
        yield from itertools.islice(super().__iter__(), skip, None)


class TrainOrderInCheckpoints(pl.Callback):
    """Keeps the training order's place in every checkpoint, and puts it back when a stage resumes from one."""

    KEY = "pnp_train_order"

    def __init__(self):
        self._loaded: dict | None = None

    # these run before the checkpoint callbacks' own hooks, which Lightning calls last
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (sampler := _resumable_shuffle(trainer)) is not None:
            sampler.batch_done()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (sampler := _resumable_shuffle(trainer)) is not None:
            sampler.epoch_ended()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if (sampler := _resumable_shuffle(trainer)) is not None:
            checkpoint[self.KEY] = sampler.position()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # before the training loader is made (its workers may draw the first batches as soon as it is)
        self._loaded = checkpoint.get(self.KEY)
        if self._loaded is not None and hasattr(trainer.datamodule, "resume_train_order"):
            trainer.datamodule.resume_train_order(self._loaded)

    def on_train_start(self, trainer, pl_module) -> None:
        loaded, self._loaded = self._loaded, None
        if hasattr(trainer.datamodule, "resume_train_order"):  # taken by this fit's loader, or by none
            trainer.datamodule.resume_train_order(None)
        if loaded is not None and loaded["mid_epoch"] and _resumable_shuffle(trainer) is None and trainer.is_global_zero:
            # DDP's sampler, which orders each epoch by itself
            print("[pnp] resumed mid-epoch with a distributed sampler: the rest of that epoch takes its first "
                  "batches again", flush=True)


def _resumable_shuffle(trainer) -> ResumableShuffle | None:
    sampler = getattr(trainer.train_dataloader, "sampler", None)
    return sampler if isinstance(sampler, ResumableShuffle) else None


# --------------------------------------------------------------------------- the data module


class ClassificationDataModule(pl.LightningDataModule):
    """Train / val / test loaders of one classification dataset, plus a calibration loader.

    The validation split is ``val_size`` training images chosen with ``seed``; the
    test split is the dataset's official held-out split. ``preprocessing`` says
    how inputs must be prepared for a model trained on this data (channels, size
    ``[H, W]``, per-channel mean and std), in JSON-able form.
    """

    def __init__(
        self,
        name: str,
        train: Dataset,
        test: Dataset,
        num_classes: int,
        preprocessing: dict,
        train_augmented: Dataset | None = None,
        class_names: Sequence[str] | None = None,
        source: str | Path | None = None,
        files: Sequence[dict] = (),
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
    ):
        super().__init__()
        _check_int("data.batch_size", batch_size, minimum=1)
        _check_int("data.num_workers", num_workers, minimum=0)
        _check_int("data.val_size", val_size, minimum=0)
        if val_size >= len(train):
            raise ValueError(
                f"data.val_size={val_size} leaves no training images: the {name} training split has "
                f"{len(train)} images; use a val_size below {len(train)}"
            )
        self.name = name
        self.num_classes = int(num_classes)
        self.preprocessing = preprocessing
        self.input_shape = (preprocessing["channels"], *preprocessing["size"])
        self.class_names = list(class_names) if class_names is not None else None
        self.source = None if source is None else str(source)  # the folder the files were read from
        self.files = [dict(f) for f in files]  # what was read: see file_record and listing_record
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(int(seed))).tolist()
        self.val_indices = order[:val_size]
        self.train_indices = sorted(order[val_size:])
        self.train_dataset = Subset(train_augmented if train_augmented is not None else train, self.train_indices)
        self.augments = train_augmented is not None
        self._train_outputs: torch.Tensor | None = None
        self.val_dataset = Subset(train, self.val_indices)
        self.test_dataset = test
        self._train_plain = train
        self._train_order: dict | None = None  # where a resumed fit's training order takes up (resume_train_order)

    def _loader(self, dataset, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        batch_size = batch_size or self.batch_size
        # a lone last training sample would break BatchNorm on 1x1 feature maps
        drop_last = shuffle and len(dataset) % batch_size == 1
        sampler = None
        if shuffle:
            sampler = ResumableShuffle(dataset, self.seed, seed_drawn_each_epoch=self.num_workers == 0)
            if self._train_order is not None:
                sampler.resume(self._train_order, batch_size)
                self._train_order = None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=sampler.generator if sampler is not None else None,
        )

    def resume_train_order(self, position: dict | None) -> None:
        """The next training loader takes up its shuffled order at ``position`` (``ResumableShuffle.position``);
        None: from its seed."""
        self._train_order = position

    def train_dataloader(self) -> DataLoader:
        if self._train_outputs is not None:
            return self._loader(WithOutputs(self.train_dataset, self._train_outputs), shuffle=True)
        return self._loader(self.train_dataset, shuffle=True)

    @contextmanager
    def train_outputs(self, outputs: torch.Tensor) -> Iterator[None]:
        """Within the block, training batches carry a third item: ``outputs`` of their images.

        ``outputs[i]`` belongs to the i-th image of the training split in the order
        :meth:`calibration_dataloader` gives it (a frozen teacher's logits, computed
        once instead of at every step). Only data read without augmentation can
        have fixed outputs.
        """
        if self.augments:
            raise ValueError(f"{self.name} is read with augmentation (data.augment=true): its images change every epoch, "
                             "so outputs computed once do not belong to them")
        if len(outputs) != len(self.train_indices):
            raise ValueError(f"{len(outputs)} outputs for {len(self.train_indices)} training images; give one per image")
        self._train_outputs = outputs
        try:
            yield
        finally:
            self._train_outputs = None

    def val_dataloader(self):
        return self._loader(self.val_dataset) if self.val_size else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset)

    def calibration_dataloader(self, num_samples: int, batch_size: int | None = None) -> DataLoader:
        """The first ``num_samples`` images of the training split, in a fixed order, without augmentation."""
        _check_int("num_samples", num_samples, minimum=1)
        if num_samples > len(self.train_indices):
            raise ValueError(
                f"num_samples={num_samples} calibration images requested, but the {self.name} training split "
                f"has {len(self.train_indices)}; ask for at most that many"
            )
        subset = Subset(self._train_plain, self.train_indices[:num_samples])
        return self._loader(subset, batch_size=min(batch_size or self.batch_size, num_samples))

    def validation_subset_dataloader(self, num_samples: int) -> DataLoader:
        """The first ``num_samples`` images of the validation split (all of it when smaller), in a fixed order."""
        _check_int("num_samples", num_samples, minimum=1)
        return self._loader(Subset(self.val_dataset, range(min(num_samples, len(self.val_dataset)))))

    def __str__(self) -> str:
        return (
            f"ClassificationDataModule({self.name!r}, classes={self.num_classes}, input_shape={self.input_shape}, "
            f"train={len(self.train_dataset)}, val={len(self.val_dataset)}, test={len(self.test_dataset)})"
        )

    __repr__ = __str__


def build_datamodule(
    name: str,
    root: str | Path | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    val_size: int = 5000,
    seed: int = 0,
    channels: int | None = None,
    image_size: int | Sequence[int] | None = None,
    augment: bool = False,
) -> ClassificationDataModule:
    """Build the data module for ``name`` (one of :data:`DATASETS`) from files under ``root``.

    ``channels`` (1 or 3) converts images (grayscale is repeated, RGB reduced to
    luminance); ``image_size`` (an int or ``[H, W]``) resizes them. ``augment``
    adds random crops and flips to the training split only.
    """
    key = _dataset_key(name)
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"data.channels={channels!r} is not supported; use 1, 3 or null (the dataset's own)")
    size = _check_size(image_size)
    root_path = _check_root(root, key)
    common = dict(batch_size=batch_size, num_workers=num_workers, val_size=val_size, seed=seed)
    if key == "imagefolder":
        return _imagefolder_module(root_path, channels, size, augment, common)
    if key == "fashion_mnist":
        source = find_fashion_mnist(root_path)
        train_x, train_y, test_x, test_y = load_fashion_mnist(source)
        classes = FASHION_MNIST_CLASSES
        paths = [_find_idx(source, base) for base in FASHION_MNIST_FILES.values()]
    else:
        source = find_cifar(root_path, 100 if key == "cifar100" else 10)
        train_x, train_y, test_x, test_y, classes = load_cifar(source, 100 if key == "cifar100" else 10)
        _, train_files, test_files, meta_file, *_ = _cifar_layout(100 if key == "cifar100" else 10)
        paths = [source / f for f in (*train_files, *test_files, meta_file) if (source / f).is_file()]
    channels = channels or int(train_x.shape[1])
    size = size or tuple(train_x.shape[-2:])
    if size != tuple(train_x.shape[-2:]) and (len(train_x) + len(test_x)) * train_x.shape[1] * size[0] * size[1] <= PRESIZE_BYTES:
        # resizing once beats resizing every batch of every epoch, while it fits in memory
        train_x, test_x = resize_uint8(train_x, size), resize_uint8(test_x, size)
    mean, std = _tensor_stats(train_x, channels)
    pre = BatchPreprocess(channels, size, mean, std)
    preprocessing = _preprocessing(channels, size, mean, std)
    return ClassificationDataModule(
        key,
        train=TensorImageDataset(train_x, train_y, pre),
        train_augmented=TensorImageDataset(train_x, train_y, pre, augment=True) if augment else None,
        test=TensorImageDataset(test_x, test_y, pre),
        num_classes=len(classes),
        preprocessing=preprocessing,
        class_names=classes,
        source=source,
        files=[file_record(path) for path in paths],
        **common,
    )


# --------------------------------------------------------------------------- what was read


def file_record(path: Path) -> dict:
    """Where a data file is, its size and its SHA-256, for the run's record."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "sha256": _sha256(str(path), stat.st_mtime_ns, stat.st_size)}


@lru_cache(maxsize=32)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listing_record(folder: Path, samples: Sequence[tuple[str, int]]) -> dict:
    """An image folder's split as its record: how many files, their bytes, and a SHA-256 of names, sizes and labels.

    Image folders can hold millions of files, so their contents are not hashed; a file
    added, removed, relabelled or resized changes the digest.
    """
    folder = Path(folder).resolve()
    digest, total = hashlib.sha256(), 0
    for path, label in samples:
        size = Path(path).stat().st_size
        total += size
        digest.update(f"{Path(path).relative_to(folder)}\t{size}\t{label}\n".encode())
    return {"path": str(folder), "files": len(samples), "bytes": total, "listing_sha256": digest.hexdigest()}


# --------------------------------------------------------------------------- argument checks


def _dataset_key(name) -> str:
    key = _ALIASES.get(str(name).strip().lower().replace("-", "_"))
    if key is None:
        raise ValueError(f"data.name={name!r} is not a known dataset; use one of {list(DATASETS)}")
    return key


def _check_int(field: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{field}={value!r} must be an integer >= {minimum}")


def _check_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"data.image_size={image_size!r} must be a positive int or a pair [H, W]")
    return size


def _check_root(root, key: str) -> Path | None:
    if root is None or str(root) == "":
        if key == "fashion_mnist":
            return None
        where = {
            "cifar10": "the folder holding cifar-10-batches-py/",
            "cifar100": "the folder holding cifar-100-python/",
            "imagefolder": "the folder holding train/<class>/ and val/<class>/",
        }[key]
        raise ValueError(f"data.root is required for {key}: set it to {where}")
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DatasetNotFoundError(f"data.root={str(root)!r} {what}; set data.root to the folder holding the {key} data")
    return path


def _preprocessing(channels: int, size, mean, std) -> dict:
    return {
        "channels": int(channels),
        "size": [int(size[0]), int(size[1])],
        "mean": [round(float(m), 6) for m in mean],
        "std": [round(float(s), 6) for s in std],
    }


def _tensor_stats(images: torch.Tensor, channels: int, chunk: int = 5000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images after conversion to ``channels`` channels."""
    total = sq = None
    count = 0
    for start in range(0, len(images), chunk):
        x = convert_channels(images[start : start + chunk].double().div_(255.0), channels)
        s, q = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += x.numel() // x.shape[1]
    mean = total / count
    std = (sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


# --------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_places(root: Path | None) -> list[Path]:
    """Folders searched for the IDX files, in order: a given ``root`` only (no fallback), else the system's."""
    if root is not None:
        return [root / "FashionMNIST" / "raw", root]
    return list(SYSTEM_FASHION_MNIST_DIRS)


def _find_idx(folder: Path, base: str) -> Path | None:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist(root: Path | None = None) -> Path:
    """The first folder of :func:`fashion_mnist_places` that holds all four IDX files."""
    places = fashion_mnist_places(root)
    for folder in places:
        if all(_find_idx(folder, base) for base in FASHION_MNIST_FILES.values()):
            return folder
    names = ", ".join(f"{b}[.gz]" for b in FASHION_MNIST_FILES.values())
    looked = "\n".join(f"  - {p}" for p in places)
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found. Looked for {names} in:\n{looked}\n"
        "Install the Debian package (apt-get install dataset-fashion-mnist), or put the four IDX files "
        "from https://github.com/zalandoresearch/fashion-mnist in data.root or in data.root/FashionMNIST/raw/."
    )


def load_fashion_mnist(folder: Path):
    """``(train_images, train_labels, test_images, test_labels)`` from ``folder``: uint8 ``[N, 1, 28, 28]``, long ``[N]``."""
    out = []
    for part in ("train", "test"):
        images = read_idx(_find_idx(folder, FASHION_MNIST_FILES[f"{part}_images"]))
        labels = read_idx(_find_idx(folder, FASHION_MNIST_FILES[f"{part}_labels"]))
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST files in {folder} do not fit together: images {tuple(images.shape)}, "
                f"labels {tuple(labels.shape)}"
            )
        labels = labels.long()
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(FASHION_MNIST_CLASSES)):
            raise ValueError(
                f"Fashion-MNIST {part} labels in {folder} range over {int(labels.min())}..{int(labels.max())}, "
                f"not 0..{len(FASHION_MNIST_CLASSES) - 1}: the labels file is not Fashion-MNIST's"
            )
        out += [images.unsqueeze(1), labels]
    return tuple(out)


_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32, 0x0E: torch.float64}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (gzipped or not) into a tensor."""
    path = Path(path)
    stat = path.stat()
    return _read_idx_cached(str(path), stat.st_mtime_ns, stat.st_size).clone()


@lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> torch.Tensor:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(body) != expected:
        raise ValueError(f"IDX file {path} holds {len(body)} bytes of data, but its header {shape} needs {expected}")
    tensor = torch.frombuffer(bytearray(body), dtype=dtype)
    if dtype != torch.uint8 and dtype != torch.int8:
        tensor = tensor.view(torch.uint8).view(-1, tensor.element_size()).flip(-1).contiguous().view(dtype)
    return tensor.reshape(shape)


# --------------------------------------------------------------------------- CIFAR


def _cifar_layout(classes: int):
    if classes == 10:
        return "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", b"labels", b"label_names"
    return "cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"


def find_cifar(root: Path, classes: int = 10) -> Path:
    """The folder holding the CIFAR batches: ``root/cifar-10-batches-py`` (or ``cifar-100-python``), or ``root``."""
    folder_name, train_files, test_files, *_ = _cifar_layout(classes)
    candidates = [root / folder_name, root]
    for folder in candidates:
        if all((folder / f).is_file() for f in train_files + test_files):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise DatasetNotFoundError(
        f"CIFAR-{classes} not found: looked for {', '.join(train_files + test_files)} in {looked}. "
        f"Set data.root to the folder holding {folder_name}/ (the 'python version' archive from "
        "https://www.cs.toronto.edu/~kriz/cifar.html, extracted)."
    )


def load_cifar(folder: Path, classes: int = 10):
    """``(train_images, train_labels, test_images, test_labels, class_names)`` from the python batches in ``folder``."""
    _, train_files, test_files, meta_file, label_key, names_key = _cifar_layout(classes)
    parts = []
    for files in (train_files, test_files):
        xs, ys = [], []
        for f in files:
            entry = _load_pickle(folder / f)
            try:
                data, labels = entry[b"data"], entry[label_key]
            except (KeyError, TypeError):
                raise ValueError(f"{folder / f} is not a CIFAR-{classes} batch (no b'data' / {label_key!r} entries)") from None
            xs.append(torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32))
            ys.append(torch.as_tensor(labels, dtype=torch.long))
        x, y = torch.cat(xs), torch.cat(ys)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise ValueError(f"CIFAR-{classes} labels in {folder} range over {int(y.min())}..{int(y.max())}, not 0..{classes - 1}")
        parts += [x, y]
    names = [str(i) for i in range(classes)]
    if (folder / meta_file).is_file():
        meta = _load_pickle(folder / meta_file)
        if isinstance(meta, dict) and names_key in meta:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    return (*parts, names)


# what CIFAR's pickled batches hold: numpy arrays, and the bytes of protocol-2 pickles
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles arrays, lists, dicts and strings only: a crafted batch file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def _load_pickle(path: Path):
    """A CIFAR batch (a Python pickle), read by an unpickler that builds only arrays and containers."""
    with open(path, "rb") as f:
        try:
            return _CifarUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ValueError(f"{path} is not a CIFAR batch pnp will read ({exc}); data.root must hold the "
                             "python-version CIFAR batches as distributed") from None


# --------------------------------------------------------------------------- image folders


def _imagefolder_module(root: Path, channels, size, augment: bool, common: dict) -> ClassificationDataModule:
    from PIL import Image

    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DatasetNotFoundError(
            f"data.root={str(root)!r} is not an image folder: it needs train/<class>/ and val/<class>/ "
            "(or test/<class>/) subfolders of images"
        )
    try:
        classes, class_to_idx = datasets.folder.find_classes(str(train_dir))
        train_probe = FixedClassImageFolder(train_dir, class_to_idx, transform=None)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"data.root={str(root)!r}: no training images found ({exc})") from None
    extra = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name not in class_to_idx)
    if extra:
        raise ValueError(f"{test_dir} has classes {extra} that {train_dir} lacks; every class needs training images")
    with Image.open(train_probe.samples[0][0]) as first:
        native_channels = 1 if first.mode in ("1", "L", "I", "I;16", "F") else 3
        native_size = (first.height, first.width)
    channels = channels or native_channels
    size = size or native_size
    # images whose size differs from the first are resized to it, so batches stack
    base = [ConvertMode("L" if channels == 1 else "RGB"), transforms.Resize(size)]
    stats_set = FixedClassImageFolder(train_dir, class_to_idx, transforms.Compose(base + [transforms.ToTensor()]))
    step = max(1, len(stats_set) // STATS_SAMPLE)
    sample = torch.stack([stats_set[i][0] for i in range(0, len(stats_set), step)][:STATS_SAMPLE])
    mean = sample.mean(dim=(0, 2, 3)).tolist()
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    eval_tf = transforms.Compose(base + normalize)
    pad = max(1, round(size[0] / 8))
    aug_tf = transforms.Compose(base + [transforms.RandomCrop(size, padding=pad), transforms.RandomHorizontalFlip()] + normalize)
    test = FixedClassImageFolder(test_dir, class_to_idx, eval_tf, allow_empty=True)
    return ClassificationDataModule(
        "imagefolder",
        train=FixedClassImageFolder(train_dir, class_to_idx, eval_tf),
        train_augmented=FixedClassImageFolder(train_dir, class_to_idx, aug_tf) if augment else None,
        test=test,
        num_classes=len(classes),
        preprocessing=_preprocessing(channels, size, mean, std),
        class_names=classes,
        source=root,
        files=[listing_record(train_dir, train_probe.samples), listing_record(test_dir, test.samples)],
        **common,
    )


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


class ConvertMode:
    """Convert a PIL image to ``mode`` ("L" or "RGB"); a class, so DataLoader workers can pickle it."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode)


class FixedClassImageFolder(datasets.ImageFolder):
    """An ImageFolder whose class indices are the training split's, whatever folders this split has."""

    def __init__(self, folder, class_to_idx: dict[str, int], transform: Callable | None, allow_empty: bool = False):
        self.fixed_class_to_idx = dict(class_to_idx)
        super().__init__(str(folder), transform=transform, is_valid_file=_is_image, allow_empty=allow_empty)

    def find_classes(self, directory):
        return sorted(self.fixed_class_to_idx, key=self.fixed_class_to_idx.get), dict(self.fixed_class_to_idx)
