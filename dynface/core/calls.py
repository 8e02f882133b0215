"""A ledger of expensive per-face computations, for checks that a pipeline computes each exactly once.

When the environment variable `DYNFACE_CALL_LEDGER` names a file, `record_calls` appends one line
`<name> <count> <pid>` to it (one small O_APPEND write, so processes on one machine, e.g. the driver
and its local Ray actors, can share the file). Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import os
from collections import Counter

LEDGER_ENV = "DYNFACE_CALL_LEDGER"


def record_calls(name: str, count: int) -> None:
    """Note that `name` ran for `count` faces (no-op unless the ledger variable is set)."""
    path = os.environ.get(LEDGER_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{name} {int(count)} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def read_ledger(path: str) -> Counter[str]:
    """{name: total count} of a ledger file."""
    totals: Counter[str] = Counter()
    with open(path) as handle:
        for line in handle:
            name, count, _pid = line.split()
            totals[name] += int(count)
    return totals
