"""Replay pnp's look-ahead on a finished methods benchmark under other ``inherit.*`` settings.

pnp's look-ahead (``inherit.choice=auto``) decides which model reaches fine-tuning:
the pruner's picks, a criterion's channels at the learned widths, or a criterion's own
read-out. Each of those models is a method of the benchmark with a record of its own
(``pnp_learned``, ``pnp_widths``, ``magnitude``), so the final accuracy of any choice
is already known. This script runs only the look-ahead again, on the stored baseline
and pruner run of each (seed, budget), with the ``--set`` overrides, and reads the
chosen model's accuracy after fine-tuning from the records: what other settings
(fewer steps, fewer candidates) would have given, and what their look-ahead cost,
without fine-tuning anything again.

    python benchmarks/replay_lookahead.py --profile standard --out DIR --models resnet20 \
        --seeds 0 1 --budgets 0.7 0.9 --set inherit.steps=30 --set "inherit.candidates=[magnitude]" \
        --records DIR --json replay.json

Nothing is trained: a (seed, budget) whose baseline or pruner run is not finished under
``--out`` is reported and skipped. The output JSON holds one row per run: the choice, the
look-ahead scores, the look-ahead's seconds and the chosen model's accuracy (null when no
record of that model is found under ``--records``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the methods package beside this file

from methods.methods import METHODS, Context  # noqa: E402
from methods.profiles import PROFILES  # noqa: E402
from methods.runner import BenchmarkError, Options, plan, record_path, resolve  # noqa: E402
from pnp.cli import stages  # noqa: E402
from pnp.core.io import read_json, write_json_atomic  # noqa: E402
from pnp.training.inherit import LEARNED, WIDTHS  # noqa: E402

# the benchmark method whose model each look-ahead candidate is
CANDIDATE_METHOD = {LEARNED: "pnp_learned", "magnitude": "pnp_widths", WIDTHS + "magnitude": "magnitude"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="standard", choices=sorted(PROFILES))
    parser.add_argument("--out", type=Path, required=True, help="the benchmark's --out, with its finished stages")
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--budgets", nargs="+", type=float, help="fractions of FLOPs removed, e.g. 0.7 0.9")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. inherit.steps=30")
    parser.add_argument("--records", nargs="+", type=Path, default=[], help="benchmark outputs whose records hold "
                        "the candidates' final accuracies (default: --out)")
    parser.add_argument("--json", type=Path, required=True, help="where the rows are written")
    parser.add_argument("--data-root", type=Path)
    return parser.parse_args(argv)


def final_accuracy(dirs: list[Path], entry, candidate: str, removed: float, seed: int) -> tuple[float | None, str | None]:
    """The accuracy after fine-tuning of the model ``candidate`` stands for, and the record it came from."""
    method = CANDIDATE_METHOD.get(candidate)
    for directory in dirs:
        paths = [record_path(directory, entry, method, removed, seed)] if method else []
        paths.append(record_path(directory, entry, "pnp", removed, seed))  # pnp's own record, where it chose the same
        for path in paths:
            if path.is_file():
                rec = read_json(path)
                if path.name.startswith("pnp-") and rec.get("inherit", {}).get("choice") != candidate:
                    continue
                return rec.get("accuracy"), str(path)
    return None, None


def replay(args) -> list[dict]:
    options = Options(args.out, "cpu", {"fashion_mnist": args.data_root})
    bench = resolve(PROFILES[args.profile], args.set, options, models=args.models, methods=["pnp"],
                    budgets=args.budgets, seeds=args.seeds)
    records = args.records or [args.out]
    rows = []
    for entry in bench.profile.entries:
        for seed in bench.profile.seeds:
            runs = [plan(bench.recipes[entry.name], entry, seed, "pnp", b, options) for b in bench.profile.budgets]
            ready = [r for r in runs if all(r.dirs[s].check() == "done" for s in ("train", "train_pruner"))]
            for r in runs:
                if r not in ready:
                    print(f"{r.tag}: baseline or pruner run not finished under {args.out}; skipped", flush=True)
            if not ready:
                continue
            cfg = ready[0].cfg
            data = stages.build_data(cfg)
            baseline = stages.train(cfg, data, ready[0].dirs["train"], "done")
            groups = stages.find_groups(cfg, data, baseline.model)
            for r in ready:
                ctx = Context(r.cfg, data, baseline.model, baseline.report["model"], groups,
                              {"train_pruner": r.dirs["train_pruner"]}, {"train_pruner": "done"})
                learned = METHODS["pnp"].choose(ctx).keep
                start = time.perf_counter()
                _, found, _ = stages.inherit(r.cfg, data, baseline.model, groups, learned)
                seconds = time.perf_counter() - start
                accuracy, source = final_accuracy(records, entry, found["choice"], r.removed, seed)
                row = {"model": entry.model, "seed": seed, "budget": r.removed, "choice": found["choice"],
                       "lookahead_accuracy": found["lookahead_accuracy"], "lookahead_s": round(seconds, 2),
                       "accuracy": accuracy, "record": source, "set": list(args.set)}
                rows.append(row)
                print(f"{r.tag}: chose {row['choice']} {row['lookahead_accuracy']} in {seconds:.0f} s; "
                      f"after fine-tuning {accuracy}", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    try:
        rows = replay(args)
    except BenchmarkError as exc:
        raise SystemExit(f"replay_lookahead: {exc}") from None
    write_json_atomic(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
