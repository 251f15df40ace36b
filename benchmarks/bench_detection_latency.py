"""Whole-detector CPU latency of the detectors a detection benchmark run left, measured in interleaved rounds.

bench_detection.py measures each detector once, five runs, when it is summarised;
on a busy machine one slow phase can fall on one detector only. This script loads
the baseline and the distilled pruned detectors of each seed's run and times them
in turns (``--rounds`` rounds of ``--repeats`` runs, batch 1, 1 thread), so every
detector meets the same phases; it prints and writes the medians and speed-ups.

    python benchmarks/bench_detection_latency.py benchmarks/results/detection/quick-s0 benchmarks/results/detection/quick-s1
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from pnp.core.cost import measure_latency
from pnp.core.io import write_json_atomic
from pnp.detection.checkpoint import load_pruned_detector
from pnp.detection.pipeline import DetectorOnImages

DETECTORS = ("baseline", "finetuned_kd", "finetuned_magnitude_kd")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="bench_detection output folders (one per seed)")
    p.add_argument("--model", default="faster_rcnn_R18_FPN")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for run in map(Path, args.runs):
        folder = run / args.model
        models = {n: DetectorOnImages(load_pruned_detector(folder / n).eval()) for n in DETECTORS if (folder / n).is_dir()}
        rounds = {n: [] for n in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                rounds[name].append(measure_latency(model, (3, args.image_size, args.image_size), threads=(1,),
                                                    repeats=args.repeats)[0].median_ms)
        median = {n: statistics.median(v) for n, v in rounds.items()}
        results[str(run)] = {"median_ms": median, "rounds_ms": rounds,
                             "speedup": {n: median["baseline"] / median[n] for n in median if n != "baseline"}}
        print(run, json.dumps({n: round(v, 2) for n, v in results[str(run)]["speedup"].items()}), flush=True)
        write_json_atomic(folder / "latency.json", results[str(run)])
    return results


if __name__ == "__main__":
    main()
