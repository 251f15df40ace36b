"""The bad-input matrix: every case of ``tests/bad_inputs.py`` run as a real command, its outcome recorded.

Each case runs the installed console script (``pnp-train``, ..., ``pnp-train-net``) in a
subprocess, as a user would, and is judged by what the user sees: the exit status, whether a
traceback was printed, the message, whether a file named by the input ran code, and whether
the files of a run folder that must stay untouched did. Writes ``bad_input.json`` under
--out and the markdown matrix (``docs/bad-input.md`` by default).

    python benchmarks/bad_input_matrix.py                 # about 5 minutes on 2 cores
    python benchmarks/bad_input_matrix.py --skip-slow     # without the detector that must diverge
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from bad_inputs import CASES, Case, arguments, prepare  # noqa: E402  (the cases live with the tests)

from pnp.core.io import write_json_atomic, write_text_atomic  # noqa: E402


def run_script(command: str, args: list[str], timeout: float = 900) -> tuple[int, str, str, float]:
    script = Path(sys.executable).with_name(command)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("PNP_DEBUG", None)
    start = time.perf_counter()
    done = subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - start


def _files(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def judge(case: Case, status: int, out: str, err: str, ran: bool, changed: bool | None) -> tuple[str, str]:
    """``(outcome, message)``: ``as promised``, or what went wrong."""
    said = err if case.status else out + err
    message = next((line.strip() for line in reversed(err.strip().splitlines()) if "error:" in line), "")
    if case.status == 0:
        message = next((line.strip() for line in out.splitlines() if case.says in line), message)
    if not message:
        message = next((line.strip() for line in err.strip().splitlines() if line.strip()), "")
    problems = []
    if status != case.status:
        problems.append(f"exit {status}, expected {case.status}")
    if "Traceback" in err:
        problems.append("traceback")
    if case.says not in said:
        problems.append(f"message lacks {case.says!r}")
    if ran:
        problems.append("an input file ran code")
    if changed:
        problems.append("files that must stay untouched changed")
    return ("as promised" if not problems else "; ".join(problems)), message


def markdown(rows: list[dict]) -> str:
    good = sum(r["outcome"] == "as promised" for r in rows)
    lines = [
        "# Bad input, faults and damaged run folders",
        "",
        "What each command does with input it cannot use, measured by `benchmarks/bad_input_matrix.py` (each case",
        "a real subprocess of the installed command; the cases are `tests/bad_inputs.py`, which",
        "`tests/test_bad_input.py` also runs in the quick suite). Exit status: 0 success, 2 bad input",
        "(config, data, files), 1 internal error, 130/143 interrupted. Set `PNP_DEBUG=1` to see the",
        "traceback behind a user error.",
        "",
        f"{good} of {len(rows)} cases as promised.",
        "",
        "| case | command | exit | outcome | what the user sees |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        shown = r["message"].replace("|", "\\|")
        if len(shown) > 220:
            shown = shown[:217] + "..."
        lines.append(f"| {r['what']} | `{r['command']}` | {r['status']} | {r['outcome']} | {shown} |")
    return "\n".join(lines) + "\n"


def _anonymous(text: str, root: Path) -> str:
    """The message with this machine's folders replaced, so the matrix reads the same anywhere."""
    return text.replace(str(root), "<tmp>").replace(str(REPO), "<repo>")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bad_input")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "bad-input.md")
    p.add_argument("--skip-slow", action="store_true", help="leave out the cases that train a detector")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ws = prepare(root, lambda a: run_script("pnp-train", a)[0])
        for case in CASES:
            if case.slow and args.skip_slow:
                continue
            folder = ws.case_dir(case.name)
            case_args = arguments(case, ws, folder)
            before = _files(folder) if case.untouched else None
            status, out, err, seconds = run_script(case.command, case_args)
            changed = None if before is None else _files(folder) != before
            outcome, message = judge(case, status, out, err, (folder / "ran").exists(), changed)
            rows.append({"case": case.name, "what": case.what, "command": case.command, "status": status,
                         "expected": case.status, "outcome": outcome, "message": _anonymous(message, root),
                         "seconds": round(seconds, 1)})
            print(f"{case.name:32s} exit {status}  {outcome}  ({seconds:.0f} s)", flush=True)
    write_json_atomic(args.out / "bad_input.json", {"cases": rows})
    write_text_atomic(args.doc, markdown(rows))
    good = sum(r["outcome"] == "as promised" for r in rows)
    print(f"{good}/{len(rows)} as promised; wrote {args.out / 'bad_input.json'} and {args.doc}")
    return rows


if __name__ == "__main__":
    main()
