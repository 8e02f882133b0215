"""tests/conftest.py fails the run when a golden test skips, or a data test skips while the data exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# A conftest for a scratch folder that takes every hook and fixture of the real one.
SCRATCH_CONFTEST = f"""
import importlib.util, sys
sys.path.insert(0, {str(TESTS)!r})
spec = importlib.util.spec_from_file_location("dynface_tests_conftest", {str(TESTS / "conftest.py")!r})
real = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real)
globals().update({{k: v for k, v in vars(real).items() if k.startswith("pytest_") or k.endswith("_dir")}})
"""

SCRATCH_TESTS = """
import pytest

def test_golden_that_skips(golden_dir):
    pytest.skip("pretend the vectors are gone")

def test_golden_that_runs(golden_dir):
    assert (golden_dir / "README.md").is_file()

def test_data_that_needs_the_data(data_dir):
    assert data_dir.is_dir()

def test_data_that_skips_anyway(data_dir):
    pytest.skip("pretend a data test lost its input")
"""


def _run(tmp_path: Path, shared: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(SCRATCH_CONFTEST)
    (tmp_path / "test_scratch.py").write_text(SCRATCH_TESTS)
    env = {**os.environ, "DYNFACE_SHARED": str(shared)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("workers", [["-n", "2"]], ids=["xdist"])
def test_a_skipped_golden_test_fails_the_run(tmp_path: Path, workers: list[str]) -> None:
    done = _run(tmp_path, tmp_path / "no_shared", *workers)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FORBIDDEN SKIPS" in done.stdout and "test_golden_that_skips (golden)" in done.stdout
    assert "test_data_that_skips_anyway" not in done.stdout.split("FORBIDDEN SKIPS")[1]  # no data here


def test_without_the_golden_skip_the_run_passes_when_data_is_absent(tmp_path: Path) -> None:
    done = _run(tmp_path, tmp_path / "no_shared", "-k", "not golden_that_skips")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SHARED DATA MISSING" in done.stdout  # data tests still skip loudly without the data


def test_a_skipped_data_test_fails_the_run_where_the_data_exists(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    (shared / "data" / "MANIFEST.csv").write_text("path\n")
    done = _run(tmp_path, shared, "-k", "not golden_that_skips")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "test_data_that_skips_anyway (data)" in done.stdout
    assert "test_data_that_needs_the_data" not in done.stdout.split("FORBIDDEN SKIPS")[1]
