"""Run directories: one per command or pipeline stage, resumable, never half-written.

A stage directory holds ``stage.json`` (the stage's config, written when it
starts), Lightning's ``checkpoints/`` and TensorBoard ``tb/`` while it trains,
and ``report.json`` once it has finished. Running a stage again in the same
directory skips it when it finished with the same config, resumes it from
``checkpoints/last.ckpt`` (every epoch) or ``checkpoints/interrupted.ckpt`` (written
when SIGINT or SIGTERM stops it) when it was interrupted, and refuses when the config
differs, so earlier results are never overwritten by a different experiment.
"""

from __future__ import annotations

import contextlib
import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pnp.core.io import read_json, write_json_atomic

STAGE_FILE = "stage.json"
REPORT_FILE = "report.json"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"  # written after every epoch
INTERRUPTED_CHECKPOINT = Path("checkpoints") / "interrupted.ckpt"  # written when a run is stopped mid-epoch


RESUME_HINT = "interrupted; run the same command again to resume"


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


def interrupted_status(record: list[int]) -> int:
    """The exit status of a command stopped by the signals in ``record``: 130 (SIGINT) or 143 (SIGTERM)."""
    return 143 if record and record[0] == signal.SIGTERM else 130


class StageConflictError(RuntimeError):
    """An output directory holds a stage run with a different config."""


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


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{where} (new: {new[key]!r})")
            elif key not in new:
                out.append(f"{where} (was {old[key]!r})")
            else:
                out += _differences(old[key], new[key], where)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


@dataclass
class StageDir:
    """The directory of one stage and what state a previous run left it in."""

    path: Path
    name: str
    config: dict

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
        return read_json(path).get("config")

    def is_done(self) -> bool:
        if not self.report_path.is_file():
            return False
        return read_json(self.report_path).get("status") == "done"

    def check(self) -> str:
        """``"new"``, ``"resume"`` or ``"done"``; raise if a previous run used another config."""
        previous = self.previous_config()
        if previous is None:
            if self.is_done() or self.last_checkpoint is not None:
                raise StageConflictError(
                    f"{self.path} holds results but no {STAGE_FILE}, so pnp cannot tell how they were made; "
                    "choose another out_dir"
                )
            return "new"
        # a JSON round trip makes tuples lists, as in the stored copy
        diffs = _differences(previous, json.loads(json.dumps(self.config)))
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
            write_json_atomic(self.path / STAGE_FILE, {"stage": self.name, "config": self.config})

    def finish(self, report: dict) -> dict:
        report = {"stage": self.name, "status": "done", **report}
        if is_global_zero():
            write_json_atomic(self.report_path, report)
        return report

    def report(self) -> dict:
        return read_json(self.report_path)
