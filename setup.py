"""Packaging hook: ship the top-level ``configs/`` tree inside the package.

pnp's Hydra configs live in ``configs/`` beside the package so a checkout reads
them in place; an installed (non-editable) pnp finds the same tree as
``pnp/configs`` in its wheel. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):  # an editable install reads configs/ in place
            shutil.copytree(CONFIGS, Path(self.build_lib) / "pnp" / "configs", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConfigs})
