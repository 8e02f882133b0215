"""The catalog lease (catalogs/lease.py): one holder at a time, on a local disk and on S3 (moto on
loopback); free again when released, expired, or when its process on this host is gone."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from s3_server import s3_server

from catalogs.lease import (
    Heartbeat,
    LeaseHeldError,
    LeaseLostError,
    acquire,
    current_holder,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def catalog(request, tmp_path, monkeypatch):
    if request.param == "local":
        yield str(tmp_path / "catalog")
        return
    with s3_server() as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        s3.create_bucket("archive")
        yield "s3://archive/catalog"


def test_a_second_run_is_refused_naming_the_holder(catalog):
    lease = acquire(catalog, "run-a", ttl=60)
    with pytest.raises(LeaseHeldError, match="run-a") as refused:
        acquire(catalog, "run-b", ttl=60)
    assert refused.value.holder.run_id == "run-a"
    assert current_holder(catalog).run_id == "run-a"
    lease.release()
    assert current_holder(catalog) is None
    second = acquire(catalog, "run-b", ttl=60)
    assert second.record.generation == lease.record.generation + 1


def test_contenders_racing_for_a_free_lease_have_one_winner(catalog):
    def contend(k: int) -> str | None:
        try:
            return acquire(catalog, f"run-{k}", ttl=60).record.run_id
        except LeaseHeldError:
            return None

    with ThreadPoolExecutor(6) as pool:
        winners = [w for w in pool.map(contend, range(6)) if w is not None]
    assert len(winners) == 1
    assert current_holder(catalog).run_id == winners[0]


def test_an_expired_lease_is_taken_and_its_old_holder_learns_it_lost(catalog, monkeypatch):
    import catalogs.lease as lease_module

    old = acquire(catalog, "run-a", ttl=60)
    monkeypatch.setattr(lease_module.time, "time", lambda: old.record.expires_at + 1)
    new = acquire(catalog, "run-b", ttl=60)
    assert new.record.run_id == "run-b"
    with pytest.raises(LeaseLostError):
        old.renew()
    assert old.lost
    old.release()  # releasing its own, older record leaves the new holder's lease held
    assert current_holder(catalog).run_id == "run-b"


def test_renewal_keeps_a_live_lease(catalog, monkeypatch):
    import catalogs.lease as lease_module

    lease = acquire(catalog, "run-a", ttl=60)
    first_expiry = lease.record.expires_at
    clock = time.time() + 50
    monkeypatch.setattr(lease_module.time, "time", lambda: clock)
    lease.renew()
    clock += 30  # past the first expiry, within the renewed one
    assert lease.record.expires_at > first_expiry
    with pytest.raises(LeaseHeldError):
        acquire(catalog, "run-b", ttl=60)


def test_a_lease_whose_process_is_gone_is_free_at_once(catalog):
    killed = "from catalogs.lease import acquire; import sys; acquire(sys.argv[1], 'killed-run', ttl=3600)"
    subprocess.run([sys.executable, "-c", killed, catalog], check=True, cwd=REPO)  # exits holding it
    assert current_holder(catalog) is None
    assert acquire(catalog, "next-run", ttl=3600).record.run_id == "next-run"


def test_a_lease_of_a_live_process_is_not_free(catalog):
    holding = (
        "from catalogs.lease import acquire; import sys; acquire(sys.argv[1], 'live-run', ttl=3600); input()"
    )
    process = subprocess.Popen([sys.executable, "-c", holding, catalog], cwd=REPO, stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while current_holder(catalog) is None:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
        with pytest.raises(LeaseHeldError, match="live-run"):
            acquire(catalog, "next-run", ttl=3600)
    finally:
        process.communicate(b"\n", timeout=60)


def test_wait_returns_once_the_holder_releases(catalog):
    lease = acquire(catalog, "run-a", ttl=60)
    told: list[str] = []
    threading.Timer(1.0, lease.release).start()
    second = acquire(
        catalog, "run-b", ttl=60, wait=True, poll_seconds=0.2, on_wait=lambda h: told.append(h.run_id)
    )
    assert second.record.run_id == "run-b"
    assert told == ["run-a"]


def test_the_heartbeat_renews_and_releases(tmp_path):
    catalog = str(tmp_path / "catalog")
    lease = acquire(catalog, "run-a", ttl=2.0)
    with Heartbeat(lease):
        time.sleep(5.0)  # more than twice the ttl: only the renewals (every 0.5 s) keep it held
        assert current_holder(catalog).run_id == "run-a"
    assert current_holder(catalog) is None
