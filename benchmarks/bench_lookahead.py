"""The weight-inheritance look-ahead's time with the teacher run once a step against once a step and candidate.

``choose_inheritance`` distils every candidate on the same batches, so it keeps the teacher's logits of
the first candidate's steps for the others. This times it against the same candidates each distilled
on its own (the teacher run again for each), on random 1x28x28 images, one thread, and checks that
the scores are equal. The two are run in alternating order, ``--repeats`` times each.

    python benchmarks/bench_lookahead.py                         # MobileNetV2, 30% of channels kept
    python benchmarks/bench_lookahead.py --model resnet20 --keep 0.5 --steps 20

Prints the seconds and their ratio and writes JSON (``benchmarks/results/lookahead.json`` unless ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from pnp.core.builders import build_model, registered_builders
from pnp.core.groups import find_channel_groups, keep_from_ratio
from pnp.core.io import write_text_atomic
from pnp.core.surgery import apply_surgery
from pnp.training.inherit import candidate_keeps, choose_inheritance, lookahead_accuracy
from pnp.training.runs import script_main

MODELS = [builder.removeprefix("pnp:") for builder in registered_builders()]  # pnp's own models
CANDIDATES = ["learned", "magnitude", "l1"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="mobilenetv2")
    parser.add_argument("--keep", type=float, default=0.3, help="fraction of each group's channels kept")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lookahead.json")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if not 0 < args.keep <= 1:
        raise SystemExit(f"--keep {args.keep} is outside (0, 1]: give the fraction of channels kept")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(f"pnp:{args.model}").eval()
    example = torch.randn(2, 1, 28, 28)
    groups = find_channel_groups(model, example)
    keep = keep_from_ratio(groups, args.keep)
    images = torch.randn(args.batch_size * args.steps, 1, 28, 28)
    labels = torch.randint(0, 10, (len(images),))

    def train_loader():
        return DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    held_out = DataLoader(TensorDataset(images[:256], labels[:256]), batch_size=args.batch_size)

    def teacher_once():
        return choose_inheritance(model, groups, keep, example, CANDIDATES, train_loader, held_out, steps=args.steps,
                                  kd_weight=1.0).scores

    def teacher_each():
        keeps, _ = candidate_keeps(model, groups, keep, CANDIDATES)
        return {name: lookahead_accuracy(apply_surgery(copy.deepcopy(model), groups, k, example, verify=False),
                                         train_loader(), held_out, args.steps, teacher=copy.deepcopy(model).eval(),
                                         kd_weight=1.0)
                for name, k in keeps.items()}

    seconds: dict[str, list[float]] = {"teacher_once": [], "teacher_each": []}
    scores = {}
    for repeat in range(args.repeats):
        order = ("teacher_once", "teacher_each") if repeat % 2 == 0 else ("teacher_each", "teacher_once")
        for name in order:
            start = time.perf_counter()
            scores[name] = (teacher_once if name == "teacher_once" else teacher_each)()
            seconds[name].append(time.perf_counter() - start)
    result = {
        "model": args.model, "keep": args.keep, "steps": args.steps, "batch_size": args.batch_size,
        "candidates": CANDIDATES, "threads": 1, "seconds": seconds,
        "ratio": statistics.median(e / o for e, o in zip(seconds["teacher_each"], seconds["teacher_once"])),
        "scores_equal": scores["teacher_once"] == scores["teacher_each"],
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    print(f"{args.model}, {args.keep:.0%} of channels, {len(CANDIDATES)} candidates x {args.steps} distilled steps "
          f"of {args.batch_size}: teacher once a step {statistics.median(seconds['teacher_once']):.1f} s, once a step "
          f"and candidate {statistics.median(seconds['teacher_each']):.1f} s (x{result['ratio']:.2f}); "
          f"scores equal: {result['scores_equal']}")
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    script_main(main)
