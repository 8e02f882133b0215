"""Robust image reading for archive runs: one bad file must never kill a run.

`read_image` turns raw bytes into an (H, W, 3) uint8 RGB array with EXIF orientation applied and
alpha composited on white, or raises `ImageReadError` with a short machine-readable `reason`:

| reason               | status    | meaning                                                          |
|----------------------|-----------|------------------------------------------------------------------|
| `empty_file`         | failed    | zero bytes                                                       |
| `not_an_image`       | failed    | no known image signature and PIL cannot identify it              |
| `truncated`          | failed    | the data ends before the image does                              |
| `decode_error`       | failed    | anything else that stops decoding                                |
| `decompression_bomb` | skipped   | the header claims more than `max_pixels` (checked before decoding) |
| `too_large`          | skipped   | a side longer than `max_side`                                    |
| `too_small`          | skipped   | a side shorter than `min_side`                                   |
| `animated`           | skipped   | more than one frame (GIF/WebP/APNG/multi-page TIFF)              |
| `unsupported_format` | skipped   | a HEIF/HEIC file (whatever its name): Pillow cannot decode it    |

"failed" means the file is broken; "skipped" means a valid file that policy refuses to restore.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif",
)  # fmt: skip

SKIP_REASONS = frozenset({"decompression_bomb", "too_large", "too_small", "animated", "unsupported_format"})
# ISO-BMFF brands of HEIF/HEIC files (Pillow cannot decode them; AVIF, the same container, it can).
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")
FAIL_REASONS = frozenset({"empty_file", "not_an_image", "truncated", "decode_error"})

# Magic numbers of the formats we accept: a file that starts like an image but cannot be opened
# is broken (truncated/decode_error), not "not an image".
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

_EXIF_ORIENTATION_TAG = 0x0112
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


class ImageReadError(Exception):
    """Why an image could not be read. `reason` is a short code (see module docstring)."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in SKIP_REASONS | FAIL_REASONS:
            raise ValueError(f"unknown ImageReadError reason {reason!r}")
        super().__init__(message)
        self.reason = reason

    @property
    def status(self) -> str:
        """Catalog status for this failure: "skipped" (policy) or "failed" (broken file)."""
        return "skipped" if self.reason in SKIP_REASONS else "failed"

    def __reduce__(self):  # keep reason when pickled across processes (Ray, Prefect)
        return (type(self), (self.reason, str(self)))


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image. `width`/`height` are those of `rgb` (after EXIF orientation).

    rgb: (H, W, 3) uint8, orientation applied, alpha composited on white.
    orientation: the EXIF orientation tag found (1..8; 1 when absent or invalid).
    mode: the original PIL mode ("RGB", "L", "I;16", "CMYK", "P", "RGBA", ...).
    format: PIL format name ("JPEG", "PNG", ...). n_bytes: size of the encoded data.
    is_grayscale: gray mode, or colour channels equal within tolerance (see `is_grayscale_rgb`).
    bit_depth: bits per sample of the source (1, 8, 16 or 32). n_frames: always 1 (more is refused).
    """

    rgb: np.ndarray
    width: int
    height: int
    orientation: int
    mode: str
    format: str
    n_bytes: int
    is_grayscale: bool
    bit_depth: int
    n_frames: int


def content_hash(data: bytes) -> str:
    """SHA-256 of the bytes, lower-case hex."""
    return hashlib.sha256(data).hexdigest()


def is_grayscale_rgb(rgb: np.ndarray, *, tol: float = 2.0) -> bool:
    """True when the three channels of an (H, W, 3) image are equal within `tol` grey levels.

    Old photos are often stored as RGB with a little chroma noise (JPEG, scanners), so a strict
    equality test would call them colour and the restorer would colourise them. The per-pixel
    spread max(R,G,B) - min(R,G,B) must be <= tol on average and <= 3*tol for 99% of the pixels
    (so a small coloured region still makes the image colour). Big images are subsampled.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3), got {rgb.shape}")
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 1_000_000)))
    sample = rgb[::step, ::step].astype(np.int16)
    spread = sample.max(axis=2) - sample.min(axis=2)
    return bool(spread.mean() <= tol and np.percentile(spread, 99) <= 3 * tol)


def encode_image(rgb: np.ndarray, fmt: str = "png", *, quality: int = 95) -> bytes:
    """Encode an (H, W, 3) uint8 array as png/jpg/jpeg/webp/bmp/tif/tiff bytes."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    names = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP"}
    names |= {"tif": "TIFF", "tiff": "TIFF"}
    key = fmt.lower().lstrip(".")
    if key not in names:
        raise ValueError(f"unsupported format {fmt!r}; expected one of {sorted(names)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    buf = io.BytesIO()
    kwargs = {"quality": quality} if names[key] in ("JPEG", "WEBP") else {}
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(buf, names[key], **kwargs)
    return buf.getvalue()


def read_image(
    data: bytes, *, max_pixels: int = 100_000_000, max_side: int = 30_000, min_side: int = 16
) -> LoadedImage:
    """Decode image bytes to RGB uint8 or raise `ImageReadError` (never another exception type
    for bad data; PIL's DecompressionBombWarning/Error are converted or silenced).

    Limits are checked on the header size before any pixel is decoded. PIL keeps its own hard
    limit (2 * Image.MAX_IMAGE_PIXELS, ~179 MP) which is also reported as decompression_bomb.
    """
    if len(data) == 0:
        raise ImageReadError("empty_file", "the file is empty (0 bytes)")
    signature = next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)
    if signature is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        signature = "WEBP"
    if signature is None and data[4:8] == b"ftyp":
        if data[8:12] in (b"avif", b"avis"):
            signature = "AVIF"
        elif data[8:12] in _HEIF_BRANDS:
            raise ImageReadError("unsupported_format", "a HEIF/HEIC image: convert it to PNG or TIFF")
    with warnings.catch_warnings():
        # Our own max_pixels check replaces PIL's bomb warning, and PIL's warnings about damaged
        # metadata are not actionable: the outcome is the result or the ImageReadError.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", module=r"PIL\.")
        im = _open(data, signature)
        try:
            _check_header(im, max_pixels=max_pixels, max_side=max_side, min_side=min_side)
            orientation = _orientation(im)
            mode, fmt = im.mode, im.format or (signature or "unknown")
            rgb = _decode(im)
            bit_depth = _bit_depth(im, data)
        finally:
            im.close()
    rgb = np.ascontiguousarray(apply_orientation(rgb, orientation))
    is_gray = mode in _GRAY_MODES or is_grayscale_rgb(rgb)
    return LoadedImage(
        rgb=rgb,
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
        orientation=orientation,
        mode=mode,
        format=fmt,
        n_bytes=len(data),
        is_grayscale=is_gray,
        bit_depth=bit_depth,
        n_frames=1,
    )


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an (H, W, ...) array: stored pixels -> displayed pixels."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # mirrored horizontally
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1],  # mirrored vertically
        5: lambda a: a.swapaxes(0, 1),  # transpose
        6: lambda a: np.rot90(a, k=-1),  # stored rotated 90 CCW: turn clockwise to display
        7: lambda a: np.rot90(a, k=2).swapaxes(0, 1),  # transverse
        8: lambda a: np.rot90(a, k=1),  # stored rotated 90 CW: turn counter-clockwise
    }
    if orientation not in ops:
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation}")
    return ops[orientation](arr)


def _open(data: bytes, signature: str | None) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            "decompression_bomb", f"the header claims too many pixels, refused before decoding: {exc}"
        ) from exc
    except UnidentifiedImageError as exc:
        if signature is None:
            raise ImageReadError(
                "not_an_image",
                f"not an image file (no known signature in the first bytes, {len(data)} bytes)",
            ) from exc
        if len(data) < 1024:
            raise ImageReadError(
                "truncated", f"starts like a {signature} but its header is incomplete ({len(data)} bytes)"
            ) from exc
        raise ImageReadError(
            "decode_error", f"starts like a {signature} but cannot be parsed: {exc}"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed headers raise all sorts of types inside PIL
        raise _decode_failure(exc) from exc


def _decode(im: Image.Image) -> np.ndarray:
    try:
        im.load()
        return _to_rgb8(im)
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError("decompression_bomb", f"refused by PIL's pixel limit: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - malformed files raise all sorts of types inside PIL
        raise _decode_failure(exc) from exc


def _decode_failure(exc: BaseException) -> ImageReadError:
    text = str(exc)
    if isinstance(exc, EOFError) or "truncat" in text.lower():
        return ImageReadError("truncated", f"the image data ends early (file truncated): {text}")
    return ImageReadError("decode_error", f"the image could not be decoded: {type(exc).__name__}: {text}")


def _check_header(im: Image.Image, *, max_pixels: int, max_side: int, min_side: int) -> None:
    width, height = im.size
    if width * height > max_pixels:
        raise ImageReadError(
            "decompression_bomb",
            f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}; not decoded",
        )
    if max(width, height) > max_side:
        raise ImageReadError("too_large", f"{width}x{height}: a side exceeds the limit of {max_side} px")
    if min(width, height) < min_side:
        raise ImageReadError("too_small", f"{width}x{height}: a side is below the minimum of {min_side} px")
    try:
        n_frames = int(getattr(im, "n_frames", 1))
    except Exception as exc:  # noqa: BLE001 - counting frames parses the whole file
        raise _decode_failure(exc) from exc
    if n_frames > 1:
        raise ImageReadError(
            "animated", f"animated or multi-page image with {n_frames} frames; only still images are restored"
        )


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the pixels unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _bit_depth(im: Image.Image, data: bytes) -> int:
    if im.mode == "1":
        return 1
    if im.mode.startswith("I;16"):
        return 16
    if im.mode in ("I", "F"):
        return 32
    # PIL decodes 16-bit RGB(A) PNGs to 8 bits; the IHDR still says what the file held.
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24:
        return int(data[24])
    return 8


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from any PIL mode. 16-bit values are rescaled (x*255/65535, rounded), not
    clipped; palette and alpha images are composited on white."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _scale_wide_gray(np.asarray(im), mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "1":
        im = im.convert("L")
    elif mode == "P":
        im = (
            im.convert("RGBA")
            if "transparency" in im.info or im.palette.mode == "RGBA"
            else im.convert("RGB")
        )
    elif mode in ("L", "RGB") and "transparency" in im.info:  # tRNS: one colour is transparent
        im = im.convert("RGBA")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    if im.mode == "L":
        arr = np.asarray(im)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if im.mode == "LA":
        arr = np.asarray(im)
        return _composite_on_white(np.repeat(arr[:, :, :1], 3, axis=2), arr[:, :, 1])
    if im.mode == "RGBA":
        arr = np.asarray(im)
        return _composite_on_white(arr[:, :, :3], arr[:, :, 3])
    # CMYK (PIL handles Adobe's inverted CMYK when decoding), YCbCr, LAB, HSV, RGBX ...
    return np.asarray(im.convert("RGB"))


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[:, :, None] / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _scale_wide_gray(arr: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit grey to uint8. I;16: x*255/65535. I: the same when values fit 16 bits, else
    min-max. F: x*255 when within [0, 1], else min-max."""
    x = arr.astype(np.float64)
    if mode == "F":
        lo, hi = (0.0, 1.0) if x.min() >= 0.0 and x.max() <= 1.0 else (float(x.min()), float(x.max()))
    elif mode == "I" and (x.min() < 0 or x.max() > 65535):
        lo, hi = float(x.min()), float(x.max())
    else:
        lo, hi = 0.0, 65535.0
    scaled = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
