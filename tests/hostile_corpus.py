"""A generated corpus of hostile and odd inputs, each with what the pipeline must make of it.

``build(folder)`` writes the files and returns ``{relative key: Expect}``: an ``ok`` row with the output's size
(EXIF rotation applied, first frame used, ...) or an ``error`` row whose reason contains some words.
The limits the expectations assume are ``MAX_PIXELS`` and ``MAX_BYTES``.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MAX_PIXELS = 300_000
MAX_BYTES = 400_000


@dataclass(frozen=True)
class Expect:
    status: str  # "ok" or "error"
    size: tuple[int, int] | None = None  # output (width, height) for ok rows
    reason: str | None = None  # words the error must contain


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(size=(40, 24), seed=0) -> Image.Image:
    """A small picture with structure (so orientation mistakes show), not a flat colour."""
    rng = np.random.default_rng(seed)
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    array[..., 1] = np.linspace(0, 255, size[1], dtype=np.uint8)[:, None]
    array[..., 2] = rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    return Image.fromarray(array, "RGB")


def write_photos(folder: Path, count: int, size=(96, 64), groups: int = 4) -> None:
    """``count`` small, distinct JPEG photos in ``groups`` subfolders: a plain bucket to crash runs on."""
    for index in range(count):
        path = folder / f"set{index % groups}" / f"photo_{index:04}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded(photo(size, seed=index), "JPEG"))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``: a decompression bomb to any header reader."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def with_exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(photo((40, 24)), "JPEG", exif=exif.tobytes(), quality=92)


def corrupt_exif_jpeg() -> bytes:
    """A JPEG whose APP1 EXIF segment is garbage (valid segment length, nonsense TIFF inside)."""
    data = encoded(photo(), "JPEG", quality=90)
    garbage = b"Exif\0\0" + b"MM\0\x2a\xff\xff\xff\xff" + os.urandom(40)
    segment = b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage
    return data[:2] + segment + data[2:]


def tiff_with_associated_alpha(image: Image.Image) -> bytes:
    """An LA or RGBA image as a TIFF whose alpha is marked associated (premultiplied; ExtraSamples = 1): the
    stored colours are read as already multiplied by alpha, and PIL opens it as mode La or RGBa."""
    buffer = io.BytesIO()
    image.save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    assert data[:2] == b"II"  # PIL writes little-endian TIFFs
    directory = int.from_bytes(data[4:8], "little")
    for index in range(int.from_bytes(data[directory : directory + 2], "little")):
        entry = directory + 2 + 12 * index
        if int.from_bytes(data[entry : entry + 2], "little") == 338:  # ExtraSamples: 2 (unassociated) -> 1
            data[entry + 8 : entry + 10] = (1).to_bytes(2, "little")
            return bytes(data)
    raise AssertionError("PIL wrote no ExtraSamples tag")


def build(folder: Path, outside: Path) -> dict[str, Expect]:
    """Write the corpus under ``folder`` (and one target file in ``outside``, a sibling folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    expect: dict[str, Expect] = {}

    def put(name: str, data: bytes, expectation: Expect) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expect[name] = expectation

    noise = Image.effect_noise((96, 96), 60).convert("RGB")
    jpeg_bytes, png_bytes = encoded(noise, "JPEG", quality=90), encoded(noise, "PNG")
    put("broken/truncated.jpg", jpeg_bytes[: len(jpeg_bytes) // 2], Expect("error", reason="truncated"))
    put("broken/truncated.png", png_bytes[: len(png_bytes) // 2], Expect("error", reason="truncated"))
    put("broken/empty.jpg", b"", Expect("error", reason="empty file"))
    put("broken/text.jpg", b"hello, I am a text file named .jpg\n", Expect("error", reason="not a recognised image"))
    put("broken/page.jpg", b"<!doctype html><html><body>404</body></html>", Expect("error", reason="not a recognised"))
    put("limits/bomb.png", png_claiming(100_000, 100_000), Expect("error", reason="over the limit"))
    put("limits/just_over.png", encoded(Image.new("RGB", (301, 1000), "gray"), "PNG"),
        Expect("error", reason="301,000 pixels, over the limit of 300,000"))
    put("limits/just_under.png", encoded(Image.new("RGB", (300, 1000), "gray"), "PNG"), Expect("ok", (300, 1000)))
    put("limits/one_pixel.png", encoded(Image.new("RGB", (1, 1), "red"), "PNG"), Expect("ok", (1, 1)))
    put("limits/sliver.png", encoded(Image.new("RGB", (3, 100_000), "blue"), "PNG"),
        Expect("error", reason="too large for JPEG output (at most 65,500 pixels a side)"))
    put("limits/sliver_wide.png", encoded(Image.new("RGB", (65_500, 3), "blue"), "PNG"), Expect("ok", (65_500, 3)))
    random_pixels = np.random.default_rng(1).integers(0, 255, (420, 420, 3), dtype=np.uint8)
    huge_file = encoded(Image.fromarray(random_pixels, "RGB"), "PNG")  # under the pixel limit, over the bytes one
    assert len(huge_file) > MAX_BYTES
    put("limits/too_many_bytes.png", huge_file, Expect("error", reason=f"over the limit of {MAX_BYTES:,}"))
    put("modes/cmyk.jpg", encoded(photo().convert("CMYK"), "JPEG"), Expect("ok", (40, 24)))
    sixteen = Image.fromarray(np.arange(40 * 24, dtype=np.uint16).reshape(24, 40) * 60)
    put("modes/gray16.png", encoded(sixteen, "PNG"), Expect("ok", (40, 24)))
    palette = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    put("modes/palette.png", encoded(palette, "PNG", transparency=0), Expect("ok", (40, 24)))
    put("modes/gray.jpg", encoded(photo().convert("L"), "JPEG"), Expect("ok", (40, 24)))
    rgba = photo().convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 24)))
    put("modes/alpha.png", encoded(rgba, "PNG"), Expect("ok", (40, 24)))
    put("modes/gray_premultiplied_alpha.tif", tiff_with_associated_alpha(photo().convert("LA")), Expect("ok", (40, 24)))
    put("modes/premultiplied_alpha.tif", tiff_with_associated_alpha(rgba), Expect("ok", (40, 24)))
    for orientation in range(1, 9):
        size = (24, 40) if orientation >= 5 else (40, 24)  # 5-8 swap width and height
        put(f"exif/orientation_{orientation}.jpg", with_exif_orientation(orientation), Expect("ok", size))
    put("exif/corrupt_exif.jpg", corrupt_exif_jpeg(), Expect("ok", (40, 24)))
    frames = [photo(seed=seed) for seed in range(3)]
    put("formats/animated.gif", encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40),
        Expect("ok", (40, 24)))
    pages = [photo((40, 24)), photo((64, 64), seed=1)]
    put("formats/multipage.tif", encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:]),
        Expect("ok", (40, 24)))
    put("formats/image.webp", encoded(photo(), "WEBP", quality=80), Expect("ok", (40, 24)))
    put("formats/progressive.jpg", encoded(photo(), "JPEG", progressive=True, quality=90), Expect("ok", (40, 24)))
    put("names/with spaces in it.jpg", encoded(photo(), "JPEG"), Expect("ok", (40, 24)))
    put("names/фото_写真_🎨.jpg", encoded(photo(), "JPEG"), Expect("ok", (40, 24)))
    put("names/" + "l" * 250 + ".jpg", encoded(photo(), "JPEG"), Expect("ok", (40, 24)))
    put("names/same_stem.jpg", encoded(photo(seed=1), "JPEG"), Expect("ok", (40, 24)))
    put("names/same_stem.png", encoded(photo(seed=2), "PNG"), Expect("ok", (40, 24)))

    (folder / "links").mkdir()
    (outside / "secret.jpg").write_bytes(encoded(photo(), "JPEG"))
    os.symlink(folder / "formats" / "progressive.jpg", folder / "links" / "inside.jpg")
    expect["links/inside.jpg"] = Expect("ok", (40, 24))
    os.symlink(outside / "secret.jpg", folder / "links" / "outside.jpg")
    expect["links/outside.jpg"] = Expect("error", reason="outside the source folder")
    os.symlink(folder / "links" / "nowhere.jpg", folder / "links" / "dangling.jpg")
    expect["links/dangling.jpg"] = Expect("error", reason="broken symbolic link")
    os.symlink(folder / "formats", folder / "links" / "to_a_folder")
    expect["links/to_a_folder"] = Expect("error", reason="a symbolic link to a folder, not followed")
    (folder / "x.jpg").mkdir()
    expect["x.jpg"] = Expect("error", reason="a folder, not an image file")
    return expect


def make_read_only(folder: Path) -> bool:
    """Make a folder tree read-only even for root (immutable attribute); False where this system cannot."""
    if shutil.which("chattr") is None:
        return False
    if subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True).returncode != 0:
        return False
    try:
        (folder / ".probe").write_bytes(b"")
    except OSError:
        return True
    (folder / ".probe").unlink()
    make_writable(folder)
    return False


def make_writable(folder: Path) -> None:
    subprocess.run(["chattr", "-R", "-i", str(folder)], capture_output=True)
