"""Data modules read the real on-disk formats (written here in miniature) and split them reproducibly."""

import gzip
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pnp.training import data as data_mod
from pnp.training.data import DatasetNotFoundError, build_datamodule, read_idx


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_fashion_mnist(folder, gz: bool, n_train=40, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz)
    return arrays


@pytest.fixture(autouse=True)
def no_system_fashion_mnist(tmp_path, monkeypatch):
    """Tests see only their own files, not a system-wide copy."""
    monkeypatch.setattr(data_mod, "SYSTEM_FASHION_MNIST_DIRS", (tmp_path / "system-fashion-mnist",))


def unnormalize(x, pre):
    mean = torch.tensor(pre["mean"]).view(-1, 1, 1)
    std = torch.tensor(pre["std"]).view(-1, 1, 1)
    return (x * std + mean) * 255.0


@pytest.mark.parametrize("gz,layout", [(True, "flat"), (False, "torchvision")])
def test_fashion_mnist_reads_idx_files(tmp_path, gz, layout):
    root = tmp_path / "fm"
    folder = root / "FashionMNIST" / "raw" if layout == "torchvision" else root
    arrays = make_fashion_mnist(folder, gz)
    dm = build_datamodule("fashion-mnist", root=root, batch_size=8, val_size=10)
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28)
    assert dm.source == str(folder)
    assert len(dm.train_dataset) == 30 and len(dm.val_dataset) == 10 and len(dm.test_dataset) == 20

    pre = dm.preprocessing
    assert json.loads(json.dumps(pre)) == pre
    assert pre["channels"] == 1 and pre["size"] == [28, 28]
    assert pre["mean"][0] == pytest.approx(arrays["train-images-idx3-ubyte"].mean() / 255, abs=1e-5)
    assert pre["std"][0] == pytest.approx(arrays["train-images-idx3-ubyte"].std() / 255, abs=1e-5)

    x, y = next(iter(dm.test_dataloader()))  # test split in file order
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert y.tolist() == arrays["t10k-labels-idx1-ubyte"][:8].tolist()
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"][:8]).float().unsqueeze(1)
    assert torch.allclose(unnormalize(x, pre), expected, atol=1e-3)

    labels = torch.cat([b[1] for b in dm.train_dataloader()])
    assert len(labels) == 30 and labels.min() >= 0 and labels.max() <= 9


def test_fashion_mnist_three_channels_and_resize(tmp_path):
    make_fashion_mnist(tmp_path / "fm", gz=True)
    dm = build_datamodule("fashion_mnist", root=tmp_path / "fm", val_size=5, channels=3, image_size=32, augment=True)
    assert dm.input_shape == (3, 32, 32)
    assert dm.preprocessing["size"] == [32, 32] and len(dm.preprocessing["mean"]) == 3
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grayscale repeated


def test_validation_split_is_fixed_by_seed(tmp_path):
    make_fashion_mnist(tmp_path / "fm", gz=True)
    build = lambda seed: build_datamodule("fashion_mnist", root=tmp_path / "fm", val_size=10, seed=seed)  # noqa: E731
    a, b, c = build(0), build(0), build(1)
    assert a.val_indices == b.val_indices
    assert a.val_indices != c.val_indices
    assert set(a.val_indices).isdisjoint(a.train_indices)
    assert sorted(a.val_indices + a.train_indices) == list(range(40))
    va = torch.cat([x for x, _ in a.val_dataloader()])
    vb = torch.cat([x for x, _ in b.val_dataloader()])
    assert torch.equal(va, vb)


def test_calibration_loader_is_fixed_train_data_without_augmentation(tmp_path):
    make_fashion_mnist(tmp_path / "fm", gz=True)
    dm = build_datamodule("fashion_mnist", root=tmp_path / "fm", val_size=10, batch_size=4, augment=True)
    first = torch.cat([x for x, _ in dm.calibration_dataloader(12)])
    again = torch.cat([x for x, _ in dm.calibration_dataloader(12)])
    assert first.shape == (12, 1, 28, 28) and torch.equal(first, again)
    plain = torch.stack([dm._train_plain[i][0] for i in dm.train_indices[:12]])
    assert torch.equal(first, plain)  # training images, not validation ones, un-augmented
    with pytest.raises(ValueError, match="num_samples=31"):
        dm.calibration_dataloader(31)


def test_training_batches_carry_each_images_own_precomputed_output(tmp_path):
    """Outputs computed once in the calibration order reach training batches beside their own images, shuffled."""
    make_fashion_mnist(tmp_path / "fm", gz=True)
    dm = build_datamodule("fashion_mnist", root=tmp_path / "fm", val_size=10, batch_size=8)
    n = len(dm.train_indices)
    outputs = torch.cat([x.sum(dim=(1, 2, 3)) for x, _ in dm.calibration_dataloader(n)])[:, None]
    with dm.train_outputs(outputs):
        batches = list(dm.train_dataloader())
    assert sum(len(b[0]) for b in batches) == n
    for x, _, out in batches:
        torch.testing.assert_close(out[:, 0], x.sum(dim=(1, 2, 3)))
    assert len(next(iter(dm.train_dataloader()))) == 2  # only within the block
    with pytest.raises(ValueError, match="one per image"):
        with dm.train_outputs(outputs[:-1]):
            pass
    augmented = build_datamodule("fashion_mnist", root=tmp_path / "fm", val_size=10, batch_size=8, augment=True)
    with pytest.raises(ValueError, match="data.augment=true"):
        with augmented.train_outputs(outputs):
            pass


def test_missing_fashion_mnist_lists_every_place_looked(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        build_datamodule("fashion_mnist", root=empty)
    message = str(info.value)
    for place in (empty / "FashionMNIST" / "raw", empty):
        assert str(place) in message
    assert str(tmp_path / "system-fashion-mnist") not in message  # a given data.root is the only place looked
    assert "apt-get install dataset-fashion-mnist" in message


def test_bad_root_and_name_are_named_in_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=r"data\.root=.*nowhere.*does not exist"):
        build_datamodule("cifar10", root=missing)
    with pytest.raises(ValueError, match=r"data\.name='mnist3d'.*fashion_mnist"):
        build_datamodule("mnist3d", root=tmp_path)
    with pytest.raises(ValueError, match=r"data\.root is required for cifar10"):
        build_datamodule("cifar10")
    make_fashion_mnist(tmp_path / "fm", gz=True)
    with pytest.raises(ValueError, match=r"data\.val_size=40"):
        build_datamodule("fashion_mnist", root=tmp_path / "fm", val_size=40)
    with pytest.raises(ValueError, match=r"data\.channels=2"):
        build_datamodule("fashion_mnist", root=tmp_path / "fm", channels=2)


def test_truncated_idx_file_is_reported(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    write_idx(path, np.zeros((3, 4, 4), dtype=np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="needs 48"):
        read_idx(path)


def write_cifar(root, classes=10, per_batch=4, n_test=6, seed=0):
    rng = np.random.default_rng(seed)
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        train_files, test_files, label_key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"
        meta_file, meta = "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]}
    else:
        folder = root / "cifar-100-python"
        train_files, test_files, label_key = ["train"], ["test"], b"fine_labels"
        meta_file, meta = "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}
    folder.mkdir(parents=True)
    written = {}
    for files, n in ((train_files, per_batch), (test_files, n_test)):
        for f in files:
            entry = {
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                label_key: [int(v) for v in rng.integers(0, classes, n)],
                b"filenames": [b"img.png"] * n,
            }
            with open(folder / f, "wb") as fh:
                pickle.dump(entry, fh, protocol=2)
            written[f] = entry
    with open(folder / meta_file, "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return written


def test_cifar10_python_batches(tmp_path):
    written = write_cifar(tmp_path)
    dm = build_datamodule("cifar10", root=tmp_path, val_size=5, batch_size=6)
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    assert dm.class_names[3] == "class3"
    assert len(dm.train_dataset) == 15 and len(dm.test_dataset) == 6
    x, y = next(iter(dm.test_dataloader()))
    assert y.tolist() == written["test_batch"][b"labels"]
    expected = torch.from_numpy(written["test_batch"][b"data"]).float().view(-1, 3, 32, 32)  # R, G, B planes
    assert torch.allclose(unnormalize(x, dm.preprocessing), expected, atol=1e-3)
    gray = build_datamodule("cifar10", root=tmp_path / "cifar-10-batches-py", val_size=5, channels=1)
    assert gray.input_shape == (1, 32, 32) and next(iter(gray.train_dataloader()))[0].shape[1] == 1


def test_cifar100_uses_fine_labels(tmp_path):
    written = write_cifar(tmp_path, classes=100, per_batch=12)
    dm = build_datamodule("cifar100", root=tmp_path, val_size=2)
    assert dm.num_classes == 100
    assert next(iter(dm.test_dataloader()))[1].tolist() == written["test"][b"fine_labels"]


def test_cifar_root_without_batches_says_what_is_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        build_datamodule("cifar10", root=tmp_path)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, classes, n in (("train", ("cat", "dog"), 3), ("val", ("dog",), 2)):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    dm = build_datamodule("imagefolder", root=tmp_path, val_size=2, batch_size=4, image_size=8, augment=True)
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"]
    assert dm.input_shape == (3, 8, 8) and dm.preprocessing["size"] == [8, 8]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8)
    # the val folder has only "dog": its labels must still be the training split's index for dog
    assert torch.cat([b[1] for b in dm.test_dataloader()]).tolist() == [1, 1]
    native = build_datamodule("image_folder", root=tmp_path, val_size=1, channels=1)
    assert native.input_shape == (1, 10, 12)


def test_image_folder_needs_its_layout(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"val/<class>"):
        build_datamodule("imagefolder", root=tmp_path)


def test_no_validation_split(tmp_path):
    make_fashion_mnist(tmp_path / "fm", gz=True)
    dm = build_datamodule("fashion_mnist", root=tmp_path / "fm", val_size=0)
    assert len(dm.train_dataset) == 40 and dm.val_dataloader() == []


def test_a_crafted_cifar_batch_cannot_run_code(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": Payload(), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_1 is not a CIFAR batch pnp will read \(it refers to (posix|os)\.system"):
        build_datamodule("cifar10", root=tmp_path, val_size=5)
    assert not marker.exists()


def test_a_given_root_without_the_files_never_falls_back_to_the_system_copy(tmp_path, monkeypatch):
    system = tmp_path / "system"
    make_fashion_mnist(system, gz=True)
    monkeypatch.setattr(data_mod, "SYSTEM_FASHION_MNIST_DIRS", (system,))
    assert build_datamodule("fashion-mnist", val_size=10).name  # no root: the system copy
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="empty"):
        build_datamodule("fashion-mnist", root=tmp_path / "empty", val_size=10)
