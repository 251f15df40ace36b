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
look-ahead scores, the look-ahead's seconds, the chosen model's accuracy (null when no
record of that model is found under ``--records``) and that record's path, relative to the
JSON's folder. The JSON is rewritten after every row, so a replay that is stopped resumes
when run again: a run whose row is there under the same ``--set`` is not replayed, and its
accuracy is read again from the records (a model fine-tuned since is filled in).
"""

from __future__ import annotations

import argparse
import os
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
from pnp.training.runs import script_main  # noqa: E402

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
    done = _previous_rows(args.json, args.set)
    rows = []
    for entry in bench.profile.entries:
        for seed in bench.profile.seeds:
            runs = [plan(bench.recipes[entry.name], entry, seed, "pnp", b, options) for b in bench.profile.budgets]
            for r in runs:
                row = done.get((entry.model, seed, r.removed))
                if row is not None:  # replayed before: only its accuracy is read again
                    accuracy, source = final_accuracy(records, entry, row["choice"], r.removed, seed)
                    rows.append({**row, "accuracy": accuracy, "record": _relative(source, args.json)})
                    print(f"{r.tag}: replayed before, chose {row['choice']}; after fine-tuning {accuracy}", flush=True)
            runs = [r for r in runs if (entry.model, seed, r.removed) not in done]
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
                       "accuracy": accuracy, "record": _relative(source, args.json), "set": list(args.set)}
                rows.append(row)
                _write(args.json, rows, done)
                print(f"{r.tag}: chose {row['choice']} {row['lookahead_accuracy']} in {seconds:.0f} s; "
                      f"after fine-tuning {accuracy}", flush=True)
    _write(args.json, rows, done)  # the rows read again, and the file even when nothing was replayed
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    try:
        rows = replay(args)
    except BenchmarkError as exc:
        raise SystemExit(f"replay_lookahead: {exc}") from None
    return rows


def _previous_rows(path: Path, settings: list[str]) -> dict:
    """Rows of an earlier replay into ``path`` under the same ``--set``, by (model, seed, budget)."""
    if not path.is_file():
        return {}
    try:
        rows = read_json(path)
    except ValueError as exc:
        raise SystemExit(f"replay_lookahead: --json {path} is not a replay's JSON ({exc}); "
                         "name another file or delete it") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"model", "seed", "budget", "choice", "set"} <= set(r)
                                             for r in rows):
        raise SystemExit(f"replay_lookahead: --json {path} is not a replay's JSON (a list of rows); "
                         "name another file or delete it")
    if any(r["set"] != list(settings) for r in rows):
        raise SystemExit(f"replay_lookahead: --json {path} holds a replay under other --set "
                         f"({rows[0]['set']}, now {list(settings)}); name another file to keep both")
    return {_key(r): r for r in rows}


def _key(row: dict) -> tuple:
    return row["model"], row["seed"], row["budget"]


def _relative(source: str | None, json_path: Path) -> str | None:
    """``source`` relative to the JSON's folder: the rows then name no folder of the machine they ran on."""
    if source is None:
        return None
    return Path(os.path.relpath(Path(source).resolve(), json_path.resolve().parent)).as_posix()


def _write(path: Path, rows: list[dict], previous: dict) -> None:
    """``rows``, then the earlier replay's rows of runs not visited this time (nothing written is lost)."""
    visited = {_key(r) for r in rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, rows + [r for key, r in previous.items() if key not in visited])


if __name__ == "__main__":
    script_main(main)  # bad input: its message, status 2
