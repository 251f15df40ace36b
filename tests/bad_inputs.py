"""Bad input, faults and damaged run folders, as a user meets them on the command line.

Each :class:`Case` prepares what it needs in a :class:`Workspace` and returns the
command-line arguments; running it must end with the expected exit status and an
error (or notice) that says what was wrong, never a traceback for a user error. Used
by ``tests/test_bad_input.py`` (in-process, the quick suite) and by
``benchmarks/bad_input_matrix.py`` (each case as a real subprocess, writing the
matrix in ``docs/bad-input.md``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from test_pipeline import write_idx

LENET = {"in_channels": 1, "num_classes": 10, "input_size": 28}
# one short epoch on the tiny set, for the cases that reach training: what every command takes,
# then each command's own sections
QUICK = ["data.val_size=100", "data.batch_size=50", "report.latency_batch_sizes=[1]", "report.latency_repeats=1"]
_TRAINER = ["trainer.limit_train_batches=2", "trainer.enable_progress_bar=false"]
QUICK_SECTIONS = {
    "pnp-train": [*_TRAINER, "train.epochs=1"],
    "pnp-train-pruner": [*_TRAINER, "pruner.epochs=1", "pruner.min_steps=0", "pruner.calibration_samples=100"],
    "pnp-prune": ["inherit.steps=2"],
    "pnp-finetune": [*_TRAINER, "finetune.epochs=1"],
    "pnp-pipeline": [*_TRAINER, "train.epochs=1", "pruner.epochs=1", "pruner.min_steps=0", "pruner.calibration_samples=100", "inherit.steps=2",
                     "finetune.epochs=1"],
}


def arguments(case: "Case", ws: "Workspace", folder: Path) -> list[str]:
    """The case's command-line arguments: the quick settings of its command, then its own (which win)."""
    own = case.setup(ws, folder)
    if case.command not in QUICK_SECTIONS:
        return own
    return [*QUICK, *QUICK_SECTIONS[case.command], *own]


def write_fashion(root: Path, n_train: int = 300, n_test: int = 50, label_max: int = 9) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{part}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        write_idx(root / f"{part}-labels-idx1-ubyte", rng.integers(0, label_max + 1, n))
    return root


@dataclass
class Workspace:
    """A folder with tiny Fashion-MNIST files and a saved (untrained) LeNet-5; each case works in its own subfolder."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "fashion"

    @property
    def target(self) -> Path:
        return self.root / "target"

    @property
    def finished(self) -> Path:
        """A finished pnp-train run on the tiny set, made by :func:`prepare` (copy it before changing it)."""
        return self.root / "finished"

    def case_dir(self, name: str) -> Path:
        path = self.root / "cases" / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


def prepare(root: Path, train: Callable[[list[str]], int]) -> Workspace:
    """The shared inputs; ``train(args)`` runs ``pnp-train`` with ``args`` (in-process or as a subprocess)."""
    from pnp.core.artifacts import save_pruned
    from pnp.core.builders import build_model

    ws = Workspace(Path(root))
    write_fashion(ws.data)
    save_pruned(build_model("pnp:lenet5", **LENET), ws.target / "model", builder="pnp:lenet5", builder_kwargs=LENET)
    status = train([*QUICK, *QUICK_SECTIONS["pnp-train"], f"data.root={ws.data}", f"out_dir={ws.finished}"])
    if status != 0:
        raise RuntimeError(f"the finished run for the bad-input cases could not be made (exit {status})")
    return ws


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # the situation, as the matrix shows it
    command: str  # pnp-train, pnp-prune, ..., pnp-train-net
    setup: Callable[[Workspace, Path], list[str]]  # (workspace, case folder) -> arguments
    status: int  # expected exit status
    says: str  # a piece of the expected message (stderr for errors, stdout for notices)
    slow: bool = False  # trains a detector: in the matrix, not in the quick suite
    untouched: bool = False  # the case folder's files before the run must be there unchanged after


def _base(ws: Workspace, d: Path, *more: str) -> list[str]:
    return [f"data.root={ws.data}", f"out_dir={d / 'out'}", *more]


def _copy_finished(ws: Workspace, d: Path) -> Path:
    out = d / "out"
    shutil.copytree(ws.finished, out)
    return out


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- the cases, one function each when it sets files up


def _truncated_idx(ws, d):
    data = write_fashion(d / "data")
    f = data / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    return _base(ws, d) + [f"data.root={data}"]


def _labels_out_of_range(ws, d):
    return _base(ws, d) + [f"data.root={write_fashion(d / 'data', label_max=12)}"]


def _crafted_cifar(ws, d):
    folder = d / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'ran'}",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": Payload(), b"labels": [0]}, fh, protocol=2)
    return _base(ws, d) + ["data=cifar10", f"data.root={d / 'cifar'}"]


def _target_builder_not_allowed(ws, d):
    model = d / "model"
    shutil.copytree(ws.target / "model", model)
    spec = json.loads((model / "channels.json").read_text())
    spec["builder"] = "os:system"
    spec["builder_kwargs"] = {"command": f"touch {d / 'ran'}"}
    _text(model / "channels.json", json.dumps(spec))
    return _base(ws, d, f"target={model}")


def _pickled_target(ws, d):
    import torch

    from pnp.core.builders import build_model

    torch.save({"model": build_model("pnp:lenet5", **LENET)}, d / "whole.pt")
    return _base(ws, d, f"target={d / 'whole.pt'}")


def _target_of_another_architecture(ws, d):
    return _base(ws, d, f"target={ws.target}", "model=resnet20")


def _keep(ws, d, content: str):
    return _base(ws, d, f"target={ws.target}", f"keep={_text(d / 'keep.json', content)}")


def _pruner_run_without_scores(ws, d):
    (d / "pruner_run").mkdir()
    return _base(ws, d, f"target={ws.target}", f"pruner_run={d / 'pruner_run'}")


def _pruned_for_other_input(ws, d):
    return [f"data.root={ws.data}", f"out_dir={d / 'out'}", f"pruned={ws.target}", "data.image_size=32",
            "finetune.kd_weight=0"]


def _corrupt_stage_record(ws, d):
    out = _copy_finished(ws, d)
    _text(out / "stage.json", '{"stage": "tra')
    return _base(ws, d)


def _results_without_record(ws, d):
    out = _copy_finished(ws, d)
    (out / "stage.json").unlink()
    return _base(ws, d)


def _changed_config(ws, d):
    _copy_finished(ws, d)
    return _base(ws, d) + ["train.lr=0.2"]


def _planted_checkpoint(ws, d):
    import torch

    out = _copy_finished(ws, d)
    (out / "report.json").unlink()
    torch.save({"state_dict": {}}, out / "checkpoints" / "last.ckpt")
    return _base(ws, d)


def _corrupt_report(ws, d):
    out = _copy_finished(ws, d)
    _text(out / "report.json", '{"status": "do')
    return _base(ws, d)


def _finished_without_model(ws, d):
    out = _copy_finished(ws, d)
    shutil.rmtree(out / "model")
    return _base(ws, d)


def _out_dir_under_a_file(ws, d):
    _text(d / "a_file", "x")
    return [f"data.root={ws.data}", f"out_dir={d / 'a_file' / 'run'}"]


def _det(ws, d, *more: str) -> list[str]:
    return ["--dataset-dir", str(d / "det"), "--output-dir", str(d / "out"), "--stage", "train", *more]


def _coco(d: Path, train_json: str) -> None:
    for split in ("train", "val"):
        (d / "det" / split).mkdir(parents=True, exist_ok=True)
    _text(d / "det" / "annotations" / "instances_train.json", train_json)
    _text(d / "det" / "annotations" / "instances_val.json", '{"images": [], "annotations": [], "categories": []}')


def _det_bad_json(ws, d):
    _coco(d, '{"images": [')
    return _det(ws, d)


def _det_json_without_images(ws, d):
    _coco(d, '{"info": {}}')
    return _det(ws, d)


def _det_python_yaml(ws, d):
    _coco(d, '{"images": [], "annotations": [], "categories": []}')
    _text(d / "bad.yaml", f"MODEL: !!python/object/apply:os.system ['touch {d / 'ran'}']\n")
    return _det(ws, d, "--config-file", str(d / "bad.yaml"))


def _det_pickle_weights(ws, d):
    _coco(d, '{"images": [], "annotations": [], "categories": []}')
    return _det(ws, d, "MODEL.WEIGHTS", str(d / "model_final.pkl"))


def _det_diverges(ws, d):
    return ["--dataset-dir", str(d / "det"), "--num-images", "40", "--fashion-root", str(ws.data),
            "--output-dir", str(d / "out"), "--stage", "train", "SOLVER.MAX_ITER", "40", "SOLVER.BASE_LR", "5.0",
            "SOLVER.IMS_PER_BATCH", "2"]


CASES: list[Case] = [
    # the config
    Case("unknown_key", "a misspelt config key", "pnp-pipeline",
         lambda ws, d: _base(ws, d, "train.epocs=3"), 2, "train.epocs"),
    Case("wrong_type", "a value of the wrong type", "pnp-pipeline",
         lambda ws, d: _base(ws, d, "train.epochs=1.5"), 2, "train.epochs"),
    Case("bad_choice", "a value outside its choices", "pnp-pipeline",
         lambda ws, d: _base(ws, d, "pruner.sparsity=latency"), 2, "pruner.sparsity='latency'"),
    Case("budget_zero", "a FLOPs budget of 0", "pnp-pipeline",
         lambda ws, d: _base(ws, d, "readout.budget=0"), 2, "readout.budget=0.0"),
    Case("no_devices", "trainer.devices=0", "pnp-train",
         lambda ws, d: _base(ws, d, "trainer.devices=0"), 2, "trainer.devices=0"),
    Case("builder_not_allowed", "a builder outside the allow-list", "pnp-train",
         lambda ws, d: _base(ws, d, "model.builder=os:system"), 2, "model.trust_builder=true"),
    Case("unknown_dataset", "an unknown dataset name", "pnp-train",
         lambda ws, d: _base(ws, d, "data.name=mnist"), 2, "data.name='mnist'"),
    Case("out_dir_under_file", "out_dir under a regular file", "pnp-train", _out_dir_under_a_file, 2, "out_dir="),
    Case("val_too_small", "trainer.limit_val_batches too small for the loader", "pnp-train",
         lambda ws, d: _base(ws, d, "trainer.limit_val_batches=0.001"), 2, "limit_val_batches"),
    # the data
    Case("data_root_missing", "data.root that does not exist", "pnp-train",
         lambda ws, d: _base(ws, d) + [f"data.root={d / 'nothing'}"], 2, "data.root="),
    Case("data_root_empty", "data.root without the dataset's files (no fallback)", "pnp-train",
         lambda ws, d: _base(ws, d) + [f"data.root={d}"], 2, "Fashion-MNIST not found"),
    Case("truncated_idx", "a truncated IDX file", "pnp-train", _truncated_idx, 2, "IDX file"),
    Case("labels_out_of_range", "labels outside the class range", "pnp-train", _labels_out_of_range, 2, "labels"),
    Case("val_size_too_big", "data.val_size larger than the training split", "pnp-train",
         lambda ws, d: _base(ws, d, "data.val_size=300"), 2, "data.val_size=300"),
    Case("crafted_cifar", "a CIFAR batch crafted to run code", "pnp-train", _crafted_cifar, 2, "not a CIFAR batch"),
    Case("classes_mismatch", "a model with fewer outputs than the data's classes", "pnp-train",
         lambda ws, d: _base(ws, d, "model.data_kwargs=[in_channels,input_size]", "+model.kwargs.num_classes=5"),
         2, "num_classes=10"),
    Case("channels_mismatch", "a 3-channel model on 1-channel data", "pnp-train",
         lambda ws, d: _base(ws, d, "model=torchvision", "model.builder=torchvision:resnet18"), 2, "data.channels"),
    # input files
    Case("target_missing", "target= that does not exist", "pnp-train-pruner",
         lambda ws, d: _base(ws, d, f"target={d / 'nothing'}"), 2, "target="),
    Case("target_without_model", "target= a folder without a saved model", "pnp-train-pruner",
         lambda ws, d: _base(ws, d, f"target={d}"), 2, "holds no saved model"),
    Case("target_other_architecture", "target= saved for another architecture", "pnp-train-pruner",
         _target_of_another_architecture, 2, "model.builder='pnp:resnet20'"),
    Case("target_pickled_module", "target= a pickled module (would run code)", "pnp-train-pruner",
         _pickled_target, 2, "weights-only"),
    Case("artifact_builder_not_allowed", "an artifact whose channels.json names os:system", "pnp-train-pruner",
         _target_builder_not_allowed, 2, "does not fit model.builder='pnp:lenet5'"),
    Case("keep_not_json", "keep= not JSON", "pnp-prune", lambda ws, d: _keep(ws, d, "{groups"), 2, "keep="),
    Case("keep_unknown_group", "keep= naming an unknown group", "pnp-prune",
         lambda ws, d: _keep(ws, d, '{"groups": {"features.9": [0, 1]}}'), 2, "unknown group name 'features.9'"),
    Case("keep_probabilities", "keep= masks of probabilities", "pnp-prune",
         lambda ws, d: _keep(ws, d, '{"masks": {"features.0": [0.2, 0.9, 0.4, 0.7, 0.1, 0.8]}}'), 2, "keep="),
    Case("pruner_run_without_scores", "pruner_run= without keep scores", "pnp-prune",
         _pruner_run_without_scores, 2, "holds no keep_scores.safetensors"),
    Case("pruned_missing", "pruned= that does not exist", "pnp-finetune",
         lambda ws, d: [f"data.root={ws.data}", f"out_dir={d / 'out'}", f"pruned={d / 'nothing'}"], 2, "pruned="),
    Case("pruned_other_input", "pruned= for another input size", "pnp-finetune", _pruned_for_other_input, 2, "pruned="),
    Case("teacher_missing", "distillation without a teacher", "pnp-finetune",
         lambda ws, d: [f"data.root={ws.data}", f"out_dir={d / 'out'}", f"pruned={ws.target}"], 2, "teacher"),
    # run folders
    Case("corrupt_stage_record", "a corrupt stage.json", "pnp-train", _corrupt_stage_record, 2, "cannot be read",
         untouched=True),
    Case("results_without_record", "results without their stage.json", "pnp-train", _results_without_record, 2,
         "no stage.json", untouched=True),
    Case("changed_config", "a finished run rerun with another config", "pnp-train", _changed_config, 2,
         "different config", untouched=True),
    Case("planted_checkpoint", "a malformed last.ckpt in the stage folder", "pnp-train", _planted_checkpoint, 0,
         "set aside"),
    Case("corrupt_report", "a truncated report.json", "pnp-train", _corrupt_report, 0, "set aside"),
    Case("finished_without_model", "a finished stage whose model/ is gone", "pnp-train", _finished_without_model, 0,
         "is missing"),
    # detection
    Case("det_dataset_missing", "--dataset-dir without COCO files", "pnp-train-net",
         lambda ws, d: _det(ws, d), 2, "does not exist"),
    Case("det_bad_json", "an instances json that is not JSON", "pnp-train-net", _det_bad_json, 2, "not valid JSON"),
    Case("det_json_without_images", "an instances json without COCO's lists", "pnp-train-net",
         _det_json_without_images, 2, "no 'images' list"),
    Case("det_python_yaml", "--config-file with a !!python tag", "pnp-train-net", _det_python_yaml, 2,
         "not plain YAML"),
    Case("det_pickle_weights", "MODEL.WEIGHTS a .pkl pickle", "pnp-train-net", _det_pickle_weights, 2, "pickle"),
    Case("det_bad_budget", "--budget outside (0, 1]", "pnp-train-net",
         lambda ws, d: _det(ws, d, "--budget", "1.5"), 2, "--budget 1.5"),
    Case("det_diverges", "a detector whose training diverges", "pnp-train-net", _det_diverges, 2, "diverged",
         slow=True),
]
