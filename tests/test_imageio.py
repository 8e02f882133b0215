"""dynface.images.imageio: every odd or broken input either decodes correctly or raises ImageReadError."""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
import zlib

import numpy as np
import pytest
from make_bad_inputs import (
    EXPECTED_REASONS,
    bomb_png,
    jpeg_with_orientation,
    png_bytes,
    sixteen_bit_png,
    smooth_image,
    write_bad_inputs,
)
from PIL import Image, ImageOps

from dynface.images.imageio import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    LoadedImage,
    content_hash,
    encode_image,
    is_grayscale_rgb,
    read_image,
)


def _save(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _quadrants(h: int = 40, w: int = 60) -> np.ndarray:
    """Four flat colours: red top-left, green top-right, blue bottom-left, white bottom-right."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2 :] = (0, 255, 0)
    a[h // 2 :, : w // 2] = (0, 0, 255)
    a[h // 2 :, w // 2 :] = (255, 255, 255)
    return a


def _reason(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageReadError) as info:
        read_image(data, **kwargs)
    assert str(info.value)  # a human message
    return info.value.reason


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil_exif_transpose(orientation: int) -> None:
    stored = (np.random.default_rng(orientation).random((20, 33, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(Image.fromarray(stored), "PNG", exif=exif.tobytes())  # lossless: exact comparison
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    loaded = read_image(data)
    assert loaded.orientation == orientation
    np.testing.assert_array_equal(loaded.rgb, expected)
    assert (loaded.height, loaded.width) == expected.shape[:2]


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg_shape_and_pixel_placement(orientation: int) -> None:
    display = _quadrants()  # what the viewer must see: 40 high, 60 wide
    # Orientation 6 = "turn the stored pixels clockwise to display", so store them turned the other way.
    stored = np.rot90(display, k=1 if orientation == 6 else -1)
    loaded = read_image(jpeg_with_orientation(np.ascontiguousarray(stored), orientation))
    assert loaded.rgb.shape == (40, 60, 3) and (loaded.width, loaded.height) == (60, 40)
    centres = {(10, 15): (255, 0, 0), (10, 45): (0, 255, 0), (30, 15): (0, 0, 255), (30, 45): (255, 255, 255)}
    for (y, x), colour in centres.items():
        np.testing.assert_allclose(loaded.rgb[y, x], colour, atol=12)


def test_invalid_orientation_value_is_ignored() -> None:
    exif = Image.Exif()
    exif[0x0112] = 42
    loaded = read_image(_save(Image.fromarray(_quadrants()), "PNG", exif=exif.tobytes()))
    assert loaded.orientation == 1
    np.testing.assert_array_equal(loaded.rgb, _quadrants())


# ---------------------------------------------------------------- modes


def test_sixteen_bit_gray_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 1, 128, 257], [32767, 32768, 65280, 65535]] * 8, dtype=np.uint16)
    values = np.tile(values, (1, 5))  # 16 x 20
    big = values.astype(">u2")
    data = png_bytes(20, 16, color_type=0, bit_depth=16, rows=[r.tobytes() for r in big])
    loaded = read_image(data)
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(loaded.rgb[:, :, 0], expected)
    assert loaded.rgb[0, 3, 0] == 1 and loaded.rgb[1, 1, 0] == 128  # clipping would give 255
    assert loaded.bit_depth == 16 and loaded.mode.startswith("I;16") and loaded.is_grayscale


def test_sixteen_bit_rgb_png_scaled_within_one_level() -> None:
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, size=(18, 24, 3), dtype=np.uint16)
    loaded = read_image(sixteen_bit_png(rgb16))
    exact = rgb16.astype(np.float64) * 255 / 65535
    assert np.abs(loaded.rgb - exact).max() <= 1.0
    assert loaded.bit_depth == 16 and not loaded.is_grayscale


def test_float_and_int32_modes_are_scaled() -> None:
    ramp = np.linspace(0.0, 1.0, 16 * 20).reshape(16, 20)
    loaded = read_image(_save(Image.fromarray(ramp.astype(np.float32), "F"), "TIFF"))
    assert loaded.mode == "F" and loaded.bit_depth == 32
    np.testing.assert_array_equal(loaded.rgb[:, :, 2], np.rint(ramp.astype(np.float32) * 255.0))
    ints = np.rint(ramp * 65535).astype(np.int32)  # 16-bit data held in a 32-bit mode
    loaded = read_image(_save(Image.fromarray(ints, "I"), "TIFF"))
    np.testing.assert_array_equal(loaded.rgb[:, :, 0], np.rint(ints * 255.0 / 65535))
    wide = np.rint(ramp * 301_000 - 1000).astype(np.int32)  # outside 16 bits: min-max scaled
    loaded = read_image(_save(Image.fromarray(wide, "I"), "TIFF"))
    assert loaded.rgb[0, 0, 0] == 0 and loaded.rgb[-1, -1, 0] == 255


def test_rgba_is_composited_on_white() -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :8, 3] = 0
    rgba[:, 8:12, 3] = 255
    rgba[:, 12:, 3] = 128
    loaded = read_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert loaded.mode == "RGBA"
    np.testing.assert_array_equal(loaded.rgb[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(loaded.rgb[0, 9], (200, 0, 0))
    a = 128 / 255
    expected = np.rint([200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)])
    np.testing.assert_array_equal(loaded.rgb[0, 13], expected)


def test_palette_with_transparency_becomes_white() -> None:
    im = Image.new("P", (20, 20), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    im.paste(0, (0, 0, 10, 20))
    loaded = read_image(_save(im, "PNG", transparency=0))
    assert loaded.mode == "P"
    np.testing.assert_array_equal(loaded.rgb[5, 5], (255, 255, 255))  # transparent index -> white, not black
    np.testing.assert_array_equal(loaded.rgb[5, 15], (10, 200, 30))


def test_cmyk_jpeg_becomes_rgb() -> None:
    rgb = _quadrants()
    loaded = read_image(_save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95))
    assert loaded.mode == "CMYK" and loaded.rgb.shape == (40, 60, 3)
    for y, x in ((10, 15), (10, 45), (30, 15), (30, 45)):
        np.testing.assert_allclose(loaded.rgb[y, x], rgb[y, x], atol=12)


def test_la_and_one_bit_are_gray() -> None:
    la = np.zeros((16, 16, 2), np.uint8)
    la[..., 0] = 50
    la[..., 1] = 255
    la[:, 8:, 1] = 0
    loaded = read_image(_save(Image.fromarray(la, "LA"), "PNG"))
    np.testing.assert_array_equal(loaded.rgb[0, 0], (50, 50, 50))
    np.testing.assert_array_equal(loaded.rgb[0, 12], (255, 255, 255))
    assert loaded.is_grayscale

    bits = np.zeros((16, 24), bool)
    bits[:, 12:] = True
    loaded = read_image(_save(Image.fromarray(bits), "PNG"))
    assert loaded.mode == "1" and loaded.bit_depth == 1 and loaded.is_grayscale
    np.testing.assert_array_equal(loaded.rgb[0, 0], (0, 0, 0))
    np.testing.assert_array_equal(loaded.rgb[0, 20], (255, 255, 255))


def test_loaded_image_metadata() -> None:
    data = _save(Image.fromarray(_quadrants()), "JPEG", quality=90)
    loaded = read_image(data)
    assert isinstance(loaded, LoadedImage)
    assert (loaded.format, loaded.mode, loaded.n_bytes, loaded.bit_depth, loaded.n_frames) == (
        "JPEG",
        "RGB",
        len(data),
        8,
        1,
    )
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.flags.c_contiguous


# ---------------------------------------------------------------- failures


def test_zero_byte_truncated_and_text() -> None:
    assert _reason(b"") == "empty_file"
    noise = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    jpeg = _save(Image.fromarray(noise), "JPEG", quality=90)
    assert _reason(jpeg[: len(jpeg) // 2]) == "truncated"
    assert _reason(jpeg[:20]) == "truncated"  # a JPEG signature but no complete header
    assert _reason(b"hello, I am a text file named photo.jpg\n" * 10) == "not_an_image"


def test_size_limits() -> None:
    tiny = _save(Image.new("RGB", (1, 1)), "PNG")
    assert _reason(tiny) == "too_small"
    assert _reason(_save(Image.new("RGB", (40, 10)), "PNG"), min_side=16) == "too_small"
    wide = _save(Image.new("RGB", (400, 20)), "PNG")
    assert _reason(wide, max_side=300) == "too_large"
    assert read_image(wide).width == 400


def test_decompression_bomb_checked_from_header_before_decoding() -> None:
    # IHDR claims 20000 x 8000 but the pixel data is garbage: only a header check can say "bomb".
    fake = png_bytes(20_000, 8_000, color_type=2, bit_depth=8, rows=zlib.compress(b"garbage"))
    assert _reason(fake) == "decompression_bomb"
    assert _reason(fake, max_pixels=200_000_000) in ("truncated", "decode_error")
    # 100000 x 100000 trips PIL's own DecompressionBombError, which must come out converted.
    huge = png_bytes(100_000, 100_000, color_type=0, bit_depth=1, rows=zlib.compress(b"\x00" * 100))
    assert _reason(huge, max_pixels=10**12, max_side=10**6) == "decompression_bomb"
    # A small valid image over a custom limit.
    assert _reason(_save(Image.new("L", (100, 100)), "PNG"), max_pixels=5_000) == "decompression_bomb"


def test_decompression_bomb_from_tiny_compressed_png() -> None:
    data = bomb_png()
    assert len(data) < 100_000
    assert _reason(data) == "decompression_bomb"


def test_pil_bomb_warning_never_escapes() -> None:
    # 9500 x 9500 exceeds PIL's warning threshold (89.5 MP) but not our default limit.
    fake = png_bytes(9_500, 9_500, color_type=0, bit_depth=1, rows=zlib.compress(b"\x00" * 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _reason(fake) in ("truncated", "decode_error")


def test_animated_gif_is_refused_with_frame_count() -> None:
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (0, 120, 240)]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageReadError) as info:
        read_image(data)
    assert info.value.reason == "animated" and "3 frames" in str(info.value)
    assert info.value.status == "skipped"
    still = read_image(_save(frames[1], "GIF"))
    assert still.format == "GIF" and still.rgb.shape == (20, 20, 3)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_corrupted_files_only_raise_image_read_error(fmt: str) -> None:
    good = _save(Image.fromarray(smooth_image(40, 48)), fmt)
    rng = np.random.default_rng(7)
    outcomes = set()
    for _ in range(40):
        bad = bytearray(good)
        for pos in rng.integers(0, min(len(bad), 200), size=4):  # hit the headers
            bad[pos] = int(rng.integers(0, 256))
        cut = int(rng.integers(len(bad) // 3, len(bad) + 1))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # nothing may leak into an archive run's log
                loaded = read_image(bytes(bad[:cut]))
            outcomes.add("ok")
            assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape[2] == 3
        except ImageReadError as err:
            outcomes.add(err.reason)
    assert outcomes - {"ok"}, "corruption never detected"


def test_error_pickles_with_reason_and_rejects_unknown_reason() -> None:
    err = pickle.loads(pickle.dumps(ImageReadError("truncated", "cut short")))
    assert (err.reason, str(err), err.status) == ("truncated", "cut short", "failed")
    with pytest.raises(ValueError):
        ImageReadError("whatever", "x")


# ---------------------------------------------------------------- grayscale, encode, hash


def test_grayscale_detection() -> None:
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    as_rgb = np.repeat(gray[:, :, None], 3, axis=2)
    assert is_grayscale_rgb(as_rgb)
    noisy = np.clip(as_rgb.astype(int) + rng.integers(-1, 2, as_rgb.shape), 0, 255).astype(np.uint8)
    assert is_grayscale_rgb(noisy)  # scanner/JPEG chroma noise
    assert not is_grayscale_rgb(_quadrants())
    patch = as_rgb.copy()
    patch[:16, :16] = (200, 30, 30)  # a small red stamp on a B&W photo makes it colour
    assert not is_grayscale_rgb(patch)
    # A gray photo stored as an RGB JPEG keeps reading as gray.
    loaded = read_image(_save(Image.fromarray(as_rgb), "JPEG", quality=85))
    assert loaded.mode == "RGB" and loaded.is_grayscale
    assert not read_image(_save(Image.fromarray(_quadrants()), "JPEG")).is_grayscale
    with pytest.raises(ValueError):
        is_grayscale_rgb(gray)


@pytest.mark.parametrize("fmt", ["png", "bmp", "tiff"])
def test_encode_lossless_round_trip(fmt: str) -> None:
    rgb = (np.random.default_rng(3).random((17, 23, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(encode_image(rgb, fmt)).rgb, rgb)


def test_encode_lossy_and_errors() -> None:
    rgb = smooth_image(48, 64)
    for fmt in ("jpg", "webp"):
        data = encode_image(rgb, fmt, quality=95)
        assert read_image(data).format == {"jpg": "JPEG", "webp": "WEBP"}[fmt]
        assert np.abs(read_image(data).rgb.astype(int) - rgb).mean() < 2
    with pytest.raises(ValueError):
        encode_image(rgb, "xyz")
    with pytest.raises(ValueError):
        encode_image(rgb.astype(np.float32))


def test_content_hash_and_extensions() -> None:
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert content_hash(b"xyz") == hashlib.sha256(b"xyz").hexdigest()
    decoded = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif"}
    assert set(IMAGE_EXTENSIONS) == decoded


def test_avif_decodes_and_heif_is_unsupported_whatever_its_name() -> None:
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (200, 40, 40)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "AVIF", quality=95)
    loaded = read_image(buf.getvalue())
    assert loaded.format == "AVIF" and (loaded.width, loaded.height) == (48, 32)
    assert np.abs(loaded.rgb.astype(int) - rgb).mean() < 8
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    with pytest.raises(ImageReadError) as err:
        read_image(heic)
    assert err.value.reason == "unsupported_format" and err.value.status == "skipped"


# ---------------------------------------------------------------- the generated bad-input folder


def test_bad_inputs_folder(tmp_path) -> None:
    expected = write_bad_inputs(tmp_path)
    names = {
        "zero_byte.jpg",
        "truncated.jpg",
        "text.jpg",
        "one_pixel.png",
        "bomb.png",
        "huge_dimensions.png",
        "animated.gif",
        "cmyk.jpg",
        "sixteen_bit.png",
        "exif_rotated.jpg",
        "no_face.png",
    }
    assert set(expected) == names == {p.name for p in tmp_path.iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, status in expected.items():
            data = (tmp_path / name).read_bytes()
            if status in ("failed", "skipped"):
                with pytest.raises(ImageReadError) as info:
                    read_image(data)
                assert (info.value.reason, info.value.status) == (EXPECTED_REASONS[name], status), name
            else:
                loaded = read_image(data)
                assert loaded.rgb.shape[2] == 3 and not loaded.is_grayscale, name
    assert read_image((tmp_path / "exif_rotated.jpg").read_bytes()).orientation == 6
    assert read_image((tmp_path / "sixteen_bit.png").read_bytes()).bit_depth == 16
    assert read_image((tmp_path / "cmyk.jpg").read_bytes()).mode == "CMYK"
