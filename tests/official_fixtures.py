"""Full-size stand-ins for the two official DifFace files, in their released on-disk formats.

`iddpm_ffhq512_ema500000.pth`: a torch pickle of the 159,788,454-parameter FFHQ-512 UNet's state dict
with a `module.` prefix on every key (as DataParallel saved the release); `swinir_restoration512_L1.pth`:
a plain state dict of the 15.8 M-parameter SwinIR including its `relative_position_index` and
`attn_mask` buffers. Weights are random (fixed seeds): these prove the path a user with the real files
takes, not restoration quality. Written once per test session into the session's temp root (shared by
the pytest-xdist workers under a file lock), never into the repository.

A test module imports the fixture with `from official_fixtures import *  # noqa: F403`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catalogs import Catalog
from dynface.models.swinir import build_swinir
from dynface.models.unet import build_unet
from dynface.packs.loading import load_dsst
from dynface.packs.manifest import read_manifest, resolve_pack

__all__ = ["official_weights"]

# ddim2 keeps timesteps {0, 500}: a face starting at t 761 (DSST at the fixed std* of 6 px) runs 2 steps.
OPTIONS = {"respacing": "ddim2"}

PRIOR_FILE = "iddpm_ffhq512_ema500000.pth"
RM_FILE = "swinir_restoration512_L1.pth"


def write_official_weights(folder: Path) -> Path:
    """Write both files into `folder` (from the configs of the shipped `difface` manifest)."""
    configs = {name: spec.config for name, spec in read_manifest("difface").components.items()}
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    unet = build_unet(configs["prior"])
    assert sum(p.numel() for p in unet.parameters()) == 159_788_454
    torch.save({f"module.{k}": v for k, v in unet.state_dict().items()}, folder / f".{PRIOR_FILE}")
    del unet
    rm = build_swinir(configs["rm"])
    state = rm.state_dict()
    assert any(k.endswith("relative_position_index") for k in state)
    assert any(k.endswith("attn_mask") for k in state)
    torch.save(state, folder / f".{RM_FILE}")
    for name in (PRIOR_FILE, RM_FILE):  # published under their names only once complete
        (folder / f".{name}").rename(folder / name)
    return folder


@pytest.fixture(scope="session")
def official_weights(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The folder holding both files, written by whichever xdist worker asks first."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent
    folder = shared / "official-difface-weights"
    with FileLock(str(shared / "official-difface-weights.lock")):
        if not (folder / PRIOR_FILE).is_file() or not (folder / RM_FILE).is_file():
            write_official_weights(folder)
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_official_run(dest: Path, weights: Path, *, n_images: int) -> None:
    """A run of the difface pack on `n_images` one-face images: every row ok, outputs at 512 px, std*
    the fixed_std fallback and recorded as such, the files used recorded with their sha256."""
    cat = Catalog(str(dest / "catalog"))
    images, faces, runs = cat.read("images"), cat.read("faces"), cat.read("runs")
    assert list(images["status"]) == ["ok"] * n_images, images[["relative_path", "status", "error"]]
    assert len(faces) == n_images and set(faces["status"]) == {"ok"}
    # No SE in the official pack: std* is the fixed_std fallback, recorded as such, and DSST starts it.
    assert set(faces["std_source"]) == {"fixed"}
    np.testing.assert_allclose(faces["std_hat"], 6.0)
    start = int(load_dsst(resolve_pack("difface", weights_dir=str(weights))).lookup(6.0))
    assert set(faces["t_start"]) == {start} and set(faces["n_steps"]) == {2}
    for uri in faces["output_uri"]:
        with Image.open(uri) as im:
            assert im.size == (512, 512)
    done = runs[runs["status"] == "completed"].iloc[0]
    files = json.loads(done["pack_files_json"])
    for component, name in (("prior", PRIOR_FILE), ("rm", RM_FILE)):
        used = {"uri": str(weights / name), "sha256": _sha256(weights / name), "pinned": False}
        assert files[component] == used
    assert files["dsst"]["pinned"] and files["dsst"]["uri"].endswith("weights/difface/dsst.json")
