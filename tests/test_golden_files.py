"""The golden vectors shipped in tests/golden: small enough, all listed, and equal to their shared source."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

MAX_BYTES = 25 * 2**20


def _files(golden_dir: Path) -> list[Path]:
    return sorted(p for p in golden_dir.iterdir() if p.is_file() and p.name != "README.md")


def test_golden_folder_is_small_and_every_file_is_listed(golden_dir: Path) -> None:
    files = _files(golden_dir)
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    readme = (golden_dir / "README.md").read_text()
    listed = set(re.findall(r"`([a-z0-9_]+\.(?:npy|npz|json|pth))`", readme))
    assert {p.name for p in files} <= listed, "a golden file is missing from tests/golden/README.md"
    assert listed - {p.name for p in files} <= {"golden_summary.json"}, "README names a file that is absent"


def test_copies_equal_the_shared_golden_set(golden_dir: Path, shared_golden_dir: Path) -> None:
    """Byte copies are identical; *_expected_f32.npy is exactly the float32 rounding of the shared float64."""
    for path in _files(golden_dir):
        if path.name.endswith("_expected_f32.npy"):
            source = shared_golden_dir / path.name.replace("_f32.npy", "_f64.npy")
            copy = np.load(path)
            assert copy.dtype == np.float32, path.name
            np.testing.assert_array_equal(copy, np.load(source).astype(np.float32), err_msg=path.name)
        else:
            assert path.read_bytes() == (shared_golden_dir / path.name).read_bytes(), path.name
