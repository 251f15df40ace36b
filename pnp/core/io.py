"""Files pnp writes and reads: atomically written text, JSON and tensors; keep scores and keep decisions.

Every writer fills a temporary file beside the target and renames it into place,
so a reader (or a rerun after a kill) sees the old file or the complete new one.
Keep scores (mean keep probability per channel of each group) are one
safetensors file, whichever task made them; keep decisions are ``keep.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

KEEP_SCORES_FILE = "keep_scores.safetensors"
KEEP_FILE = "keep.json"


def replace_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a temporary file beside ``path``, then rename it over ``path``.

    Readers see the old file or the complete new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON; tensors, paths and dataclasses are converted."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_tensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """A safetensors file of ``tensors`` (moved to the CPU), written atomically."""
    from safetensors.torch import save_file

    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return replace_atomically(path, lambda tmp: save_file(plain, str(tmp)))


def save_keep_scores(path: str | Path, scores: Mapping[str, torch.Tensor]) -> Path:
    """Keep scores ``{group name: [size] probabilities}`` as one safetensors file."""
    return save_tensors_atomic({k: torch.as_tensor(v).float() for k, v in scores.items()}, path)


def load_keep_scores(path: str | Path) -> dict[str, torch.Tensor]:
    """The keep scores :func:`save_keep_scores` wrote (safetensors: no code runs on load)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def write_keep_decisions(path: str | Path, groups, keep: Mapping[str, torch.Tensor], info: dict | None = None) -> Path:
    """``keep.json``: kept channel indices per group (one line each), group sizes, how they were read out."""
    doc = {
        "groups": {g.name: keep[g.name].nonzero().flatten().tolist() for g in groups},
        "group_sizes": {g.name: g.size for g in groups},
        "readout": info or {},
    }
    text = json.dumps(doc, indent=2, default=_json_default)
    text = re.sub(r"\[[\d,\s-]*\]", lambda m: json.dumps(json.loads(m.group())), text)  # index lists on one line
    return write_text_atomic(path, text + "\n")


# what a run directory holds besides its results: logs, resume points, records
_NOT_CONTENT = {"checkpoints", "tb", ".hydra", "logs", "stage.json", "report.json"}


def content_digest(*paths: str | Path) -> str:
    """sha256 (16 hex digits) of what the files given, or the result files of the directories given, hold.

    In a directory, logs, resume checkpoints and run records are left out: two runs
    whose results are the same files have the same digest.
    """
    h = hashlib.sha256()
    for path in map(Path, paths):
        files = [path] if not path.is_dir() else sorted(
            p for p in path.rglob("*") if p.is_file() and not _NOT_CONTENT & set(p.relative_to(path).parts)
        )
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]
