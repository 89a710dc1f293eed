"""Decoding and encoding images from and to bytes, safely, and converting them to and from tensors.

Every decodable image becomes 8-bit sRGB with its EXIF orientation applied: RGB colours described by an
embedded ICC profile (Display P3 and Adobe RGB photos) are converted to sRGB, alpha is composited on white,
CMYK, palette, 16-bit and grayscale images are converted, animations give their first frame.
Anything else raises ImageDecodeError with a one-line reason; images over a pixel limit are refused
from their header, before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import functools
import io
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # about 7,000 x 5,700; a 40 MP RGB float tensor is 480 MB
OUTPUT_FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
INPUT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Filters set once for the process: warnings.catch_warnings swaps one process-wide list, and entered and left by
# decoding threads at once it can leave "ignore everything" behind. torchvision >= 0.29 warns on every codec call;
# PIL warns of a "decompression bomb" above its own pixel limit, where this project applies its own
# (check_pixel_count, max_pixels) and says why it refuses an image; and PIL's complaints about corrupt EXIF
# (such an image is taken as stored, upright).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


class ImageDecodeError(ValueError):
    """The bytes are not an image this project can read."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image, upright, first frame, or raise ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # PIL's own, higher limit: say it in this project's terms
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else "too many pixels"
        raise ImageTooLargeError(f"{size}, over the limit of {max_pixels:,} (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except Exception as error:  # PIL raises many types for malformed headers
        raise ImageDecodeError(f"unreadable image header: {_one_line(error)}") from None

    width, height = image.size
    check_pixel_count(width, height, max_pixels)
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    try:
        image.seek(0)
        image.load()
    except Exception as error:  # truncated data, bad Huffman tables, zlib errors, ...
        raise ImageDecodeError(f"corrupt or truncated {image.format or 'image'} data: {_one_line(error)}") from None
    profile = image.info.get("icc_profile")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block must not cost the image: keep it as stored
        pass
    try:
        return to_srgb(image, profile)
    except MemoryError:
        raise
    except Exception as error:  # a pixel layout PIL decodes but cannot convert: this image's error, not the run's
        raise ImageDecodeError(f"unsupported {image.format or 'image'} pixel mode {image.mode}: "
                               f"{_one_line(error)}") from None


def to_srgb(image: Image.Image, profile: bytes | None) -> Image.Image:
    """Any PIL mode to 8-bit RGB in sRGB (what outputs, viewers and VGG assume), through ``profile`` (the image's
    embedded ICC profile) where it describes other RGB colours; as ``to_rgb`` without one, with an sRGB one, with
    one for another colour space (CMYK, gray), or with one that cannot be used (a broken profile must not cost
    the image)."""
    rgb = to_rgb(image)
    if (transform := srgb_transform(profile)) is not None:
        try:
            return ImageCms.applyTransform(rgb, transform)
        except (ImageCms.PyCMSError, ValueError, OSError):
            pass
    return rgb


# lcms's one-pixel cache is not safe for a transform shared by threads (decoding runs in several).
_NO_CACHE = ImageCms.Flags.NOCACHE if hasattr(ImageCms, "Flags") else ImageCms.FLAGS["NOCACHE"]


@functools.lru_cache(maxsize=64)  # photos of one camera share their profile: built once
def srgb_transform(profile: bytes | None) -> ImageCms.ImageCmsTransform | None:
    """The transform from the RGB colours ``profile`` describes to sRGB; None when there is nothing to convert: no
    profile, an sRGB one, one for another colour space, or one lcms cannot read."""
    if not profile:
        return None
    try:
        parsed = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if parsed.profile.xcolor_space.strip() != "RGB":
            return None
        if "srgb" in (parsed.profile.profile_description or "").lower():
            return None
        return ImageCms.buildTransform(parsed, ImageCms.createProfile("sRGB"), "RGB", "RGB", flags=_NO_CACHE)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError, ImportError):  # ImportError: a Pillow without lcms
        return None


def check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    """Raise ImageTooLargeError when a width x height image has more than ``max_pixels`` pixels."""
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        array = np.asarray(image, dtype=np.float64)
        peak = 1.0 if array.max() <= 1.0 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")

    if mode == "La":  # gray with premultiplied alpha (a TIFF's "associated" alpha): PIL converts it only to LA
        image = image.convert("LA")
    has_alpha = image.mode in ("RGBA", "LA", "RGBa", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def encode_image(image: Image.Image, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """Encode an RGB image as JPEG, PNG or WebP bytes."""
    pil_format = output_format(fmt)
    buffer = io.BytesIO()
    if pil_format == "PNG":
        image.save(buffer, "PNG", compress_level=6)
    elif pil_format == "JPEG":
        image.save(buffer, "JPEG", quality=quality, optimize=False, subsampling="4:2:0")  # as encode_jpeg_tensor
    else:
        image.save(buffer, "WEBP", quality=quality, method=4)
    return buffer.getvalue()


def decode_plain_jpeg(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """A baseline or progressive RGB JPEG without EXIF rotation (what ``decode_image`` would return as is) to a
    uint8 (3, H, W) tensor: the same libjpeg-turbo decode as PIL's, same pixels, but it releases the GIL for the
    whole decode, so threads scale with cores (PIL's path: 5x slower per image and GIL-bound)."""
    codecs = _torchvision_codecs()
    if codecs is not None:
        try:
            return codecs.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                      mode=codecs.ImageReadMode.RGB)
        except RuntimeError:  # libjpeg refuses it: PIL says precisely why (or decodes what libjpeg-turbo would not)
            pass
    return image_to_tensor(decode_image(data, max_pixels))


def jpeg_ends_complete(data: bytes) -> bool:
    """Whether a JPEG's bytes end with its end-of-image marker (a little trailing padding allowed). nvjpeg decodes
    a truncated JPEG without a word, grey below the cut, where libjpeg and PIL refuse it; in the coded data a 0xFF
    byte is always followed by 0x00 or a restart marker, so FF D9 near the end is the real end."""
    return b"\xff\xd9" in data[-64:]


def encode_jpeg_tensor(image: torch.Tensor, quality: int = 90) -> bytes:
    """A uint8 (3, H, W) CPU tensor to JPEG bytes (4:2:0 chroma, as ``encode_image``). libjpeg-turbo without the
    GIL: PIL holds it while encoding, so its encodes do not run in parallel in threads."""
    codecs = _torchvision_codecs()
    if codecs is None:
        return encode_image(tensor_to_image(image), "jpeg", quality)
    return bytes(codecs.encode_jpeg(image.contiguous(), quality=quality).numpy())


@functools.cache  # once, not on every image
def _torchvision_codecs():
    """torchvision.io where it still has its image codecs (deprecated from 0.29), else None: PIL is used."""
    try:
        import torchvision.io as codecs

        codecs.decode_jpeg, codecs.encode_jpeg, codecs.ImageReadMode  # noqa: B018 (all three are needed)
        return codecs
    except (ImportError, AttributeError):
        return None


def output_format(fmt: str) -> str:
    try:
        return OUTPUT_FORMATS[fmt.lower().lstrip(".")]
    except KeyError:
        raise ValueError(f"unknown output format {fmt!r}; use jpeg, png or webp") from None


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a uint8 (3, H, W) tensor."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor, float in [0, 1] or uint8, to an RGB PIL image."""
    if tensor.dtype != torch.uint8:
        tensor = tensor.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(tensor.permute(1, 2, 0).cpu().numpy(), "RGB")


def resize_long_side(image: Image.Image, size: int) -> Image.Image:
    """Shrink (never enlarge) so the longer side is at most ``size``."""
    width, height = image.size
    scale = size / max(width, height)
    if scale >= 1:
        return image
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Scale (up or down) so the shorter side is exactly ``size``."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size == (width, height):
        return image
    return image.resize(new_size, Image.Resampling.LANCZOS)


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
