"""The golden vectors shipped in tests/golden: small enough, all listed, and equal to their shared source."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from dynface.paths import shared_dir

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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_copies_equal_the_shared_golden_set(golden_dir: Path) -> None:
    """From the repository alone: every file has the digest recorded when it was copied, and a byte copy's
    digest is its shared source's. Where the shared set is present, the recorded source digests are its
    files', and each *_expected_f32.npy is exactly the float32 rounding of its shared float64 source."""
    sources = json.loads((golden_dir / "sources.json").read_text())
    assert set(sources) == {p.name for p in _files(golden_dir)} - {"sources.json"}
    for name, entry in sources.items():
        assert _sha256(golden_dir / name) == entry["sha256"], name
        if entry["made_by"] == "byte copy":
            assert entry["sha256"] == entry["source_sha256"], name
        else:
            assert entry["made_by"] == "float32 rounding" and name.endswith("_expected_f32.npy"), name
    shared = shared_dir() / "golden"
    if not shared.is_dir():
        return
    for name, entry in sources.items():
        source = shared / entry["source"]
        assert _sha256(source) == entry["source_sha256"], name
        if entry["made_by"] == "float32 rounding":
            copy = np.load(golden_dir / name)
            assert copy.dtype == np.float32, name
            np.testing.assert_array_equal(copy, np.load(source).astype(np.float32), err_msg=name)
