"""The catalog lease: at most one run restores into a catalog at a time.

A lease is a sequence of small JSON records under `{catalog}/_lease/`, one file per *generation*
(`00000001.json`, `00000002.json`, ...). The newest generation is the lease's state. A run takes the lease by
creating the next generation's file with an exclusive create, which only one contender can win: `O_EXCL` on a
local disk, a conditional put (`If-None-Match: *`) on S3. It may do so only when the newest record is free:
released by its run, past its expiry (its run stopped renewing it), or held by a process of this host that no
longer exists (a `kill -9`: the next run need not wait for the expiry).

The holder renews its record (a heartbeat that moves `expires_at`) and releases it when the run ends. A holder
that finds a newer generation when it renews has lost the lease (it was presumed dead) and must stop
committing: `Lease.lost` says so.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import fsspec
import psutil

LEASE_FOLDER = "_lease"
DEFAULT_TTL_SECONDS = 120.0
TTL_ENV = "DYNFACE_LEASE_TTL"  # seconds; tests and the soak shorten it


class LeaseHeldError(RuntimeError):
    """Another live run holds the catalog's lease."""

    def __init__(self, holder: LeaseRecord, catalog: str) -> None:
        self.holder = holder
        super().__init__(
            f"catalog {catalog} is in use by run {holder.run_id} (host {holder.host}, pid {holder.pid}, "
            f"since {holder.acquired_at}); wait for it to end or use --wait"
        )


class LeaseLostError(RuntimeError):
    """This run's lease was taken by another run (it missed its renewals): it must not commit more."""


@dataclass(frozen=True)
class LeaseRecord:
    generation: int
    run_id: str
    host: str
    pid: int
    pid_started: float  # the holder process's start time, so a reused pid is not mistaken for it
    acquired_at: str
    expires_at: float  # unix seconds
    released: bool = False

    def is_free(self, now: float) -> bool:
        return self.released or now > self.expires_at or self._holder_is_gone()

    def _holder_is_gone(self) -> bool:
        if self.host != socket.gethostname():
            return False  # another machine: only the expiry can tell
        try:
            return abs(psutil.Process(self.pid).create_time() - self.pid_started) > 1.0
        except psutil.NoSuchProcess:
            return True


def default_ttl() -> float:
    return float(os.environ.get(TTL_ENV, DEFAULT_TTL_SECONDS))


def _record_name(generation: int) -> str:
    return f"{generation:08d}.json"


def _lease_paths(catalog: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(catalog)
    return fs, f"{root.rstrip('/')}/{LEASE_FOLDER}"


def _generations(fs: fsspec.AbstractFileSystem, folder: str) -> list[int]:
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False, refresh=True)]
    except FileNotFoundError:
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def _encode(record: LeaseRecord) -> bytes:
    return json.dumps(asdict(record)).encode()


def _newest(fs: fsspec.AbstractFileSystem, folder: str) -> LeaseRecord | None:
    """The newest generation's record (the lease's state), None before the first run took it."""
    generations = _generations(fs, folder)
    if not generations:
        return None
    with fs.open(f"{folder}/{_record_name(generations[-1])}", "rb") as f:
        return LeaseRecord(**json.loads(f.read()))


def current_holder(catalog: str) -> LeaseRecord | None:
    """The newest lease record when it is held (not free), else None."""
    record = _newest(*_lease_paths(catalog))
    return None if record is None or record.is_free(time.time()) else record


def _create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` only if it does not exist; False when another writer created it first."""
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


@dataclass
class Lease:
    """A held lease: `renew` it on a heartbeat and `release` it at the end (`Heartbeat` does both)."""

    catalog: str
    record: LeaseRecord
    ttl: float
    lost: bool = False

    def _write(self, record: LeaseRecord) -> None:
        fs, folder = _lease_paths(self.catalog)
        fs.pipe_file(f"{folder}/{_record_name(record.generation)}", _encode(record))
        self.record = record

    def _superseded(self) -> bool:
        fs, folder = _lease_paths(self.catalog)
        generations = _generations(fs, folder)
        return bool(generations) and generations[-1] != self.record.generation

    def renew(self) -> None:
        """Move the expiry forward; raises LeaseLostError (and sets `lost`) when a newer run took over."""
        if self.lost or self._superseded():
            self.lost = True
            raise LeaseLostError(f"run {self.record.run_id} lost the lease on {self.catalog}")
        self._write(replace(self.record, expires_at=time.time() + self.ttl))

    def release(self) -> None:
        """Mark this run's record released. Harmless after a takeover: the newest record is the state."""
        self._write(replace(self.record, released=True))


def acquire(
    catalog: str,
    run_id: str,
    *,
    ttl: float | None = None,
    wait: bool = False,
    poll_seconds: float = 2.0,
    on_wait: Callable[[LeaseRecord], None] | None = None,
) -> Lease:
    """Take the catalog's lease for `run_id`. When a live run holds it: raise LeaseHeldError, or with
    `wait`, poll until it is free (`on_wait` is called once with the holder)."""
    ttl = default_ttl() if ttl is None else ttl
    fs, folder = _lease_paths(catalog)
    fs.makedirs(folder, exist_ok=True)  # a no-op on object stores
    told = False
    while True:
        newest = _newest(fs, folder)
        if newest is not None and not newest.is_free(time.time()):
            if not wait:
                raise LeaseHeldError(newest, catalog)
            if on_wait is not None and not told:
                on_wait(newest)
                told = True
            time.sleep(poll_seconds)
            continue
        previous = newest.generation if newest is not None else 0
        me = psutil.Process()
        record = LeaseRecord(
            generation=previous + 1,
            run_id=run_id,
            host=socket.gethostname(),
            pid=me.pid,
            pid_started=me.create_time(),
            acquired_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            expires_at=time.time() + ttl,
        )
        if _create_exclusive(fs, f"{folder}/{_record_name(record.generation)}", _encode(record)):
            _prune(fs, folder, keep_from=previous)
            return Lease(catalog=catalog, record=record, ttl=ttl)
        # another run created that generation first: look again


def _prune(fs: fsspec.AbstractFileSystem, folder: str, *, keep_from: int) -> None:
    """Remove generations older than `keep_from` (best effort: they are history, not state)."""
    for generation in _generations(fs, folder):
        if generation < keep_from:
            try:
                fs.rm_file(f"{folder}/{_record_name(generation)}")
            except FileNotFoundError:
                pass


class Heartbeat:
    """Renews a lease every `ttl / 4` seconds on a daemon thread until stopped; `lost` turns True when
    a renewal finds the lease taken (the run must then stop committing)."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="dynface-lease", daemon=True)

    @property
    def lost(self) -> bool:
        return self.lease.lost

    def _beat(self) -> None:
        while not self._stop.wait(self.lease.ttl / 4):
            try:
                self.lease.renew()
            except LeaseLostError:
                return
            except Exception:  # noqa: BLE001 - a transient store error: the next beat tries again
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.lease.release()
        except Exception:  # noqa: BLE001 - an unreleased lease expires on its own
            pass
