"""Stage 1, discover: list the source, key images by content, drop committed ones, write shard manifests.

Also `prepare_run`, which resolves the pack and the restoration config into a `RunContext` and
its `config_hash`: the resume key. Two runs share a config hash exactly when they would produce
the same outputs for the same bytes (same pack files, same restoration and alignment settings,
side-by-sides or not, same code: package version plus a hash of the `dynface` and `tasks` sources);
how they are executed (batch size, device, Ray layout) is left out.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec

import dynface
from catalogs import COMMITTED_STATUSES, Catalog
from dynface.images.faces import DetectorConfig
from dynface.packs.manifest import resolve_pack
from dynface.restorer import config_for
from tasks.sources import SourceReadError, hash_source, list_entries, no_content_id
from tasks.tables import SHARDS
from tasks.work import RunContext, check_bucket, is_inside, join_uri, normalize_uri, stage_task

# Config keys that change how a run executes but not what it writes.
# (tf32 and precision stay in: they change the numbers the prior computes.)
EXECUTION_ONLY_KEYS = frozenset({"batch_size", "compile_mode", "channels_last", "cudnn_benchmark"})
# Faces per batch manifest when the batch size is automatic (0): each actor then splits a manifest
# into the batches its own device memory holds (Restorer.batch_size).
AUTO_MANIFEST_BATCH = 32
OUTPUT_FOLDERS = ("restored", "faces", "compare", ".work")


def new_run_id(now: dt.datetime | None = None) -> str:
    """`20260101T120000Z-1a2b3c4d`: sortable by start time, unique, a valid catalog partition name."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def config_hash(
    *,
    pack_sha256: dict[str, str | None],
    resolution: int,
    config: dict[str, Any],
    aligned: bool,
    detector: dict[str, Any] | None,
    code_version: str,
    compare: bool = False,
    aligned_max_aspect: float = 1.1,
) -> str:
    """sha256 hex of the canonical JSON of everything that decides a run's outputs."""
    payload = {
        "pack_sha256": pack_sha256,
        "resolution": resolution,
        "restore": {k: v for k, v in sorted(config.items()) if k not in EXECUTION_ONLY_KEYS},
        "aligned": aligned,
        "compare": compare,
        "detector": None if aligned else detector,
        "aligned_max_aspect": aligned_max_aspect if aligned else None,
        "code_version": code_version,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def code_version() -> str:
    """`<package version>+<12 hex>`: the hash covers every .py file of the `dynface` and `tasks`
    packages (paths and bytes), so an edited sampler or stage gives a new resume key."""
    import tasks

    digest = hashlib.sha256()
    for package in (dynface, tasks):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return f"{dynface.__version__}+{digest.hexdigest()[:12]}"


def restore_overrides(*, method: str, guidance: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """Flow parameters -> RestoreConfig overrides (options first, explicit parameters win)."""
    overrides = dict(options or {})
    overrides["method"] = method
    if guidance is not None:
        if guidance not in ("dps", "closed_form"):
            raise ValueError(f"guidance must be 'dps', 'closed_form' or None, got {guidance!r}")
        overrides["mode"] = guidance
    return overrides


def check_locations(source: str, dest: str, catalog: str) -> None:
    """Refuse layouts where an output could land on a source file or be read back as an input."""
    if normalize_uri(source) == normalize_uri(dest):
        raise ValueError("dest must differ from source: outputs would be written among the source files")
    for folder in (*(join_uri(dest, f) for f in OUTPUT_FOLDERS), catalog):
        if is_inside(source, folder):
            raise ValueError(f"source {source!r} lies inside the output folder {folder!r}")


def prepare_run(
    *,
    source: str,
    dest: str,
    catalog: str | None,
    pack: str,
    aligned: bool,
    device: str,
    compare: bool,
    method: str,
    guidance: str | None,
    options: dict[str, Any] | None,
    weights_dir: str | None = None,
    aligned_max_aspect: float = 1.1,
    run_id: str | None = None,
) -> RunContext:
    """Validate the parameters and resolve pack and config into the run's context. The pack is
    resolved here, once: every weight file located (`weights_dir`, the manifest's variable, its
    folder) and hashed when the manifest does not pin it; the stages and actors then load exactly
    those files and read no environment to find them."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if not aligned_max_aspect >= 1.0:
        raise ValueError(f"aligned_max_aspect must be >= 1, got {aligned_max_aspect!r}")
    source, dest = normalize_uri(source), normalize_uri(dest)
    catalog = normalize_uri(catalog) if catalog else join_uri(dest, "catalog")
    check_locations(source, dest, catalog)
    for uri in (dest, catalog):
        check_bucket(uri)
    fs, path = fsspec.core.url_to_fs(source)
    if not (fs.exists(path) or os.path.lexists(path)):
        raise FileNotFoundError(f"source {source!r} does not exist")
    manifest = resolve_pack(pack, weights_dir=weights_dir)
    overrides = restore_overrides(method=method, guidance=guidance, options=options)
    config = config_for(manifest, overrides)
    detector = asdict(DetectorConfig())
    values = config.to_dict()
    version = code_version()
    return RunContext(
        run_id=run_id or new_run_id(),
        source=source,
        dest=dest,
        catalog=catalog,
        pack=manifest,
        aligned=aligned,
        device=device,
        compare=compare,
        overrides=overrides,
        config=values,
        config_hash=config_hash(
            pack_sha256=manifest.sha256s(),
            resolution=manifest.resolution,
            config=values,
            aligned=aligned,
            detector=detector,
            code_version=version,
            compare=compare,
            aligned_max_aspect=aligned_max_aspect,
        ),
        code_version=version,
        batch_size=config.batch_size or AUTO_MANIFEST_BATCH,
        detector=detector,
        aligned_max_aspect=aligned_max_aspect,
    )


@dataclass(frozen=True)
class Discovered:
    """shards: shard manifest URIs in order. n_committed: files already done under this config (same
    bytes at the same place); n_duplicates: files whose bytes another file of the source (or an earlier
    run) already has, given a row that reuses that result."""

    shards: tuple[str, ...]
    n_files: int
    n_new: int
    n_committed: int
    n_duplicates: int


def committed_images(catalog: str, config_hash: str) -> dict[str, dict[str, Any]]:
    """{image_id: {"sources": set of source URIs, "source_uri", "output_uri", "status"}} of the images
    committed (`ok` or `no_face`) under `config_hash`: what a re-run skips or reuses."""
    import pyarrow.dataset as ds

    expression = (ds.field("config_hash") == config_hash) & ds.field("status").isin(COMMITTED_STATUSES)
    columns = ["image_id", "source_uri", "output_uri", "status"]
    rows = Catalog(catalog).read_arrow("images", columns=columns, filters=expression).to_pylist()
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        known = out.setdefault(row["image_id"], {**row, "sources": set()})
        known["sources"].add(row["source_uri"])
    return out


def _exists(uri: str | None) -> bool:
    if not uri:
        return False
    fs, path = fsspec.core.url_to_fs(uri)
    return bool(fs.exists(path))


def shard_groups(groups: list[list[dict[str, Any]]], shard_size: int) -> list[list[dict[str, Any]]]:
    """Consecutive groups packed into shards of about `shard_size` rows; a group (an image and its
    duplicates) is never split, so a duplicate is composed right after its original."""
    shards: list[list[dict[str, Any]]] = []
    for group in groups:
        if not shards or len(shards[-1]) >= shard_size:
            shards.append([])
        shards[-1].extend(group)
    return shards


def discover_images(ctx: RunContext, *, shard_size: int) -> Discovered:
    """The stage as a plain function (the Prefect task below wraps it)."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    # Outputs of earlier runs (dest inside source) are never inputs.
    exclude = (ctx.dest, ctx.catalog) if is_inside(ctx.dest, ctx.source) else (ctx.catalog,)
    entries = list_entries(ctx.source, exclude=exclude)
    committed = committed_images(ctx.catalog, ctx.config_hash)
    originals: dict[str, list[dict[str, Any]]] = {}  # image_id -> its group (original first)
    groups: list[list[dict[str, Any]]] = []
    n_committed = n_duplicates = 0
    for entry in entries:
        row: dict[str, Any] = {"source_uri": entry.uri, "relative_path": entry.relative_path}
        problem = entry.problem
        if problem is None:
            try:
                row["image_id"], row["bytes"] = hash_source(entry.uri)
            except SourceReadError as err:
                problem = err
        if problem is not None:
            row.update(image_id=no_content_id(entry.uri), source_status=problem.status)
            groups.append([{**row, "source_error": problem.row_error}])
            continue
        earlier = committed.get(row["image_id"])
        if earlier is not None and entry.uri in earlier["sources"]:
            n_committed += 1
            continue
        if row["image_id"] in originals:  # the same bytes under another name in this source
            n_duplicates += 1
            group = originals[row["image_id"]]
            group.append({**row, "duplicate_of": group[0]["source_uri"]})
        elif earlier is not None and (earlier["status"] == "no_face" or _exists(earlier["output_uri"])):
            n_duplicates += 1  # restored by an earlier run under another name: reuse that result
            row.update(
                duplicate_of=earlier["source_uri"],
                duplicate_output_uri=earlier["output_uri"],
                duplicate_status=earlier["status"],
            )
            groups.append([row])
        else:
            originals[row["image_id"]] = [row]
            groups.append(originals[row["image_id"]])
    shards = []
    for number, part in enumerate(shard_groups(groups, shard_size)):
        rows = [{"shard": number, **row} for row in part]
        shards.append(SHARDS.write(SHARDS.shard_uri(ctx.work, number), rows))
    return Discovered(
        shards=tuple(shards),
        n_files=len(entries),
        n_new=sum(len(g) for g in groups),
        n_committed=n_committed,
        n_duplicates=n_duplicates,
    )


@stage_task("discover", retries=3)
def discover(ctx: RunContext, shard_size: int) -> Discovered:
    """List, hash and shard the source; drop files committed under `ctx.config_hash`."""
    return discover_images(ctx, shard_size=shard_size)
