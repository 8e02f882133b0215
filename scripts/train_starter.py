"""Train every DynFace component on CPU and write the `starter` pack.

    python scripts/train_starter.py weights/starter --budget-minutes 75 --threads 1
    python scripts/train_starter.py /tmp/pack --quick            # tiny sizes, seconds
    python scripts/train_starter.py weights/starter --check      # only check an existing pack

The command-line logic lives in `app.train_cli` (`dynface train starter`).
"""

from __future__ import annotations

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "starter", *sys.argv[1:]]))
