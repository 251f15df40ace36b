"""Install detectron2 with nothing but pip, or keep the one that is there.

    python -m pnp.detection.install            # what `make setup-detection` runs
    python -m pnp.detection.install --force    # reinstall the Python-only build

detectron2 is not on PyPI under its own name. The ``pb1-detectron2`` sdist holds
the Python sources of detectron2 v0.6 but not the C++ sources of its compiled
ops, so its own build fails. This script downloads that sdist with pip, empties
its extension list, drops its pin of the ``black`` formatter (unneeded, and
uninstallable on recent Pythons), installs its dependencies and then the package
with ``--no-build-isolation`` (its ``setup.py`` imports the torch installed here).
``setuptools<81`` is pinned because ``detectron2.model_zoo`` imports
``pkg_resources``. The missing ops and Pillow >= 10 are handled at import time by
:mod:`pnp.detection.compat`.

When a detectron2 with compiled ops is already importable (built from source),
nothing is installed or changed.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "pb1-detectron2==0.6"
# detectron2 0.6's install_requires without black; fvcore/iopath locked as detectron2 locks them
DEPENDENCIES = (
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "future",
    "pydot",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
    "setuptools<81",
)
# (text in the sdist's setup.py, what replaces it)
SETUP_PATCHES = (
    ("ext_modules=get_extensions(),", "ext_modules=[],"),
    ('"black==21.4b2",', ""),
)


class InstallError(RuntimeError):
    """detectron2 could not be installed."""


def installed_detectron2() -> str | None:
    """``"complete"`` (compiled ops present), ``"python-only"``, or None when detectron2 is not importable."""
    if importlib.util.find_spec("detectron2") is None:
        return None
    return "complete" if importlib.util.find_spec("detectron2._C") is not None else "python-only"


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise InstallError(f"pip failed: {' '.join(command)}")


def patch_setup(source: Path) -> None:
    """Empty the sdist's extension list and drop its black pin, refusing an sdist that does not match."""
    setup_py = source / "setup.py"
    text = setup_py.read_text()
    for old, new in SETUP_PATCHES:
        if text.count(old) != 1:
            raise InstallError(
                f"{setup_py} does not contain {old!r} exactly once; this is not the {SDIST} sdist this script knows"
            )
        text = text.replace(old, new)
    setup_py.write_text(text)


def unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # Python < 3.11.4: refuse members that would land outside ``into``
            for member in tar.getmembers():
                target = (into / member.name).resolve()
                if into.resolve() not in target.parents and target != into.resolve():
                    raise InstallError(f"{archive} holds {member.name!r}, which points outside the folder it unpacks to")
            tar.extractall(into)
    roots = [p for p in into.iterdir() if (p / "setup.py").is_file()]
    if len(roots) != 1:
        raise InstallError(f"{archive} does not unpack to one folder holding setup.py")
    return roots[0]


def install(force: bool = False) -> str:
    """Install detectron2 unless a usable one is there; returns what was done."""
    state = installed_detectron2()
    if state == "complete":
        return "a detectron2 with compiled ops is installed; it is used as it is"
    if state == "python-only" and not force:
        return "detectron2 (Python sources, without compiled ops) is already installed; --force reinstalls it"
    if importlib.util.find_spec("torch") is None:
        raise InstallError("torch must be installed first: detectron2's setup.py imports it (run `make setup`)")
    pip("install", "--quiet", *DEPENDENCIES)
    with tempfile.TemporaryDirectory(prefix="pnp-detectron2-") as tmp:
        tmp_path = Path(tmp)
        pip("download", "--quiet", "--no-deps", "--no-build-isolation", SDIST, "-d", str(tmp_path))
        archives = sorted(tmp_path.glob("*.tar.gz"))
        if len(archives) != 1:
            raise InstallError(f"pip download {SDIST} gave {[p.name for p in tmp_path.iterdir()]}, not one .tar.gz sdist")
        source = unpack(archives[0], tmp_path / "src")
        patch_setup(source)
        pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--force-reinstall", str(source))
    probe = "from pnp.detection.compat import import_detectron2; import_detectron2(); import detectron2.modeling"
    check = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise InstallError(f"detectron2 was installed but does not import:\n{check.stderr.strip()}")
    return "installed detectron2 0.6 (Python sources; compiled ops replaced by pnp.detection.compat)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="reinstall the Python-only detectron2 even if present")
    args = parser.parse_args(argv)
    try:
        print(install(force=args.force))
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
