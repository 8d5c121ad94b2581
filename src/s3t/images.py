"""Images as s3t stores and reads them: the bytes of one PNG or JPEG file, checked once, decoded the same way
everywhere.

A record's image is kept as its encoded file (what `ImageRecord.image` holds and the registry seals): a path
is read and its bytes kept as they are; a numpy array or a PIL image is encoded losslessly to PNG. Training,
the trunk cache and prediction all decode those bytes with `decode`, so an image given as a path, as bytes,
as an array or as a PIL image yields the same pixels, and a record's pixels never depend on what else is in
its batch.

Limits (`MAX_IMAGE_BYTES`, `MAX_IMAGE_PIXELS`) are checked from the file's header before any pixel is
decoded, so a small file that claims a huge size (a decompression bomb) is refused without being decoded.
The HTTP service applies tighter ones of its own (`ServiceSettings.max_image_bytes` / `max_image_pixels`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from .errors import DataError

__all__ = ["to_bytes", "check", "is_one_image", "decode", "encode_png", "FORMATS", "SUFFIXES", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS"]

FORMATS = ("PNG", "JPEG")                  # what Pillow must detect in the file (not what its name says)
SUFFIXES = (".png", ".jpg", ".jpeg")        # files `Dataset.from_image_folder` picks up
MAX_IMAGE_BYTES = 32 << 20                  # 32 MiB per encoded image
MAX_IMAGE_PIXELS = 50_000_000               # 50 megapixels (width x height) per image


def to_bytes(value: Any, *, where: str, base: Path | None = None, max_bytes: int = MAX_IMAGE_BYTES,
             max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """The checked, encoded bytes of an image given as a path (relative to `base`), bytes, a PIL image or a
    numpy array; `where` names it in error messages."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if base is not None and not path.is_absolute():
            path = base / path
        data = _read(path, where, max_bytes)
        where = f"{where} ({path})"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif _is_pil(value) or _is_array(value):
        data = encode_png(value, where=where)
    else:
        raise DataError(f"the image at {where} must be a file path, PNG/JPEG bytes, a PIL image or a numpy array; "
                        f"got {type(value).__name__}")
    check(data, where=where, max_bytes=max_bytes, max_pixels=max_pixels)
    return data


def check(data: bytes, *, where: str, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse (DataError, one line) anything that is not a complete PNG or JPEG within the limits."""
    if len(data) > max_bytes:
        raise DataError(f"the image at {where} is {len(data):,} bytes; the limit is {max_bytes:,}. Downscale or "
                        "recompress it")
    image = _open(data, where, max_pixels)
    try:
        image.load()   # decodes every pixel: a truncated or corrupt file fails here, not in training
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"the image at {where} is damaged ({_reason(exc)}); re-save it as PNG or JPEG") from None


def decode(data: bytes, mode: str, *, max_pixels: int = MAX_IMAGE_PIXELS):
    """The PIL image in `data`, upright (EXIF orientation applied) and converted to `mode` ("RGB" or "L")."""
    from PIL import ImageOps

    image = _open(data, "input", max_pixels)
    image = ImageOps.exif_transpose(image)   # a phone photo tagged "rotate 90" is seen the way it is shown
    return image.convert(mode)


def encode_png(value: Any, *, where: str = "input") -> bytes:
    """A PIL image or a uint8 array (H, W), (H, W, 3) or (H, W, 4) as PNG bytes (lossless: the same pixels)."""
    from PIL import Image

    if _is_array(value):
        import numpy as np

        array = np.asarray(value)
        if array.dtype != np.uint8:
            if array.dtype.kind not in "iub" or array.size and (array.min() < 0 or array.max() > 255):
                raise DataError(f"the image array at {where} has dtype {array.dtype}; give uint8 pixel values "
                                "0-255 (e.g. `(x * 255).round().astype('uint8')` for floats in [0, 1])")
            array = array.astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
            raise DataError(f"the image array at {where} has shape {array.shape}; give (height, width) grey, "
                            "(height, width, 3) RGB or (height, width, 4) RGBA pixels")
        value = Image.fromarray(array)
    out = io.BytesIO()
    try:
        value.save(out, format="PNG")
    except (OSError, ValueError) as exc:
        raise DataError(f"the image at {where} cannot be stored as PNG ({_reason(exc)}); convert it to RGB first"
                        ) from None
    return out.getvalue()


def _open(data: bytes, where: str, max_pixels: int):
    """The image in `data` with only its header read, after checking its format and pixel count."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():   # our pixel limit is checked below, before any decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:   # Pillow's own limit (far above ours) on the header's size
        raise DataError(f"the image at {where} has more than {max_pixels:,} pixels (the limit); downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise DataError(f"the image at {where} is not a readable image file; use PNG or JPEG") from None
    if image.format not in FORMATS:
        raise DataError(f"the image at {where} is {image.format}; s3t reads {' and '.join(FORMATS)}: convert it")
    width, height = image.size
    if width * height > max_pixels:
        raise DataError(f"the image at {where} is {width}x{height} = {width * height:,} pixels; the limit is "
                        f"{max_pixels:,}. Downscale it")
    return image


def _read(path: Path, where: str, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"the image at {where} ({path}) is {size:,} bytes; the limit is {max_bytes:,}. "
                            "Downscale or recompress it")
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"the image at {where} does not exist: {path}. Check the path (relative paths in a data "
                        "file are relative to that file's folder)") from None
    except IsADirectoryError:
        raise DataError(f"the image at {where} is a folder, not a file: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read the image at {where} ({path}): {exc.strerror}") from None


def is_one_image(value: Any) -> bool:
    """Whether `value` is a single image (a path, bytes, a PIL image, an (H, W[, C]) array) rather than a list."""
    if isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)) or _is_pil(value):
        return True
    return _is_array(value) and value.ndim != 4   # an (N, H, W, C) array is a list of N images


def _is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a pinned dependency
        return False
    return isinstance(value, Image.Image)


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ == "ndarray"


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
