"""Image decoding turns every readable image into upright 8-bit RGB, and everything else into ImageDecodeError."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from stylecore.images import (
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    encode_image,
    image_to_tensor,
    tensor_to_image,
)
from tests.hostile_corpus import tiff_with_associated_alpha

# Adobe RGB (1998): its primaries adapted to D50 (the profile connection space) and its gamma, 563/256.
ADOBE_RGB = ((0.60974, 0.31111, 0.01947), (0.20528, 0.62567, 0.06087), (0.14919, 0.06322, 0.74457))
ADOBE_GAMMA = 563 / 256
SRGB_D50 = ((0.4360747, 0.2225045, 0.0139322), (0.3850649, 0.7168786, 0.0971045), (0.1430804, 0.0606169, 0.7141733))


def matrix_profile(description: str, primaries, gamma: float) -> bytes:
    """A minimal ICC v2 display profile (matrix and gamma curves), as cameras and editors embed for Adobe RGB."""
    def fixed(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(values) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(fixed(v) for v in values)

    text = description.encode("ascii")
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    tags = [(b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(text) + 1) + text + bytes(1 + 4 + 4 + 2 + 1 + 67)),
            (b"cprt", b"text\0\0\0\0public domain\0"), (b"wtpt", xyz((0.9642, 1.0, 0.8249))),
            (b"rXYZ", xyz(primaries[0])), (b"gXYZ", xyz(primaries[1])), (b"bXYZ", xyz(primaries[2])),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + bytes(28) + fixed(0.9642) + fixed(1.0)
              + fixed(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data


def adobe_to_srgb(rgb) -> np.ndarray:
    """The sRGB levels of Adobe RGB levels, worked out from the two colour spaces' definitions."""
    linear = (np.asarray(rgb, dtype=np.float64) / 255) ** ADOBE_GAMMA
    srgb = np.linalg.solve(np.array(SRGB_D50).T, np.array(ADOBE_RGB).T @ linear).clip(0, 1)
    return 255 * np.where(srgb <= 0.0031308, 12.92 * srgb, 1.055 * srgb ** (1 / 2.4) - 0.055)


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims enormous dimensions: a decompression bomb as far as any header reader can tell."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "red")
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(save(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.size == (20, 40)
    top_middle = np.asarray(decoded)[2, 10]
    assert top_middle[2] > 200 and top_middle[0] < 60  # the blue band is now at the top


@pytest.mark.parametrize("orientation,transpose", [
    (1, None), (2, Image.Transpose.FLIP_LEFT_RIGHT), (3, Image.Transpose.ROTATE_180),
    (4, Image.Transpose.FLIP_TOP_BOTTOM), (5, Image.Transpose.TRANSPOSE), (6, Image.Transpose.ROTATE_270),
    (7, Image.Transpose.TRANSVERSE), (8, Image.Transpose.ROTATE_90),
])
def test_every_exif_orientation_gives_the_upright_picture(orientation, transpose):
    stored = Image.new("RGB", (40, 20), (200, 30, 30))
    stored.paste((30, 30, 200), (0, 0, 10, 10))  # a blue corner: shows every flip and turn
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = np.asarray(decode_image(save(stored, "PNG", exif=exif.tobytes())), dtype=int)
    upright = np.asarray(stored if transpose is None else stored.transpose(transpose), dtype=int)
    assert decoded.shape == upright.shape and np.abs(decoded - upright).max() == 0


def test_transparent_pixels_are_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    decoded = np.asarray(decode_image(save(image, "PNG")))
    assert tuple(decoded[0, 0]) == (255, 255, 255)
    assert tuple(decoded[1, 1]) == (255, 0, 0)


@pytest.mark.parametrize("stored, expected", [((100, 128), (227, 227, 227)), ((100, 50, 20, 128), (227, 177, 147))])
def test_premultiplied_alpha_is_composited_on_white(stored, expected):
    # A TIFF's "associated" alpha (PIL modes La and RGBa): the stored colour is already multiplied by alpha, so
    # over white it shows as colour + 255 * (1 - alpha).
    image = Image.new("LA" if len(stored) == 2 else "RGBA", (4, 4), stored)
    image.putpixel((0, 0), (0, 0) if len(stored) == 2 else (0, 0, 0, 0))
    decoded = np.asarray(decode_image(tiff_with_associated_alpha(image))).astype(int)
    assert tuple(decoded[0, 0]) == (255, 255, 255)
    assert np.abs(decoded[1, 1] - np.array(expected)).max() <= 1


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    decoded = np.asarray(decode_image(save(image, "PNG", transparency=0)))
    assert tuple(decoded[0, 0]) == (255, 255, 255)
    assert tuple(decoded[2, 2]) == (0, 255, 0)


def test_cmyk_jpeg_becomes_rgb():
    image = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    decoded = decode_image(save(image, "JPEG", quality=95))
    assert decoded.mode == "RGB"
    red, green, blue = np.asarray(decoded)[4, 4].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_colours_of_an_embedded_wide_gamut_profile_are_converted_to_srgb():
    # A photo saved in Adobe RGB (or Display P3) read as if it were sRGB comes out dull; its outputs, written as
    # sRGB, would be too.
    colours = [(180, 60, 60), (60, 160, 90), (40, 70, 200), (128, 128, 128)]
    image = Image.new("RGB", (8 * len(colours), 8))
    for index, colour in enumerate(colours):
        image.paste(colour, (8 * index, 0, 8 * index + 8, 8))
    profile = matrix_profile("Adobe RGB (1998) compatible", ADOBE_RGB, ADOBE_GAMMA)
    expected = np.array([adobe_to_srgb(colour) for colour in colours])
    decoded = np.asarray(decode_image(save(image, "PNG", icc_profile=profile)))[4, 4::8].astype(float)
    assert np.abs(decoded - expected).max() <= 1.0
    assert decoded[0, 0] > 200  # more saturated than the stored levels, as the photo really looks

    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter to the left: converted and turned upright
    rotated = save(image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=100, subsampling=0,
                   icc_profile=profile, exif=exif.tobytes())
    assert np.abs(np.asarray(decode_image(rotated))[4, 4::8].astype(float) - expected).max() <= 3.0


def test_srgb_foreign_and_broken_profiles_leave_the_pixels_as_stored():
    image = Image.effect_mandelbrot((24, 16), (-2, -1, 1, 1), 40).convert("RGB")
    stored = np.asarray(image)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # another colour space
    for profile in (srgb, lab, b"not a profile at all", srgb[:200]):
        assert np.array_equal(np.asarray(decode_image(save(image, "PNG", icc_profile=profile))), stored)


def test_16_bit_png_is_scaled_not_clipped():
    array = np.array([[0, 32768, 65535]], dtype=np.uint16)
    decoded = np.asarray(decode_image(save(Image.fromarray(array), "PNG")))
    assert decoded.shape == (1, 3, 3)
    assert list(decoded[0, :, 0]) == [0, 128, 255]


def test_grayscale_becomes_three_equal_channels():
    decoded = np.asarray(decode_image(save(Image.new("L", (3, 3), 77), "PNG")))
    assert decoded.shape == (3, 3, 3) and (decoded == 77).all()


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("P", (6, 6), 0), Image.new("P", (6, 6), 1)]
    for frame in frames:
        frame.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert tuple(np.asarray(decode_image(data))[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"hello, I am a text file named photo.jpg\n", "not a recognised image format"),
        (b"<html><body>404 Not Found</body></html>", "not a recognised image format"),
    ],
)
def test_non_images_raise_a_typed_one_line_error(data, reason):
    with pytest.raises(ImageDecodeError, match=reason) as caught:
        decode_image(data)
    assert "\n" not in str(caught.value)


def test_truncated_jpeg_and_png_are_refused():
    photo = Image.effect_noise((64, 64), 40).convert("RGB")
    for fmt in ("JPEG", "PNG"):
        data = save(photo, fmt)
        with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
            decode_image(data[: len(data) // 2])


def test_images_over_the_pixel_limit_are_refused_before_decoding():
    with pytest.raises(ImageTooLargeError, match="over the limit of 5,000"):
        decode_image(save(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5_000)
    bomb = png_header_only(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb)


def test_an_image_just_under_the_limit_is_accepted():
    assert decode_image(save(Image.new("RGB", (100, 50)), "PNG"), max_pixels=5_000).size == (100, 50)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_encoding_round_trips(fmt):
    image = Image.effect_noise((33, 21), 30).convert("RGB")
    decoded = decode_image(encode_image(image, fmt, quality=95))
    assert decoded.size == (33, 21)
    if fmt == "png":
        assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_tensor_conversion_round_trips():
    image = Image.effect_noise((5, 7), 50).convert("RGB")
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 7, 5)
    assert np.array_equal(np.asarray(tensor_to_image(tensor)), np.asarray(image))
    assert np.array_equal(np.asarray(tensor_to_image(tensor.float() / 255)), np.asarray(image))
