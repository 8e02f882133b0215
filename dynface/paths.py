"""Where the read-only shared material lives (golden vectors, research data)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """`DYNFACE_SHARED` if set, else the `shared/` folder beside the repository checkout."""
    env = os.environ.get("DYNFACE_SHARED")
    return Path(env) if env else REPO_ROOT.parent / "shared"
