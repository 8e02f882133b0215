"""A watchdog that ends the local Ray a driver started once that driver is gone, however it ended.

Ray's own reaper stops the GCS and raylet when their driver dies, but after a `kill -9` of the driver
its dashboard and runtime-env agents live on, orphaned. Before a local start the driver marks its
environment (`OWNER_ENV`, inherited by every Ray process) and starts this watchdog in a session of its
own; the watchdog polls the driver and, once it has exited, kills every process carrying the mark,
then exits itself. Linux only (it reads /proc); elsewhere it is not started.

    python -m app.guardian DRIVER_PID DRIVER_START_TICKS MARK
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

OWNER_ENV = "DYNFACE_RAY_OWNER"
POLL_SECONDS = 1.0


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None when it does not exist): with the pid
    it names one process, even after the pid is reused."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[19])


def marked_processes(mark: str, variable: str = OWNER_ENV) -> list[int]:
    """Pids of the processes whose environment holds `variable`=mark."""
    needle = f"{variable}={mark}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def kill_marked(mark: str) -> int:
    killed = 0
    for pid in marked_processes(mark):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def watch(driver_pid: int, driver_ticks: int, mark: str) -> None:
    while start_ticks(driver_pid) == driver_ticks:
        time.sleep(POLL_SECONDS)
    kill_marked(mark)


def mark_and_watch() -> str | None:
    """Mark this process's environment for the Ray it is about to start and start the watchdog;
    returns the mark (None where /proc is missing)."""
    ticks = start_ticks(os.getpid())
    if ticks is None:
        return None
    mark = uuid.uuid4().hex
    os.environ[OWNER_ENV] = mark
    subprocess.Popen(
        [sys.executable, "-m", "app.guardian", str(os.getpid()), str(ticks), mark],
        start_new_session=True,  # neither a terminal's Ctrl-C nor the driver's death reaches it
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != OWNER_ENV},  # never kill itself by the mark
    )
    return mark


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
