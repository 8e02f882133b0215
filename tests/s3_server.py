"""A loopback S3 server for tests: moto's threaded server bound to 127.0.0.1 on a free port.

    with s3_server() as s3:
        s3.create_bucket("catalog")
        monkeypatch.setenv(...)  # apply s3.env (dummy keys, no metadata probe, endpoint)
        Catalog("s3://catalog/x", storage_options=s3.storage_options)

The server runs in a child process: delta-rs holds the GIL through some S3 calls (`DeltaTable.history`
in deltalake 1.6.6), which starves a server thread in the test's own process until the request
times out. Each server has its own state, reset on exit. s3fs caches filesystem instances (and with
them the endpoint read from the environment), so the cache is cleared on entry and exit.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

DUMMY_KEY = "dynface-test-key"
DUMMY_SECRET = "dynface-test-secret"


@dataclass(frozen=True)
class S3Server:
    """Where the loopback server listens and how clients reach it."""

    endpoint_url: str

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server (a fresh dict each time)."""
        return {
            "key": DUMMY_KEY,
            "secret": DUMMY_SECRET,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment for botocore/s3fs: dummy keys, no metadata probe, endpoint for S3 and all services."""
        return {
            "AWS_ACCESS_KEY_ID": DUMMY_KEY,
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            # A proxy configured on the machine must not see loopback traffic.
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def create_bucket(self, name: str) -> str:
        """Create bucket `name` (no region: moto rejects a location constraint here); returns `s3://name`."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=DUMMY_KEY,
            aws_secret_access_key=DUMMY_SECRET,
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"


def _clear_s3fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


# The child: moto's threaded server on a free loopback port; prints the port, serves until stdin closes.
_SERVE = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start moto on 127.0.0.1 (free port) in a child process; yield its `S3Server`; reset and stop it."""
    child = subprocess.Popen(
        [sys.executable, "-c", _SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        endpoint = f"http://127.0.0.1:{port}"
        _clear_s3fs_cache()
        yield S3Server(endpoint_url=endpoint)
        request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(request, timeout=10):
            pass
    finally:
        _clear_s3fs_cache()
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@contextmanager
def s3_environment(*buckets: str) -> Iterator[S3Server]:
    """`s3_server` with its variables (dummy keys, endpoint, no metadata probe) set in this process's
    environment until exit, and `buckets` created: what clients that read the environment need."""
    import pytest

    with s3_server() as server, pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        for name in buckets:
            server.create_bucket(name)
        yield server
