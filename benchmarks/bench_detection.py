"""Detection: a Faster R-CNN R-FPN pruned by pnp, fine-tuned with and without distillation.

On the composed Fashion-MNIST detection set (pnp.detection.data): train the
baseline detector, train the pruner of its backbone with the detector's losses,
cut the backbone to the FLOPs budget in one shot, then fine-tune the pruned
detector once per variant (no distillation; FPN feature imitation plus RoI
class-logit distillation) with the same schedule, and train the unpruned baseline
on by that schedule too (the control: it has had as many iterations as the pruned
detectors). Every detector is evaluated with detectron2's COCOEvaluator on the
val split.

    python benchmarks/bench_detection.py --profile quick        # CPU, under an hour on 2 cores
    python benchmarks/bench_detection.py --profile quick --set seed=1
    python benchmarks/bench_detection.py --profile full --device cuda
    python benchmarks/bench_detection.py --profile quick --set finetune_iters=200

Every stage is seeded from the profile's ``seed`` (``--set seed=1``). Writes, under
--out (default ``benchmarks/results/detection/<profile>-s<seed>``): ``r<depth>/``
with each stage's detector (``baseline``, ``pruned``, ``finetuned_<variant>``,
``baseline_continued``; reused when present) and each detector's figures
(``summaries/``), ``results.json`` (every record, the machine, the commit) and
``table.md``. A stage whose output exists is not run again; delete the
folder to redo it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import environment  # noqa: E402  (this folder: the machine and commit of a result)

from pnp.detection.checkpoint import load_pruned_detector  # noqa: E402
from pnp.detection.pipeline import (  # noqa: E402
    build_config, detector_summary, finetune_pruned, format_detection_table, prune_baseline, register_splits, train_backbone_pruner,
    train_baseline,
)
from pnp.training.report import write_json_atomic, write_text_atomic  # noqa: E402


@dataclass(frozen=True)
class Profile:
    """Everything that decides a result; ``--set FIELD=VALUE`` overrides a field."""

    depths: tuple[int, ...] = (18,)
    num_images: int = 600  # composed training images; val gets a quarter
    image_size: int = 128
    ims_per_batch: int = 8
    baseline_iters: int = 600
    base_lr: float = 0.02
    budget: float = 0.6  # fraction of backbone FLOPs kept
    pruner_iters: int = 100
    pruner_lr: float = 1e-3
    finetune_iters: int = 300
    finetune_lr: float = 0.01
    kd_fpn: float = 1.0  # the distilled variant's weights
    kd_cls: float = 1.0
    seed: int = 0
    latency_repeats: int = 5


PROFILES = {
    "quick": Profile(),
    "full": Profile(depths=(18, 50), num_images=8000, image_size=256, ims_per_batch=16, baseline_iters=9000,
                    pruner_iters=1500, finetune_iters=4500, latency_repeats=20),
    "smoke": Profile(num_images=16, image_size=64, ims_per_batch=2, baseline_iters=4, pruner_iters=2,
                     finetune_iters=2, latency_repeats=1),
}
VARIANTS = ("no_kd", "kd")
CONTROL = "baseline_continued"  # the folder of the control, and its key in the records
RESULTS = Path(__file__).resolve().parent / "results" / "detection"


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
                value = tuple(int(v) for v in raw.split(",") if v)
            else:
                value = type(current)(raw)
        except ValueError:
            raise SystemExit(f"--set {text!r}: {raw!r} is not a {type(current).__name__}") from None
        profile = replace(profile, **{name: value})
    return profile


def stage_config(profile: Profile, depth: int, datasets: tuple[str, str], out: Path, device: str):
    cfg = build_config(*datasets, depth=depth, image_size=profile.image_size, output_dir=out)
    cfg.defrost()
    cfg.MODEL.DEVICE = device
    cfg.SEED = profile.seed
    cfg.SOLVER.IMS_PER_BATCH = profile.ims_per_batch
    cfg.SOLVER.MAX_ITER = profile.baseline_iters
    cfg.SOLVER.BASE_LR = profile.base_lr
    cfg.SOLVER.STEPS = (int(profile.baseline_iters * 0.75),)
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9  # the stage's detector is saved at its end
    cfg.TEST.EVAL_PERIOD = 0  # evaluated once, in the report
    return cfg


def _timed(done: Path, run, durations: dict, key: str) -> None:
    if done.exists():
        print(f"[detection] {key}: found {done}, reused", flush=True)
        return
    start = time.perf_counter()
    run()
    durations[key] = round(time.perf_counter() - start, 1)
    print(f"[detection] {key}: {durations[key]:.0f} s", flush=True)


def run_depth(profile: Profile, depth: int, datasets: tuple[str, str], out: Path, device: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    cfg = stage_config(profile, depth, datasets, out, device)
    times_path = out / "durations.json"
    durations = json.loads(times_path.read_text()) if times_path.is_file() else {}
    _timed(out / "baseline" / "channels.json", lambda: train_baseline(cfg, out), durations, "train")
    _timed(out / "pruner" / "keep_scores.json",
           lambda: train_backbone_pruner(cfg, out, profile.pruner_iters, profile.budget, lr=profile.pruner_lr),
           durations, "prune-train")
    _timed(out / "pruned" / "channels.json", lambda: prune_baseline(cfg, out, profile.budget), durations, "prune")
    write_json_atomic(times_path, durations)

    # every fine-tuning by the same schedule: the pruned detector once per variant, and
    # the control, the unpruned baseline trained on, so that the pruned detectors'
    # extra iterations are not mistaken for a gain from pruning
    runs = {CONTROL: ("baseline", 0.0, 0.0, "control")}
    for variant in VARIANTS:
        kd = (profile.kd_fpn, profile.kd_cls) if variant == "kd" else (0.0, 0.0)
        runs[f"finetuned_{variant}"] = ("pruned", *kd, f"finetune-{variant}")
    for name, (source, kd_fpn, kd_cls, key) in runs.items():
        _timed(out / name / "channels.json",
               lambda: finetune_pruned(cfg, out, kd_fpn, kd_cls, profile.finetune_iters, profile.finetune_lr,
                                       source=source, name=name),
               durations, key)
        write_json_atomic(times_path, durations)

    summaries = {name: summarize(out, name, cfg, profile.latency_repeats) for name in ("baseline", "pruned", *runs)}
    records = []
    for variant in VARIANTS:
        report = {k: summaries[k] for k in ("baseline", "pruned")} | {"finetuned": summaries[f"finetuned_{variant}"]}
        print(f"\n[detection] R{depth}-FPN, fine-tuned {variant}:\n{format_detection_table(report)}\n", flush=True)
        records.append(record(report, summaries[CONTROL], depth, variant, profile, durations))
    return records


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


def record(report: dict, control: dict, depth: int, variant: str, profile: Profile, durations: dict) -> dict:
    base, pruned, tuned = report["baseline"], report["pruned"], report["finetuned"]
    return {
        "model": f"faster_rcnn_R{depth}_FPN", "variant": variant, "seed": profile.seed,
        "budget": round(1.0 - tuned["backbone_flops"] / base["backbone_flops"], 4),  # backbone FLOPs removed
        "baseline": _figures(base), "pruned": _figures(pruned), "finetuned": _figures(tuned),
        "baseline_continued": _figures(control),
        "ap_change": _change(tuned, base), "ap_change_vs_continued": _change(tuned, control),
        "wall_s": {k: v for k, v in durations.items()
                   if k in ("train", "prune-train", "prune") or k == f"finetune-{variant}"},
    }


def _change(after: dict, before: dict) -> float | None:
    return None if after["AP"] is None or before["AP"] is None else round(after["AP"] - before["AP"], 2)


def _figures(summary: dict) -> dict:
    keys = ("AP", "AP50", "AP75", "backbone_flops", "flops", "backbone_params", "params")
    return {**{k: summary.get(k) for k in keys}, "latency_ms": summary.get("latency")}


def format_table(records: list[dict]) -> str:
    header = ["model", "detector", "AP", "AP50", "AP75", "backbone GFLOPs", "params (M)", "backbone ms",
              "AP vs baseline", "AP vs control"]
    rows, seen = [], set()
    for r in records:
        stages = [(f"pruned, fine-tuned {r['variant']}", r["finetuned"])]
        if r["model"] not in seen:
            stages[:0] = [("baseline", r["baseline"]), ("baseline trained on (control)", r["baseline_continued"]),
                          ("pruned, before fine-tuning", r["pruned"])]
            seen.add(r["model"])
        for name, f in stages:
            versus = [("" if f is ref else _signed(_change(f, ref))) for ref in (r["baseline"], r["baseline_continued"])]
            rows.append([r["model"], name, _num(f["AP"]), _num(f["AP50"]), _num(f["AP75"]),
                         f"{f['backbone_flops'] / 1e9:.3f}", f"{f['params'] / 1e6:.2f}",
                         _num((f["latency_ms"] or {}).get("backbone_ms")), *versus])
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
    settings_path = out / "settings.json"
    settings = json.loads(json.dumps(asdict(profile)))  # as stored: tuples become lists
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
        raise SystemExit(f"{out} holds results made with other settings ({settings_path}); pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_path, settings)

    records = []
    for depth in profile.depths:
        records += run_depth(profile, depth, datasets, out / f"r{depth}", args.device)
    results = {"profile": args.profile, "settings": asdict(profile), "environment": environment(args.device),
               "records": records}
    write_json_atomic(out / "results.json", results)
    table = format_table(records)
    write_text_atomic(out / "table.md", table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
