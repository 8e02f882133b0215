"""Generate (never copy) the odd and broken input files the pipeline must survive.

`write_bad_inputs(folder)` writes every file and returns {file name: expected catalog status}:
"failed" (broken file), "skipped" (valid but refused by policy), "no_face" or "ok".
The "ok" files hold a drawn cartoon face that dlib's HOG frontal detector finds (score ~0.8-1.0 at
300 px), so they need no research data; each is stored in an awkward form (CMYK, 16-bit, rotated
with an EXIF orientation tag) that a naive reader gets wrong.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

EXPECTED_REASONS: dict[str, str] = {
    "zero_byte.jpg": "empty_file",
    "truncated.jpg": "truncated",
    "text.jpg": "not_an_image",
    "one_pixel.png": "too_small",
    "bomb.png": "decompression_bomb",
    "huge_dimensions.png": "too_large",
    "animated.gif": "animated",
}


def synthetic_face(size: int = 300) -> np.ndarray:
    """(size, size, 3) uint8 cartoon face (hair, skin oval, eyes, brows, nose, mouth), centred.

    Eye centres are near (0.4125*size, 0.44*size) and (0.5875*size, 0.44*size). Drawn on a
    400-unit canvas scaled to `size`, then blurred so the HOG gradients look photographic.
    """
    u = size / 400.0
    im = Image.new("RGB", (size, size), (90, 110, 140))
    d = ImageDraw.Draw(im)
    d.ellipse([110 * u, 40 * u, 290 * u, 200 * u], fill=(60, 40, 30))
    d.ellipse([120 * u, 70 * u, 280 * u, 320 * u], fill=(225, 180, 150))
    for cx in (165, 235):
        d.ellipse([(cx - 22) * u, 165 * u, (cx + 22) * u, 187 * u], fill=(250, 250, 250))
        d.ellipse([(cx - 9) * u, 167 * u, (cx + 9) * u, 185 * u], fill=(50, 35, 25))
        d.line(
            [(cx - 26) * u, 150 * u, (cx + 24) * u, 146 * u], fill=(60, 40, 30), width=max(1, round(7 * u))
        )
    d.polygon([(200 * u, 180 * u), (188 * u, 240 * u), (212 * u, 240 * u)], fill=(200, 150, 125))
    d.ellipse([185 * u, 233 * u, 215 * u, 247 * u], fill=(170, 120, 100))
    d.chord([168 * u, 255 * u, 232 * u, 290 * u], 0, 180, fill=(160, 70, 70))
    d.line([168 * u, 268 * u, 232 * u, 268 * u], fill=(120, 50, 50), width=max(1, round(3 * u)))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(2 * u)))


def write_aligned_faces(
    folder: Path, n: int, *, size: int = 48, step: int = 3, name: str = "face{k}.png"
) -> Path:
    """`n` aligned crops (the synthetic face shifted by `step` * k pixels) saved as PNG into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray(np.roll(synthetic_face(size), step * k, axis=1)).save(folder / name.format(k=k))
    return folder


def smooth_image(height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 smooth colour field (low-frequency sinusoids): no edges, no faces."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.empty((height, width, 3))
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        out[:, :, c] = 128 + 60 * np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase)
    return np.rint(out).astype(np.uint8)


def write_photos(folder: Path) -> Path:
    """Three whole photos drawn by us: two faces on a background, one gray face, no face at all
    (dlib finds 2, 1 and 0 faces)."""
    folder.mkdir(parents=True)
    scene = smooth_image(300, 420, seed=3)
    scene[20:220, 10:210] = synthetic_face(200)
    scene[110:270, 250:410] = synthetic_face(160)[:, ::-1]
    Image.fromarray(scene).save(folder / "two_faces.png")
    gray = smooth_image(260, 260, seed=4)
    gray[30:230, 30:230] = synthetic_face(200)
    Image.fromarray(gray).convert("L").save(folder / "gray_face.jpg", quality=95)
    Image.fromarray(smooth_image(200, 300, seed=5)).save(folder / "landscape.png")
    return folder


def png_bytes(
    width: int, height: int, *, color_type: int, bit_depth: int, rows: list[bytes] | bytes
) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB or lie about sizes). `rows` are the raw
    scanlines without filter bytes, or an already zlib-compressed IDAT payload (bytes)."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    if isinstance(rows, list):
        idat = zlib.compress(b"".join(b"\x00" + r for r in rows), 6)
    else:
        idat = rows
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def sixteen_bit_png(rgb16: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint16 array as a 16-bit RGB PNG."""
    big = rgb16.astype(">u2")
    return png_bytes(big.shape[1], big.shape[0], color_type=2, bit_depth=16, rows=[r.tobytes() for r in big])


def bomb_png(width: int = 12_000, height: int = 9_000) -> bytes:
    """A valid 1-bit PNG of `width` x `height` zeros (108 MP by default) in ~15 kB."""
    row = bytes(1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    payload = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return png_bytes(width, height, color_type=0, bit_depth=1, rows=payload)


def jpeg_with_orientation(stored: np.ndarray, orientation: int, *, quality: int = 95) -> bytes:
    """JPEG of the stored pixels with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """Write every bad/odd input file into `folder`; return {file name: expected status}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    face = synthetic_face(300)
    files: dict[str, tuple[bytes, str]] = {}

    buf = io.BytesIO()
    Image.fromarray(face).save(buf, "JPEG", quality=90)
    full_jpeg = buf.getvalue()
    files["zero_byte.jpg"] = (b"", "failed")
    files["truncated.jpg"] = (full_jpeg[: len(full_jpeg) // 2], "failed")
    files["text.jpg"] = (b"This is not a JPEG, just a text file with the wrong name.\n" * 20, "failed")

    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(buf, "PNG")
    files["one_pixel.png"] = (buf.getvalue(), "skipped")
    files["bomb.png"] = (bomb_png(), "skipped")
    buf = io.BytesIO()
    Image.fromarray(smooth_image(20, 40_000)).save(buf, "PNG")
    files["huge_dimensions.png"] = (buf.getvalue(), "skipped")

    frames = [Image.fromarray(face), Image.fromarray(255 - face), Image.fromarray(face[::-1])]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["animated.gif"] = (buf.getvalue(), "skipped")

    buf = io.BytesIO()
    Image.fromarray(face).convert("CMYK").save(buf, "JPEG", quality=95)
    files["cmyk.jpg"] = (buf.getvalue(), "ok")
    # Real 16-bit content: v*257 plus a deterministic low-byte pattern that PIL's 8-bit path drops.
    wiggle = (np.arange(face.size, dtype=np.uint32).reshape(face.shape) * 37) % 200
    face16 = (face.astype(np.uint32) * 257).clip(0, 65535 - 200) + wiggle
    files["sixteen_bit.png"] = (sixteen_bit_png(face16.astype(np.uint16)), "ok")
    # Stored turned 90 degrees counter-clockwise; orientation 6 says "turn clockwise to display".
    files["exif_rotated.jpg"] = (jpeg_with_orientation(np.ascontiguousarray(np.rot90(face, k=1)), 6), "ok")

    buf = io.BytesIO()
    Image.fromarray(smooth_image(240, 320, seed=3)).save(buf, "PNG")
    files["no_face.png"] = (buf.getvalue(), "no_face")

    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: status for name, (_, status) in files.items()}
