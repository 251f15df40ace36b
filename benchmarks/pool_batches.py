"""pnp against the best criterion over several declared batches at once: a description, not a verdict.

Each batch (a ``bench_methods.py`` output folder, or a committed copy of one, with its
``runs/``) is read by the methods table's rule: per (model, dataset, budget), pnp minus
the criterion with the highest mean *in that batch*, seed by seed. The differences of
every batch at one budget are then pooled: their mean, 95% t-interval, spread and worst
seed, and how many seed pairs an interval clear of 0 would need at that mean and spread.
The batches were each declared and read on their own; pooling them after the fact is a
summary of where pnp stands, not a test (say so wherever its figures are quoted).

    python benchmarks/pool_batches.py benchmarks/results/methods/standard-resnet56-k \\
      benchmarks/results/methods/standard-mobilenetv2 --json pooled.json

Nothing is trained.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the methods package beside this file

from methods.methods import METHODS  # noqa: E402
from methods.tables import PNP, PairedDifference, comparisons  # noqa: E402
from pnp.core.io import read_json, write_json_atomic  # noqa: E402
from pnp.training.runs import script_main  # noqa: E402

Z_975 = 1.959964


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("batches", nargs="+", type=Path, help="benchmark output folders, each with runs/MODEL-DATASET/*.json")
    parser.add_argument("--budgets", nargs="+", type=float, help="only these fractions of FLOPs removed (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows and the pools here")
    return parser.parse_args(argv)


def batch_records(folder: Path) -> list[dict]:
    """The applicable run records of one batch; a folder without any is bad input."""
    paths = sorted((folder / "runs").glob("*/*.json"))
    if not paths:
        raise SystemExit(f"pool_batches: {folder} holds no run records (runs/MODEL-DATASET/*.json); "
                         "give the folder a bench_methods.py --out wrote, or a committed copy of one")
    records = []
    for path in paths:
        try:
            record = read_json(path)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"pool_batches: {path} cannot be read as a run record ({exc})") from None
        if not isinstance(record, dict) or not {"model", "dataset", "method", "budget", "seed"} <= set(record):
            raise SystemExit(f"pool_batches: {path} is not a run record of bench_methods.py")
        if record["method"] not in METHODS:
            raise SystemExit(f"pool_batches: {path} is a record of method {record['method']!r}, which this benchmark "
                             f"does not know (its methods: {', '.join(METHODS)}); leave that folder out")
        if "not_applicable" not in record and "accuracy" in record:
            records.append(record)
    return records


def seeds_needed(mean: float, sd: float) -> int | None:
    """Seed pairs for a 95% interval clear of 0 at this mean and spread (normal approximation); None at a mean <= 0."""
    if mean <= 0:
        return None
    return max(2, math.ceil((Z_975 * sd / mean) ** 2))


def pool(batches: list[Path], budgets: list[float] | None = None) -> tuple[list[dict], list[dict]]:
    """One row per (batch, model, dataset, budget) and one pool per budget."""
    rows, by_budget = [], {}
    for folder in batches:
        for (model, dataset, budget), paired in comparisons(batch_records(folder)).items():
            if budgets is not None and not any(abs(budget - b) < 1e-9 for b in budgets):
                continue
            found = paired.to_dict()
            rows.append({"batch": folder.name, "model": model, "dataset": dataset, "budget": budget, **found,
                         "seeds": list(found["seeds"]), "diffs": list(found["diffs"])})
            by_budget.setdefault(budget, []).append(paired)
    pools = []
    for budget, parts in sorted(by_budget.items()):
        together = PairedDifference(PNP, "the best criterion of each batch",
                                    tuple(s for p in parts for s in p.seeds), tuple(d for p in parts for d in p.diffs))
        found = together.to_dict()
        sd = statistics.stdev(together.diffs) if together.n > 1 else None
        pools.append({"budget": budget, "batches": len(parts), **found, "seeds": list(found["seeds"]),
                      "diffs": list(found["diffs"]), "sd": sd,
                      "seeds_needed": seeds_needed(together.mean, sd) if sd is not None else None})
    return rows, pools


def _interval(r: dict) -> str:
    return f" [{r['low']:+.2f}, {r['high']:+.2f}]" if r["low"] is not None else ""


def format_tables(rows: list[dict], pools: list[dict]) -> str:
    lines = ["| batch | model | FLOPs removed | best criterion | n | pnp − best [95% CI] | worst | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['model']} | {round(100 * r['budget'])}% | {r['rival']} | {r['n']} | "
                     f"{r['mean']:+.2f}{_interval(r)} | {r['worst']:+.2f} | {r['verdict']} |")
    lines += ["", "Pooled (a description of the batches together, not a test):", "",
              "| FLOPs removed | batches | seed pairs | pnp − best [95% CI] | sd | worst | seed pairs for a 95% interval clear of 0 |",
              "|---|---|---|---|---|---|---|"]
    for p in pools:
        sd = f"{p['sd']:.2f}" if p["sd"] is not None else "–"
        need = str(p["seeds_needed"]) if p["seeds_needed"] is not None else "– (mean ≤ 0)"
        lines.append(f"| {round(100 * p['budget'])}% | {p['batches']} | {p['n']} | {p['mean']:+.2f}{_interval(p)} | {sd} | "
                     f"{p['worst']:+.2f} | {need} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    for folder in args.batches:
        if not folder.is_dir():
            raise SystemExit(f"pool_batches: batch folder {folder} does not exist; give a bench_methods.py --out folder")
    rows, pools = pool(args.batches, args.budgets)
    if not rows:
        raise SystemExit("pool_batches: no batch has both pnp and a criterion at the budgets asked; nothing to pool")
    print(format_tables(rows, pools))
    result = {"rows": rows, "pools": pools}
    if args.json is not None:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    script_main(main)  # bad input: its message, status 2
