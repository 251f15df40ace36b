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


# --------------------------------------------------------------------------- pruning the whole detector

from pnp.detection.checkpoint import DetectorCheckpointError, load_pruned_detector, save_pruned_detector  # noqa: E402
from pnp.detection.engine import DetectionTrainer, evaluate_detector, train_pruner  # noqa: E402
from pnp.detection.pipeline import register_splits  # noqa: E402
from pnp.detection.pruning import (  # noqa: E402
    DenseDetector,
    decide_detector_keep,
    dense_example,
    detector_keep_scores,
    example_image_batch,
    find_detector_groups,
    kept_feature_channels,
    prune_detector,
    pruned_config,
    rank_detector_channels,
)


@pytest.fixture(scope="module")
def det_datasets(train_split, fashion_root):
    val = compose_fashion_mnist_detection(train_split.json_file.parents[1], "val", num_images=3, seed=5, image_size=96,
                                          root=fashion_root)
    return (register_coco("pnp_test_prune_train", train_split.image_root, train_split.json_file),
            register_coco("pnp_test_prune_val", val.image_root, val.json_file))


def small_cfg(datasets, depth=18, meta_architecture="faster_rcnn", **solver):
    cfg = detector_config(depth=depth, image_size=64, fpn_channels=32, train_datasets=[datasets[0]],
                          test_datasets=[datasets[1]], meta_architecture=meta_architecture)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an untrained detector still predicts boxes to evaluate
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
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
    groups = find_detector_groups(detector, 64)
    keep = pnp.keep_from_ratio(groups, 0.6, generator=torch.Generator().manual_seed(0))
    return cfg, detector, groups, keep, prune_detector(detector, groups, keep).eval()


WHOLE_DETECTOR_GROUPS = {
    "backbone.bottom_up.res2.0.conv1",  # a block's internal channels
    "backbone.bottom_up.res3.0.shortcut",  # a stage's channels, with the FPN lateral reading them
    "backbone.fpn_lateral5",  # the laterals, coupled across levels by the top-down additions
    "backbone.fpn_output5",  # the pyramid, coupled with the RPN head and the RoI box head
    "proposal_generator.rpn_head.conv",
    "roi_heads.box_head.fc1",
    "roi_heads.box_head.fc2",
}


def test_whole_detector_groups_reach_fpn_rpn_and_box_head(pruned_setup):
    _, detector, groups, _, _ = pruned_setup
    assert WHOLE_DETECTOR_GROUPS <= set(groups.names)
    pyramid = groups["backbone.fpn_output5"]
    assert set(pyramid.producers) == {f"backbone.fpn_output{k}" for k in (2, 3, 4, 5)}
    assert set(pyramid.consumers) == {"proposal_generator.rpn_head.conv", "roi_heads.box_head.fc1"}
    # only the layers whose outputs are predictions are left out, each with its reason
    assert set(groups.excluded) == {"proposal_generator.rpn_head.objectness_logits", "proposal_generator.rpn_head.anchor_deltas",
                                    "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"}
    assert all("output" in why for why in groups.excluded.values())
    # the cost model counts every level of the shared RPN head and every RoI of the box head
    counted = pnp.count_flops_params(DenseDetector(detector), dense_example(detector, 64)).flops
    assert pnp.CostModel(groups).full_flops == pytest.approx(counted, rel=1e-6)


def test_backbone_scope_keeps_the_heads_and_budgets_the_backbone(pruned_setup):
    _, detector, _, _, _ = pruned_setup
    groups = find_detector_groups(detector, 64, scope="backbone")
    assert {"backbone.bottom_up.res2.0.conv1", "backbone.fpn_lateral5"} <= set(groups.names)
    assert not any(n.startswith(("proposal_generator", "roi_heads")) or "fpn_output" in n for n in groups.names)
    assert "ignored layer" in groups.excluded["backbone.fpn_output5"]
    scores = {g.name: torch.rand(g.size, generator=torch.Generator().manual_seed(1)) for g in groups}
    keep, info = decide_detector_keep(groups, scores, budget=0.5, scope="backbone")
    pruned = prune_detector(detector, groups, keep)
    x = example_image_batch(detector, 64)
    before, after = (pnp.count_flops_params(m.backbone, x).flops for m in (detector, pruned))
    assert 0.45 * before < after <= 0.5 * before  # the budget is on the backbone's FLOPs
    assert info["scope"] == "backbone" and pruned.roi_heads.box_head.fc1.in_features == 32 * 49
    with pytest.raises(ValueError, match="scope 'neck'"):
        find_detector_groups(detector, 64, scope="neck")


def test_pruner_trains_on_detection_losses_and_reads_out_within_budget(det_datasets):
    torch.manual_seed(0)
    cfg = small_cfg(det_datasets)
    detector = build_detector(cfg).eval()
    groups = find_detector_groups(detector, 64)
    detector_before = {k: v.clone() for k, v in detector.state_dict().items()}
    from pnp.detection.pruning import build_detection_pruner

    torch.manual_seed(1)
    head_before = build_detection_pruner(detector, groups).head.linear.weight.detach().clone()
    torch.manual_seed(1)
    pruner = train_pruner(cfg, detector, groups, iterations=2, lr=1e-2, loss={"budget": 0.5})
    assert not torch.allclose(pruner.head.linear.weight, head_before)  # the pruner learned
    assert all(torch.equal(v, detector.state_dict()[k]) for k, v in detector_before.items())  # the detector did not
    assert not any(m._forward_pre_hooks for m in detector.modules())  # gates taken off

    from detectron2.data import build_detection_test_loader

    scores = detector_keep_scores(detector, pruner, groups, build_detection_test_loader(cfg, det_datasets[0]), 4)
    keep, info = decide_detector_keep(groups, scores, budget=0.5, round_to=4)
    assert info["flops_fraction"] <= 0.5 and float(pnp.CostModel(groups).flops_fraction(keep)) <= 0.5
    assert info["flops_fraction"] > 0.4  # keeps as much as the budget allows
    assert all(int(k.sum()) % 4 == 0 for name, k in keep.items() if groups[name].size >= 4)


def test_gates_on_the_whole_detector_act_in_training(det_datasets):
    """A gated channel of the pyramid or the box head changes the detector's losses: the pruner sees what it cuts."""
    torch.manual_seed(0)
    cfg = small_cfg(det_datasets)
    detector = build_detector(cfg)
    groups = find_detector_groups(detector, 64)
    gate = pnp.GatedModel(DenseDetector(detector), groups)
    batch = next(iter(build_detection_train_loader(cfg)))
    detector.train()
    losses = {}
    for name in (None, "backbone.fpn_output5", "roi_heads.box_head.fc2"):
        masks = {} if name is None else {name: torch.zeros(groups[name].size).index_fill(0, torch.tensor([0]), 1.0)}
        torch.manual_seed(2)  # the same proposals are sampled each time
        with EventStorage(), gate.masked(masks), torch.no_grad():
            losses[name] = detector(batch)
    gate.remove()
    assert losses["backbone.fpn_output5"]["loss_rpn_cls"] != losses[None]["loss_rpn_cls"]
    assert losses["roi_heads.box_head.fc2"]["loss_cls"] != losses[None]["loss_cls"]
    assert losses["roi_heads.box_head.fc2"]["loss_rpn_cls"] == losses[None]["loss_rpn_cls"]


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
    width = int(keep["backbone.fpn_output5"].sum())
    assert width < 32 and {k: (v.shape[1], fpn[k].channels) for k, v in features.items()} == {k: (width, width) for k in original}
    heads = pruned.roi_heads.box_head
    assert pruned.proposal_generator.rpn_head.conv.in_channels == width and heads.fc1.in_features == width * 49
    assert heads.fc2.in_features == heads.fc1.out_features < 1024 and heads.output_shape.channels == heads.fc2.out_features
    assert pruned.roi_heads.box_predictor.cls_score.in_features == heads.fc2.out_features
    slim = pruned_config(cfg, pruned)  # the config's width fields say what the layers are
    assert slim.MODEL.FPN.OUT_CHANNELS == width
    assert slim.MODEL.RPN.CONV_DIMS == [pruned.proposal_generator.rpn_head.conv.out_channels]
    counted = pnp.count_flops_params(DenseDetector(pruned), dense_example(detector, 64)).flops
    assert counted == pytest.approx(float(pnp.CostModel(groups).flops(keep)), rel=1e-6)
    assert detector.backbone.bottom_up.res3[0].conv1.out_channels == 128  # the original is untouched
    with torch.no_grad():
        (out,) = pruned([{"image": torch.rand(3, 64, 80) * 255, "height": 32, "width": 40}])
    assert out["instances"].image_size == (32, 40) and len(out["instances"]) > 0


def test_pruned_detector_reloads_with_identical_outputs(pruned_setup, tmp_path):
    cfg, _, _, _, pruned = pruned_setup
    directory = save_pruned_detector(pruned, cfg, tmp_path / "pruned")
    assert sorted(p.name for p in directory.iterdir()) == ["channels.json", "config.yaml", "model.safetensors"]
    loaded = load_pruned_detector(directory, cfg=cfg, dataset=cfg.DATASETS.TRAIN[0])
    assert loaded.pnp_channel_spec.modules == pruned.pnp_channel_spec.modules
    assert loaded.backbone.output_shape() == pruned.backbone.output_shape()
    assert loaded.backbone.bottom_up.output_shape() == pruned.backbone.bottom_up.output_shape()
    from pnp.detection.checkpoint import config_from_text

    written = config_from_text((directory / "config.yaml").read_text())
    assert written.MODEL.FPN.OUT_CHANNELS == loaded.backbone.fpn_output2.out_channels < cfg.MODEL.FPN.OUT_CHANNELS
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
    assert kept_feature_channels(student)["p6"] == kept_feature_channels(student)["p2"]  # P6 pools P5
    teacher_before = {k: v.clone() for k, v in detector.state_dict().items()}
    trainer = DetectionTrainer(cfg, model=student, teacher=detector, kd_fpn=1.0, kd_cls=1.0)
    trainer.train()
    history = trainer.storage.histories()
    for key in ("loss_kd_fpn", "loss_kd_cls", "loss_cls", "total_loss"):
        values = [v for v, _ in history[key].values()]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), key
    assert trainer.student is student and not torch.equal(
        student.backbone.bottom_up.stem.conv1.weight, pruned.backbone.bottom_up.stem.conv1.weight)
    assert list(tmp_path.glob("events.out.tfevents.*"))  # TensorBoard
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
    with pytest.raises(DetectorCheckpointError, match="3 categories.*10 classes"):
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


def test_checkpoint_of_another_meta_architecture_is_refused(pruned_setup, tmp_path):
    cfg, _, _, _, pruned = pruned_setup
    directory = save_pruned_detector(pruned, cfg, tmp_path / "pruned")
    retina = small_cfg((cfg.DATASETS.TRAIN[0], cfg.DATASETS.TEST[0]), meta_architecture="retinanet")
    with pytest.raises(DetectorCheckpointError, match="META_ARCHITECTURE='GeneralizedRCNN'.*META_ARCHITECTURE='RetinaNet'"):
        load_pruned_detector(directory, cfg=retina)


def test_retinanet_shared_head_is_pruned_exactly_trains_and_reloads(det_datasets, randomize_norms, tmp_path):
    """RetinaNet's subnets are shared by P3-P7 (P6/P7 made from res5): one coupled group per subnet layer."""
    torch.manual_seed(0)
    cfg = small_cfg(det_datasets, meta_architecture="retinanet")
    detector = build_detector(cfg)
    randomize_norms(detector.backbone)
    detector.eval()
    groups = find_detector_groups(detector, 64)
    pyramid = next(g for g in groups if "backbone.fpn_output5" in g.producers)
    assert {"backbone.top_block.p6", "backbone.top_block.p7"} <= set(pyramid.producers)
    assert {"head.cls_subnet.0", "head.bbox_subnet.0", "backbone.top_block.p7"} <= set(pyramid.consumers)
    assert {"head.cls_subnet.0", "head.bbox_subnet.6"} <= set(groups.names)
    assert set(groups.excluded) == {"head.cls_score", "head.bbox_pred"}
    keep = pnp.keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))
    pruned = prune_detector(detector, groups, keep).eval()  # verified against the gated original
    width = int(keep[pyramid.name].sum())
    assert {v.channels for v in pruned.backbone.output_shape().values()} == {width}
    assert pruned.head.cls_subnet[0].in_channels == width and pruned.head.cls_subnet[0].out_channels < 32

    cfg = cfg.clone()
    cfg.SOLVER.MAX_ITER = 1
    cfg.DATASETS.TEST = ()
    cfg.OUTPUT_DIR = str(tmp_path / "logs")
    trainer = DetectionTrainer(cfg, model=pruned, teacher=detector, kd_fpn=1.0)
    trainer.train()
    assert math.isfinite(trainer.storage.history("loss_kd_fpn").latest())
    with pytest.raises(ValueError, match="no RoI box head"):
        DetectionTrainer(cfg, model=pruned, teacher=detector, kd_cls=1.0)
    pruned.eval()
    directory = save_pruned_detector(pruned, cfg, tmp_path / "retina")
    loaded = load_pruned_detector(directory, cfg=cfg, dataset=cfg.DATASETS.TRAIN[0])
    image = [{"image": torch.rand(3, 64, 64) * 255}]
    with torch.no_grad():
        expected, actual = pruned(image)[0]["instances"], loaded(image)[0]["instances"]
    assert len(expected) > 0 and torch.equal(expected.pred_boxes.tensor, actual.pred_boxes.tensor)


def _train_net():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_net", Path(__file__).parents[1] / "tools" / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    return train_net


def test_train_net_runs_every_stage_reports_and_skips_what_is_done(tmp_path, fashion_root, capsys):
    out = tmp_path / "run"
    argv = [
        "--dataset-dir", str(tmp_path / "data"), "--num-images", "6", "--fashion-root", str(fashion_root),
        "--output-dir", str(out), "--image-size", "64", "--pruner-iters", "2", "--lookahead-iters", "2", "--budget", "0.5",
        "--kd-fpn", "1",
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    ]
    assert _train_net().main(argv) == 0
    report = load(out / "report.json")
    assert {"baseline", "pruned", "finetuned"} <= set(report)
    for stage in ("baseline", "pruned", "finetuned"):
        assert {"AP", "AP50", "AP75", "backbone_flops", "flops", "params", "latency"} <= set(report[stage])
    readout = report["pruned"]["readout"]
    assert readout["scope"] == "detector" and 0.4 < readout["flops_fraction"] <= 0.5  # of the whole detector
    assert "roi_heads.box_predictor.cls_score" in readout["left_out"]  # with its reason
    assert report["pruned"]["flops"] < 0.7 * report["baseline"]["flops"]
    assert report["finetuned"]["params"] == report["pruned"]["params"] < report["baseline"]["params"]
    assert list(out.glob("logs/finetuned/events.out.tfevents.*"))  # TensorBoard
    assert not list(out.glob("logs/*/*.pth"))  # resume points go when a stage finishes

    # the same command again: every stage is found finished and reused
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")}
    capsys.readouterr()
    assert _train_net().main(argv) == 0
    assert "already finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")} == stamps
    # a changed setting is refused (exit 2, a message), not run over the finished results
    assert _train_net().main([*argv[:-2], "MODEL.RPN.POST_NMS_TOPK_TEST", "60"]) == 2
    assert "different config" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")} == stamps


def test_train_net_refuses_bad_input_with_a_message(tmp_path, capsys):
    assert _train_net().main(["--dataset-dir", str(tmp_path / "none"), "--budget", "1.5"]) == 2
    assert "--budget 1.5" in capsys.readouterr().err
    assert _train_net().main(["--dataset-dir", str(tmp_path / "none")]) == 2
    assert "instances_train.json" in capsys.readouterr().err
    from pnp.detection.pipeline import build_config

    bad = tmp_path / "bad.yaml"
    marker = tmp_path / "ran"
    bad.write_text(f"MODEL: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match="bad.yaml.*not plain YAML"):
        build_config("train", "val", config_file=str(bad))
    assert not marker.exists()  # the file's code never ran
    with pytest.raises(ValueError, match="MODEL.WEIGHTS 'w.pkl' is a pickle"):
        build_config("train", "val", opts=["MODEL.WEIGHTS", "w.pkl"])


def test_train_net_flags_default_to_the_one_detection_recipe():
    from pnp.cli import detection as cli
    from pnp.detection.pipeline import DetectionRecipe

    parse = cli.argument_parser().parse_args
    assert cli.recipe_of(parse(["--dataset-dir", "d"])) == DetectionRecipe()
    # RetinaNet has no RoI class logits to distil: off unless asked for, and asking is refused
    assert cli.recipe_of(parse(["--dataset-dir", "d", "--meta-architecture", "retinanet"])).kd_cls == 0.0
    with pytest.raises(ValueError, match="^--kd-cls distils RoI class logits"):
        cli.recipe_of(parse(["--dataset-dir", "d", "--meta-architecture", "retinanet", "--kd-cls", "1"]))
    given = cli.recipe_of(parse(["--dataset-dir", "d", "--round-to", "1", "--budget", "0.3", "--inherit", "l1"]))
    assert (given.round_to, given.budget, given.inherit, given.pruner_iters) == (1, 0.3, "l1", DetectionRecipe().pruner_iters)
    with pytest.raises(ValueError, match="^--min-channels 0 must be at least 1"):
        cli.recipe_of(parse(["--dataset-dir", "d", "--min-channels", "0"]))
    # the read-out's width floor: the classification default, and a flag to change it
    from pnp.core.readout import MIN_SHARE

    assert DetectionRecipe().min_share == MIN_SHARE
    assert cli.recipe_of(parse(["--dataset-dir", "d", "--min-share", "0"])).min_share == 0.0
    with pytest.raises(ValueError, match=r"^--min-share 2.0 is outside \[0, 1\]"):
        cli.recipe_of(parse(["--dataset-dir", "d", "--min-share", "2"]))


def test_an_interrupted_detection_stage_resumes_from_its_checkpoint(tmp_path, fashion_root):
    """SIGKILL the baseline stage after its first periodic checkpoint; the same command resumes, not restarts."""
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    command = [
        sys.executable, str(Path(__file__).parents[1] / "tools" / "train_net.py"), "--stage", "train",
        "--dataset-dir", str(tmp_path / "data"), "--num-images", "6", "--fashion-root", str(fashion_root),
        "--output-dir", str(out), "--image-size", "64", "SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "3",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "MODEL.FPN.OUT_CHANNELS", "16", "SEED", "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tag = out / "logs" / "baseline" / "last_checkpoint"
    deadline = time.monotonic() + 120
    while not tag.is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert tag.is_file() and not (out / "baseline").exists()
    resumed_from = tag.read_text().strip()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming stage 'baseline' from" in second.stdout and resumed_from in second.stdout
    assert (out / "baseline" / "model.safetensors").is_file() and not tag.exists()
    checkpoint_iteration = int(resumed_from[len("model_"):-len(".pth")])
    assert f"Starting training from iteration {checkpoint_iteration + 1}" in second.stdout + second.stderr
    logged = [json.loads(line) for line in (out / "logs" / "baseline" / "metrics.json").read_text().splitlines()]
    assert max(r["iteration"] for r in logged if "total_loss" in r) == 39


@pytest.fixture(scope="module")
def bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_detection", Path(__file__).parents[1] / "benchmarks" / "bench_detection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_detection_benchmark_profiles_are_dotlists_over_pnps_recipe(bench, tmp_path):
    from pnp.detection.pipeline import DetectionRecipe

    # the quick profile the README's detection figures were measured with: pnp's recipe, fine-tuned 200 at lr 0.01
    quick = bench.compose_profile("quick")
    assert quick.recipe == DetectionRecipe(finetune_iters=200, finetune_lr=0.01)
    r = quick.recipe
    assert (r.budget, r.scope, r.round_to, r.inherit, r.pruner_iters, r.pruner_lr, r.kd_fpn, r.kd_cls) == (
        0.5, "detector", 8, "auto", 100, 1e-3, 1.0, 1.0)
    own = ("models", "num_images", "image_size", "ims_per_batch", "baseline_iters", "base_lr", "criterion", "seed",
           "latency_repeats")
    assert [getattr(quick, k) for k in own] == [("faster_rcnn:18",), 600, 128, 4, 600, 0.02, "magnitude", 0, 5]
    smoke = bench.compose_profile("smoke")
    assert smoke.recipe == DetectionRecipe(round_to=1, pruner_iters=2, lookahead_iters=2, finetune_iters=2, finetune_lr=0.01)
    full = bench.compose_profile("full")
    assert full.models == ("faster_rcnn:18", "faster_rcnn:50", "retinanet:18") and full.baseline_iters == 9000
    assert full.recipe == DetectionRecipe(pruner_iters=1500, finetune_iters=4500, finetune_lr=0.01)

    given = bench.compose_profile("quick", ["recipe.budget=0.3", "seed=1", "models=retinanet:18,faster_rcnn:50"])
    assert given.recipe.budget == 0.3 and given.seed == 1 and given.models == ("retinanet:18", "faster_rcnn:50")
    assert given.recipe.finetune_iters == 200  # the profile's entries stay under --set's
    assert bench.compose_profile("quick", ["models=[retinanet:18]"]).models == ("retinanet:18",)

    with pytest.raises(SystemExit, match=r"'recipe\.nope=1': Key 'nope'"):
        bench.compose_profile("quick", ["recipe.nope=1"])
    with pytest.raises(SystemExit, match=r"'finetune_lr=0\.0025'.* recipe\.finetune_lr"):  # the old key names the new one
        bench.compose_profile("quick", ["finetune_lr=0.0025"])
    with pytest.raises(SystemExit, match=r"'recipe\.pruner_iters=many': Value 'many'"):
        bench.compose_profile("quick", ["recipe.pruner_iters=many"])
    with pytest.raises(SystemExit, match="'yolo:18' is not META:DEPTH"):
        bench.compose_profile("quick", ["models=yolo:18"])
    with pytest.raises(ValueError) as product:
        DetectionRecipe(min_share=2.0).check()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:  # before anything is composed or written
        bench.main(["--profile", "smoke", "--out", str(out), "--set", "recipe.min_share=2"])
    assert str(refused.value) == f"recipe.{product.value}" and not out.exists()

    # records written before the recipe was recorded whole (scope and budget only) still make the table
    committed = Path(bench.RESULTS) / "quick-s0" / "faster_rcnn_R18_FPN" / "records.json"
    table = bench.format_table(json.loads(committed.read_text())["records"])
    assert "| faster_rcnn_R18_FPN | pnp, fine-tuned kd | 37.70 |" in table


def test_detection_benchmark_compares_pnp_with_a_criterion_and_reuses_its_stages(bench, tmp_path, fashion_root):
    out = tmp_path / "out"
    argv = ["--profile", "smoke", "--out", str(out), "--fashion-root", str(fashion_root),
            "--set", "num_images=6", "--set", "recipe.budget=0.5"]
    results = bench.main(argv)

    assert [(r["method"], r["variant"]) for r in results["records"]] == [("pnp", "no_kd"), ("pnp", "kd"), ("magnitude", "kd")]
    for r in results["records"]:
        assert r["model"] == "faster_rcnn_R18_FPN" and r["recipe"]["scope"] == "detector" and r["recipe"]["round_to"] == 1
        assert r["readout"]["flops_fraction"] <= 0.5 and r["flops_removed"] > 0.3  # of the whole detector
        assert r["finetuned"]["params"] == r["pruned"]["params"] < r["baseline"]["params"]
        assert {"AP", "AP50", "AP75", "backbone_flops", "flops", "latency_ms"} <= set(r["finetuned"])
        assert r["latency_speedup"] > 0 and r["backbone_latency_speedup"] > 0
        assert r["wall_s"]["selection"] > 0 and r["wall_s"]["finetune"] > 0
        assert r["baseline_continued"]["params"] == r["baseline"]["params"] and "ap_change_vs_continued" in r
    assert results["environments"][0]["torch"] == torch.__version__
    table = (out / "table.md").read_text()
    assert "pnp, fine-tuned no_kd" in table and "pnp, fine-tuned kd" in table and "pnp, before fine-tuning" in table
    assert "magnitude (criterion), fine-tuned kd" in table and "baseline trained on (control)" in table

    # a second run finds every stage finished and trains nothing
    model = out / "faster_rcnn_R18_FPN"
    tuned = [model / name / "model.safetensors" for name in ("finetuned_no_kd", "finetuned_kd", "finetuned_magnitude_kd",
                                                              "baseline_continued")]
    stamps = [p.stat().st_mtime_ns for p in tuned]
    assert bench.main(argv)["records"] == results["records"]
    assert [p.stat().st_mtime_ns for p in tuned] == stamps
    with pytest.raises(SystemExit, match="other settings"):
        bench.main([*argv, "--set", "recipe.finetune_iters=3"])
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


def test_mask_rcnn_heads_read_the_pruned_pyramid_and_are_cut_with_it(randomize_norms):
    """Mask R-CNN: the mask head's convolutions join the groups, so a narrower pyramid never leaves it unfed."""
    torch.manual_seed(0)
    cfg = detector_config(depth=18, image_size=64, fpn_channels=32)
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 2
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 20
    detector = randomize_norms(build_detector(cfg)).eval()
    groups = find_detector_groups(detector, 64)
    pyramid = groups["backbone.fpn_output5"]
    assert "roi_heads.mask_head.mask_fcn1" in pyramid.consumers
    assert "roi_heads.mask_head.mask_fcn1" in groups.names and "roi_heads.mask_head.predictor" in groups.excluded
    keep = pnp.keep_from_ratio(groups, 0.5, generator=torch.Generator().manual_seed(0))
    pruned = prune_detector(detector, groups, keep).eval()  # verified, mask logits included
    assert pruned.roi_heads.mask_head.mask_fcn1.in_channels == int(keep["backbone.fpn_output5"].sum())
    with torch.no_grad():
        (out,) = pruned([{"image": torch.rand(3, 64, 64) * 255}])
    assert out["instances"].has("pred_masks")


def test_inheritance_keeps_the_learned_widths_and_takes_the_criterions_channels(pruned_setup, tmp_path):
    from pnp.detection.pipeline import prune_baseline

    cfg, detector, groups, _, _ = pruned_setup
    out = tmp_path / "run"
    save_pruned_detector(detector, cfg, out / "baseline")
    scores = {g.name: torch.rand(g.size, generator=torch.Generator().manual_seed(3)) for g in groups}
    learned = load_pruned_detector(prune_baseline(cfg, out, 0.5, scores=scores, name="learned"))
    inherited = load_pruned_detector(prune_baseline(cfg, out, 0.5, scores=scores, name="inherited", inherit="magnitude"))
    a, b = learned.pnp_channel_spec.groups, inherited.pnp_channel_spec.groups
    assert {k: len(v) for k, v in a.items()} == {k: len(v) for k, v in b.items()}  # the same architecture
    assert a != b  # filled with other channels
    assert inherited.pnp_metadata["readout"]["inherit"] == "magnitude"


def test_auto_inheritance_keeps_the_learned_widths_and_takes_the_best_candidates_channels(pruned_setup, tmp_path, capsys):
    """Each candidate trains briefly on training images, and is scored on others: the validation split stays unseen."""
    from pnp.detection.pipeline import prune_baseline

    cfg, detector, groups, _, _ = pruned_setup
    out = tmp_path / "run"
    save_pruned_detector(detector, cfg, out / "baseline")
    scores = {g.name: torch.rand(g.size, generator=torch.Generator().manual_seed(3)) for g in groups}
    auto = load_pruned_detector(prune_baseline(cfg, out, 0.5, scores=scores, name="auto", inherit="auto",
                                               lookahead_iters=2, lookahead_images=3))
    record = auto.pnp_metadata["readout"]["inheritance"]
    tried = record["lookahead_AP"]
    assert list(tried) == ["learned", "l1", "magnitude", "widths:magnitude"]
    assert record["skipped"] == {} and record["steps"] == 2
    assert record["choice"] == max(tried, key=tried.get)  # the best, the earlier on a tie
    assert record["evaluated_on"] == "3 training images the look-ahead did not train on"
    printed = capsys.readouterr().out
    assert f"weights inherited from the {record['choice']!r} channels" in printed or "own widths and channels beat" in printed
    assert load(out / "logs" / "auto" / "keep.json")["readout"]["inheritance"]["choice"] == record["choice"]

    # each candidate is what a fixed choice cuts: the learned widths filled by its channels, or magnitude's read-out
    fixed = {choice: load_pruned_detector(prune_baseline(cfg, out, 0.5, scores=scores, name=f"fixed_{choice}", inherit=choice))
             for choice in ("learned", "l1", "magnitude")}
    own = load_pruned_detector(prune_baseline(cfg, out, 0.5, scores=rank_detector_channels(detector, groups, "magnitude"),
                                              name="own_magnitude"))
    expected = own if record["choice"] == "widths:magnitude" else fixed[record["choice"]]
    assert auto.pnp_channel_spec.groups == expected.pnp_channel_spec.groups
    widths = {name: {k: len(v) for k, v in m.pnp_channel_spec.groups.items()} for name, m in (("learned", fixed["learned"]), ("own", own))}
    assert widths["learned"] != widths["own"]  # the rival is another architecture
    readout = auto.pnp_metadata["readout"]
    assert (readout.get("criterion") == "magnitude") == (record["choice"] == "widths:magnitude")

    lookahead = out / "logs" / "auto" / "lookahead"
    assert sorted(p.name for p in lookahead.iterdir()) == ["l1", "learned", "magnitude", "widths:magnitude"]
    assert not list(lookahead.glob("*/model_*.pth"))  # the candidates' checkpoints go
    split = {n.rsplit("_", 1)[1]: DatasetCatalog.get(n) for n in DatasetCatalog.list()
             if n.startswith(f"{cfg.DATASETS.TRAIN[0]}_lookahead_")}
    held_out = {d["file_name"] for d in split["heldout"]}
    assert len(held_out) == 3 and held_out.isdisjoint(d["file_name"] for d in split["train"])
    assert len(split["train"]) + 3 == len(DatasetCatalog.get(cfg.DATASETS.TRAIN[0]))
    settings = {n: load(out / "logs" / n / "stage.json")["config"] for n in ("auto", "fixed_learned")}
    assert settings["auto"]["inherit"] == "auto" and settings["auto"]["lookahead_iters"] == 2
    assert settings["auto"]["widths_from"] == ["magnitude"]
    assert not {"inherit", "inherit_candidates", "lookahead_iters", "widths_from"} & set(settings["fixed_learned"])


def test_bad_lookahead_settings_are_named():
    from pnp.cli import detection as cli
    from pnp.detection.pipeline import DetectionRecipe, prune_baseline

    parse = cli.argument_parser().parse_args
    auto = cli.recipe_of(parse(["--dataset-dir", "d", "--inherit", "auto", "--inherit-candidates", "l1", "learned",
                                "--lookahead-iters", "5"]))
    assert (auto.inherit, auto.inherit_candidates, auto.lookahead_iters) == ("auto", ("l1", "learned"), 5)
    assert auto.widths_from == ("magnitude",)
    assert cli.recipe_of(parse(["--dataset-dir", "d", "--inherit", "auto", "--widths-from"])).widths_from == ()
    with pytest.raises(ValueError, match="^widths_from has 'learned', which is not one of"):
        DetectionRecipe(inherit="auto", widths_from=("learned",)).check()
    with pytest.raises(ValueError, match="^--lookahead-iters 0 must be at least 1"):
        cli.recipe_of(parse(["--dataset-dir", "d", "--inherit", "auto", "--lookahead-iters", "0"]))
    with pytest.raises(ValueError, match="^--lookahead-images -1 must be at least 1"):
        cli.recipe_of(parse(["--dataset-dir", "d", "--lookahead-images", "-1"]))
    with pytest.raises(ValueError, match="^inherit_candidates has 'taylor', which is not one of"):
        DetectionRecipe(inherit="auto", inherit_candidates=("learned", "taylor")).check()
    with pytest.raises(ValueError, match="^inherit_candidates is empty"):
        DetectionRecipe(inherit="auto", inherit_candidates=()).check()
    with pytest.raises(ValueError, match="^lookahead_iters 0 must be at least 1"):  # before any stage work
        prune_baseline(None, "unused", 0.5, inherit="auto", lookahead_iters=0)
    with pytest.raises(ValueError, match="^inherit 'best' is not one of"):
        prune_baseline(None, "unused", 0.5, inherit="best")
