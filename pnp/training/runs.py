"""Run directories: one per command or pipeline stage, resumable, never half-written.

A stage directory holds ``stage.json`` (the stage's config, written when it
starts), Lightning's ``checkpoints/`` and TensorBoard ``tb/`` while it trains,
and ``report.json`` once it has finished. Running a stage again in the same
directory skips it when it finished with the same config, resumes it from
``checkpoints/last.ckpt`` (every epoch) or ``checkpoints/interrupted.ckpt`` (written
when SIGINT or SIGTERM stops it) when it was interrupted, and refuses when the config
differs, so earlier results are never overwritten by a different experiment. A
setting added to pnp after the stage ran counts as no change while it is left at its
default, so a newer pnp resumes and skips the stages an older one wrote.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pnp.core.io import read_json, write_json_atomic

STAGE_FILE = "stage.json"
REPORT_FILE = "report.json"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"  # written after every epoch
INTERRUPTED_CHECKPOINT = Path("checkpoints") / "interrupted.ckpt"  # written when a run is stopped mid-epoch


RESUME_HINT = "interrupted; run the same command again to resume"
DEBUG_VARIABLE = "PNP_DEBUG"  # set (e.g. PNP_DEBUG=1): a user error raises with its traceback, not a one-line message


@contextlib.contextmanager
def interrupts_recorded(record: list[int]):
    """Note SIGINT/SIGTERM in ``record``, then interrupt as Ctrl-C does.

    Lightning turns an interruption into an exit of its own (status 1, or 0 for
    SIGTERM) after writing the interrupted stage's checkpoint; the record tells such
    an exit from any other, so a command can say so and exit 130/143.
    """

    def handler(signum, frame):
        record.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def script_main(main: Callable[[], Any]) -> None:
    """Run a script's ``main`` as a command: a ``SystemExit`` with a message is bad input.

    The scripts end bad input by raising ``SystemExit("what was wrong and what to do")``;
    here its message is printed without a traceback and the status is 2, as argparse gives
    for a bad argument (Python's own would be 1, an internal error's). Other statuses pass.
    """
    try:
        main()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise


def interrupted_status(record: list[int]) -> int:
    """The exit status of a command stopped by the signals in ``record``: 130 (SIGINT) or 143 (SIGTERM)."""
    return 143 if record and record[0] == signal.SIGTERM else 130


class StageConflictError(RuntimeError):
    """An output directory holds a stage run with a different config."""


def _read_record(path: Path) -> dict | None:
    """A JSON record as a dict, or None when it is unreadable (truncated, not JSON, not an object)."""
    try:
        record = read_json(path)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_global_zero() -> bool:
    """True in the process that writes files (rank 0), also before any Trainer exists.

    Under a process group (Lightning's DDP or detectron2's ``launch``) the group's
    rank decides; before one exists, the rank Lightning reads from the environment.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


_NO_DEFAULT = object()


def _differences(old: Any, new: Any, defaults: Any = None, prefix: str = "") -> list[str]:
    """What changed from ``old`` to ``new``; a key only ``new`` has, at its value in ``defaults``, is no change."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        defaults = defaults if isinstance(defaults, Mapping) else {}
        out = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                if new[key] != defaults.get(key, _NO_DEFAULT):
                    out.append(f"{where} (new: {_short(new[key])})")
            elif key not in new:
                out.append(f"{where} (was {_short(old[key])})")
            else:
                out += _differences(old[key], new[key], defaults.get(key), where)
        return out
    return [] if old == new else [f"{prefix}: {_short(old)} -> {_short(new)}"]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class StageDir:
    """The directory of one stage and what state a previous run left it in."""

    path: Path
    name: str
    config: dict
    # what a finished stage leaves (paths relative to ``path``); one missing makes the stage run again
    outputs: tuple[str, ...] = ()
    # more for stage.json that is not compared between runs (e.g. where the data files were)
    record: dict = field(default_factory=dict)
    # each setting as pnp ran before it existed, shaped as ``config``: a setting added to pnp
    # since the stage ran (so missing from its stage.json) and set to that value is no change
    defaults: dict = field(default_factory=dict)

    def __post_init__(self):
        self.path = Path(self.path)

    @property
    def report_path(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest resume point: the last epoch's checkpoint, or the one an interruption wrote after it."""
        found = [p for p in (self.path / LAST_CHECKPOINT, self.path / INTERRUPTED_CHECKPOINT) if p.is_file()]
        return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None

    def previous_config(self) -> dict | None:
        path = self.path / STAGE_FILE
        if not path.is_file():
            return None
        record = _read_record(path)
        if record is None or not isinstance(record.get("config"), dict):
            raise StageConflictError(
                f"{path} cannot be read, so pnp cannot tell how the results in {self.path} were made; "
                f"choose another out_dir, or delete {self.path} to run stage {self.name!r} again"
            )
        return record["config"]

    def is_done(self) -> bool:
        if not self.report_path.is_file():
            return False
        record = _read_record(self.report_path)
        if record is None:
            self._set_aside(self.report_path, "cannot be read")
            return False
        if record.get("status") != "done":
            return False
        missing = [name for name in self.outputs if not (self.path / name).exists()]
        if missing:
            self._set_aside(self.report_path, f"says the stage finished, but {self.path / missing[0]} is missing")
            return False
        return True

    def _set_aside(self, path: Path, why: str) -> None:
        """Move an untrustworthy record out of the way (kept beside it) and say so."""
        if is_global_zero():
            aside = path.with_name(path.name + ".set-aside")
            path.replace(aside)
            print(f"[pnp] {path} {why}; set aside as {aside.name}, stage {self.name!r} runs again", flush=True)

    def check(self) -> str:
        """``"new"``, ``"resume"`` or ``"done"``; raise if a previous run used another config."""
        previous = self.previous_config()
        if previous is None:
            if self.report_path.is_file() or self.last_checkpoint is not None:
                raise StageConflictError(
                    f"{self.path} holds results but no {STAGE_FILE}, so pnp cannot tell how they were made; "
                    "choose another out_dir"
                )
            return "new"
        # a JSON round trip makes tuples lists, as in the stored copy
        diffs = _differences(previous, json.loads(json.dumps(self.config)), json.loads(json.dumps(self.defaults)))
        if diffs:
            shown = "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")
            raise StageConflictError(
                f"stage {self.name!r} in {self.path} was run with a different config ({shown}). "
                f"Choose another out_dir, or delete {self.path} to run the stage again"
            )
        if self.is_done():
            return "done"
        return "resume" if self.last_checkpoint is not None else "new"

    def start(self) -> None:
        if is_global_zero():
            write_json_atomic(self.path / STAGE_FILE, {"stage": self.name, "config": self.config, **self.record})

    def finish(self, report: dict) -> dict:
        report = {"stage": self.name, "status": "done", **report}
        if is_global_zero():
            write_json_atomic(self.report_path, report)
        return report

    def report(self) -> dict:
        return read_json(self.report_path)
