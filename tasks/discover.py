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
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
from prefect import task
from prefect.cache_policies import NO_CACHE

import dynface
from catalogs import Catalog
from dynface.images.faces import DetectorConfig
from dynface.images.imageio import IMAGE_EXTENSIONS
from dynface.packs.manifest import resolve_pack
from dynface.restorer import config_for
from tasks.tables import SHARDS
from tasks.work import RunContext, is_inside, join_uri, normalize_uri, path_to_uri

# Config keys that change how a run executes but not what it writes.
EXECUTION_ONLY_KEYS = frozenset({"batch_size"})
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
) -> str:
    """sha256 hex of the canonical JSON of everything that decides a run's outputs."""
    payload = {
        "pack_sha256": pack_sha256,
        "resolution": resolution,
        "restore": {k: v for k, v in sorted(config.items()) if k not in EXECUTION_ONLY_KEYS},
        "aligned": aligned,
        "compare": compare,
        "detector": None if aligned else detector,
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
    run_id: str | None = None,
) -> RunContext:
    """Validate the parameters and resolve pack and config into the run's context. The pack is
    resolved here, once: every weight file located (`weights_dir`, the manifest's variable, its
    folder) and hashed when the manifest does not pin it; the stages and actors then load exactly
    those files and read no environment to find them."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    source, dest = normalize_uri(source), normalize_uri(dest)
    catalog = normalize_uri(catalog) if catalog else join_uri(dest, "catalog")
    check_locations(source, dest, catalog)
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
        ),
        code_version=version,
        batch_size=config.batch_size,
        detector=detector,
    )


@dataclass(frozen=True)
class SourceFile:
    uri: str
    relative_path: str


def list_images(source: str, *, exclude: tuple[str, ...] = ()) -> list[SourceFile]:
    """Image files (by extension, case-insensitive) below `source` (a folder, prefix or one file),
    sorted by relative path; anything inside an `exclude` URI is left out; hidden names are skipped."""
    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/")
    if fs.isfile(root):
        paths = [root]
        base = root.rsplit("/", 1)[0]
    else:
        if not fs.exists(root):
            raise FileNotFoundError(f"source {source!r} does not exist")
        paths = fs.find(root)
        base = root
    found = []
    for path in paths:
        relative = path[len(base) :].lstrip("/")
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        if not relative.lower().endswith(IMAGE_EXTENSIONS):
            continue
        uri = path_to_uri(fs, path)
        if any(is_inside(uri, folder) for folder in exclude):
            continue
        found.append(SourceFile(uri=uri, relative_path=relative))
    return sorted(found, key=lambda f: f.relative_path)


def hash_file(uri: str) -> tuple[str, int]:
    """(sha256 hex, size in bytes), streamed in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with fsspec.open(uri, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


@dataclass(frozen=True)
class Discovered:
    """shards: shard manifest URIs in order. n_committed: images already done under this config."""

    shards: tuple[str, ...]
    n_files: int
    n_new: int
    n_committed: int
    n_duplicates: int


def discover_images(ctx: RunContext, *, shard_size: int) -> Discovered:
    """The stage as a plain function (the Prefect task below wraps it)."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    # Outputs of earlier runs (dest inside source) are never inputs.
    exclude = (ctx.dest, ctx.catalog) if is_inside(ctx.dest, ctx.source) else (ctx.catalog,)
    files = list_images(ctx.source, exclude=exclude)
    committed = Catalog(ctx.catalog).committed_image_ids(ctx.config_hash)
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    n_committed = n_duplicates = 0
    for f in files:
        image_id, size = hash_file(f.uri)
        if image_id in committed:
            n_committed += 1
            continue
        if image_id in seen:  # same bytes under another name: restored once, under the first name
            n_duplicates += 1
            continue
        seen.add(image_id)
        rows.append(
            {"image_id": image_id, "source_uri": f.uri, "relative_path": f.relative_path, "bytes": size}
        )
    shards = []
    for number, start in enumerate(range(0, len(rows), shard_size)):
        part = [{"shard": number, **row} for row in rows[start : start + shard_size]]
        shards.append(SHARDS.write(SHARDS.shard_uri(ctx.work, number), part))
    return Discovered(
        shards=tuple(shards),
        n_files=len(files),
        n_new=len(rows),
        n_committed=n_committed,
        n_duplicates=n_duplicates,
    )


@task(name="discover", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE)
def discover(ctx: RunContext, shard_size: int) -> Discovered:
    """List, hash and shard the source; drop images committed under `ctx.config_hash`."""
    return discover_images(ctx, shard_size=shard_size)
