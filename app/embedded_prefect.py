"""The Prefect API server `dynface restore` runs on when no server is configured, tied to its life.

Prefect's own ephemeral server is a child in the CLI's process group: a terminal's Ctrl-C reaches it
too and kills it under the running flow, and after a `kill -9` of the CLI it lives on, orphaned and
listening. This one is started the same way (uvicorn over `prefect.server.api.server:create_app`,
127.0.0.1 only, no UI) but in a session of its own, so a terminal's Ctrl-C is the CLI's alone to
handle, and with the kernel's parent-death signal (Linux `PR_SET_PDEATHSIG`), so it dies with the
CLI however the CLI ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
# A port found free can be taken by another process before uvicorn binds it (seen with Ray starting
# beside a run); the server then exits at once and is started again on another port.
START_ATTEMPTS = 3


class ServerExited(RuntimeError):
    """The server process ended before it answered (typically: its port was taken meanwhile)."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    import prefect

    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
    env.pop("PREFECT_API_URL", None)
    command = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
        "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    return subprocess.Popen(
        command,
        env=env,
        start_new_session=True,  # not in the terminal's foreground group: Ctrl-C is not sent to it
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        stdout=subprocess.DEVNULL,
    )


def wait_healthy(process: subprocess.Popen[bytes], api_url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerExited(f"the Prefect server exited with code {process.returncode} while starting")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{api_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
    raise RuntimeError(f"the Prefect server did not answer at {api_url} within {timeout:.0f} s")


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API URL to run flows against: the configured one, or a server started here for
    the duration of the block (and no longer than this process)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    process, api_url = _start_healthy(float(os.environ.get(STARTUP_TIMEOUT_ENV, "120")))
    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            yield api_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start_healthy(timeout: float) -> tuple[subprocess.Popen[bytes], str]:
    """A healthy server and its API URL; a server that exits while starting is tried again on a new
    port, up to START_ATTEMPTS times."""
    for attempt in range(1, START_ATTEMPTS + 1):
        port = _free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        process = start_server(port)
        try:
            wait_healthy(process, api_url, timeout)
            return process, api_url
        except ServerExited:
            if attempt == START_ATTEMPTS:
                raise
        except BaseException:
            process.kill()
            process.wait()
            raise
    raise AssertionError("unreachable")
