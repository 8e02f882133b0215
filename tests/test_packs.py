"""Model packs and the checkpoint loader: manifests, sha256, fsspec URIs, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
import torch

from dynface.checkpoints import ChecksumError, load_state_dict
from dynface.packs.loading import load_pack
from dynface.packs.manifest import MissingWeightsError, read_manifest
from dynface.packs.writer import write_random_pack


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pack")
    write_random_pack(str(folder), resolution=32, seed=3)
    return folder


def test_random_pack_loads_with_every_component(pack_dir: Path) -> None:
    pack = load_pack(str(pack_dir))
    assert pack.manifest.resolution == 32 and pack.se is not None and pack.dgsa is not None
    assert pack.dsst is not None and 690 <= int(pack.dsst.lookup(pack.manifest.std_range[1])) <= 925
    assert all(len(sha) == 64 for sha in pack.manifest.sha256s().values())
    assert all(not p.requires_grad for p in pack.prior.parameters())


def test_sha256_mismatch_is_refused(pack_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    manifest["components"]["rm"]["sha256"] = "0" * 64
    for f in pack_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ChecksumError, match="rm.safetensors"):
        load_pack(str(tmp_path / "manifest.json"))


def test_missing_file_names_file_and_publication(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNFACE_DIFFACE_DIR", str(tmp_path))
    manifest = read_manifest("difface")
    assert manifest.resolution == 512 and manifest.component_uri("prior").startswith(str(tmp_path))
    # The DSST table ships with the manifest, the networks come from the user's folder.
    assert manifest.component_uri("dsst").endswith("weights/difface/dsst.json")
    with pytest.raises(MissingWeightsError) as err:
        load_pack("difface")
    text = str(err.value)
    assert "iddpm_ffhq512_ema500000.pth" in text and "github.com/zsyOAOA/DifFace/releases" in text
    assert "DYNFACE_DIFFACE_DIR" in text


def test_pack_over_fsspec_memory_uri(pack_dir: Path) -> None:
    fs = fsspec.filesystem("memory")
    for f in pack_dir.iterdir():
        fs.pipe(f"/packs/tiny/{f.name}", f.read_bytes())
    pack = load_pack("memory://packs/tiny/manifest.json")
    local = load_pack(str(pack_dir))
    for (k, a), (_, b) in zip(pack.prior.state_dict().items(), local.prior.state_dict().items()):
        assert torch.equal(a, b), k


def test_load_state_dict_unwraps_and_strips_prefix(tmp_path: Path) -> None:
    state = {"module.a.weight": torch.ones(2), "module.b": torch.zeros(1)}
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    loaded = load_state_dict(str(tmp_path / "wrapped.pth"))
    assert sorted(loaded) == ["a.weight", "b"]
    torch.save({"x": torch.ones(1), "meta": "text"}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a tensor"):
        load_state_dict(str(tmp_path / "bad.pth"))


def test_unknown_component_and_bad_pack_name(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(
        json.dumps({"name": "x", "resolution": 32, "std_range": [1, 2], "components": {"vae": {"file": "v"}}})
    )
    with pytest.raises(ValueError, match="unknown component"):
        read_manifest(str(tmp_path / "manifest.json"))
    with pytest.raises(FileNotFoundError, match="not a built-in pack"):
        read_manifest(str(tmp_path / "nowhere"))
