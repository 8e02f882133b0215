"""Byte-level regression check of `restore-archive`: the bundled sample archive and three generated whole
photos, restored with a 32-px random pack and fixed seeds, must give the recorded catalog values and
restored faces (tests/regression/). Refactors prove they changed nothing here; a change that is meant
to alter outputs re-records the snapshot (DYNFACE_RECORD_SNAPSHOT=1) and says why in its commit.

Catalog values must match to 1e-5 relative and restored faces to one 8-bit level (float rounding of
batched kernels may differ between CPUs); the test also reports whether every output is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from make_bad_inputs import write_photos
from PIL import Image
from pipeline_fixtures import *  # noqa: F403 - the shared fixtures prefect_api and local_ray

from catalogs import Catalog
from dynface.packs.writer import write_random_pack
from dynface.paths import REPO_ROOT

SNAPSHOT = Path(__file__).parent / "regression" / "restore_snapshot.json"
FACES = Path(__file__).parent / "regression" / "restore_snapshot_faces.npz"
RECORD = os.environ.get("DYNFACE_RECORD_SNAPSHOT") == "1"
OPTIONS = {"respacing": "ddim10"}
FACE_VALUES = ("status", "std_hat", "std_final", "t_start", "bucket", "eta", "guidance_levels", "n_steps")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pixels(uri: str) -> np.ndarray:
    with Image.open(uri) as im:
        return np.asarray(im.convert("RGB"))


def _run(source: Path, dest: Path, pack: str, *, aligned: bool) -> dict[str, Any]:
    from flows.restore_archive import restore_archive

    summary = restore_archive(
        source=str(source), dest=str(dest), pack=pack, aligned=aligned, shard_size=4, wave_shards=2,
        options=OPTIONS,
    )  # fmt: skip
    cat = Catalog(str(dest / "catalog"))
    images = cat.read("images", run_id=summary.run_id).sort_values("relative_path")
    faces = cat.read("faces", run_id=summary.run_id)
    path_of = dict(zip(images["image_id"], images["relative_path"], strict=True))
    face_rows = []
    for row in faces.to_dict("records"):
        values: dict[str, Any] = {"image": path_of[row["image_id"]], "face_index": int(row["face_index"])}
        for key in FACE_VALUES:
            value = row[key]
            if isinstance(value, np.ndarray):
                value = [float(v) for v in value]
            elif isinstance(value, np.integer | int) and not isinstance(value, bool):
                value = int(value)
            elif isinstance(value, np.floating | float):
                value = float(value)
            values[key] = value
        face_rows.append(values)
    face_rows.sort(key=lambda r: (r["image"], r["face_index"]))
    outputs = sorted(p for folder in ("restored", "faces") for p in (dest / folder).rglob("*") if p.is_file())
    return {
        "images": [
            {"image": r["relative_path"], "status": r["status"], "n_faces": int(r["n_faces"])}
            for r in images.to_dict("records")
        ],
        "faces": face_rows,
        "outputs": {str(p.relative_to(dest)): _sha256(p) for p in outputs},
        "face_pixels": {
            f"{path_of[r['image_id']]}#{int(r['face_index'])}": _pixels(r["output_uri"])
            for r in faces.to_dict("records")
            if r["status"] == "ok"
        },
    }


@pytest.fixture(scope="module")
def snapshot_runs(prefect_api, local_ray, tmp_path_factory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("snapshot")
    pack = write_random_pack(str(root / "pack"), resolution=32, seed=0)
    photos = write_photos(root / "photos")
    return {
        "archive": _run(REPO_ROOT / "samples" / "archive", root / "archive_out", pack, aligned=True),
        "photos": _run(photos, root / "photos_out", pack, aligned=False),
    }


def _record(runs: dict[str, dict[str, Any]]) -> None:
    SNAPSHOT.parent.mkdir(exist_ok=True)
    public = {name: {k: v for k, v in run.items() if k != "face_pixels"} for name, run in runs.items()}
    SNAPSHOT.write_text(json.dumps(public, indent=1, sort_keys=True) + "\n")
    pixels = {f"{name}/{key}": arr for name, run in runs.items() for key, arr in run["face_pixels"].items()}
    np.savez_compressed(FACES, **pixels)


def test_restore_matches_the_recorded_snapshot(snapshot_runs):
    if RECORD:
        _record(snapshot_runs)
    expected = json.loads(SNAPSHOT.read_text())
    pixels = np.load(FACES)
    identical = True
    for name, run in snapshot_runs.items():
        want = expected[name]
        assert run["images"] == want["images"], name
        assert [(f["image"], f["face_index"]) for f in run["faces"]] == [
            (f["image"], f["face_index"]) for f in want["faces"]
        ], name
        for got, ref in zip(run["faces"], want["faces"], strict=True):
            for key in FACE_VALUES:
                a, b = got[key], ref[key]
                if isinstance(b, float | list) and b is not None:
                    np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=f"{name} {got['image']} {key}")
                else:
                    assert a == b, f"{name} {got['image']}#{got['face_index']} {key}: {a!r} != {b!r}"
        assert sorted(run["outputs"]) == sorted(want["outputs"]), name
        identical &= run["outputs"] == want["outputs"]
        assert sorted(run["face_pixels"]) == sorted(k.split("/", 1)[1] for k in pixels if k.startswith(name))
        for key, arr in run["face_pixels"].items():
            diff = np.abs(arr.astype(int) - pixels[f"{name}/{key}"].astype(int))
            assert diff.max() <= 1, f"{name} {key}: restored face differs by {diff.max()} levels"
    print(f"regression snapshot: outputs byte-identical = {identical}")
