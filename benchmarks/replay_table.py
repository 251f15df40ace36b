"""A replayed look-ahead's choices against the criteria, paired by seed, as the methods table reads pnp.

``replay_lookahead.py`` writes, per (model, seed, budget), the model a look-ahead setting
would have chosen and that model's accuracy after fine-tuning (from its record). This
script reads one or more of those JSON files and compares those accuracies with the
criteria's records beside each chosen record (the same benchmark output, same seed and
budget), by the methods table's rule: the difference to the criterion with the highest
mean, seed by seed, its 95% t-interval, the worst seed, and "ahead" only when the whole
interval is above 0. With ``--rival METHOD`` it compares with that method's records instead
(``pnp``: the look-ahead the records were made with).

    python benchmarks/replay_table.py K-resnet20.json K-resnet56.json --json K-table.json

Nothing is trained. A row without a final accuracy (its chosen model not fine-tuned yet) is
left out and counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the methods package beside this file

from methods.methods import METHODS  # noqa: E402
from methods.tables import PNP, against_best, paired_difference  # noqa: E402
from pnp.core.io import read_json, write_json_atomic  # noqa: E402
from pnp.training.runs import script_main  # noqa: E402

REPLAYED = PNP  # the replayed choices stand in pnp's place, so the table's rule reads them as it reads pnp
RECORDED = "recorded " + PNP  # pnp's own records: the look-ahead they were made with, a rival like any other


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("replays", nargs="+", type=Path, help="JSON files written by replay_lookahead.py --json")
    parser.add_argument("--rival", help="compare with this method's records (default: the best criterion by mean)")
    parser.add_argument("--json", type=Path, help="also write the comparisons here")
    return parser.parse_args(argv)


def cells(replays: list[Path]) -> tuple[dict[tuple, list[dict]], int]:
    """Per (model, budget): the replayed choices as records of pnp, and the other methods' records beside them.

    Also returns how many rows had no final accuracy.
    """
    out: dict[tuple, dict[tuple, dict]] = {}
    missing = 0
    for path in replays:
        try:
            rows = read_json(path)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"replay_table: {path} cannot be read as a replay's JSON ({exc})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and {"model", "seed", "budget", "accuracy", "record"} <= set(r)
                                                 for r in rows):
            raise SystemExit(f"replay_table: {path} is not a replay's JSON (a list of rows from replay_lookahead.py)")
        for row in rows:
            if row["accuracy"] is None or row["record"] is None:
                missing += 1
                continue
            key = (row["model"], round(float(row["budget"]), 6))
            cell = out.setdefault(key, {})
            cell[(REPLAYED, row["seed"])] = {"method": REPLAYED, "seed": row["seed"], "accuracy": row["accuracy"]}
            folder = (path.parent / row["record"]).parent
            for sibling in sorted(folder.glob(f"*-r{round(100 * float(row['budget']))}-s{row['seed']}.json")):
                record = read_json(sibling)
                if record.get("method") in METHODS and "accuracy" in record and "not_applicable" not in record:
                    method = RECORDED if record["method"] == REPLAYED else record["method"]
                    cell[(method, row["seed"])] = {"method": method, "seed": row["seed"], "accuracy": record["accuracy"]}
    return {key: list(cell.values()) for key, cell in sorted(out.items())}, missing


def compare(replays: list[Path], rival: str | None = None) -> tuple[list[dict], int]:
    """One comparison per (model, budget): the replayed choices minus the rival, paired by seed."""
    by_cell, missing = cells(replays)
    rows = []
    for (model, budget), records in by_cell.items():
        if rival is None:  # against_best picks among the criteria itself
            paired = against_best([r for r in records if r["method"] != RECORDED])
        else:
            paired = paired_difference(records, REPLAYED, RECORDED if rival == PNP else rival)
        if paired is not None:
            found = paired.to_dict()
            rows.append({"model": model, "budget": budget, **found, "seeds": list(found["seeds"]), "diffs": list(found["diffs"])})
    return rows, missing


def format_rows(rows: list[dict]) -> str:
    lines = ["| model | FLOPs removed | rival | n | replayed − rival, mean [95% CI] | worst seed | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f" [{r['low']:+.2f}, {r['high']:+.2f}]" if r["low"] is not None else ""
        lines.append(f"| {r['model']} | {round(100 * r['budget'])}% | {r['rival']} | {r['n']} | {r['mean']:+.2f}{ci} | "
                     f"{r['worst']:+.2f} | {r['verdict']} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.rival is not None and args.rival not in METHODS:
        raise SystemExit(f"replay_table: --rival {args.rival!r} is not a method; choose one of {', '.join(METHODS)}")
    rows, missing = compare(args.replays, args.rival)
    print(format_rows(rows))
    if missing:
        print(f"\n{missing} replayed row(s) have no final accuracy yet (their chosen model has no record): left out")
    if args.json is not None:
        write_json_atomic(args.json, rows)
    return rows


if __name__ == "__main__":
    script_main(main)  # bad input: its message, status 2
