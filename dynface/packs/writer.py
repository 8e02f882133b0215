"""Writing model packs: safetensors files + a manifest with sha256s. Also tiny random-weight packs.

Random packs exist so the pipeline, tests and benchmarks run with every component of the method
before trained weights exist; their outputs are not restorations.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import numpy as np
import torch
import yaml
from safetensors.torch import save as save_safetensors
from torch import nn

from dynface.checkpoints import ChecksumError, read_bytes, sha256_hex, sha256_of
from dynface.core.diffusion import linear_betas
from dynface.core.dsst import DSSTTable, build_dsst_table, radial_frequency
from dynface.models.dgsa import build_dgsa
from dynface.models.se import build_sde
from dynface.models.swinir import build_swinir, small_params
from dynface.models.unet import build_unet
from dynface.packs.manifest import check_relative, resolve_pack


def _write(uri: str, data: bytes) -> None:
    with fsspec.open(uri, "wb") as f:
        f.write(data)


def state_dict_bytes(module: nn.Module) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return save_safetensors(state)


def write_pack(
    folder: str,
    *,
    name: str,
    resolution: int,
    std_range: tuple[float, float],
    networks: dict[str, tuple[nn.Module, dict[str, Any]]],
    dsst: DSSTTable | None,
    sampler: dict[str, Any] | None = None,
    card: str | None = None,
    notice: str | None = None,
    splits: dict[str, Any] | None = None,
    external: dict[str, dict[str, Any]] | None = None,
    documents: dict[str, bytes] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write `networks` ({component: (module, config)}) and the DSST table; returns the manifest URI.

    `notice`: the one line `dynface restore` prints about what the pack can do; `splits`: the rule that
    split its faces (dynface.splits.SplitRule.to_manifest).
    `external`: components kept where they are, as manifest entries ({file: explicit URI, sha256,
    config, ...}; e.g. a base pack's prior). `documents`: {file name: bytes} written beside the manifest
    and pinned under its `documents` key (model card, training record; `verify_pack` checks them).
    `extra`: further top-level manifest keys (records only; loading ignores them).
    """
    folder = folder.rstrip("/")
    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    components: dict[str, Any] = {}
    for comp, entry in (external or {}).items():
        if "://" not in entry["file"] or not entry.get("sha256"):
            raise ValueError(f"external component {comp!r} needs an explicit URI and its sha256")
        components[comp] = dict(entry)
    for comp, (module, config) in networks.items():
        data = state_dict_bytes(module)
        _write(f"{folder}/{comp}.safetensors", data)
        components[comp] = {"file": f"{comp}.safetensors", "sha256": sha256_hex(data), "config": config}
    if dsst is not None:
        data = dsst.to_json().encode()
        _write(f"{folder}/dsst.json", data)
        components["dsst"] = {"file": "dsst.json", "sha256": sha256_hex(data)}
    manifest = {
        "name": name,
        "resolution": resolution,
        "std_range": list(std_range),
        "components": components,
        "sampler": sampler or {},
    }
    if card:
        manifest["card"] = card
    if notice:
        manifest["notice"] = notice
    if splits:
        manifest["splits"] = splits
    if documents:
        pins = {}
        for name, data in sorted(documents.items()):
            _write(f"{folder}/{check_relative(name, pack=folder)}", data)
            pins[name] = sha256_hex(data)
        manifest["documents"] = pins
    manifest.update(extra or {})
    uri = f"{folder}/manifest.json"
    _write(uri, json.dumps(manifest, indent=2).encode())
    return uri


def tiny_configs(resolution: int) -> dict[str, dict[str, Any]]:
    """Small configs of every network for a pack at `resolution` (32 or 64 px)."""
    if resolution % 32:
        raise ValueError("tiny packs need a resolution that is a multiple of 32")
    swinir = small_params(resolution, embed_dim=24, depths=(2,), num_heads=2)
    lo, hi = 1.0 * resolution / 512, 15.0 * resolution / 512
    return {
        "prior": {
            "image_size": resolution,
            "in_channels": 3,
            "model_channels": 32,
            "out_channels": 6,
            "num_res_blocks": 1,
            "attention_resolutions": [resolution // 4],
            "dropout": 0.0,
            "channel_mult": [1, 1, 2],
            "num_head_channels": 32,
            "use_scale_shift_norm": True,
        },
        "rm": swinir,
        "tm": swinir,
        "sde": {"width": 8, "num_stages": 2, "input_size": resolution, "std_min": lo, "std_max": hi},
        "dgsa": {"hidden": 8},
    }


def power_law_psd(resolution: int, exponent: float = 2.0) -> np.ndarray:
    """A natural-image-like power spectrum P(f) ∝ (|f| + f0)^-exponent, normalised to unit mean."""
    f = radial_frequency(resolution, resolution)
    psd = (f + 1.0 / resolution) ** -exponent
    return psd / psd.mean()


def write_random_pack(
    folder: str,
    *,
    resolution: int = 32,
    seed: int = 0,
    with_se: bool = True,
    with_dgsa: bool = True,
    sampler: dict[str, Any] | None = None,
) -> str:
    """A complete pack of randomly initialised tiny networks (for tests and benchmarks)."""
    torch.manual_seed(seed)
    configs = tiny_configs(resolution)
    builders = {
        "prior": build_unet,
        "rm": build_swinir,
        "tm": build_swinir,
        "sde": build_sde,
        "dgsa": build_dgsa,
    }
    wanted = ["prior", "rm"] + (["tm", "sde"] if with_se else []) + (["dgsa"] if with_dgsa else [])
    networks = {c: (builders[c](configs[c]), configs[c]) for c in wanted}
    std_range = (configs["sde"]["std_min"], configs["sde"]["std_max"])
    alphas_cumprod = np.cumprod(1.0 - linear_betas())
    dsst = build_dsst_table(
        power_law_psd(resolution),
        alphas_cumprod,
        resolution=resolution,
        std_min=std_range[0],
        std_max=std_range[1],
        std_step=0.1 * resolution / 512,
        source="synthetic power-law spectrum (random test pack)",
    )
    return write_pack(
        folder,
        name=f"random-{resolution}",
        resolution=resolution,
        std_range=std_range,
        networks=networks,
        dsst=dsst,
        sampler={"respacing": "ddim50", "batch_size": 4, **(sampler or {})},
        card="Random weights: for tests and benchmarks only, not a restoration model.",
    )


def _relative_inside(uri: str, folder: str) -> str | None:
    """`uri`'s path relative to `folder` when it lies inside it (same filesystem), else None."""
    base = folder.rstrip("/") + "/"
    return uri[len(base) :] if uri.startswith(base) else None


def explicit_uri(uri: str) -> str:
    """A located file as a URI a manifest may name: local paths become `file://` URIs."""
    return uri if "://" in uri else f"file://{os.path.abspath(uri)}"


def pin_pack(pack: str, *, out: str, weights_dir: str | None = None) -> str:
    """Write `{out}/manifest.yaml`: `pack`'s manifest with every file located and its sha256 filled in,
    so that every later run verifies it reads the same bytes. Files inside `out` are named relative to
    it, others by explicit URI; bundled files (e.g. the DSST table) are copied into `out`. Hashes the
    manifest already pins are checked, not replaced. Returns the new manifest's URI."""
    manifest = resolve_pack(pack, weights_dir=weights_dir)
    out = out.rstrip("/")
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    components: dict[str, Any] = {}
    for name, spec in manifest.components.items():
        uri = manifest.component_uri(name)
        if spec.pinned and sha256_of(uri) != spec.sha256:
            raise ChecksumError(f"{uri}: sha256 {sha256_of(uri)} does not match the manifest's {spec.sha256}")
        relative = _relative_inside(explicit_uri(uri), explicit_uri(out))
        if relative is None and spec.bundled:
            relative = uri.rsplit("/", 1)[-1]
            _write(f"{out}/{relative}", read_bytes(uri))
        entry: dict[str, Any] = {"file": relative or explicit_uri(uri), "sha256": spec.sha256}
        if spec.config:
            entry["config"] = spec.config
        if spec.published:
            entry["published"] = spec.published
        components[name] = entry
    data: dict[str, Any] = {
        "name": manifest.name,
        "resolution": manifest.resolution,
        "std_range": list(manifest.std_range),
        "pinned_from": manifest.uri,
        "components": components,
        "sampler": manifest.sampler,
    }
    if manifest.card:
        data["card"] = manifest.card
    if manifest.notice:
        data["notice"] = manifest.notice
    if manifest.splits:
        data["splits"] = manifest.splits
    target = f"{out}/manifest.yaml"
    _write(target, yaml.safe_dump(data, sort_keys=False).encode())
    return target
