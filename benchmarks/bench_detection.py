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
        --set finetune_lr=0.0025 --out benchmarks/results/detection/quick-retinanet-s0   # diverges at 0.02
    python benchmarks/bench_detection.py --profile full --device cuda

The stages are pnp's own (``pnp.detection.pipeline``, what ``tools/train_net.py``
runs), with their records: a finished stage is reused, an interrupted one resumes,
one with other settings is refused. Writes, under --out (default
``benchmarks/results/detection/<profile>-s<seed>``): ``<model>/`` with each
stage's detector and each detector's figures (``summaries/``), ``results.json``
(every record, the machine, the commit) and ``table.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods.environment import environment  # noqa: E402  (beside this file: the machine and commit of a result)

from pnp.detection.checkpoint import load_pruned_detector  # noqa: E402
from pnp.detection.pipeline import (  # noqa: E402
    build_config, criterion_scores, detector_summary, finetune_pruned, prune_baseline, register_splits,
    train_baseline, train_detector_pruner,
)
from pnp.detection.pipeline import DetectionRecipe  # noqa: E402
from pnp.core.io import read_json, write_json_atomic, write_text_atomic  # noqa: E402

RECIPE = DetectionRecipe()


@dataclass(frozen=True)
class Profile:
    """Everything that decides a result; ``--set FIELD=VALUE`` overrides a field."""

    models: tuple[str, ...] = ("faster_rcnn:18",)  # meta-architecture:ResNet depth
    num_images: int = 600  # composed training images; val gets a quarter
    image_size: int = 128
    ims_per_batch: int = 4
    baseline_iters: int = 600
    base_lr: float = 0.02
    # pnp's recipe (tools/train_net.py's defaults), unless a profile or --set says otherwise
    budget: float = RECIPE.budget  # fraction of the scope's FLOPs kept
    scope: str = RECIPE.scope
    round_to: int = RECIPE.round_to
    inherit: str = RECIPE.inherit  # "auto": the look-ahead picks which channels fill the learned widths
    lookahead_iters: int = RECIPE.lookahead_iters
    pruner_iters: int = RECIPE.pruner_iters
    pruner_lr: float = RECIPE.pruner_lr
    kd_fpn: float = RECIPE.kd_fpn  # the distilled variants' weights
    kd_cls: float = RECIPE.kd_cls  # (RetinaNet has no RoI class logits: 0 there)
    criterion: str = "magnitude"  # the criterion row, read out and cut like pnp's
    finetune_iters: int = 200
    finetune_lr: float = 0.01
    seed: int = 0
    latency_repeats: int = 5


PROFILES = {
    "quick": Profile(),
    "full": Profile(models=("faster_rcnn:18", "faster_rcnn:50", "retinanet:18"), num_images=8000, image_size=256, ims_per_batch=16, baseline_iters=9000,
                    pruner_iters=1500, finetune_iters=4500, latency_repeats=20),
    "smoke": Profile(num_images=16, image_size=64, ims_per_batch=2, baseline_iters=4, pruner_iters=2,
                     finetune_iters=2, latency_repeats=1, round_to=1),
}
# fine-tunings of the pruned detector: name -> (distil?), and the criterion's with distillation
VARIANTS = {"no_kd": False, "kd": True}
CONTROL = "baseline_continued"  # the folder of the control, and its key in the records
RESULTS = Path(__file__).resolve().parent / "results" / "detection"
META_NAMES = {"faster_rcnn": "faster_rcnn", "retinanet": "retinanet"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a profile field")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dataset-dir", default=None, help="default: data/ beside the default --out, else <out>/data")
    p.add_argument("--fashion-root", default=None, help="Fashion-MNIST IDX files (default: the usual places)")
    p.add_argument("--out", default=None, help=f"default: {RESULTS}/<profile>-s<seed>")
    return p.parse_args(argv)


def apply_overrides(profile: Profile, assignments: list[str]) -> Profile:
    fields = {f.name: f for f in dataclasses.fields(Profile)}
    for text in assignments:
        name, sep, raw = text.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set {text!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        current = getattr(profile, name)
        try:
            if isinstance(current, tuple):
                value = tuple(v for v in raw.split(",") if v)
            else:
                value = type(current)(raw)
        except ValueError:
            raise SystemExit(f"--set {text!r}: {raw!r} is not a {type(current).__name__}") from None
        profile = replace(profile, **{name: value})
    return profile


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
    r = replace(RECIPE, budget=profile.budget, scope=profile.scope, round_to=profile.round_to, inherit=profile.inherit,
                lookahead_iters=profile.lookahead_iters, pruner_iters=profile.pruner_iters, pruner_lr=profile.pruner_lr, kd_fpn=profile.kd_fpn,
                kd_cls=profile.kd_cls).for_architecture(arch)
    kd = {"kd_fpn": r.kd_fpn, "kd_cls": r.kd_cls}
    schedule = {"max_iter": profile.finetune_iters, "base_lr": profile.finetune_lr}
    readout = {"round_to": r.round_to, "min_channels": r.min_channels, "min_share": r.min_share}
    train_baseline(cfg, out)
    train_detector_pruner(cfg, out, r.pruner_iters, r.budget, lr=r.pruner_lr, sparsity_weight=r.sparsity_weight,
                          scope=r.scope)
    prune_baseline(cfg, out, r.budget, scope=r.scope, inherit=r.inherit, inherit_candidates=r.inherit_candidates,
                   lookahead_iters=r.lookahead_iters, lookahead_images=r.lookahead_images, lookahead_lr=profile.finetune_lr,
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
    return [record(summaries, seconds, model_name(arch, depth), method, variant, before, after, profile)
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
           profile: Profile) -> dict:
    base, pruned, tuned, control = summaries["baseline"], summaries[before], summaries[after], summaries[CONTROL]
    selection = ["pruner", "pruned"] if method == "pnp" else [before]
    return {
        "model": model, "method": method, "variant": variant, "seed": profile.seed, "scope": profile.scope,
        "budget": profile.budget,
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
    profile = apply_overrides(PROFILES[args.profile], args.set)
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
    main()
