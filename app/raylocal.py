"""Start or join Ray without sending traffic off the machine.

`connect_ray()` reuses a Ray already initialised in this process, joins `address` (or the
`RAY_ADDRESS` environment variable) when given, and otherwise starts a local Ray with the
dashboard off. Two facts from shared/design/PLATFORM.md shape it:

* Ray 2.60 probes the cloud metadata address at start unless the `HOME` of the starting process
  holds `ray_bootstrap_config.yaml` with `provider: {type: local}`: Ray is started with `HOME`
  pointing at such a folder (`ray_home()`), restored afterwards.
* Usage statistics are turned off (`RAY_USAGE_STATS_ENABLED=0`) unless the caller set it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.guardian import OWNER_ENV, mark_and_watch

RAY_HOME_ENV = "DYNFACE_RAY_HOME"
BOOTSTRAP_NAME = "ray_bootstrap_config.yaml"
BOOTSTRAP_TEXT = (
    "# Written by dynface: tells Ray this is a local cluster (no cloud metadata probe).\n"
    "provider:\n  type: local\n"
)


def ray_home() -> Path:
    """The folder used as HOME while Ray starts: `DYNFACE_RAY_HOME`, else a per-user temp folder."""
    env = os.environ.get(RAY_HOME_ENV)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"dynface-ray-home-{os.getuid()}"


def ensure_bootstrap_home(folder: Path) -> Path:
    """Create `folder` with the local-provider bootstrap file (left alone when already right)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / BOOTSTRAP_NAME
    if not path.is_file() or path.read_text() != BOOTSTRAP_TEXT:
        path.write_text(BOOTSTRAP_TEXT)
    return folder


@contextlib.contextmanager
def ray_start_environment(home: Path | None = None) -> Iterator[Path]:
    """HOME -> a folder holding the bootstrap file, usage stats off; restored on exit. Processes
    Ray spawns meanwhile (raylet, GCS, workers) keep this HOME."""
    folder = ensure_bootstrap_home(home or ray_home())
    previous = os.environ.get("HOME")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["HOME"] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = previous


@dataclass(frozen=True)
class RayConnection:
    """address: the cluster's GCS address; started: this call started Ray (so it should stop it)."""

    address: str
    started: bool

    def shutdown(self) -> None:
        """Stop Ray if this connection started it; joining drivers leave the cluster running."""
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> RayConnection:
    """Join or start Ray (see module docstring). `num_cpus` only applies to a local start."""
    import ray

    if ray.is_initialized():
        return RayConnection(address=_current_address(), started=False)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        # Joining starts no head processes (no metadata probe); HOME stays the user's, where
        # Ray looks for the cluster's auth token.
        ray.init(address=address, logging_level="WARNING")
        return RayConnection(address=_current_address(), started=False)
    with ray_start_environment() as home:
        # Every Ray process inherits the mark; a watchdog ends them if this process dies unannounced.
        mark_and_watch()
        try:
            # address="local": start our own. Without it Ray joins whatever cluster `ray start` last
            # recorded on this machine (/tmp/ray/ray_current_cluster), not the local Ray asked for.
            ray.init(
                address="local",
                num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
                include_dashboard=False,
                logging_level="WARNING",
            )
        finally:
            os.environ.pop(OWNER_ENV, None)  # later children of this process are not Ray's
    _export_token_path(home)
    return RayConnection(address=_current_address(), started=True)


def _export_token_path(home: Path) -> None:
    """Ray 2.60 enables token auth for a local start and writes the token under HOME/.ray: point
    RAY_AUTH_TOKEN_PATH at it, so drivers joining later (child processes with RAY_ADDRESS) and a
    later local start in this process (whose new GCS would look under HOME) find the same token."""
    token = home / ".ray" / "auth_token"
    if token.is_file() and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)


def _current_address() -> str:
    import ray

    return str(ray.get_runtime_context().gcs_address)


def cluster_has_gpus() -> bool:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) >= 1.0
