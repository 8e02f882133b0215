"""Model packs: a manifest (component -> file, sha256, config) plus weight files, local or fsspec.

A manifest is JSON or YAML:

```yaml
name: starter
resolution: 64                 # working resolution of every network
std_range: [0.125, 1.875]      # kernel std range in pixels at `resolution`
components:
  prior: {file: prior.safetensors, sha256: "…", config: {…DifFace UNet model.params…}}
  rm:    {file: rm.safetensors,    sha256: "…", config: {…DifFace SwinIR model_ir.params…}}
  tm:    {…SwinIR…}            # optional: SE transfer model
  sde:   {file: …, config: {…SDEConfig…}}      # optional: without SE, std* = sampler.fixed_std
  dgsa:  {file: …, config: {…DGSAConfig…}}     # optional: without DGSA, A_t = 1 (global guidance)
  dsst:  {file: dsst.json, sha256: "…"}        # std -> t_start table
sampler: {…SamplerConfig overrides stored with the pack…}
```
Relative file names resolve against the manifest's folder (or `files_dir` when given). Weight
files are never downloaded: a missing file raises `MissingWeightsError` naming the file, where it
was looked for, and where it is published.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import yaml

from dynface.checkpoints import read_bytes
from dynface.paths import REPO_ROOT

NETWORK_COMPONENTS = ("prior", "rm", "tm", "sde", "dgsa")
REQUIRED_COMPONENTS = ("prior", "rm")
BUILTIN_PACKS = {
    "starter": REPO_ROOT / "weights" / "starter" / "manifest.json",
    "difface": REPO_ROOT / "weights" / "difface" / "manifest.yaml",
}
# Where the user keeps the official DifFace files for the built-in `difface` pack.
DIFFACE_DIR_ENV = "DYNFACE_DIFFACE_DIR"


class MissingWeightsError(FileNotFoundError):
    """A weight file a manifest names is not where the manifest says."""


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    file: str
    sha256: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    published: str | None = None
    bundled: bool = False  # ships beside the manifest even when the user's files live elsewhere


@dataclass(frozen=True)
class PackManifest:
    name: str
    resolution: int
    std_range: tuple[float, float]
    components: dict[str, ComponentSpec]
    sampler: dict[str, Any]
    files_dir: str  # URI of the folder relative file names resolve against
    uri: str  # where the manifest was read from
    manifest_dir: str  # URI of the manifest's folder (bundled files resolve against it)
    card: str | None = None

    def component_uri(self, name: str) -> str:
        spec = self.components[name]
        if "://" in spec.file or os.path.isabs(spec.file):
            return spec.file
        folder = self.manifest_dir if spec.bundled else self.files_dir
        return f"{folder.rstrip('/')}/{spec.file}"

    def sha256s(self) -> dict[str, str | None]:
        return {name: spec.sha256 for name, spec in sorted(self.components.items())}


def _parse_manifest(data: Mapping[str, Any], *, uri: str, files_dir: str | None) -> PackManifest:
    for key in ("name", "resolution", "std_range", "components"):
        if key not in data:
            raise ValueError(f"pack manifest {uri}: missing '{key}'")
    components = {}
    for name, spec in data["components"].items():
        if name not in (*NETWORK_COMPONENTS, "dsst"):
            raise ValueError(f"pack manifest {uri}: unknown component '{name}'")
        components[name] = ComponentSpec(
            name=name,
            file=str(spec["file"]),
            sha256=spec.get("sha256"),
            config=dict(spec.get("config") or {}),
            published=spec.get("published"),
            bundled=bool(spec.get("bundled", False)),
        )
    missing = [c for c in REQUIRED_COMPONENTS if c not in components]
    if missing:
        raise ValueError(f"pack manifest {uri}: required components missing: {missing}")
    lo, hi = (float(v) for v in data["std_range"])
    manifest_dir = uri.rsplit("/", 1)[0] if "/" in uri else "."
    return PackManifest(
        name=str(data["name"]),
        resolution=int(data["resolution"]),
        std_range=(lo, hi),
        components=components,
        sampler=dict(data.get("sampler") or {}),
        files_dir=files_dir or manifest_dir,
        uri=uri,
        manifest_dir=manifest_dir,
        card=data.get("card"),
    )


def resolve_manifest_uri(pack: str) -> tuple[str, str | None]:
    """(manifest URI, files_dir override) for a pack name or a manifest/folder path or URI."""
    if pack in BUILTIN_PACKS:
        files_dir = os.environ.get(DIFFACE_DIR_ENV) if pack == "difface" else None
        return str(BUILTIN_PACKS[pack]), files_dir
    if pack.endswith((".json", ".yaml", ".yml")):
        return pack, None
    for candidate in ("manifest.json", "manifest.yaml"):
        uri = f"{pack.rstrip('/')}/{candidate}"
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.exists(path):
            return uri, None
    raise FileNotFoundError(
        f"pack {pack!r}: not a built-in pack ({', '.join(BUILTIN_PACKS)}) and no manifest.json/.yaml there"
    )


def read_manifest(pack: str, *, files_dir: str | None = None) -> PackManifest:
    uri, default_files_dir = resolve_manifest_uri(pack)
    text = read_bytes(uri).decode()
    data = json.loads(text) if uri.endswith(".json") else yaml.safe_load(text)
    return _parse_manifest(data, uri=uri, files_dir=files_dir or default_files_dir)


def check_exists(manifest: PackManifest, name: str) -> str:
    uri = manifest.component_uri(name)
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        spec = manifest.components[name]
        where = f" It is published at {spec.published}." if spec.published else ""
        hint = (
            f" Put it there, or set {DIFFACE_DIR_ENV} to the folder holding it."
            if manifest.name == "difface"
            else ""
        )
        file_name = Path(spec.file).name
        raise MissingWeightsError(
            f"pack '{manifest.name}': {name} weights '{file_name}' not found at {uri}.{where}{hint}"
        )
    return uri
