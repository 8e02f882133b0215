"""Model packs and the checkpoint loader: manifests, sha256, fsspec URIs, clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import pytest
import torch
from s3_server import s3_server

from dynface.checkpoints import ChecksumError, load_state_dict
from dynface.packs.loading import load_pack
from dynface.packs.manifest import MissingWeightsError, PackPathError, read_manifest, resolve_pack
from dynface.packs.writer import pin_pack, write_random_pack
from dynface.paths import REPO_ROOT


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


# -- resolution: where each file is found, decided once -----------------------------------------------
DIFFACE_FILES = ("iddpm_ffhq512_ema500000.pth", "swinir_restoration512_L1.pth")


def _fake_difface_dir(folder: Path) -> Path:
    """Stand-ins for the two official files (resolution only locates and hashes; nothing is built)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in DIFFACE_FILES:
        (folder / name).write_bytes(name.encode())
    return folder


def test_builtin_pack_with_the_variable(tmp_path: Path) -> None:
    weights = _fake_difface_dir(tmp_path / "w")
    pack = resolve_pack("difface", environ={"DYNFACE_DIFFACE_DIR": str(weights)})
    assert pack.resolved and pack.resolution == 512 and pack.weights_dir_env == "DYNFACE_DIFFACE_DIR"
    assert pack.component_uri("prior") == f"{weights}/{DIFFACE_FILES[0]}"
    assert pack.component_uri("rm") == f"{weights}/{DIFFACE_FILES[1]}"
    # The DSST table ships with the manifest, the networks come from the user's folder.
    assert pack.component_uri("dsst").endswith("weights/difface/dsst.json")
    # Unpinned files are hashed at resolution and marked so; the shipped table is pinned.
    assert pack.components["prior"].sha256 == hashlib.sha256(DIFFACE_FILES[0].encode()).hexdigest()
    assert not pack.components["prior"].pinned and pack.components["dsst"].pinned
    assert pack.files()["rm"] == {"uri": pack.component_uri("rm"), "sha256": pack.components["rm"].sha256,
                                  "pinned": False}  # fmt: skip


def test_builtin_pack_with_an_explicit_dir_wins_over_the_variable(tmp_path: Path) -> None:
    given = _fake_difface_dir(tmp_path / "given")
    other = _fake_difface_dir(tmp_path / "other")
    pack = resolve_pack("difface", weights_dir=str(given), environ={"DYNFACE_DIFFACE_DIR": str(other)})
    assert pack.component_uri("prior") == f"{given}/{DIFFACE_FILES[0]}"
    assert pack.weights_dirs[:2] == (str(given), str(other))
    # A file missing from the explicit folder is still found in the next place looked.
    (given / DIFFACE_FILES[1]).unlink()
    pack = resolve_pack("difface", weights_dir=str(given), environ={"DYNFACE_DIFFACE_DIR": str(other)})
    assert pack.component_uri("rm") == f"{other}/{DIFFACE_FILES[1]}"


def test_missing_file_names_every_place_looked_and_the_publication(tmp_path: Path) -> None:
    env = {"DYNFACE_DIFFACE_DIR": str(tmp_path / "env")}
    with pytest.raises(MissingWeightsError) as err:
        resolve_pack("difface", weights_dir=str(tmp_path / "given"), environ=env)
    text = str(err.value)
    assert "iddpm_ffhq512_ema500000.pth" in text and "github.com/zsyOAOA/DifFace/releases" in text
    for place in (tmp_path / "given", tmp_path / "env", REPO_ROOT / "weights" / "difface"):
        assert f"{place}/iddpm_ffhq512_ema500000.pth" in text
    assert "--weights-dir" in text and "DYNFACE_DIFFACE_DIR" in text
    with pytest.raises(MissingWeightsError):
        load_pack("difface", weights_dir=str(tmp_path / "given"))


def test_a_manifest_path_and_a_folder_resolve_alike(pack_dir: Path) -> None:
    by_file = resolve_pack(str(pack_dir / "manifest.json"))
    by_folder = resolve_pack(str(pack_dir))
    assert by_file.files() == by_folder.files()
    assert by_file.component_uri("prior") == f"{pack_dir}/prior.safetensors"
    assert all(spec.pinned for spec in by_file.components.values())


def test_an_s3_pack_resolves_and_loads(pack_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with s3_server() as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        bucket = s3.create_bucket("models")
        fs = fsspec.filesystem("s3", **s3.storage_options)
        for f in pack_dir.iterdir():
            fs.pipe(f"models/tiny/{f.name}", f.read_bytes())
        pack = resolve_pack(f"{bucket}/tiny")
        assert pack.component_uri("prior") == f"{bucket}/tiny/prior.safetensors"
        loaded = load_pack(pack)
        assert loaded.manifest.files() == pack.files() and loaded.se is not None


def test_files_outside_the_pack_are_refused_before_reading(pack_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not a weight")
    for bad in ("../../../etc/passwd", "/etc/passwd", str(secret), "sub/../../x.bin", "..", "C:\\w.bin"):
        manifest["components"]["rm"]["file"] = bad
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(PackPathError, match="pack"):
            read_manifest(str(tmp_path / "manifest.json"))
    # An explicit URI is the way to name a file elsewhere, and a sub-folder is inside the pack.
    manifest["components"]["rm"]["file"] = f"file://{pack_dir}/rm.safetensors"
    manifest["components"]["prior"]["file"] = "nets/./prior.safetensors"
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "prior.safetensors").write_bytes((pack_dir / "prior.safetensors").read_bytes())
    for name in ("tm", "sde", "dgsa", "dsst"):
        manifest["components"][name]["file"] = f"file://{pack_dir}/{manifest['components'][name]['file']}"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    pack = resolve_pack(str(tmp_path / "manifest.json"))
    assert pack.component_uri("prior") == f"{tmp_path}/nets/prior.safetensors"
    assert pack.component_uri("rm") == f"file://{pack_dir}/rm.safetensors"
    load_pack(pack)


def test_pin_fills_in_the_hashes_and_later_runs_verify_them(tmp_path: Path) -> None:
    weights = _fake_difface_dir(tmp_path / "w")
    out = tmp_path / "pinned"
    uri = pin_pack("difface", out=str(out), weights_dir=str(weights))
    pinned = resolve_pack(uri)
    assert pinned.name == "difface" and all(spec.pinned for spec in pinned.components.values())
    assert pinned.component_uri("prior") == f"file://{weights}/{DIFFACE_FILES[0]}"
    assert pinned.component_uri("dsst") == f"{out}/dsst.json"  # the bundled table is copied
    unpinned = resolve_pack("difface", weights_dir=str(weights))
    assert pinned.sha256s() == unpinned.sha256s()
    # A file that changes after pinning no longer loads.
    (weights / DIFFACE_FILES[0]).write_bytes(b"another file")
    with pytest.raises(ChecksumError, match="iddpm_ffhq512_ema500000.pth"):
        load_pack(uri)
    # Pinning checks what a manifest already pins.
    with pytest.raises(ChecksumError):
        pin_pack(uri, out=str(tmp_path / "again"))


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
