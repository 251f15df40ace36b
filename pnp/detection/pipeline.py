"""The detection pruning pipeline's stages, as ``tools/train_net.py`` runs them.

Each stage reads what the previous one wrote under one output directory:
``baseline/`` (the trained detector), ``pruner/`` (the pruner's weights and its
averaged keep scores, ``keep_scores.safetensors`` as the classification stages write
them), ``pruned/`` (the detector after surgery), ``finetuned/``
(after fine-tuning), ``logs/<stage>/`` (metrics.json, TensorBoard events, the
stage's record, the prune stage's ``keep.json`` and, while a stage trains,
detectron2's periodic checkpoints) and
``report.json`` with the before/after figures. Every detector directory is a
:func:`save_pruned_detector` checkpoint (safetensors).

Like the classification stages, each stage is recorded (:class:`pnp.training.runs.StageDir`):
one that finished with the same settings and the same inputs (by content) is
skipped, one that was interrupted resumes from its last periodic checkpoint
(detectron2's ``resume_or_load``), and one whose settings or inputs changed is
refused rather than overwritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from pnp.core.cost import count_flops_params, measure_latency
from pnp.detection.checkpoint import load_pruned_detector, save_pruned_detector
from pnp.detection.compat import import_detectron2
from pnp.detection.data import compose_fashion_mnist_detection, coco_split_paths, register_coco
from pnp.detection.engine import DetectionTrainer, evaluate_detector, train_pruner
from pnp.detection.modeling import detector_config
from pnp.core.readout import MIN_SHARE
from pnp.detection.pruning import decide_detector_keep, find_detector_groups, prune_detector
from pnp.core.io import (
    KEEP_FILE, KEEP_SCORES_FILE, content_digest, load_keep_scores, save_keep_scores, save_tensors_atomic,
    write_json_atomic, write_keep_decisions,
)
from pnp.core.criteria import CRITERIA
from pnp.training.inherit import (
    AUTO, LEARNED, Inheritance, channels_changed, inheritance_line, keeps_by_candidate, rival_widths,
    select_inheritance,
)
from pnp.training.report import format_count, render_table
from pnp.training.runs import StageDir, is_global_zero

STAGES = ("train", "prune-train", "prune", "finetune")
PRUNER_WEIGHTS = "pruner.safetensors"
REPORT_COLUMNS = (("baseline", "baseline"), ("pruned", "pruned"), ("finetuned", "fine-tuned"))
# what can fill the learned widths: the pruner's picks, or a criterion that needs no loss gradients
INHERIT_SOURCES = (LEARNED, *(name for name, c in CRITERIA.items() if not c.needs_gradients))


def register_splits(dataset_dir: str | Path, num_images: int | None = None, image_size: int = 128,
                    root: str | Path | None = None) -> tuple[str, str]:
    """Register ``dataset_dir``'s COCO train and val splits; with ``num_images`` compose them first.

    Returns the two dataset names. A split whose json is missing raises an error
    naming the path (compose it with ``num_images``, or point at a COCO set).
    """
    dataset_dir = Path(dataset_dir)
    if num_images is not None:
        compose_fashion_mnist_detection(dataset_dir, "train", num_images=num_images, image_size=image_size, root=root)
        compose_fashion_mnist_detection(dataset_dir, "val", num_images=max(1, num_images // 4), image_size=image_size,
                                        seed=1, root=root)
    tag = hashlib.sha1(str(dataset_dir.resolve()).encode()).hexdigest()[:8]
    names = []
    for split in ("train", "val"):
        paths = coco_split_paths(dataset_dir, split)
        names.append(register_coco(f"pnp_det_{tag}_{split}", paths.image_root, paths.json_file))
    return names[0], names[1]


def build_config(train_dataset: str, test_dataset: str, depth: int = 18, image_size: int = 128,
                 config_file: str | None = None, opts: Sequence[str] = (), output_dir: str | Path = "output",
                 meta_architecture: str = "faster_rcnn"):
    """pnp's detector recipe (:func:`detector_config`), then ``config_file``, then ``opts`` overrides."""
    cfg = detector_config(depth=depth, image_size=image_size, train_datasets=[train_dataset], test_datasets=[test_dataset],
                          meta_architecture=meta_architecture)
    if config_file:
        if not Path(config_file).is_file():
            raise FileNotFoundError(f"--config-file {config_file!r} does not exist")
        import yaml

        try:
            cfg.merge_from_file(str(config_file), allow_unsafe=False)  # plain YAML: no Python tags, no code
        except yaml.YAMLError as exc:
            raise ValueError(f"--config-file {config_file!r} is not plain YAML ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0]}); write detectron2 fields as plain values") from None
    cfg.merge_from_list(list(opts))
    cfg.OUTPUT_DIR = str(output_dir)
    if str(cfg.MODEL.WEIGHTS).endswith(".pkl"):
        raise ValueError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r} is a pickle, which loading would execute; "
                         "convert it to a .pth state dict or a pnp checkpoint directory")
    return cfg


def _stage_cfg(cfg, out: Path, stage: str, max_iter: int | None = None, base_lr: float | None = None):
    """The stage's config (its own log folder and schedule); seeds every generator from ``cfg.SEED`` (if >= 0)."""
    import_detectron2()
    from detectron2.utils.env import seed_all_rng

    if int(cfg.SEED) >= 0:
        seed_all_rng(int(cfg.SEED))  # python, numpy, torch; detectron2's samplers draw their seeds from these
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(out / "logs" / stage)  # metrics.json, TensorBoard events, evaluation files
    if max_iter is not None:
        cfg.SOLVER.MAX_ITER = int(max_iter)
    if base_lr is not None:
        cfg.SOLVER.BASE_LR = float(base_lr)
    cfg.SOLVER.WARMUP_ITERS = min(int(cfg.SOLVER.WARMUP_ITERS), max(0, int(cfg.SOLVER.MAX_ITER) // 4))
    cfg.SOLVER.STEPS = tuple(s for s in cfg.SOLVER.STEPS if s < cfg.SOLVER.MAX_ITER)
    Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    return cfg


# config fields that say where or how fast a stage runs, not what it learns
_RUN_FIELDS = ("OUTPUT_DIR", "MODEL.DEVICE", "DATALOADER.NUM_WORKERS")


def stage_settings(cfg, **extra) -> dict:
    """What decides a stage's result: the detectron2 config (without where it runs) and the stage's own arguments."""
    import yaml

    config = yaml.safe_load(cfg.dump())
    for dotted in _RUN_FIELDS:
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return {"detectron2": config, **extra}


def _dataset_files(cfg) -> list[Path]:
    import_detectron2()
    from detectron2.data import MetadataCatalog

    return [Path(MetadataCatalog.get(name).json_file) for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST)
            if getattr(MetadataCatalog.get(name), "json_file", None)]


class TrainingDivergedError(ValueError):
    """A detection stage's losses became NaN or infinite: its settings need changing."""


def run_stage(out: Path, name: str, product: Path, settings: dict, inputs: Sequence[Path], run) -> Path:
    """Run stage ``name`` (``run()`` writes ``product``) unless it finished with these settings and inputs.

    The record lives in ``out/logs/<name>``, which is also the stage's detectron2
    output folder: an interrupted stage finds its periodic checkpoints there and
    resumes. A stage run before with other settings or inputs is refused
    (:class:`pnp.training.runs.StageConflictError`), so no result is silently replaced.
    """
    digests = {str(Path(p).relative_to(out)) if Path(p).is_relative_to(out) else str(p): content_digest(p) for p in inputs}
    stage = StageDir(out / "logs" / name, name, {**settings, "inputs": digests})
    state = stage.check()
    if state == "done" and product.exists():
        print(f"[pnp] stage {name!r} already finished with these settings; reusing {product}", flush=True)
        return product
    resume_from = _resume_checkpoint(stage.path)
    if resume_from is not None and is_global_zero():
        print(f"[pnp] resuming stage {name!r} from {resume_from}", flush=True)
    start = time.perf_counter()
    stage.start()
    try:
        run()
    except FloatingPointError as exc:  # detectron2's trainer stops when a loss is not finite
        raise TrainingDivergedError(
            f"stage {name!r} diverged ({str(exc).strip().splitlines()[0]}): lower the learning rate (SOLVER.BASE_LR, "
            "or --finetune-lr / --pruner-lr for those stages) or lengthen the warm-up (SOLVER.WARMUP_ITERS), "
            f"then delete {stage.path} and run again"
        ) from None
    _synchronize()  # every process reads what rank 0 wrote
    _drop_resume_checkpoints(stage.path)
    stage.finish({"time_s": round(time.perf_counter() - start, 2), "product": str(product)})
    return product


def _synchronize() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _resume_checkpoint(directory: Path) -> Path | None:
    tag = directory / "last_checkpoint"
    if not tag.is_file():
        return None
    path = directory / tag.read_text().strip()
    return path if path.is_file() else None


def _drop_resume_checkpoints(directory: Path) -> None:
    """A finished stage's result is its safetensors checkpoint; the pickled resume points go."""
    if not is_global_zero():
        return
    for path in [*directory.glob("model_*.pth"), directory / "last_checkpoint"]:
        path.unlink(missing_ok=True)


def train_baseline(cfg, out: str | Path) -> Path:
    """Train the detector ``cfg`` describes; write ``out/baseline``."""
    out = Path(out)
    cfg = _stage_cfg(cfg, out, "baseline")

    def run():
        trainer = DetectionTrainer(cfg)
        trainer.resume_or_load(resume=True)
        trainer.train()
        if is_global_zero():
            save_pruned_detector(trainer.student, cfg, out / "baseline", overwrite=True)

    return run_stage(out, "baseline", out / "baseline", stage_settings(cfg), _dataset_files(cfg), run)


def _load_checked(directory: Path, cfg, dataset: str) -> nn.Module:
    return load_pruned_detector(directory, cfg=cfg, dataset=dataset, map_location=cfg.MODEL.DEVICE)


def train_detector_pruner(cfg, out: str | Path, iterations: int, budget: float | None, lr: float = 1e-3,
                          sparsity_weight: float = 1.0, calibration_images: int = 64, scope: str = "detector") -> Path:
    """Train the pruner of ``out/baseline``; write its weights and keep scores to ``out/pruner``.

    ``budget`` is the fraction of the ``scope``'s FLOPs (whole detector or backbone) to keep.
    """
    from pnp.detection.pruning import check_scope, detector_keep_scores, model_budget

    out = Path(out)
    check_scope(scope)
    cfg = _stage_cfg(cfg, out, "pruner")

    def run():
        import_detectron2()
        from detectron2.data import build_detection_test_loader

        detector = _load_checked(out / "baseline", cfg, cfg.DATASETS.TRAIN[0])
        groups = find_detector_groups(detector, cfg.INPUT.MIN_SIZE_TEST, scope=scope)
        loss = {"sparsity_weight": sparsity_weight, "budget": model_budget(groups, budget, scope)}
        pruner = train_pruner(cfg, detector, groups, iterations, lr=lr, loss=loss, output_dir=cfg.OUTPUT_DIR,
                              checkpoint_period=int(cfg.SOLVER.CHECKPOINT_PERIOD))
        loader = build_detection_test_loader(cfg, cfg.DATASETS.TRAIN[0])
        scores = detector_keep_scores(detector, pruner, groups, loader, max_batches=calibration_images)
        if is_global_zero():
            save_tensors_atomic(pruner.state_dict(), out / "pruner" / PRUNER_WEIGHTS)
            save_keep_scores(out / "pruner" / KEEP_SCORES_FILE, scores)

    settings = stage_settings(cfg, iterations=int(iterations), budget=budget, lr=float(lr),
                              sparsity_weight=float(sparsity_weight), calibration_images=int(calibration_images), scope=scope)
    return run_stage(out, "pruner", out / "pruner" / KEEP_SCORES_FILE, settings, [out / "baseline"], run)


def read_scores(out: str | Path) -> dict[str, torch.Tensor]:
    """The keep scores ``out/pruner`` holds."""
    path = Path(out) / "pruner" / KEEP_SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run --stage prune-train first")
    return load_keep_scores(path)


def prune_baseline(cfg, out: str | Path, budget: float | None, scope: str = "detector",
                   scores: dict[str, torch.Tensor] | None = None, name: str = "pruned", inherit: str = "learned",
                   inherit_candidates: Sequence[str] | None = None, lookahead_iters: int | None = None,
                   lookahead_images: int | None = None, lookahead_lr: float | None = None,
                   widths_from: Sequence[str] | None = None, **readout) -> Path:
    """Read out keep scores at ``budget`` (fraction of the ``scope``'s FLOPs), cut ``out/baseline``; write ``out/<name>``.

    ``scores`` default to ``out/pruner``'s; a criterion's scores (``pnp.core.criteria``)
    go through the same read-out and surgery. ``inherit`` chooses which channels fill
    the widths read out: ``"learned"`` (the scores' own picks), a data-free
    criterion (``"l1"``, ``"magnitude"``), or ``"auto"``: the best of
    ``inherit_candidates`` after a short training look-ahead
    (:func:`lookahead_inheritance`: ``lookahead_iters`` iterations at ``lookahead_lr``,
    default ``SOLVER.BASE_LR``, box AP on ``lookahead_images`` held-out training
    images), as the classification stages' weight inheritance does; with a budget the
    read-outs of the ``widths_from`` criteria (their own widths) compete in it too.
    What is left None is :class:`DetectionRecipe`'s default. ``readout`` goes to
    :func:`decide_detector_keep` (``round_to``, ``min_channels``, ``fill``).
    """
    given_lookahead = {"inherit_candidates": None if inherit_candidates is None else tuple(inherit_candidates),
                       "lookahead_iters": lookahead_iters, "lookahead_images": lookahead_images,
                       "widths_from": None if widths_from is None else tuple(widths_from)}
    lookahead = replace(DetectionRecipe(inherit=inherit), **{k: v for k, v in given_lookahead.items() if v is not None})
    lookahead.check()  # the recipe's checks name the field and value
    out = Path(out)
    cfg = _stage_cfg(cfg, out, name)
    given = scores is not None

    def run():
        keep_scores = scores if given else read_scores(out)
        detector = _load_checked(out / "baseline", cfg, cfg.DATASETS.TRAIN[0])
        groups = find_detector_groups(detector, cfg.INPUT.MIN_SIZE_TEST, scope=scope)
        wrong = [g.name for g in groups if g.name not in keep_scores or tuple(keep_scores[g.name].shape) != (g.size,)]
        if wrong:
            raise ValueError(f"the keep scores do not fit the detector's channel groups (e.g. {wrong[0]!r}): were they "
                             f"made for another detector or another scope than {scope!r}?")
        keep, info = decide_detector_keep(groups, keep_scores, budget=budget, scope=scope, **readout)
        info["left_out"] = dict(groups.excluded)
        learned = keep
        if inherit == AUTO:
            from pnp.detection.pruning import rank_detector_channels

            rivals, unusable = rival_widths(lookahead.widths_from, budget, lambda criterion: decide_detector_keep(
                groups, rank_detector_channels(detector, groups, criterion), budget=budget, scope=scope, **readout))
            chosen, evaluated_on = lookahead_inheritance(cfg, out, name, detector, groups, keep, lookahead, lookahead_lr,
                                                         rivals={k: v[0] for k, v in rivals.items()})
            keep = chosen.keep
            if chosen.choice in rivals:  # a criterion's own widths won: its read-out is what is cut
                info = {**rivals[chosen.choice][1], "left_out": info["left_out"], "learned": info}
            info["inheritance"] = {**chosen.to_dict(), "evaluated_on": evaluated_on,
                                   "channels_changed": channels_changed(learned, keep)}
            info["inheritance"]["skipped"].update(unusable)
        elif inherit != LEARNED:
            from pnp.detection.pruning import rank_detector_channels

            keeps, skipped = keeps_by_candidate(groups, keep, [inherit],
                                                functools.partial(rank_detector_channels, detector, groups))
            if not keeps:
                raise ValueError(f"inherit {inherit!r} does not apply to this detector: {skipped[inherit]}")
            keep = keeps[inherit]
        info["inherit"] = inherit
        if is_global_zero():
            print(f"[pnp] {len(groups)} channel groups ({groups.total_channels} channels) pruned under one budget; "
                  f"left out: " + "; ".join(f"{n} ({why})" for n, why in groups.excluded.items()), flush=True)
            if "inheritance" in info:
                print(inheritance_line(info["inheritance"], "training iterations", "box AP on"), flush=True)
        pruned = prune_detector(detector, groups, keep)
        if is_global_zero():
            write_keep_decisions(out / "logs" / name / KEEP_FILE, groups, keep, _plain(info))
            save_pruned_detector(pruned, cfg, out / name, metadata={"readout": _plain(info)}, overwrite=True)

    settings = stage_settings(cfg, budget=budget, scope=scope, **readout)
    if inherit != "learned":
        settings["inherit"] = inherit  # absent for the default, so records made before the option still match
    if inherit == AUTO:  # what decides the look-ahead's choice; no record from before "auto" has these
        settings.update(inherit_candidates=list(lookahead.inherit_candidates), lookahead_iters=int(lookahead.lookahead_iters),
                        lookahead_images=int(lookahead.lookahead_images), lookahead_lr=lookahead_lr,
                        widths_from=list(lookahead.widths_from))
    if given:
        settings["scores"] = hashlib.sha256(json.dumps({k: v.tolist() for k, v in sorted(scores.items())}).encode()).hexdigest()[:16]
    inputs = [out / "baseline"] + ([] if given else [out / "pruner" / KEEP_SCORES_FILE])
    return run_stage(out, name, out / name, settings, inputs, run)


def lookahead_inheritance(cfg, out: Path, name: str, detector: nn.Module, groups, keep: dict[str, torch.Tensor],
                          recipe: "DetectionRecipe", base_lr: float | None = None,
                          rivals: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> tuple[Inheritance, str]:
    """Cut ``detector`` once per ``recipe.inherit_candidates``, train each briefly, take the best box AP.

    Each candidate is trained for ``recipe.lookahead_iters`` iterations by
    detectron2's trainer (:class:`DetectionTrainer`, the config's solver at
    ``base_lr``, default ``SOLVER.BASE_LR``), every one from the same seed and so on
    the same batches, with its logs in ``out/logs/<name>/lookahead/<candidate>``. The validation split is what the
    report's AP is measured on, so the candidates are scored on training images
    instead: ``recipe.lookahead_images`` of them (at most half), held out of the
    look-ahead's training (:func:`_lookahead_splits`). ``rivals`` (``widths:CRITERION``,
    decisions with widths of their own) are scored after the candidates. Returns the
    choice (:func:`pnp.training.inherit.select_inheritance`) and what it was evaluated on.
    """
    import_detectron2()
    from detectron2.utils import comm

    from pnp.detection.pruning import rank_detector_channels

    stage_dir = out / "logs" / name
    trained_on, scored_on, count = _lookahead_splits(cfg.DATASETS.TRAIN[0], recipe.lookahead_images, stage_dir)
    keeps, skipped = keeps_by_candidate(groups, keep, recipe.inherit_candidates,
                                        functools.partial(rank_detector_channels, detector, groups))
    keeps.update({candidate: dict(k) for candidate, k in (rivals or {}).items()})
    seeded = cfg.clone()
    seeded.defrost()
    seeded.SEED = max(int(cfg.SEED), 0)  # _stage_cfg seeds every generator: the same batches for every candidate

    def score(candidate: str, candidate_keep) -> float:
        run_cfg = _stage_cfg(seeded, out, f"{name}/lookahead/{candidate}", recipe.lookahead_iters, base_lr)
        run_cfg.DATASETS.TRAIN, run_cfg.DATASETS.TEST = (trained_on,), ()
        trainer = DetectionTrainer(run_cfg, model=prune_detector(detector, groups, candidate_keep))
        trainer.train()
        run_cfg.DATASETS.TEST = (scored_on,)
        results = DetectionTrainer.test(run_cfg, trainer.student)  # rank 0 gathers every process's share
        _drop_resume_checkpoints(Path(run_cfg.OUTPUT_DIR))
        return _finite(results.get("bbox", {}).get("AP")) or 0.0  # COCOEvaluator's NaN: no detections at all

    chosen = select_inheritance(keeps, score, skipped, steps=recipe.lookahead_iters, metric="AP")
    chosen = comm.all_gather(chosen)[0]  # rank 0 scored every held-out image: its choice holds on every rank
    return chosen, f"{count} training images the look-ahead did not train on"


def _lookahead_splits(train: str, images: int, stage_dir: Path) -> tuple[str, str, int]:
    """Register ``train`` less ``images`` evenly spaced images (at most half), and those images; and their count.

    The names carry a digest of ``stage_dir``, whose look-ahead folders hold the
    held-out images' COCO json that the evaluator writes.
    """
    import_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog

    total = len(DatasetCatalog.get(train))
    if total < 2:
        raise ValueError(f"inherit='auto' scores its candidates on training images it does not train on, but {train!r} "
                         f"has {total} image(s); use more training images or a fixed inherit (e.g. 'learned')")
    count = min(int(images), total // 2)
    held_out = {i * total // count for i in range(count)}  # at least two apart: count <= total / 2
    tag = hashlib.sha1(f"{stage_dir.resolve()}:{count}".encode()).hexdigest()[:8]
    names = (f"{train}_lookahead_{tag}_train", f"{train}_lookahead_{tag}_heldout")
    metadata = {k: v for k, v in MetadataCatalog.get(train).as_dict().items() if k not in ("name", "json_file")}
    for split, scored in zip(names, (False, True)):
        if split not in DatasetCatalog.list():
            DatasetCatalog.register(split, lambda scored=scored: [
                d for i, d in enumerate(DatasetCatalog.get(train)) if (i in held_out) == scored])
            MetadataCatalog.get(split).set(**metadata)
    return names[0], names[1], count


def criterion_scores(cfg, out: str | Path, criterion: str, scope: str = "detector") -> dict[str, torch.Tensor]:
    """Keep scores of ``out/baseline``'s channels by a data-free criterion, for :func:`prune_baseline`."""
    from pnp.detection.pruning import rank_detector_channels

    detector = _load_checked(Path(out) / "baseline", cfg, cfg.DATASETS.TRAIN[0])
    groups = find_detector_groups(detector, cfg.INPUT.MIN_SIZE_TEST, scope=scope)
    return rank_detector_channels(detector, groups, criterion)


def finetune_pruned(cfg, out: str | Path, kd_fpn: float = 0.0, kd_cls: float = 0.0, max_iter: int | None = None,
                    base_lr: float | None = None, source: str = "pruned", name: str = "finetuned") -> Path:
    """Fine-tune ``out/<source>`` in detectron2's trainer, distilled from ``out/baseline`` when asked.

    Writes ``out/<name>``. ``source="baseline"`` gives the control: the unpruned
    detector trained on by the same schedule.
    """
    out = Path(out)
    cfg = _stage_cfg(cfg, out, name, max_iter, base_lr)
    distil = kd_fpn > 0 or kd_cls > 0

    def run():
        student = _load_checked(out / source, cfg, cfg.DATASETS.TRAIN[0])
        teacher = _load_checked(out / "baseline", cfg, cfg.DATASETS.TRAIN[0]) if distil else None
        trainer = DetectionTrainer(cfg, model=student, teacher=teacher, kd_fpn=kd_fpn, kd_cls=kd_cls)
        trainer.resume_or_load(resume=True)
        trainer.train()
        if is_global_zero():
            save_pruned_detector(trainer.student, cfg, out / name, overwrite=True)

    settings = stage_settings(cfg, kd_fpn=float(kd_fpn), kd_cls=float(kd_cls), source=source)
    inputs = [out / source] + ([out / "baseline"] if distil and source != "baseline" else [])
    return run_stage(out, name, out / name, settings, inputs, run)


class DetectorOnImages(nn.Module):
    """A detector called on an image tensor batch, for latency measurement."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor):
        return self.detector([{"image": image} for image in images])


def detector_summary(model: nn.Module, cfg, dataset: str, repeats: int = 5) -> dict:
    """AP figures, backbone and whole-detector FLOPs (on the dataset's first image) and params, CPU latency."""
    import_detectron2()
    from detectron2.data import build_detection_test_loader

    model = model.to("cpu").eval()
    ap = evaluate_detector(model, cfg, dataset)
    first = next(iter(build_detection_test_loader(cfg, dataset)))
    x = model.preprocess_image(first).tensor
    backbone = count_flops_params(model.backbone, x)
    total = count_flops_params(model, (first,))
    shape = tuple(first[0]["image"].shape)
    latency = {
        "backbone_ms": measure_latency(model.backbone, tuple(x.shape[1:]), threads=(1,), repeats=repeats)[0].median_ms,
        "detector_ms": measure_latency(DetectorOnImages(model), shape, threads=(1,), repeats=repeats)[0].median_ms,
    }
    return {
        **{k: _finite(ap.get(k)) for k in ("AP", "AP50", "AP75")},
        "backbone_flops": backbone.flops, "backbone_params": backbone.params,
        "flops": total.flops, "params": total.params, "input_shape": list(shape),
        "latency": {k: round(v, 3) for k, v in latency.items()},
    }


def write_report(cfg, out: str | Path, durations: dict | None = None, repeats: int = 5) -> dict:
    """Summarise every detector under ``out`` into ``out/report.json``; return the report."""
    out = Path(out)
    dataset = cfg.DATASETS.TEST[0]
    report: dict = {"dataset": dataset, "durations_s": dict(durations or {})}
    for key, _ in REPORT_COLUMNS:
        if (out / key / "channels.json").is_file():
            model = load_pruned_detector(out / key, cfg=cfg, dataset=dataset)
            report[key] = detector_summary(model, cfg, dataset, repeats=repeats)
            if key == "pruned":
                report[key]["readout"] = model.pnp_metadata.get("readout")
    write_json_atomic(out / "report.json", report)
    return report


def format_detection_table(report: dict) -> str:
    """Before/after table: AP, AP50, AP75, backbone and total FLOPs, params, latency per stage."""
    present = [(k, t) for k, t in REPORT_COLUMNS if isinstance(report.get(k), dict)]
    if not present:
        raise ValueError("report has none of 'baseline', 'pruned', 'finetuned'; nothing to tabulate")
    rows = [["", *(t for _, t in present)]]
    for label, key in (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75")):
        rows.append([label] + [_number(report[k].get(key)) for k, _ in present])
    for label, key in (("backbone FLOPs", "backbone_flops"), ("total FLOPs", "flops"),
                       ("backbone params", "backbone_params"), ("params", "params")):
        rows.append([label] + [format_count(report[k].get(key)) for k, _ in present])
    for label, key in (("backbone latency ms (1 thread)", "backbone_ms"), ("detector latency ms (1 thread)", "detector_ms")):
        rows.append([label] + [_number(report[k]["latency"].get(key)) for k, _ in present])
    return render_table(rows)


def _finite(value) -> float | None:
    """COCOEvaluator's NaN (no predictions, or no objects of a size) as JSON's null."""
    return None if value is None or value != value else float(value)


def _number(value) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def _plain(info: dict) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, dict))}


@dataclass(frozen=True)
class DetectionRecipe:
    """What the stages after the baseline do, every default written once.

    ``tools/train_net.py``'s flags default to these fields and the detection benchmark
    starts from them, so what the benchmark measured is what the command runs.
    """

    budget: float | None = 0.5  # fraction of the scope's FLOPs to keep
    scope: str = "detector"  # the whole detector; "backbone" leaves the heads whole
    round_to: int = 8  # channel counts in multiples of this (CPU kernels run faster)
    min_channels: int = 1
    min_share: float = MIN_SHARE  # no group under this share of the uniform keep ratio at the budget
    # which channels fill the learned widths: the pruner's, a criterion's, or "auto": the best after a look-ahead
    inherit: str = "auto"
    inherit_candidates: tuple[str, ...] = ("learned", "l1", "magnitude")  # what inherit="auto" tries
    # inherit="auto": these criteria's own read-outs (their widths, at the same budget) compete too
    widths_from: tuple[str, ...] = ("magnitude",)
    lookahead_iters: int = 100  # inherit="auto": training iterations per candidate, at the fine-tuning lr
    lookahead_images: int = 64  # inherit="auto": training images held out to score the candidates on (box AP)
    pruner_iters: int = 100
    pruner_lr: float = 1e-3
    sparsity_weight: float = 1.0
    kd_fpn: float = 1.0  # fine-tuning: imitation of the teacher's kept FPN channels
    kd_cls: float = 1.0  # fine-tuning: RoI class-logit distillation (R-CNNs; RetinaNet has none)
    finetune_iters: int | None = None  # None: SOLVER.MAX_ITER
    finetune_lr: float | None = None  # None: SOLVER.BASE_LR

    def check(self, meta_architecture: str = "faster_rcnn") -> None:
        """Raise ValueError naming the field and value for what no stage could use."""
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget {self.budget} is outside (0, 1]: it is the fraction of FLOPs to keep, e.g. 0.5")
        for name in ("pruner_iters", "round_to", "min_channels", "lookahead_iters", "lookahead_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        if self.inherit not in (*INHERIT_SOURCES, AUTO):
            raise ValueError(f"inherit {self.inherit!r} is not one of {[*INHERIT_SOURCES, AUTO]}")
        if not self.inherit_candidates:
            raise ValueError(f"inherit_candidates is empty: name at least one of {list(INHERIT_SOURCES)} for inherit='auto'")
        for name in self.inherit_candidates:
            if name not in INHERIT_SOURCES:
                raise ValueError(f"inherit_candidates has {name!r}, which is not one of {list(INHERIT_SOURCES)}")
        for name in self.widths_from:
            if name not in INHERIT_SOURCES or name == LEARNED:
                raise ValueError(f"widths_from has {name!r}, which is not one of {list(INHERIT_SOURCES[1:])}")
        if not 0.0 <= self.min_share <= 1.0:
            raise ValueError(f"min_share {self.min_share} is outside [0, 1]: it is the share of the uniform keep "
                             "ratio every group keeps at least (0: no floor)")
        for name in ("kd_fpn", "kd_cls", "sparsity_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 0")
        if self.kd_cls > 0 and meta_architecture == "retinanet":
            raise ValueError("kd_cls distils RoI class logits, which RetinaNet has not; set it to 0 and use kd_fpn")

    def for_architecture(self, meta_architecture: str) -> "DetectionRecipe":
        """This recipe with what ``meta_architecture`` has not turned off (RetinaNet: no RoI class logits)."""
        return replace(self, kd_cls=0.0) if meta_architecture == "retinanet" else self


def run_stages(stages: Sequence[str], cfg, out: str | Path, recipe: DetectionRecipe = DetectionRecipe(),
               report: bool = True) -> dict | None:
    """Run ``stages`` in order (a subset of :data:`STAGES`) as ``recipe`` says, then write and print the report."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; use {list(STAGES)} or 'all'")
    out = Path(out)
    durations = {}
    for stage in stages:
        start = time.perf_counter()
        r = recipe
        if stage == "train":
            train_baseline(cfg, out)
        elif stage == "prune-train":
            train_detector_pruner(cfg, out, r.pruner_iters, r.budget, lr=r.pruner_lr, sparsity_weight=r.sparsity_weight,
                                  scope=r.scope)
        elif stage == "prune":
            prune_baseline(cfg, out, r.budget, scope=r.scope, inherit=r.inherit, inherit_candidates=r.inherit_candidates,
                           widths_from=r.widths_from,
                           lookahead_iters=r.lookahead_iters, lookahead_images=r.lookahead_images,
                           lookahead_lr=r.finetune_lr, round_to=r.round_to, min_channels=r.min_channels,
                           min_share=r.min_share)
        else:
            finetune_pruned(cfg, out, r.kd_fpn, r.kd_cls, r.finetune_iters, r.finetune_lr)
        durations[stage] = round(time.perf_counter() - start, 2)
    if not report or not is_global_zero():
        return None
    result = write_report(cfg, out, durations)
    print(format_detection_table(result))
    return result
