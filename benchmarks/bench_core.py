"""Core benchmark: group finding and surgery time, FLOPs and measured CPU speedup.

For each torchvision model (weights=None, eval, 3x224x224 inputs) this times
``find_channel_groups`` and ``apply_surgery``, then, at several keep ratios with
random channel choices whose keep counts are multiples of ``--round-to``, compares
the FLOPs reduction with the measured latency speedup of the pruned model.

    python benchmarks/bench_core.py                    # ResNet-50 and MobileNetV2
    python benchmarks/bench_core.py --models resnet18 --ratios 0.5 --repeats 3

Prints a table and writes JSON (``benchmarks/results/core.json`` unless ``--out``).
Latency is wall time and shares the CPU with whatever else runs: the JSON records
the load average before and after so that noisy figures can be recognised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torchvision

from pnp.core.cost import CostModel, count_flops_params, measure_latency
from pnp.core.groups import find_channel_groups
from pnp.core.readout import decide_keep
from pnp.core.surgery import apply_surgery, verify_surgery
from pnp.core.io import write_text_atomic

INPUT_SHAPE = (3, 224, 224)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.5, 0.35], help="fraction of channels kept per group")
    parser.add_argument("--round-to", type=int, default=8, help="keep counts are multiples of this")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "core.json")
    return parser.parse_args(argv)


def random_scores(groups, seed: int) -> dict[str, torch.Tensor]:
    """Scores evenly spread over (0, 1) in random order: thresholding at ``1 - r`` keeps ``r`` of each group."""
    gen = torch.Generator().manual_seed(seed)
    return {g.name: (torch.randperm(g.size, generator=gen).float() + 0.5) / g.size for g in groups}


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def median_latency_ms(model, args) -> float:
    (result,) = measure_latency(
        model, INPUT_SHAPE, batch_sizes=(args.batch,), threads=(args.threads,), warmup=args.warmup, repeats=args.repeats
    )
    return result.median_ms


def bench_model(name: str, args) -> dict:
    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, *INPUT_SHAPE)
    groups, find_s = timed(find_channel_groups, model, x)
    cost = CostModel(groups)
    original = count_flops_params(model, x)
    original_ms = median_latency_ms(model, args)
    scores = random_scores(groups, args.seed)
    rows = []
    for ratio in args.ratios:
        keep, info = decide_keep(groups, scores, threshold=1.0 - ratio, round_to=args.round_to)
        pruned, surgery_s = timed(apply_surgery, model, groups, keep, x)
        max_diff = verify_surgery(model, pruned, groups, keep, x)
        counted = count_flops_params(pruned, x)
        pruned_ms = median_latency_ms(pruned, args)
        flops_ratio = original.flops / counted.flops
        speedup = original_ms / pruned_ms
        rows.append(
            {
                "keep_ratio": ratio,
                "channels_kept": info["channels_kept"],
                "channels_total": info["channels_total"],
                "counts_multiple_of_round_to": all(
                    int(keep[g.name].sum()) % args.round_to == 0 for g in groups if g.size >= args.round_to
                ),
                "surgery_s": surgery_s,
                "groups_plus_surgery_s": find_s + surgery_s,
                "verify_max_abs_diff": max_diff,
                "flops": counted.flops,
                "params": counted.params,
                "predicted_flops": float(cost.flops(keep)),
                "flops_ratio": flops_ratio,
                "latency_ms": pruned_ms,
                "speedup": speedup,
                "speedup_over_flops_ratio": speedup / flops_ratio,
            }
        )
    return {
        "model": name,
        "groups": len(groups),
        "excluded": groups.excluded,
        "find_groups_s": find_s,
        "flops": original.flops,
        "params": original.params,
        "latency_ms": original_ms,
        "pruned": rows,
    }


def print_table(results: list[dict], args) -> None:
    print(f"batch {args.batch}, {args.threads} threads, keep counts rounded to multiples of {args.round_to}")
    header = (
        f"{'model':<14}{'keep':>6}{'groups s':>10}{'surgery s':>11}{'GFLOPs':>9}{'FLOPs x':>9}"
        f"{'ms':>10}{'speedup':>9}{'spd/FLOPs':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['model']:<14}{1.0:>6.2f}{r['find_groups_s']:>10.2f}{'':>11}{r['flops'] / 1e9:>9.3f}{1.0:>9.2f}"
            f"{r['latency_ms']:>10.1f}{1.0:>9.2f}{'':>11}"
        )
        for p in r["pruned"]:
            print(
                f"{'':<14}{p['keep_ratio']:>6.2f}{'':>10}{p['surgery_s']:>11.2f}{p['flops'] / 1e9:>9.3f}"
                f"{p['flops_ratio']:>9.2f}{p['latency_ms']:>10.1f}{p['speedup']:>9.2f}{p['speedup_over_flops_ratio']:>11.2f}"
            )


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_before = os.getloadavg()
    results = [bench_model(name, args) for name in args.models]
    report = {
        # where the file goes is not a setting (and would name a folder of this machine)
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "input_shape": list(INPUT_SHAPE),
        "environment": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "results": results,
    }
    print_table(results, args)
    write_text_atomic(args.out, json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
