"""Test-wide settings: no traffic off this machine, small thread counts, shared-material fixtures."""

from __future__ import annotations

import os

# Set before anything imports Prefect, Ray or botocore (see shared/design/PLATFORM.md).
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_key, _value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from dynface.paths import shared_dir  # noqa: E402

# Tests use small tensors: one intra-op thread each is faster, and leaves the second core to the
# second pytest-xdist worker.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    path = shared_dir() / "golden"
    if not path.is_dir():
        pytest.skip(f"GOLDEN VECTORS MISSING: {path} not found (set DYNFACE_SHARED); golden tests skipped")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_dir() / "data"
    if not (path / "MANIFEST.csv").is_file():
        pytest.skip(f"SHARED DATA MISSING: {path}/MANIFEST.csv not found (set DYNFACE_SHARED); test skipped")
    return path
