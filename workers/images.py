"""Loading images safely: allowed sources only, size limits, any mode to upright RGB, capped pixels."""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from producer.errors import ErrorCode, ImageError
from producer.sources import STORE_SCHEMES, EmbeddedRef
from workers import storage
from workers.fetch import fetch_url
from workers.settings import ImageSettings


def load_image(ref: str, settings: ImageSettings) -> Image.Image:
    """Reads an image reference into an RGB image of at most ``max_pixels``. Raises `ImageError`."""
    data = read_bytes(ref, settings)
    return decode_image(data, settings, ref)


def read_bytes(ref: str, settings: ImageSettings) -> bytes:
    """The bytes of an image reference: a local path, ``file://``, ``data:``, http(s), an object-store
    URL or an image inside a dataset file (`producer.sources.EmbeddedRef`)."""
    embedded = EmbeddedRef.parse(ref)
    if embedded is not None:
        return storage.read_embedded(embedded, settings)
    scheme = urlsplit(ref).scheme.lower()
    if scheme == "data":
        return _data_uri(ref, settings.max_image_bytes)
    if scheme in ("http", "https"):
        return _fetch(ref, settings)
    if scheme in STORE_SCHEMES:
        return storage.read_object(ref, settings)
    path = Path(unquote(urlsplit(ref).path)) if scheme == "file" else Path(ref)
    return _read_file(path, settings)


def decode_image(data: bytes, settings: ImageSettings, ref: str = "image") -> Image.Image:
    if not data:
        raise ImageError(f"{_short(ref)} is empty (0 bytes)", code=ErrorCode.IMAGE_UNREADABLE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            probe = Image.open(io.BytesIO(data))
            width, height = probe.size
            if width * height > settings.max_image_pixels:
                raise ImageError(
                    f"{_short(ref)} is {width}x{height}, over {settings.max_image_pixels} pixels",
                    code=ErrorCode.IMAGE_TOO_LARGE,
                )
            image = probe
            if type(probe).verify is not ImageFile.ImageFile.verify:  # PNG checks its CRCs: then reopen
                probe.verify()
                image = Image.open(io.BytesIO(data))
            image.seek(0)  # the first frame of an animation
            drafted = _draft(image, settings.max_pixels, settings.size_multiple)
            image.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(
                f"{_short(ref)} is a decompression bomb: {e}", code=ErrorCode.IMAGE_TOO_LARGE
            ) from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(
                f"{_short(ref)} is not a readable image: {e}", code=ErrorCode.IMAGE_UNREADABLE
            ) from e
    decoded: Image.Image = image
    if drafted is not None:
        # To the final size now, from the area that holds the full image (the decoder pads to whole
        # pixels): the size and framing of a full decode. A JPEG is L, RGB or CMYK, fine to resize before
        # to_rgb; the resized copy keeps ``info``, so its EXIF orientation still applies below.
        size, box = drafted
        decoded = image.resize(size, Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    upright: Image.Image = ImageOps.exif_transpose(decoded) or decoded
    return cap_pixels(to_rgb(upright), settings.max_pixels, settings.size_multiple)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode (CMYK, LA, P with transparency, 16-bit, float) to RGB; transparency onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


SNAP_MULTIPLES = 8
"""`capped_size` rounds sides to the processor's grid only from this many grid cells up."""


def cap_pixels(image: Image.Image, max_pixels: int, multiple: int = 1) -> Image.Image:
    size = capped_size(*image.size, max_pixels, multiple)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def capped_size(width: int, height: int, max_pixels: int, multiple: int = 1) -> tuple[int, int]:
    """The size of a ``width`` x ``height`` image scaled down, aspect kept, to at most ``max_pixels``.

    When it is scaled down and both sides are at least ``SNAP_MULTIPLES`` times ``multiple``, each side
    goes to the nearest multiple of ``multiple`` (down where that would exceed ``max_pixels``), as
    Qwen-VL's processor rounds them (``smart_resize``): the processor then has nothing to resize, and
    the aspect moves by a few per cent at most. Smaller images are left to the processor."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    if multiple == 1 or min(w, h) < SNAP_MULTIPLES * multiple:
        return w, h
    near = round(width * scale / multiple) * multiple, round(height * scale / multiple) * multiple
    if near[0] * near[1] <= max_pixels:
        return near
    return w // multiple * multiple, h // multiple * multiple


def _draft(
    image: Image.Image, max_pixels: int, multiple: int
) -> tuple[tuple[int, int], tuple[float, float, float, float]] | None:
    """For a JPEG that will be downscaled, makes the decoder scale in the DCT domain (1/2, 1/4 or 1/8) to
    the smallest size still at least the final size in both sides: a fraction of the work of a full
    decode. Returns the final size, computed from the full size, and the area of the reduced image that
    holds the full image. None: the image is decoded in full (not a JPEG, or no downscale)."""
    size = capped_size(*image.size, max_pixels, multiple)
    if size == image.size:
        return None
    drafted = image.draft("RGB", size)  # a no-op but for JPEG
    return None if drafted is None else (size, drafted[1])


def _read_file(path: Path, settings: ImageSettings) -> bytes:
    real = storage.local_path(path, settings)
    try:
        with real.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > settings.max_image_bytes:
                raise ImageError(
                    f"{path} is {size} bytes, over {settings.max_image_bytes}", code=ErrorCode.IMAGE_TOO_LARGE
                )
            return f.read()
    except FileNotFoundError as e:
        raise ImageError(f"image file not found: {path}", code=ErrorCode.IMAGE_NOT_FOUND) from e
    except IsADirectoryError as e:
        raise ImageError(f"{path} is a folder, not an image", code=ErrorCode.IMAGE_UNREADABLE) from e
    except PermissionError as e:
        raise ImageError(f"no permission to read {path}", code=ErrorCode.IMAGE_UNREADABLE) from e


def _data_uri(ref: str, max_bytes: int) -> bytes:
    header, sep, payload = ref.partition(",")
    if not sep or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise ImageError(
            "data: URI must look like data:image/<type>;base64,<data>", code=ErrorCode.IMAGE_REF_INVALID
        )
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError(f"data: URI is over {max_bytes} bytes", code=ErrorCode.IMAGE_TOO_LARGE)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data: URI is not valid base64: {e}", code=ErrorCode.IMAGE_REF_INVALID) from e


def _fetch(url: str, settings: ImageSettings) -> bytes:
    return fetch_url(url, settings.fetch_policy())


def _short(ref: str) -> str:
    return ref if len(ref) <= 120 else ref[:60] + "..." + ref[-40:]
