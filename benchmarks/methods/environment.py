"""The machine and the commit a benchmark result was measured on (shared by the methods and detection benchmarks)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def environment(device: str) -> dict:
    env = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "device": device,
        **code_version(),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def code_version() -> dict:
    """What ran: the commit (and whether tracked files differed from it), torch and torch-pruning."""
    return {
        "torch": torch.__version__,
        "torch_pruning": _distribution_version("torch-pruning"),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _distribution_version(name: str) -> str | None:
    """The installed distribution's version: torch-pruning 1.6.1's own ``__version__`` still says 1.6.0."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
