"""Settings every layer reads: where brickwork keeps its files. The bottom of the import order (imports nothing
of brickwork)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where brickwork keeps converted models and prepared corpora (``$BRICKWORK_HOME``)."""
    return Path(os.environ.get("BRICKWORK_HOME", Path.home() / ".cache" / "brickwork"))
