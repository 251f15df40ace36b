"""pnp-prune, runnable from a checkout: `python tools/prune.py [overrides]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnp.cli.main import prune  # noqa: E402

if __name__ == "__main__":
    prune()
