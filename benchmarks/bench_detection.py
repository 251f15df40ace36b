"""Detection: a whole detector pruned by pnp against a criterion, fine-tuned with and without distillation.

On the composed Fashion-MNIST detection set (pnp.detection.data), for each model
of the profile (Faster R-CNN R18-FPN, R50-FPN, RetinaNet R18-FPN): train the
baseline detector, train the pruner of the whole detector (trunk, FPN, RPN or
RetinaNet head, RoI box head) with the detector's losses, cut it to the FLOPs
budget in one shot, then fine-tune the pruned detector once per variant (no
distillation; distillation) with the same schedule. Beside it: a criterion
(Torch-Pruning's group magnitude) read out at the same budget through the same
surgery and fine-tuned with distillation, and the control, the unpruned baseline
trained on by that schedule. Every detector is evaluated with detectron2's
COCOEvaluator on the val split; FLOPs, params and CPU latency are given for the
whole detector and for its backbone.

    python benchmarks/bench_detection.py --profile quick        # CPU, 40-90 min a model on 2 cores
    python benchmarks/bench_detection.py --profile quick --set seed=1
    python benchmarks/bench_detection.py --profile quick --set models=retinanet:18 --set base_lr=0.005 \
        --set recipe.finetune_lr=0.0025 --out benchmarks/results/detection/quick-retinanet-s0   # diverges at 0.02
    python benchmarks/bench_detection.py --profile quick --set recipe.budget=0.3 --set recipe.inherit=auto
    python benchmarks/bench_detection.py --profile full --device cuda

A profile is an OmegaConf dotlist over :class:`Profile`: the benchmark's own settings
(data, baseline schedule, criterion, seed) and ``recipe``, pnp's detection recipe
(``pnp.detection.pipeline.DetectionRecipe``, the defaults ``tools/train_net.py`` runs)
as ``recipe.FIELD``. ``--set KEY=VALUE`` adds entries to it; ``models`` is a list,
``models=[faster_rcnn:18,retinanet:18]`` or ``models=faster_rcnn:18,retinanet:18``.

The stages are pnp's own (``pnp.detection.pipeline``, what ``tools/train_net.py``
runs), with their records: a finished stage is reused, an interrupted one resumes,
one with other settings is refused. Writes, under --out (default
``benchmarks/results/detection/<profile>-s<seed>``): ``<model>/`` with each
stage's detector and each detector's figures (``summaries/``), ``results.json``
(every record, the machine, the commit) and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods.environment import environment  # noqa: E402  (beside this file: the machine and commit of a result)

from pnp.detection.checkpoint import load_pruned_detector  # noqa: E402
from pnp.detection.pipeline import (  # noqa: E402
    DetectionRecipe, build_config, criterion_scores, detector_summary, finetune_pruned, prune_baseline,
    register_splits, train_baseline, train_detector_pruner,
)
from pnp.core.io import read_json, write_json_atomic, write_text_atomic  # noqa: E402
from pnp.training.runs import script_main  # noqa: E402


@dataclass(frozen=True)
class Profile:
    """Everything that decides a result: the benchmark's own settings and pnp's detection recipe."""

    models: tuple[str, ...] = ("faster_rcnn:18",)  # meta-architecture:ResNet depth
    num_images: int = 600  # composed training images; val gets a quarter
    image_size: int = 128
    ims_per_batch: int = 4
    baseline_iters: int = 600
    base_lr: float = 0.02
    criterion: str = "magnitude"  # the criterion row, read out and cut like pnp's
    seed: int = 0
    latency_repeats: int = 5
    # what every stage after the baseline does, with the product's defaults (RetinaNet runs it with
    # kd_cls 0: it has no RoI class logits)
    recipe: DetectionRecipe = field(default_factory=DetectionRecipe)


# each profile: where it differs from Profile's defaults, as OmegaConf dotlist entries. Every
# fine-tuning, and the look-ahead of recipe.inherit=auto, runs at half the baseline's lr.
PROFILES: dict[str, tuple[str, ...]] = {
    "quick": ("recipe.finetune_iters=200", "recipe.finetune_lr=0.01"),
    "full": ("models=[faster_rcnn:18,faster_rcnn:50,retinanet:18]", "num_images=8000", "image_size=256",
             "ims_per_batch=16", "baseline_iters=9000", "latency_repeats=20", "recipe.pruner_iters=1500",
             "recipe.finetune_iters=4500", "recipe.finetune_lr=0.01"),
    "smoke": ("num_images=16", "image_size=64", "ims_per_batch=2", "baseline_iters=4", "latency_repeats=1",
              "recipe.round_to=1", "recipe.pruner_iters=2", "recipe.lookahead_iters=2", "recipe.finetune_iters=2",
              "recipe.finetune_lr=0.01"),
}
RECIPE_FIELDS = {f.name for f in fields(DetectionRecipe)}
# fine-tunings of the pruned detector: name -> (distil?), and the criterion's with distillation
VARIANTS = {"no_kd": False, "kd": True}
CONTROL = "baseline_continued"  # the folder of the control, and its key in the records
RESULTS = Path(__file__).resolve().parent / "results" / "detection"
META_NAMES = {"faster_rcnn": "faster_rcnn", "retinanet": "retinanet"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotlist entry over the profile, e.g. seed=1 or recipe.budget=0.3 (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dataset-dir", default=None, help="default: data/ beside the default --out, else <out>/data")
    p.add_argument("--fashion-root", default=None, help="Fashion-MNIST IDX files (default: the usual places)")
    p.add_argument("--out", default=None, help=f"default: {RESULTS}/<profile>-s<seed>")
    return p.parse_args(argv)


def compose_profile(name: str, sets: Sequence[str] = ()) -> Profile:
    """Profile ``name``: its dotlist, then ``sets`` (``--set``), over :class:`Profile`'s defaults.

    OmegaConf checks every key and type, then the product checks the recipe for every
    model (:meth:`DetectionRecipe.check`); what either refuses ends the script with a
    message naming the key and value.
    """
    cfg = OmegaConf.structured(Profile)
    OmegaConf.set_readonly(cfg.recipe, None)  # OmegaConf reads a frozen dataclass as "no overrides"
    for source, text in [(f"--profile {name}", t) for t in PROFILES[name]] + [("--set", t) for t in sets]:
        key, sep, value = text.partition("=")
        if not sep:
            raise SystemExit(f"{source} {text!r} is not KEY=VALUE (e.g. seed=1 or recipe.budget=0.3)")
        entry = f"models=[{value}]" if key == "models" and not value.startswith("[") else text  # models=a:18,b:50
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([entry]))
        except OmegaConfBaseException as exc:
            hint = f"; pnp's recipe is set as recipe.{key}" if key in RECIPE_FIELDS else ""
            raise SystemExit(f"{source} {text!r}: {str(exc).splitlines()[0]}{hint}") from None
    given = OmegaConf.to_container(cfg)
    recipe = DetectionRecipe(**_as_tuples(given.pop("recipe")))
    profile = Profile(**_as_tuples(given), recipe=recipe)
    for text in profile.models:
        arch, _ = parse_model(text)
        try:
            recipe.for_architecture(arch).check(arch)
        except ValueError as exc:  # the product's messages start with the field's name
            raise SystemExit(f"recipe.{exc}") from None
    return profile


def _as_tuples(values: dict) -> dict:
    """OmegaConf's lists as the tuples the dataclasses hold, so that a recipe equals the product's."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def parse_model(text: str) -> tuple[str, int]:
    arch, _, depth = text.partition(":")
    if arch not in META_NAMES or not depth.isdigit():
        raise SystemExit(f"--set models: {text!r} is not META:DEPTH with META one of {sorted(META_NAMES)} (e.g. faster_rcnn:18)")
    return arch, int(depth)


def model_name(arch: str, depth: int) -> str:
    return f"{arch}_R{depth}_FPN"


def stage_config(profile: Profile, arch: str, depth: int, datasets: tuple[str, str], out: Path, device: str):
    cfg = build_config(*datasets, depth=depth, image_size=profile.image_size, output_dir=out, meta_architecture=arch)
    cfg.defrost()
    cfg.MODEL.DEVICE = device
    cfg.SEED = profile.seed
    cfg.SOLVER.IMS_PER_BATCH = profile.ims_per_batch
    cfg.SOLVER.MAX_ITER = profile.baseline_iters
    cfg.SOLVER.BASE_LR = profile.base_lr
    cfg.SOLVER.STEPS = (int(profile.baseline_iters * 0.75),)
    cfg.TEST.EVAL_PERIOD = 0  # evaluated once, in the summaries
    return cfg


def run_model(profile: Profile, arch: str, depth: int, datasets: tuple[str, str], out: Path, device: str) -> list[dict]:
    """Every stage of one model (each reused when finished); its records, one per fine-tuned variant."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = stage_config(profile, arch, depth, datasets, out, device)
    r = profile.recipe.for_architecture(arch)
    if r != profile.recipe:
        changed = {k: v for k, v in asdict(r).items() if asdict(profile.recipe)[k] != v}
        print(f"[bench] {arch} runs the recipe with {changed}: it lacks what those fields act on "
              "(RetinaNet: RoI class logits); its rows record the recipe as it ran", flush=True)
    kd = {"kd_fpn": r.kd_fpn, "kd_cls": r.kd_cls}
    schedule = {"max_iter": r.finetune_iters, "base_lr": r.finetune_lr}
    readout = {"round_to": r.round_to, "min_channels": r.min_channels, "min_share": r.min_share}
    train_baseline(cfg, out)
    train_detector_pruner(cfg, out, r.pruner_iters, r.budget, lr=r.pruner_lr, sparsity_weight=r.sparsity_weight,
                          scope=r.scope)
    prune_baseline(cfg, out, r.budget, scope=r.scope, inherit=r.inherit, inherit_candidates=r.inherit_candidates,
                   widths_from=r.widths_from, lookahead_iters=r.lookahead_iters, lookahead_images=r.lookahead_images, lookahead_lr=r.finetune_lr,
                   **readout)
    criterion = f"pruned_{profile.criterion}"
    if not (out / criterion).is_dir():
        scores = criterion_scores(cfg, out, profile.criterion, scope=r.scope)
        prune_baseline(cfg, out, r.budget, scope=r.scope, scores=scores, name=criterion, **readout)
    # every fine-tuning by the same schedule, and the control: the unpruned baseline trained on,
    # so that the pruned detectors' extra iterations are not mistaken for a gain from pruning
    finetune_pruned(cfg, out, source="baseline", name=CONTROL, **schedule)
    for variant, distil in VARIANTS.items():
        finetune_pruned(cfg, out, **(kd if distil else {}), source="pruned", name=f"finetuned_{variant}", **schedule)
    finetune_pruned(cfg, out, **kd, source=criterion, name=f"finetuned_{profile.criterion}_kd", **schedule)

    names = ["baseline", CONTROL, "pruned", criterion, *(f"finetuned_{v}" for v in VARIANTS), f"finetuned_{profile.criterion}_kd"]
    summaries = {name: summarize(out, name, cfg, profile.latency_repeats) for name in names}
    seconds = stage_seconds(out)
    rows = [("pnp", variant, "pruned", f"finetuned_{variant}") for variant in VARIANTS]
    rows.append((profile.criterion, "kd", criterion, f"finetuned_{profile.criterion}_kd"))
    return [record(summaries, seconds, model_name(arch, depth), method, variant, before, after, profile.seed, r)
            for method, variant, before, after in rows]


def stage_seconds(out: Path) -> dict[str, float]:
    """Wall time of each finished stage, from its record."""
    times = {}
    for report in sorted((out / "logs").glob("*/report.json")):
        times[report.parent.name] = read_json(report).get("time_s")
    return times


def summarize(out: Path, name: str, cfg, repeats: int) -> dict:
    """AP, FLOPs, params and latency of the detector in ``out/<name>``, measured once (``out/summaries/``)."""
    path = out / "summaries" / f"{name}.json"
    if not path.is_file():
        test = cfg.DATASETS.TEST[0]
        model = load_pruned_detector(out / name, cfg=cfg, dataset=test)
        summary = detector_summary(model, cfg, test, repeats=repeats)
        if "readout" in model.pnp_metadata:
            summary["readout"] = model.pnp_metadata["readout"]
        write_json_atomic(path, summary)
    return json.loads(path.read_text())


def record(summaries: dict, seconds: dict, model: str, method: str, variant: str, before: str, after: str,
           seed: int, recipe: DetectionRecipe) -> dict:
    """One row of the results; ``recipe`` is the one the model ran (records before it held only scope and budget)."""
    base, pruned, tuned, control = summaries["baseline"], summaries[before], summaries[after], summaries[CONTROL]
    selection = ["pruner", "pruned"] if method == "pnp" else [before]
    return {
        "model": model, "method": method, "variant": variant, "seed": seed, "recipe": asdict(recipe),
        "flops_removed": round(1.0 - tuned["flops"] / base["flops"], 4),
        "backbone_flops_removed": round(1.0 - tuned["backbone_flops"] / base["backbone_flops"], 4),
        "latency_speedup": _ratio(base, tuned, "detector_ms"),
        "backbone_latency_speedup": _ratio(base, tuned, "backbone_ms"),
        "baseline": _figures(base), "pruned": _figures(pruned), "finetuned": _figures(tuned),
        "baseline_continued": _figures(control),
        "ap_change": _change(tuned, base), "ap_change_vs_continued": _change(tuned, control),
        "readout": pruned.get("readout"),
        "wall_s": {"train": seconds.get("baseline"), "selection": sum(seconds.get(s) or 0.0 for s in selection),
                   "finetune": seconds.get(after)},
    }


def _ratio(base: dict, tuned: dict, key: str) -> float | None:
    b, t = (base.get("latency") or {}).get(key), (tuned.get("latency") or {}).get(key)
    return round(b / t, 3) if b and t else None


def _change(after: dict, before: dict) -> float | None:
    return None if after["AP"] is None or before["AP"] is None else round(after["AP"] - before["AP"], 2)


def _figures(summary: dict) -> dict:
    keys = ("AP", "AP50", "AP75", "backbone_flops", "flops", "backbone_params", "params")
    return {**{k: summary.get(k) for k in keys}, "latency_ms": summary.get("latency")}


def format_table(records: list[dict]) -> str:
    header = ["model", "detector", "AP", "AP50", "GFLOPs", "backbone GFLOPs", "params (M)", "ms", "backbone ms",
              "AP vs baseline", "AP vs control"]
    rows, seen = [], set()
    for r in records:
        label = "pnp" if r["method"] == "pnp" else f"{r['method']} (criterion)"
        stages = [(f"{label}, fine-tuned {r['variant']}", r["finetuned"])]
        if r["method"] != "pnp" or r["variant"] == "no_kd":
            stages[:0] = [(f"{label}, before fine-tuning", r["pruned"])]
        if r["model"] not in seen:
            stages[:0] = [("baseline", r["baseline"]), ("baseline trained on (control)", r["baseline_continued"])]
            seen.add(r["model"])
        for name, f in stages:
            versus = [("" if f is ref else _signed(_change(f, ref))) for ref in (r["baseline"], r["baseline_continued"])]
            latency = f["latency_ms"] or {}
            rows.append([r["model"], name, _num(f["AP"]), _num(f["AP50"]), f"{f['flops'] / 1e9:.3f}",
                         f"{f['backbone_flops'] / 1e9:.3f}", f"{f['params'] / 1e6:.2f}",
                         _num(latency.get("detector_ms")), _num(latency.get("backbone_ms")), *versus])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _signed(value) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    profile = compose_profile(args.profile, args.set)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device!r}: no CUDA device is visible; use --device cpu")
    out = Path(args.out) if args.out else RESULTS / f"{args.profile}-s{profile.seed}"
    dataset_dir = Path(args.dataset_dir) if args.dataset_dir else (out / "data" if args.out else RESULTS / "data")
    datasets = register_splits(dataset_dir, profile.num_images, profile.image_size, args.fashion_root)
    models = [parse_model(text) for text in profile.models]
    settings_path = out / "settings.json"
    settings = {k: v for k, v in json.loads(json.dumps(asdict(profile))).items() if k != "models"}  # as stored
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
        raise SystemExit(f"{out} holds results made with other settings ({settings_path}); pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_path, settings)

    for arch, depth in models:
        directory = out / model_name(arch, depth)
        records = run_model(profile, arch, depth, datasets, directory, args.device)
        write_json_atomic(directory / "records.json", {"environment": environment(args.device), "records": records})
    # every model measured in this folder so far, each with the machine and commit it ran on
    runs = [read_json(p) for p in sorted(out.glob("*/records.json"))]
    records = [r for run in runs for r in run["records"]]
    results = {"profile": args.profile, "settings": settings, "environments": [run["environment"] for run in runs],
               "records": records}
    write_json_atomic(out / "results.json", results)
    table = format_table(records)
    write_text_atomic(out / "table.md", table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    script_main(main)  # bad input: its message, status 2
