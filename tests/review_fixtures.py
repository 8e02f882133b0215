"""A small catalog for the review app's tests, written through the public `Catalog` API.

Photos are drawn by us (`synthetic_face` on smooth backgrounds) and written to a folder or any fsspec
URI. Faces are placed with `alignment_transform` on chosen landmarks (no detector, so the values are
known), and each "restored" face is a visibly different image (the input crop, colour-inverted), so a
test can tell input from restored. QA values are chosen to give a known review priority.

Run "r1" (QA values present):
    two.png   face 0: id 0.90, residual 0.10, det 1.20   (the safest face)
              face 1: id 0.30, residual 0.50, det 0.60   (the riskiest face)
    one.jpg   face 0: id 0.60, residual 0.30, det 0.90
    broken.png face 0: sampling failed (no output, no QA)
    whole.png face 0: aligned mode (the whole photo is the face, no landmarks): id 0.50, residual 0.20
Run "r2" (an old run: no QA columns, one restored file deleted):
    old.png   face 0: output present; face 1: output file missing
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from make_bad_inputs import smooth_image, synthetic_face
from PIL import Image

from catalogs import Catalog
from dynface.images.faces import DLIB5_TEMPLATE_512, aligned_input, alignment_transform, warp_affine

SIZE = 32
T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


@dataclass(frozen=True)
class ReviewFace:
    run_id: str
    image_id: str
    face_index: int
    name: str
    landmarks: np.ndarray | None  # float64, None in aligned mode
    source_uri: str
    output_uri: str | None

    @property
    def key(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "image_id": self.image_id, "face_index": self.face_index}


@dataclass(frozen=True)
class ReviewCatalog:
    catalog: Catalog
    source: str
    dest: str
    faces: dict[str, ReviewFace]  # "two.png#1" -> face


def _landmarks(x: float, y: float, side: float) -> np.ndarray:
    """dlib-style 5 points of a face drawn as a `side` square at (x, y), with a slight tilt."""
    points = (DLIB5_TEMPLATE_512 + 0.5) * (side / 512.0) - 0.5
    centre = points.mean(axis=0)
    angle = np.deg2rad(4.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (points - centre) @ rot.T + centre + [x, y]


def _encode(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _put(uri: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


# name -> (run, format, height, width, [(x, y, side) per face] or None for aligned mode)
PHOTOS = {
    "two.png": ("r1", "PNG", 200, 300, [(10, 20, 120), (160, 50, 110)]),
    "one.jpg": ("r1", "JPEG", 160, 160, [(20, 20, 120)]),
    "broken.png": ("r1", "PNG", 150, 150, [(15, 15, 110)]),
    "whole.png": ("r1", "PNG", 80, 64, None),
    "old.png": ("r2", "PNG", 180, 280, [(10, 30, 110), (150, 40, 110)]),
}
QA = {  # (identity_similarity, guidance_residual, det_score, t_start)
    "two.png#0": (0.90, 0.10, 1.20, 700),
    "two.png#1": (0.30, 0.50, 0.60, 820),
    "one.jpg#0": (0.60, 0.30, 0.90, 760),
    "whole.png#0": (0.50, 0.20, None, 705),
}


def write_review_catalog(source: str, dest: str, *, storage_options: dict | None = None) -> ReviewCatalog:
    """Photos under `source`, restored faces under `dest/faces`, the catalog at `dest/catalog`."""
    catalog = Catalog(f"{dest}/catalog", storage_options=storage_options)
    faces: dict[str, ReviewFace] = {}
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for n, (name, (run_id, fmt, h, w, placements)) in enumerate(PHOTOS.items()):
        rgb = smooth_image(h, w, seed=10 + n)
        landmark_sets: list[np.ndarray | None] = []
        for x, y, side in placements or []:
            rgb[y : y + side, x : x + side] = synthetic_face(side)
            landmark_sets.append(_landmarks(x, y, side))
        if placements is None:
            rgb = synthetic_face(64)[:, :, :].repeat(2, axis=0)[:h, :w].copy()
            landmark_sets.append(None)
        data = _encode(rgb, fmt)
        source_uri = f"{source}/{name}"
        _put(source_uri, data)
        rgb = _decode(data)
        image_id = hashlib.sha256(data).hexdigest()
        table = rows.setdefault(run_id, {"images": [], "faces": []})
        table["images"].append(
            {
                "run_id": run_id, "image_id": image_id, "source_uri": source_uri, "relative_path": name,
                "bytes": len(data), "width": w, "height": h, "is_grayscale": False,
                "n_faces": len(landmark_sets), "status": "ok", "config_hash": "c" * 64,
                "committed_at": T0,
            }
        )  # fmt: skip
        for k, landmarks in enumerate(landmark_sets):
            label = f"{name}#{k}"
            if landmarks is None:
                aligned = aligned_input(rgb, SIZE).faces[0]
                affine, crop = aligned.affine, aligned.crop
                bbox = [0.0, 0.0, float(w), float(h)]
            else:
                affine = alignment_transform(landmarks, SIZE)
                crop = warp_affine(rgb, affine, (SIZE, SIZE))
                bbox = [float(landmarks[:, 0].min() - 20), float(landmarks[:, 1].min() - 30)]
                bbox += [float(landmarks[:, 0].max() + 20), float(landmarks[:, 1].max() + 40)]
            failed = name == "broken.png"
            output_uri = None if failed else f"{dest}/faces/{image_id}_{k:02d}.png"
            if output_uri is not None and label != "old.png#1":  # old.png#1: the file is missing
                _put(output_uri, _encode(255 - crop, "PNG"))
            id_sim, residual, det, t_start = QA.get(label, (None, None, None, 690 + 10 * k))
            if landmarks is not None and det is None and run_id == "r1":
                det = 0.8
            table["faces"].append(
                {
                    "run_id": run_id, "image_id": image_id, "face_index": k, "bbox": bbox,
                    "landmarks": None if landmarks is None else landmarks.reshape(-1).tolist(),
                    "det_score": det, "affine": affine.reshape(-1).tolist(), "is_grayscale": False,
                    "t_start": t_start, "bucket": t_start // 50, "output_uri": output_uri,
                    "identity_similarity": id_sim, "guidance_residual": residual,
                    "config_hash": "c" * 64, "status": "failed" if failed else "ok",
                    "error": "RuntimeError: sampler diverged" if failed else None,
                }
            )  # fmt: skip
            faces[label] = ReviewFace(run_id, image_id, k, name, landmarks, source_uri, output_uri)
    for run_id, tables in rows.items():
        catalog.write_part(
            "runs",
            [{"run_id": run_id, "started_at": T0, "status": "completed", "config_hash": "c" * 64,
              "source_uri": source, "dest_uri": dest}],
            run_id=run_id,
        )  # fmt: skip
        catalog.write_part("images", tables["images"], run_id=run_id)
        catalog.write_part("faces", tables["faces"], run_id=run_id)
    return ReviewCatalog(catalog=catalog, source=source, dest=dest, faces=faces)
