"""Every case of bad input (tests/bad_inputs.py) ends as promised: the exit status, a message, no traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bad_inputs import CASES, Case, arguments, prepare

COMMANDS = {
    "pnp-train": "train", "pnp-train-pruner": "train_pruner", "pnp-prune": "prune",
    "pnp-finetune": "finetune", "pnp-pipeline": "pipeline",
}


def run_command(command: str, args: list[str]) -> int:
    """``command args`` as the console script runs it, in this process; its exit status."""
    if command == "pnp-train-net":
        from pnp.cli.detection import main

        return main(args)
    from pnp.cli.main import _entry

    argv = sys.argv
    sys.argv = [command, *args]
    try:
        _entry(COMMANDS[command])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return 0


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("bad_input"), lambda args: run_command("pnp-train", args))


def _files(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in CASES])
def test_bad_input_ends_as_promised(case: Case, workspace, capfd):
    folder = workspace.case_dir(case.name)
    args = arguments(case, workspace, folder)
    before = _files(folder) if case.untouched else None
    capfd.readouterr()
    status = run_command(case.command, args)
    out, err = capfd.readouterr()
    said = err if case.status else out + err
    assert status == case.status, f"exit {status}, expected {case.status}\n{err[-2000:]}"
    assert case.says in said, said[-2000:]
    assert "Traceback" not in err
    if case.status:  # pnp's own message, or Hydra's for a config it cannot compose
        assert "error:" in err or "full_key:" in err, err[-1000:]
    assert not (folder / "ran").exists()  # nothing named by an input file was executed
    if before is not None:
        assert _files(folder) == before
