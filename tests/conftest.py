"""Test-wide settings: no traffic off this machine, small thread counts, golden and shared-data fixtures,
and the rule that golden tests (and, where ../shared/data exists, data tests) may never be skipped."""

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
from _golden import GOLDEN_DIR  # noqa: E402

from dynface.paths import shared_dir  # noqa: E402

# Tests use small tensors: one intra-op thread each is faster, and leaves the second core to the
# second pytest-xdist worker.
torch.set_num_threads(1)

# A test is a golden test when it uses the golden_dir fixture, a shared-data test when it uses data_dir;
# collection marks them so the reports that reach the xdist controller carry the kind.
_KIND_OF_FIXTURE = {"golden_dir": "golden", "data_dir": "data"}


def shared_data_present() -> bool:
    return (shared_dir() / "data" / "MANIFEST.csv").is_file()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden vectors shipped in the repository (tests/golden, README there): never skipped."""
    if not (GOLDEN_DIR / "README.md").is_file():
        pytest.skip(f"GOLDEN VECTORS MISSING: {GOLDEN_DIR} not found; a golden test cannot run")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_dir() / "data"
    if not (path / "MANIFEST.csv").is_file():
        pytest.skip(f"SHARED DATA MISSING: {path}/MANIFEST.csv not found (set DYNFACE_SHARED); test skipped")
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, kind in _KIND_OF_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, kind))


_forbidden_skips: list[str] = []


def forbidden_skip(kinds: set[str], *, data_present: bool) -> bool:
    """Whether a skipped test of these kinds must fail the run."""
    return "golden" in kinds or ("data" in kinds and data_present)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Runs in the process that reports (the xdist controller too); keywords hold the markers' names.
    if not report.skipped:
        return
    kinds = {kind for kind in _KIND_OF_FIXTURE.values() if kind in report.keywords}
    if kinds and forbidden_skip(kinds, data_present=shared_data_present()):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _forbidden_skips.append(f"{report.nodeid} ({', '.join(sorted(kinds))}): {reason}")


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's own type
    if _forbidden_skips:
        terminalreporter.section("FORBIDDEN SKIPS: the run fails", sep="!", red=True, bold=True)
        terminalreporter.line(
            "Golden tests must always run (their vectors ship in tests/golden), and tests needing "
            "../shared/data must run where it is present:"
        )
        for line in _forbidden_skips:
            terminalreporter.line(f"  {line}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _forbidden_skips and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
