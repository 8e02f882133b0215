"""Model packs: a manifest (component -> file, sha256, config) plus weight files, local or fsspec.

A manifest is JSON or YAML:

```yaml
name: starter
resolution: 64                 # working resolution of every network
std_range: [0.125, 1.875]      # kernel std range in pixels at `resolution`
weights_dir_env: DYNFACE_DIFFACE_DIR   # optional: a variable naming a folder that holds the weights
components:
  prior: {file: prior.safetensors, sha256: "…", config: {…DifFace UNet model.params…}}
  rm:    {file: rm.safetensors,    sha256: "…", config: {…DifFace SwinIR model_ir.params…}}
  tm:    {…SwinIR…}            # optional: SE transfer model
  sde:   {file: …, config: {…SDEConfig…}}      # optional: without SE, std* = sampler.fixed_std
  dgsa:  {file: …, config: {…DGSAConfig…}}     # optional: without DGSA, A_t = 1 (global guidance)
  dsst:  {file: dsst.json, sha256: "…", bundled: true}   # std -> t_start table
sampler: {…SamplerConfig overrides stored with the pack…}
```

`file` is a name relative to the pack's folder (it may not leave it: no `..`, no absolute path) or
an explicit URI with a scheme (`file:///…`, `s3://…`). Relative weight files are looked for, in
order, in the folder given by the caller (`weights_dir`, the CLI's `--weights-dir`), the folder named
by the manifest's `weights_dir_env` variable, and the manifest's own folder; `bundled` files only in
the manifest's folder. `resolve_pack` does this once and returns a manifest whose every component
has a concrete URI and a sha256 (the manifest's pin, or measured now), so the stages and Ray actors
of a run load exactly those bytes and never look at the environment. Nothing is ever downloaded: a
missing file raises `MissingWeightsError` naming the file, every place looked and where it is
published.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import fsspec
import yaml

from dynface.checkpoints import read_bytes, sha256_of
from dynface.paths import REPO_ROOT

NETWORK_COMPONENTS = ("prior", "rm", "tm", "sde", "dgsa")
COMPONENTS = (*NETWORK_COMPONENTS, "dsst")
REQUIRED_COMPONENTS = ("prior", "rm")
BUILTIN_PACKS = {
    "starter": REPO_ROOT / "weights" / "starter" / "manifest.json",
    "difface": REPO_ROOT / "weights" / "difface" / "manifest.yaml",
}


class MissingWeightsError(FileNotFoundError):
    """A weight file a manifest names is not where the manifest says."""


class PackPathError(ValueError):
    """A manifest's `file` entry points outside the pack (an absolute path or a `..` escape)."""


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    file: str
    sha256: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    published: str | None = None
    bundled: bool = False  # ships beside the manifest even when the user's files live elsewhere
    uri: str | None = None  # where the file was found (set by `resolve_pack`)
    pinned: bool = True  # False: sha256 was measured at resolution, not pinned by the manifest


@dataclass(frozen=True)
class PackManifest:
    name: str
    resolution: int
    std_range: tuple[float, float]
    components: dict[str, ComponentSpec]
    sampler: dict[str, Any]
    uri: str  # where the manifest was read from
    manifest_dir: str  # URI of the manifest's folder
    weights_dirs: tuple[str, ...] = ()  # folders searched for relative weight files, in order
    weights_dir_env: str | None = None
    card: str | None = None
    notice: str | None = None  # one line for users about what the pack can do (printed by restore)
    splits: dict[str, Any] | None = None  # the train/validation/test rule (dynface.splits)

    @property
    def resolved(self) -> bool:
        return all(spec.uri is not None for spec in self.components.values())

    def component_uri(self, name: str) -> str:
        """The resolved URI of a component (`resolve_pack` first)."""
        uri = self.components[name].uri
        if uri is None:
            raise ValueError(f"pack '{self.name}' is not resolved: call resolve_pack first")
        return uri

    def sha256s(self) -> dict[str, str | None]:
        return {name: spec.sha256 for name, spec in sorted(self.components.items())}

    def has_se(self) -> bool:
        return "sde" in self.components

    def has_dgsa(self) -> bool:
        return "dgsa" in self.components

    def files(self) -> dict[str, dict[str, Any]]:
        """{component: {uri, sha256, pinned}}: what a run records as the files it used."""
        return {
            name: {"uri": spec.uri, "sha256": spec.sha256, "pinned": spec.pinned}
            for name, spec in sorted(self.components.items())
        }


def _is_explicit_uri(file: str) -> bool:
    return "://" in file


def check_relative(file: str, *, pack: str) -> str:
    """`file` as a normalised relative path inside the pack's folder, or PackPathError."""
    if _is_explicit_uri(file):
        return file
    if os.path.isabs(file) or file.startswith(("/", "\\")) or (len(file) > 1 and file[1] == ":"):
        raise PackPathError(
            f"pack {pack}: file {file!r} is an absolute path; write it relative to the pack's folder,"
            " or as an explicit URI (file:///..., s3://...)"
        )
    normal = posixpath.normpath(file.replace("\\", "/"))
    if normal == "." or normal == ".." or normal.startswith("../"):
        raise PackPathError(f"pack {pack}: file {file!r} leaves the pack's folder")
    return normal


def _parse_manifest(data: Mapping[str, Any], *, uri: str) -> PackManifest:
    if not isinstance(data, Mapping):
        raise ValueError(f"pack manifest {uri}: not a mapping")
    for key in ("name", "resolution", "std_range", "components"):
        if key not in data:
            raise ValueError(f"pack manifest {uri}: missing '{key}'")
    components = {}
    for name, spec in data["components"].items():
        if name not in COMPONENTS:
            raise ValueError(f"pack manifest {uri}: unknown component '{name}'")
        if not isinstance(spec, Mapping) or "file" not in spec:
            raise ValueError(f"pack manifest {uri}: component '{name}' needs a 'file'")
        components[name] = ComponentSpec(
            name=name,
            file=check_relative(str(spec["file"]), pack=uri),
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
        uri=uri,
        manifest_dir=manifest_dir,
        weights_dir_env=data.get("weights_dir_env"),
        card=data.get("card"),
        notice=data.get("notice"),
        splits=dict(data["splits"]) if data.get("splits") else None,
    )


def resolve_manifest_uri(pack: str) -> str:
    """The manifest URI for a pack name, a manifest path/URI, or a folder holding manifest.json/.yaml."""
    if pack in BUILTIN_PACKS:
        return str(BUILTIN_PACKS[pack])
    if pack.endswith((".json", ".yaml", ".yml")):
        return pack
    for candidate in ("manifest.json", "manifest.yaml"):
        uri = f"{pack.rstrip('/')}/{candidate}"
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.exists(path):
            return uri
    raise FileNotFoundError(
        f"pack {pack!r}: not a built-in pack ({', '.join(BUILTIN_PACKS)}) and no manifest.json/.yaml there"
    )


def read_manifest(
    pack: str, *, weights_dir: str | None = None, environ: Mapping[str, str] | None = None
) -> PackManifest:
    """Parse a pack's manifest and decide where its weight files are looked for (nothing is opened
    but the manifest). `environ` (default os.environ) is read here only, for `weights_dir_env`."""
    uri = resolve_manifest_uri(pack)
    text = read_bytes(uri).decode()
    try:
        data = json.loads(text) if uri.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if uri.endswith(".json") else "YAML"
        raise ValueError(f"pack manifest {uri}: not valid {kind}: {err}") from None
    manifest = _parse_manifest(data, uri=uri)
    env = os.environ if environ is None else environ
    dirs = [weights_dir] if weights_dir else []
    if manifest.weights_dir_env and env.get(manifest.weights_dir_env):
        dirs.append(env[manifest.weights_dir_env])
    dirs.append(manifest.manifest_dir)
    unique = tuple(dict.fromkeys(d.rstrip("/") or "/" for d in dirs))
    return replace(manifest, weights_dirs=unique)


def _exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return bool(fs.isfile(path))


def _where_to_look(manifest: PackManifest, spec: ComponentSpec) -> list[str]:
    if _is_explicit_uri(spec.file):
        return [spec.file]
    folders = list(manifest.weights_dirs or (manifest.manifest_dir,))
    if spec.bundled:
        folders = [manifest.manifest_dir]
    return [f"{folder.rstrip('/')}/{spec.file}" for folder in folders]


def locate(manifest: PackManifest, name: str) -> str:
    """The first place holding component `name`'s file, or MissingWeightsError naming every place."""
    spec = manifest.components[name]
    candidates = _where_to_look(manifest, spec)
    for uri in candidates:
        if _exists(uri):
            return uri
    where = f" It is published at {spec.published}." if spec.published else ""
    hints = ["pass --weights-dir DIR (flow parameter weights_dir)"]
    if manifest.weights_dir_env:
        hints.append(f"set {manifest.weights_dir_env}")
    hint = "" if spec.bundled or _is_explicit_uri(spec.file) else f" Put it there, {', or '.join(hints)}."
    raise MissingWeightsError(
        f"pack '{manifest.name}': {name} weights '{Path(spec.file).name}' not found; looked at "
        + ", ".join(candidates)
        + f".{where}{hint}"
    )


def resolve_pack(
    pack: str | PackManifest,
    *,
    weights_dir: str | None = None,
    environ: Mapping[str, str] | None = None,
    measure_unpinned: bool = True,
) -> PackManifest:
    """The manifest with every component's file located (a concrete URI) and a sha256 for each: the
    manifest's pin, or, for unpinned files, measured now (`measure_unpinned`), so every later load
    (any process, any node) verifies it reads the same bytes. Pinned hashes are checked at load."""
    if isinstance(pack, PackManifest):
        manifest = pack
    else:
        manifest = read_manifest(pack, weights_dir=weights_dir, environ=environ)
    components = {}
    for name, spec in manifest.components.items():
        uri = locate(manifest, name)
        sha, pinned = spec.sha256, spec.sha256 is not None
        if sha is None and measure_unpinned:
            sha = sha256_of(uri)
        components[name] = replace(spec, uri=uri, sha256=sha, pinned=pinned)
    return replace(manifest, components=components)


def verify_pinned(manifest: PackManifest) -> None:
    """Check every pinned file of a resolved manifest against its hash (ChecksumError naming it)."""
    from dynface.checkpoints import ChecksumError

    for name, spec in manifest.components.items():
        if spec.pinned and spec.sha256 is not None:
            actual = sha256_of(manifest.component_uri(name))
            if actual != spec.sha256:
                raise ChecksumError(
                    f"pack '{manifest.name}': {name} file {manifest.component_uri(name)} has sha256 {actual},"
                    f" the manifest pins {spec.sha256}"
                )


def verify_pack(pack: str, *, weights_dir: str | None = None) -> PackManifest:
    """A pack whose every file is pinned and matches: each component's sha256 (none may be unpinned)
    and each of the manifest's `documents` ({file beside the manifest: sha256}). Returns the resolved
    manifest; raises ChecksumError (or MissingWeightsError) naming the first file that does not."""
    from dynface.checkpoints import ChecksumError

    manifest = resolve_pack(pack, weights_dir=weights_dir)
    unpinned = sorted(name for name, spec in manifest.components.items() if not spec.pinned)
    if unpinned:
        raise ChecksumError(f"pack '{manifest.name}': no sha256 pinned for {', '.join(unpinned)}")
    verify_pinned(manifest)
    data = yaml.safe_load(read_bytes(manifest.uri).decode())  # JSON is YAML too
    for name, expected in sorted((data.get("documents") or {}).items()):
        uri = f"{manifest.manifest_dir}/{check_relative(name, pack=manifest.uri)}"
        actual = sha256_of(uri)
        if actual != expected:
            raise ChecksumError(
                f"pack '{manifest.name}': {uri} has sha256 {actual}, the manifest pins {expected}"
            )
    return manifest
