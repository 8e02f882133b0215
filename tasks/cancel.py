"""Stopping a run on request (the CLI's Ctrl-C): a process-wide flag the flow and the sampling loop read.

Once requested, the flow starts no new wave, the sampling loop dispatches no new batch and ends the
ones in flight (their faces are recorded as cancelled), what is already restored is composed and
committed, and the run closes with status `cancelled`.
"""

from __future__ import annotations

import threading

CANCELLED_ERROR = "cancelled: the run was stopped before this face was restored"

_requested = threading.Event()


def request_cancel() -> None:
    _requested.set()


def cancel_requested() -> bool:
    return _requested.is_set()


def reset_cancel() -> None:
    """Clear the flag (a new run in the same process starts uncancelled)."""
    _requested.clear()
