"""What lies below a source: every entry that looks like an image, classified before anything opens it.

An entry "looks like an image" by its extension (case-insensitive): one we decode
(`dynface.images.imageio.IMAGE_EXTENSIONS`) or one we recognise but cannot decode
(`UNSUPPORTED_EXTENSIONS`: HEIC/HEIF, JPEG XL, camera raw, ...). Each becomes a `SourceEntry`; the
ones that cannot be restored carry their catalog status and reason, so they end as a row like any
other image and never stop or hang a run:

    failed   broken_link   a symbolic link whose target does not exist
    failed   link_loop     links that point at each other
    failed   unreadable    no permission to read it (or another OS error)
    failed   vanished      listed, then gone before it was read
    skipped  special_file  a FIFO, socket or device (never opened: reading a FIFO blocks forever)
    skipped  unsupported_format  an image format we cannot decode

Local sources are walked with `os` calls that never open an entry (`lstat`/`stat` only), following
directory links once each (a link cycle is not walked twice); local files are then read with
O_NONBLOCK and checked to be regular files on the open descriptor, so a FIFO swapped in after the
listing is still never read. Other fsspec sources (S3, ...) hold only plain objects.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dynface.images.imageio import IMAGE_EXTENSIONS
from tasks.work import is_inside, path_to_uri

UNSUPPORTED_EXTENSIONS: tuple[str, ...] = (
    ".heic", ".heif", ".hif", ".jxl", ".jp2", ".j2k", ".psd", ".svg", ".ico",
    ".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf",
    ".rw2", ".pef", ".srw", ".x3f", ".3fr", ".erf", ".kdc", ".mrw", ".raw", ".rwl", ".iiq",
)  # fmt: skip
IMAGE_LIKE = IMAGE_EXTENSIONS + UNSUPPORTED_EXTENSIONS
READ_BLOCK = 1 << 20


class SourceReadError(OSError):
    """An entry that cannot be read; `status` and `reason` go to its catalog row."""

    def __init__(self, status: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason

    def __reduce__(self):  # keep status and reason when pickled across processes
        return (type(self), (self.status, self.reason, str(self)))

    @property
    def row_error(self) -> str:
        return f"{self.reason}: {self}"


@dataclass(frozen=True)
class SourceEntry:
    uri: str
    relative_path: str
    problem: SourceReadError | None = None  # set: the entry ends as a row with this status and reason


def no_content_id(uri: str) -> str:
    """The image id of an entry whose bytes were never read: sha256 of a marker and its URI."""
    return hashlib.sha256(f"dynface:unread:{uri}".encode()).hexdigest()


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _classify_local(path: str) -> SourceReadError | None:
    """Why a local entry cannot be read as a regular file (None when it can), without opening it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            message = f"the link points to {os.readlink(path)!r}, which does not exist"
            return SourceReadError("failed", "broken_link", message)
        return SourceReadError("failed", "vanished", "the file disappeared after it was listed")
    except OSError as err:
        if err.errno == errno.ELOOP:
            return SourceReadError("failed", "link_loop", "symbolic links that point at each other")
        return SourceReadError("failed", "unreadable", f"{type(err).__name__}: {err.strerror or err}")
    if stat.S_ISREG(st.st_mode):
        return None
    kinds = {stat.S_ISFIFO: "FIFO", stat.S_ISSOCK: "socket", stat.S_ISCHR: "character device"}
    kinds[stat.S_ISBLK] = "block device"
    kind = next((name for test, name in kinds.items() if test(st.st_mode)), "special file")
    return SourceReadError("skipped", "special_file", f"a {kind}, not a regular file: never opened")


def _unsupported(relative: str) -> SourceReadError | None:
    ext = os.path.splitext(relative)[1].lower()
    if ext in UNSUPPORTED_EXTENSIONS:
        message = f"{ext} images cannot be decoded here; convert them to PNG or TIFF"
        return SourceReadError("skipped", "unsupported_format", message)
    return None


def _walk_local(root: str, exclude: tuple[str, ...]) -> list[tuple[str, str]]:
    """(path, relative path) of every image-like non-directory entry below `root`."""
    found = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # reached again through a link: walked already
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        rel_dir = os.path.relpath(dirpath, root)
        keep = []
        for name in dirnames:
            relative = name if rel_dir == "." else f"{rel_dir}/{name}"
            full = os.path.join(dirpath, name)
            if not _hidden(relative) and not any(is_inside(full, folder) for folder in exclude):
                keep.append(name)
        dirnames[:] = sorted(keep)
        for name in filenames:
            relative = name if rel_dir == "." else f"{rel_dir}/{name}"
            if _hidden(relative) or not name.lower().endswith(IMAGE_LIKE):
                continue
            full = os.path.join(dirpath, name)
            if not any(is_inside(full, folder) for folder in exclude):
                found.append((full, relative))
    return found


def list_entries(source: str, *, exclude: tuple[str, ...] = ()) -> list[SourceEntry]:
    """Image-like entries below `source` (a folder, prefix or one file), sorted by relative path;
    anything inside an `exclude` URI is left out; hidden names are skipped."""
    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/") or "/"
    entries = []
    if isinstance(fs, LocalFileSystem):
        if os.path.isdir(root):
            pairs = _walk_local(root, exclude)
        elif os.path.lexists(root):
            pairs = [(root, os.path.basename(root))]
        else:
            raise FileNotFoundError(f"source {source!r} does not exist")
        for path, relative in pairs:
            problem = _classify_local(path) or _unsupported(relative)
            entries.append(SourceEntry(uri=path, relative_path=relative, problem=problem))
    else:
        if fs.isfile(root):
            listing = {root: fs.info(root)}
            base = root.rsplit("/", 1)[0]
        elif fs.exists(root):
            listing = fs.find(root, detail=True)
            base = root
        else:
            raise FileNotFoundError(f"source {source!r} does not exist")
        for path, info in listing.items():
            relative = path[len(base) :].lstrip("/")
            if info.get("type") != "file" or _hidden(relative) or not relative.lower().endswith(IMAGE_LIKE):
                continue
            uri = path_to_uri(fs, path)
            if not any(is_inside(uri, folder) for folder in exclude):
                entries.append(SourceEntry(uri=uri, relative_path=relative, problem=_unsupported(relative)))
    return sorted(entries, key=lambda e: e.relative_path)


def _open_regular_local(path: str) -> int:
    """A read descriptor of a local regular file; O_NONBLOCK so that a FIFO never blocks the open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise _classify_local(path) or SourceReadError("failed", "vanished", "the file disappeared") from None
    except OSError as err:
        raise _classify_local(path) or SourceReadError("failed", "unreadable", str(err)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceReadError("skipped", "special_file", "not a regular file: never read")
    os.set_blocking(fd, True)
    return fd


def read_source_bytes(uri: str) -> bytes:
    """A source file's bytes; SourceReadError (with a status for its row) when it cannot be read."""
    if "://" not in uri or uri.startswith("file://"):
        fd = _open_regular_local(uri.removeprefix("file://"))
        with os.fdopen(fd, "rb") as handle:
            return handle.read()
    try:
        with fsspec.open(uri, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise SourceReadError("failed", "vanished", "the object disappeared after it was listed") from None


def hash_source(uri: str) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a source file, streamed; SourceReadError when unreadable."""
    digest = hashlib.sha256()
    size = 0
    if "://" not in uri or uri.startswith("file://"):
        handle = os.fdopen(_open_regular_local(uri.removeprefix("file://")), "rb")
    else:
        try:
            handle = fsspec.open(uri, "rb").open()
        except FileNotFoundError:
            raise SourceReadError("failed", "vanished", "the object disappeared after listing") from None
    with handle:
        while block := handle.read(READ_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
