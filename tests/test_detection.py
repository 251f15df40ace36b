"""detectron2 integration: the install's compatibility layer, the composed COCO data, the Faster R-CNN detector."""

from __future__ import annotations

import gzip
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2", reason="detectron2 is not installed (make setup-detection installs it)")

import pnp  # noqa: E402
from pnp.detection.compat import MissingCompiledOpError, MissingCompiledOps, import_detectron2  # noqa: E402
from pnp.detection.data import box_iou, compose_fashion_mnist_detection, register_coco  # noqa: E402
from pnp.detection.modeling import build_detector, detector_config  # noqa: E402

import_detectron2()
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader  # noqa: E402
from detectron2.engine import SimpleTrainer  # noqa: E402
from detectron2.structures import Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

TRAIN_BRIGHTNESS, TEST_BRIGHTNESS = 250, 120


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_items(n: int, brightness: int, rng) -> np.ndarray:
    """28x28 items: a filled rectangle of random extent on a black background."""
    items = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        y0, x0 = rng.integers(0, 10, size=2)
        y1, x1 = rng.integers(18, 28, size=2)
        items[i, y0:y1, x0:x1] = brightness
    return items


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    """Fashion-MNIST-shaped IDX files whose train items are brighter than their test items."""
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte.gz", fake_items(40, TRAIN_BRIGHTNESS, rng))
    write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 40))
    write_idx(root / "t10k-images-idx3-ubyte.gz", fake_items(20, TEST_BRIGHTNESS, rng))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 20))
    return root


@pytest.fixture(scope="module")
def train_split(tmp_path_factory, fashion_root):
    out = tmp_path_factory.mktemp("det")
    return compose_fashion_mnist_detection(out, "train", num_images=12, seed=3, image_size=96, root=fashion_root)


def load(json_file):
    with open(json_file) as f:
        return json.load(f)


def test_composed_split_is_valid_coco(train_split):
    coco = load(train_split.json_file)
    assert len(coco["images"]) == 12
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    per_image = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 10
    assert all(2 <= len(anns) <= 5 for anns in per_image.values())
    overlapping = 0
    for anns in per_image.values():
        boxes = [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]) for a in anns]
        overlapping += any(box_iou(a, b) > 0 for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert overlapping >= 1
    sides = [a["bbox"][2] for a in coco["annotations"]]
    assert max(sides) > 1.5 * min(sides)  # varied sizes
    for im in coco["images"]:
        image = np.asarray(Image.open(train_split.image_root / im["file_name"]))
        assert image.shape == (im["height"], im["width"]) == (96, 96)
        for a in per_image[im["id"]]:  # the box is tight on the item's pixels
            x, y, w, h = (int(v) for v in a["bbox"])
            assert image[y : y + h, x : x + w].max() > 0


def test_same_seed_same_files_and_val_uses_test_items(tmp_path, fashion_root, train_split):
    again = compose_fashion_mnist_detection(tmp_path, "train", num_images=12, seed=3, image_size=96, root=fashion_root)
    assert load(again.json_file) == load(train_split.json_file)
    for f in sorted(train_split.image_root.iterdir()):
        assert (again.image_root / f.name).read_bytes() == f.read_bytes()
    other = compose_fashion_mnist_detection(tmp_path / "b", "train", num_images=12, seed=4, image_size=96, root=fashion_root)
    assert load(other.json_file)["annotations"] != load(train_split.json_file)["annotations"]

    val = compose_fashion_mnist_detection(tmp_path, "val", num_images=4, seed=3, image_size=96, root=fashion_root)
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted(val.image_root.iterdir())])
    assert 0 < pixels.max() <= TEST_BRIGHTNESS  # drawn from the test items only


def test_rewriting_a_split_with_other_arguments_needs_overwrite(tmp_path, fashion_root):
    paths = compose_fashion_mnist_detection(tmp_path, "val", num_images=3, seed=0, image_size=64, root=fashion_root)
    stamp = paths.json_file.stat().st_mtime_ns
    compose_fashion_mnist_detection(tmp_path, "val", num_images=3, seed=0, image_size=64, root=fashion_root)
    assert paths.json_file.stat().st_mtime_ns == stamp  # same arguments: kept as it is
    with pytest.raises(FileExistsError, match="overwrite=True"):
        compose_fashion_mnist_detection(tmp_path, "val", num_images=5, seed=0, image_size=64, root=fashion_root)
    compose_fashion_mnist_detection(tmp_path, "val", num_images=5, seed=0, image_size=64, root=fashion_root, overwrite=True)
    assert len(load(paths.json_file)["images"]) == len(list(paths.image_root.iterdir())) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.parametrize(
    "kwargs, field",
    [({"split": "test"}, "split='test'"), ({"max_objects": 1}, "max_objects=1"), ({"scale_range": (0.5, 0.2)}, "scale_range")],
)
def test_bad_generator_arguments_are_named(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        compose_fashion_mnist_detection(tmp_path, **{"num_images": 2, **kwargs})


def test_register_coco_gives_detectron2_dicts(train_split):
    name = register_coco("pnp_test_fashion_det", train_split.image_root, train_split.json_file)
    register_coco(name, train_split.image_root, train_split.json_file)  # same files again: nothing to do
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 12
    assert all(d["annotations"] and d["file_name"].startswith(str(train_split.image_root)) for d in dicts)
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(10))  # contiguous ids
    assert len(MetadataCatalog.get(name).thing_classes) == 10
    with pytest.raises(ValueError, match="already registered"):
        register_coco(name, train_split.image_root.parent, train_split.json_file)


def test_register_coco_names_the_missing_path(tmp_path, train_split):
    with pytest.raises(FileNotFoundError, match="json_file=.*missing.json"):
        register_coco("pnp_missing_json", train_split.image_root, tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="image_root=.*no-images"):
        register_coco("pnp_missing_images", tmp_path / "no-images", train_split.json_file)


def test_placeholder_ops_name_the_op():
    placeholder = MissingCompiledOps()
    with pytest.raises(MissingCompiledOpError, match="deform_conv_forward"):
        placeholder.deform_conv_forward
    assert not hasattr(placeholder, "__file__") and not hasattr(placeholder, "_private")
    assert isinstance(placeholder.get_compiler_version(), str)
    assert Image.LINEAR == Image.BILINEAR


def test_r18_fpn_trains_a_step_and_detects(train_split):
    torch.manual_seed(0)
    name = register_coco("pnp_test_fashion_det_train", train_split.image_root, train_split.json_file)
    cfg = detector_config(depth=18, image_size=96, fpn_channels=64, train_datasets=[name])
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SEED = 0
    model = build_detector(cfg)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = model.backbone.bottom_up.stem.conv1.weight.detach().clone()
    trainer = SimpleTrainer(model, build_detection_train_loader(cfg), optimizer)
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()
        losses = {k: v for k, v in storage.latest().items() if k.startswith("loss") or k == "total_loss"}
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert all(math.isfinite(value) for value, _ in losses.values())
    assert not torch.equal(before, model.backbone.bottom_up.stem.conv1.weight)  # the backbone learned

    model.eval()
    image = torch.randint(0, 255, (3, 80, 112), dtype=torch.uint8).float()
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 40, "width": 56}])
    instances = output["instances"]
    assert isinstance(instances, Instances) and instances.image_size == (40, 56)
    assert {"pred_boxes", "scores", "pred_classes"} <= set(instances.get_fields())


def test_r50_fpn_backbone_gives_every_level():
    cfg = detector_config(depth=50, image_size=64, fpn_channels=32)
    model = build_detector(cfg).eval()
    assert all(isinstance(m, torch.nn.BatchNorm2d) for n, m in model.backbone.named_modules() if n.endswith("norm"))
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in features.items()} == {
        "p2": (32, 16, 16), "p3": (32, 8, 8), "p4": (32, 4, 4), "p5": (32, 2, 2), "p6": (32, 1, 1),
    }


def conv_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every convolution call, per sample, counted with forward hooks."""
    total = 0

    def hook(conv, args, out):
        nonlocal total
        total += out[0].numel() * (conv.in_channels // conv.groups) * conv.weight[0, 0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def test_r18_fpn_backbone_prunes_its_norms_and_counts_its_convolutions(randomize_norms, gated_output):
    torch.manual_seed(0)
    backbone = randomize_norms(build_detector(detector_config(depth=18, image_size=128)).backbone.eval())
    x = torch.randn(1, 3, 128, 128)
    groups = pnp.find_channel_groups(backbone, x)
    modules = dict(backbone.named_modules())
    norms = {n for n, m in modules.items() if isinstance(m, torch.nn.BatchNorm2d)}
    in_groups = {m.module for g in groups for m in g.members if m.side == "out"}
    assert norms and norms <= in_groups  # every conv's own norm (detectron2 Conv2d.norm) shrinks with it

    counted = pnp.count_flops_params(backbone, x)
    assert counted.flops == pytest.approx(conv_macs(backbone, x), rel=0.01)
    assert pnp.CostModel(groups).full_flops == pytest.approx(counted.flops, rel=1e-6)

    keep = pnp.keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))
    pruned = pnp.apply_surgery(backbone, groups, keep, x, verify=True)
    assert pruned.bottom_up.stem.conv1.norm.num_features == pruned.bottom_up.stem.conv1.out_channels < 64
    expected = gated_output(backbone, groups, keep, x)
    with torch.no_grad():
        actual = pruned(x)
    assert expected.keys() == actual.keys()
    for level in expected:
        torch.testing.assert_close(actual[level], expected[level], rtol=1e-4, atol=1e-5)
    assert pnp.count_flops_params(pruned, x).flops == pytest.approx(float(pnp.CostModel(groups).flops(keep)), rel=1e-6)


# --------------------------------------------------------------------------- pruning the detector's backbone

from pnp.detection.checkpoint import DetectorCheckpointError, load_pruned_detector, save_pruned_detector  # noqa: E402
from pnp.detection.engine import DetectionTrainer, evaluate_detector, train_pruner  # noqa: E402
from pnp.detection.pipeline import register_splits  # noqa: E402
from pnp.detection.pruning import (  # noqa: E402
    backbone_keep_scores,
    decide_backbone_keep,
    example_image_batch,
    find_backbone_groups,
    prune_detector,
)


@pytest.fixture(scope="module")
def det_datasets(train_split, fashion_root):
    val = compose_fashion_mnist_detection(train_split.json_file.parents[1], "val", num_images=3, seed=5, image_size=96,
                                          root=fashion_root)
    return (register_coco("pnp_test_prune_train", train_split.image_root, train_split.json_file),
            register_coco("pnp_test_prune_val", val.image_root, val.json_file))


def small_cfg(datasets, depth=18, **solver):
    cfg = detector_config(depth=depth, image_size=64, fpn_channels=32, train_datasets=[datasets[0]],
                          test_datasets=[datasets[1]])
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an untrained detector still predicts boxes to evaluate
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


@pytest.fixture(scope="module")
def pruned_setup(det_datasets, randomize_norms):
    """An R18-FPN detector (random BN statistics), its groups, keep decisions and the pruned copy."""
    torch.manual_seed(0)
    cfg = small_cfg(det_datasets)
    detector = build_detector(cfg)
    randomize_norms(detector.backbone)
    detector.eval()
    groups = find_backbone_groups(detector, 64)
    keep = pnp.keep_from_ratio(groups, 0.6, generator=torch.Generator().manual_seed(0))
    return cfg, detector, groups, keep, prune_detector(detector, groups, keep).eval()


def test_pruner_trains_on_detection_losses_and_reads_out_within_budget(det_datasets):
    torch.manual_seed(0)
    cfg = small_cfg(det_datasets)
    detector = build_detector(cfg).eval()
    groups = find_backbone_groups(detector, 64)
    assert {"bottom_up.res2.0.conv1", "bottom_up.res3.0.shortcut", "fpn_lateral2"} <= set(groups.names)
    assert all("fpn_output" in name for name in groups.excluded)  # the heads' inputs keep their width
    detector_before = {k: v.clone() for k, v in detector.state_dict().items()}
    from pnp.detection.pruning import build_detection_pruner

    torch.manual_seed(1)
    head_before = build_detection_pruner(detector, groups).head.linear.weight.detach().clone()
    torch.manual_seed(1)
    pruner = train_pruner(cfg, detector, groups, iterations=2, lr=1e-2, loss={"budget": 0.5})
    assert not torch.allclose(pruner.head.linear.weight, head_before)  # the pruner learned
    assert all(torch.equal(v, detector.state_dict()[k]) for k, v in detector_before.items())  # the detector did not
    assert not any(m._forward_pre_hooks for m in detector.backbone.modules())  # gates taken off

    from detectron2.data import build_detection_test_loader

    scores = backbone_keep_scores(detector, pruner, groups, build_detection_test_loader(cfg, det_datasets[0]), 4)
    keep, info = decide_backbone_keep(groups, scores, budget=0.5)
    assert info["flops_fraction"] <= 0.5 and float(pnp.CostModel(groups).flops_fraction(keep)) <= 0.5
    assert info["flops_fraction"] > 0.4  # keeps as much as the budget allows


def test_surgery_gives_a_detector_whose_shapes_match_its_layers(pruned_setup):
    cfg, detector, groups, keep, pruned = pruned_setup
    x = example_image_batch(detector, 64)
    with torch.no_grad():
        bottom = pruned.backbone.bottom_up(x)
        features = pruned.backbone(x)
        original = detector.backbone(x)
    declared = pruned.backbone.bottom_up.output_shape()
    assert {k: v.shape[1] for k, v in bottom.items()} == {k: declared[k].channels for k in bottom}
    assert bottom["res3"].shape[1] < 128  # stage channels (shared with the FPN lateral) were cut
    fpn = pruned.backbone.output_shape()
    assert {k: (v.shape[1], v.shape[2] * fpn[k].stride) for k, v in features.items()} == {k: (32, 64) for k in original}
    assert {k: v.channels for k, v in fpn.items()} == {k: v.shape[1] for k, v in original.items()}  # heads unchanged
    assert pnp.count_flops_params(pruned.backbone, x).flops < 0.8 * pnp.count_flops_params(detector.backbone, x).flops
    assert pruned.roi_heads.box_head.fc1.weight.shape == detector.roi_heads.box_head.fc1.weight.shape
    assert detector.backbone.bottom_up.res3[0].conv1.out_channels == 128  # the original is untouched
    with torch.no_grad():
        (out,) = pruned([{"image": torch.rand(3, 64, 80) * 255, "height": 32, "width": 40}])
    assert out["instances"].image_size == (32, 40) and len(out["instances"]) > 0


def test_pruned_detector_reloads_with_identical_outputs(pruned_setup, tmp_path):
    cfg, _, _, _, pruned = pruned_setup
    directory = save_pruned_detector(pruned, cfg, tmp_path / "pruned")
    assert sorted(p.name for p in directory.iterdir()) == ["channels.json", "config.yaml", "model.safetensors"]
    loaded = load_pruned_detector(directory, cfg=cfg, dataset=cfg.DATASETS.TRAIN[0])
    assert loaded.backbone.pnp_channel_spec.modules == pruned.backbone.pnp_channel_spec.modules
    assert loaded.backbone.bottom_up.output_shape() == pruned.backbone.bottom_up.output_shape()
    image = [{"image": torch.rand(3, 64, 64) * 255}]
    with torch.no_grad():
        expected, actual = pruned(image)[0]["instances"], loaded(image)[0]["instances"]
    assert torch.equal(expected.pred_boxes.tensor, actual.pred_boxes.tensor)
    assert torch.equal(expected.scores, actual.scores) and torch.equal(expected.pred_classes, actual.pred_classes)


def test_finetuning_with_distillation_adds_finite_kd_losses(pruned_setup, tmp_path):
    cfg, detector, _, _, pruned = pruned_setup
    cfg = cfg.clone()
    cfg.SOLVER.MAX_ITER = 2
    cfg.DATASETS.TEST = ()  # evaluation has its own test
    cfg.OUTPUT_DIR = str(tmp_path)
    import copy

    student = copy.deepcopy(pruned)
    teacher_before = {k: v.clone() for k, v in detector.state_dict().items()}
    trainer = DetectionTrainer(cfg, model=student, teacher=detector, kd_fpn=1.0, kd_cls=1.0)
    trainer.train()
    history = trainer.storage.histories()
    for key in ("loss_kd_fpn", "loss_kd_cls", "loss_cls", "total_loss"):
        values = [v for v, _ in history[key].values()]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), key
    assert trainer.student is student and not torch.equal(
        student.backbone.bottom_up.stem.conv1.weight, pruned.backbone.bottom_up.stem.conv1.weight)
    assert list(tmp_path.glob("events.out.tfevents.*")) and not list(tmp_path.glob("*.pth"))  # TensorBoard, no pickles
    assert all(torch.equal(v, detector.state_dict()[k]) for k, v in teacher_before.items())  # teacher frozen


def test_coco_evaluator_gives_box_ap(pruned_setup):
    cfg, _, _, _, pruned = pruned_setup
    results = evaluate_detector(pruned, cfg, cfg.DATASETS.TEST[0])
    assert {"AP", "AP50", "AP75"} <= set(results)
    assert all(math.isfinite(results[k]) and 0 <= results[k] <= 100 for k in ("AP", "AP50", "AP75"))


def test_missing_dataset_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        register_splits(tmp_path / "no-dataset")


def test_checkpoint_with_other_categories_is_refused(pruned_setup, tmp_path, train_split):
    cfg, _, _, _, pruned = pruned_setup
    directory = save_pruned_detector(pruned, cfg, tmp_path / "pruned")
    coco = load(train_split.json_file)
    coco["categories"] = coco["categories"][:3]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] <= 3]
    other = tmp_path / "three.json"
    other.write_text(json.dumps(coco))
    name = register_coco("pnp_test_three_classes", train_split.image_root, other)
    with pytest.raises(DetectorCheckpointError, match="3 categories.*NUM_CLASSES=10"):
        load_pruned_detector(directory, dataset=name)
    renamed = dict(coco, categories=[dict(c, name=f"x{c['id']}") for c in load(train_split.json_file)["categories"]])
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    name = register_coco("pnp_test_renamed_classes", train_split.image_root, tmp_path / "renamed.json")
    with pytest.raises(DetectorCheckpointError, match="thing_classes differ"):
        load_pruned_detector(directory, dataset=name)


def test_checkpoint_from_another_backbone_is_refused(pruned_setup, tmp_path):
    cfg, _, _, _, pruned = pruned_setup
    directory = save_pruned_detector(pruned, cfg, tmp_path / "pruned")
    r50 = cfg.clone()
    r50.MODEL.RESNETS.DEPTH = 50
    with pytest.raises(DetectorCheckpointError, match="MODEL.RESNETS.DEPTH=18.*MODEL.RESNETS.DEPTH=50"):
        load_pruned_detector(directory, cfg=r50)


def test_train_net_runs_every_stage_and_reports(tmp_path, fashion_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_net", Path(__file__).parents[1] / "tools" / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    out = tmp_path / "run"
    train_net.main([
        "--dataset-dir", str(tmp_path / "data"), "--num-images", "6", "--fashion-root", str(fashion_root),
        "--output-dir", str(out), "--image-size", "64", "--pruner-iters", "2", "--budget", "0.5", "--kd-fpn", "1",
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "MODEL.FPN.OUT_CHANNELS", "32",
    ])
    report = load(out / "report.json")
    assert {"baseline", "pruned", "finetuned"} <= set(report)
    for stage in ("baseline", "pruned", "finetuned"):
        assert {"AP", "AP50", "AP75", "backbone_flops", "flops", "params", "latency"} <= set(report[stage])
    assert report["pruned"]["backbone_flops"] <= 0.5 * report["baseline"]["backbone_flops"]
    assert report["finetuned"]["params"] == report["pruned"]["params"] < report["baseline"]["params"]
    assert list(out.glob("logs/finetuned/events.out.tfevents.*"))  # TensorBoard


def test_detection_benchmark_compares_distillation_and_reuses_its_stages(tmp_path, fashion_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_detection", Path(__file__).parents[1] / "benchmarks" / "bench_detection.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while the file runs
    spec.loader.exec_module(bench)
    out = tmp_path / "out"
    argv = ["--profile", "smoke", "--out", str(out), "--fashion-root", str(fashion_root),
            "--set", "num_images=6", "--set", "budget=0.5"]
    results = bench.main(argv)

    assert [r["variant"] for r in results["records"]] == ["no_kd", "kd"]
    for r in results["records"]:
        assert r["model"] == "faster_rcnn_R18_FPN" and r["budget"] >= 0.5
        assert r["finetuned"]["params"] == r["pruned"]["params"] < r["baseline"]["params"]
        assert {"AP", "AP50", "AP75", "backbone_flops", "latency_ms"} <= set(r["finetuned"])
        assert {"train", "prune-train", "prune", f"finetune-{r['variant']}"} == set(r["wall_s"])
        assert r["baseline_continued"]["params"] == r["baseline"]["params"] and "ap_change_vs_continued" in r
    assert results["environment"]["torch"] == torch.__version__
    table = (out / "table.md").read_text()
    assert "fine-tuned no_kd" in table and "fine-tuned kd" in table and "pruned, before fine-tuning" in table
    assert "baseline trained on (control)" in table

    # a second run finds every detector on disk and trains nothing
    tuned = [out / "r18" / name / "channels.json" for name in ("finetuned_no_kd", "finetuned_kd", "baseline_continued")]
    stamps = [p.stat().st_mtime_ns for p in tuned]
    assert bench.main(argv)["records"] == results["records"]
    assert [p.stat().st_mtime_ns for p in tuned] == stamps
    with pytest.raises(SystemExit, match="other settings"):
        bench.main([*argv, "--set", "finetune_iters=3"])
    with pytest.raises(SystemExit, match="finetune_iter"):
        bench.main([*argv[:4], "--set", "finetune_iter=3"])


def test_training_with_a_seed_is_repeatable(det_datasets, tmp_path):
    from pnp.detection.pipeline import train_baseline

    cfg = small_cfg(det_datasets, MAX_ITER=2, BASE_LR=0.01)
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    weights = []
    for run, seed in enumerate((7, 7, 8)):
        cfg.SEED = seed
        out = train_baseline(cfg, tmp_path / f"run{run}")
        weights.append(load_pruned_detector(out, cfg=cfg, dataset=det_datasets[0]).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # same seed: same detector
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
