"""Shared helpers of the restore-archive stages: the run context, the work folder and small Parquet I/O.

Stages pass URIs, never pixels. Every per-shard file of a run lives under
`{dest}/.work/{run_id}/` at a name derived from the stage and the shard number (`WorkDir`), so a
stage needs only the run context and a shard number to find what the previous stage wrote.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from dynface.packs.manifest import PackManifest

# Stages report progress as log records on this logger (the CLI turns them into tqdm bars); a
# record's `dynface_progress` attribute is {"stage": str, "total_add": int, "advance": int}.
PROGRESS_LOGGER = "dynface.progress"


def report_progress(stage: str, *, total_add: int = 0, advance: int = 0) -> None:
    """Emit a progress record (no-op unless someone listens on `PROGRESS_LOGGER`)."""
    logging.getLogger(PROGRESS_LOGGER).info(
        "%s: +%d total, +%d done",
        stage,
        total_add,
        advance,
        extra={"dynface_progress": {"stage": stage, "total_add": total_add, "advance": advance}},
    )


# -- URIs ---------------------------------------------------------------------------------------------
def join_uri(base: str, *parts: str) -> str:
    """`base/part/...` without doubled slashes (works for local paths and `proto://` URIs)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def path_to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """An fsspec path back to a URI: plain absolute path for local files, `proto://path` otherwise."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def normalize_uri(uri: str) -> str:
    """Local paths made absolute (and `file://` stripped); other URIs without a trailing slash."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


def is_inside(child: str, parent: str) -> bool:
    """True when normalized URI `child` equals `parent` or lies below it."""
    child, parent = normalize_uri(child), normalize_uri(parent)
    return child == parent or child.startswith(parent.rstrip("/") + "/")


# -- bytes and images -----------------------------------------------------------------------------------
def read_bytes(uri: str) -> bytes:
    """A whole file; MissingBucketError when its bucket is gone (rather than a bare FileNotFoundError)."""
    try:
        with fsspec.open(uri, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        check_bucket(uri)
        raise


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a failed stage unless retrying cannot help (a missing bucket)."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, MissingBucketError)


RETRY_DELAYS = (1, 5, 15)


def stage_task(name: str, *, retries: int) -> Callable[[Callable[..., Any]], Any]:
    """A pipeline stage as a Prefect task: `retries` tries after the first, 1/5/15 s apart, none when
    retrying cannot help; no result caching (resume comes from the catalog, not Prefect's cache)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(
        name=name,
        retries=retries,
        retry_delay_seconds=list(RETRY_DELAYS[:retries]) or 0,
        retry_condition_fn=retry_unless_permanent,
        cache_policy=NO_CACHE,
    )


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Local files go through a hidden temp file and a rename, so a reader (or a
    resumed run) never sees half an output; object stores publish a PUT whole anyway. A bucket is
    never created: writing into a missing one raises MissingBucketError."""
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        temp = f"{parent}/.tmp-{os.getpid()}-{path.rsplit('/', 1)[-1]}"
        with open(temp, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
        return
    try:
        fs.pipe_file(path, data)
    except FileNotFoundError as err:
        check_bucket(uri)
        raise err


class MissingBucketError(FileNotFoundError):
    """An object-store URI whose bucket does not exist (DynFace never creates buckets)."""


def bucket_of(uri: str) -> str | None:
    """`s3://bucket` for an object-store URI (any `proto://bucket/...`), None for local paths."""
    if "://" not in uri or uri.startswith(("file://", "memory://")):
        return None
    proto, rest = uri.split("://", 1)
    return f"{proto}://{rest.split('/', 1)[0]}"


def check_bucket(uri: str) -> None:
    """Raise MissingBucketError when `uri` lies in a bucket that does not exist."""
    bucket = bucket_of(uri)
    if bucket is None:
        return
    fs, path = fsspec.core.url_to_fs(bucket)
    fs.invalidate_cache()
    if not fs.exists(path):
        raise MissingBucketError(f"the bucket {bucket} does not exist (DynFace never creates buckets): {uri}")


def write_png(uri: str, rgb: np.ndarray) -> None:
    """(H, W, 3) uint8 -> PNG file (lossless: crops travel between stages as PNG)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(buf, "PNG", compress_level=1)
    write_bytes(uri, buf.getvalue())


def read_png(uri: str) -> np.ndarray:
    """A crop written by `write_png` -> (H, W, 3) uint8."""
    with Image.open(io.BytesIO(read_bytes(uri))) as im:
        return np.asarray(im.convert("RGB"))


def remove_tree(uri: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# -- small tables -------------------------------------------------------------------------------------
def write_rows(uri: str, rows: Sequence[Mapping[str, Any]], *, columns: Sequence[str]) -> str:
    """Write dict rows (lists and None allowed) as a Parquet file with exactly `columns`; returns uri.

    An empty `rows` still writes a file (all-null typed columns), so consumers never special-case
    "this shard had no faces"."""
    unknown = sorted({k for row in rows for k in row} - set(columns))
    if unknown:
        raise ValueError(f"unknown columns {unknown}")
    data = {name: [row.get(name) for row in rows] for name in columns}
    table = pa.table({name: pa.array(values) for name, values in data.items()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue().to_pybytes())
    return uri


def read_rows(uri: str) -> list[dict[str, Any]]:
    """Rows of a Parquet file written by `write_rows`, as plain Python dicts."""
    table = pq.read_table(io.BytesIO(read_bytes(uri)))
    return table.to_pylist()


# -- the run ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkDir:
    """The per-run work folder; the stages' tables live there at names `tasks.tables` declares."""

    root: str

    def crop(self, image_id: str, face_index: int) -> str:
        return join_uri(self.root, "crops", f"{image_id}_{face_index:02d}.png")

    def restored(self, image_id: str, face_index: int) -> str:
        return join_uri(self.root, "restored", f"{image_id}_{face_index:02d}.png")


@dataclass(frozen=True)
class RunContext:
    """Everything a stage needs to know about the run; small and picklable (goes to every task and
    Ray actor).

    pack: the resolved manifest (dynface.packs.manifest.resolve_pack, done once in the driver): every
    component's URI and sha256, so no stage and no actor on any node looks for weights itself.
    overrides: RestoreConfig overrides on top of the pack's stored sampler defaults (method,
    guidance mode, user options). config: the resolved RestoreConfig as a dict (for the record).
    """

    run_id: str
    source: str
    dest: str
    catalog: str
    pack: PackManifest
    aligned: bool
    device: str
    compare: bool
    overrides: dict[str, Any]
    config: dict[str, Any]
    config_hash: str
    code_version: str
    batch_size: int
    detector: dict[str, Any] = field(default_factory=dict)
    aligned_max_aspect: float = 1.1  # aligned mode: longer side / shorter side above this is refused

    @property
    def resolution(self) -> int:
        return self.pack.resolution

    @property
    def work(self) -> WorkDir:
        return WorkDir(join_uri(self.dest, ".work", self.run_id))

    def output_uri(self, relative_path: str) -> str:
        return join_uri(self.dest, "restored", output_name(relative_path))

    def compare_uri(self, relative_path: str) -> str:
        return join_uri(self.dest, "compare", f"{relative_path}.png")

    def face_uri(self, image_id: str, face_index: int) -> str:
        return join_uri(self.dest, "faces", f"{image_id}_{face_index:02d}.png")


# Formats we write back in the source's own format; anything else (gif, ...) becomes `<name>.png`
# (appended, not replaced, so `a.gif` and `a.png` in one folder never collide).
SAME_FORMAT_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def output_name(relative_path: str) -> str:
    lower = relative_path.lower()
    return relative_path if lower.endswith(SAME_FORMAT_SUFFIXES) else f"{relative_path}.png"


def output_format(relative_path: str) -> str:
    """encode_image format name for the output of `relative_path`."""
    return output_name(relative_path).rsplit(".", 1)[-1].lower()


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def short_error(error: BaseException) -> str:
    """`ExcType: first line of the message` for catalog rows. Ray wraps a remote error in a
    RayTaskError whose text is a whole traceback; its `cause` is the original exception."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    lines = [line for line in str(error).splitlines() if line.strip()]
    message = lines[0].strip() if lines else ""
    return f"{type(error).__name__}: {message}"[:500] if message else type(error).__name__
