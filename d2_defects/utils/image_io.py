"""Reading images of any bit depth into the 8-bit range the models are trained on.

Detectron2's ``read_image`` converts a 16-bit grayscale image (``I;16``/``I`` in Pillow) to RGB by clipping
every value above 255 to 255, so an industrial 16-bit image becomes almost entirely white. :func:`read_image`
reads such images with their real values and scales them linearly into 0..255:

- ``window=None`` (``INPUT.HIGH_BIT_DEPTH.WINDOW: []``): the full range of the pixel type, 0..65535 for
  16-bit (and 32-bit integer) images, 0..1 for floating-point images; a 16-bit copy of an 8-bit image
  (``value * 257``) gives back exactly the 8-bit image;
- ``window=(low, high)``: values <= low become 0, values >= high become 255, linear in between, e.g.
  ``[0, 4095]`` for a 12-bit camera that stores its pixels in 16-bit files.

8-bit images go through Detectron2's ``read_image`` unchanged. Colour images with 16 bits per channel are
decoded by Pillow to 8 bits per channel (their upper byte: the full range); the window applies to
single-channel images.
"""
import os

import numpy as np
from detectron2.data import detection_utils
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "HIGH_BIT_MODES", "read_image", "scale_to_uint8", "check_window", "image_size",
           "decoded_images"]

# file extensions read as images (dataset readers, tools/predict.py folders), lower case
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Pillow modes of single-channel images with more than 8 bits per pixel
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def check_window(window, key="INPUT.HIGH_BIT_DEPTH.WINDOW"):
    """``None`` for an empty window, else ``(low, high)`` floats; ``ValueError`` naming ``key`` otherwise."""
    if window is None or len(window) == 0:
        return None
    try:
        low, high = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be [] or [LOW, HIGH] (two numbers), got {list(window)!r}") from None
    if not high > low:
        raise ValueError(f"{key} must be [LOW, HIGH] with LOW < HIGH, got {list(window)!r}")
    return low, high


def scale_to_uint8(values, mode, window=None):
    """Scale a single-channel array of Pillow ``mode`` into uint8 (see the module docstring)."""
    x = np.asarray(values, dtype=np.float64)
    if window is None:
        low, high = (0.0, 1.0) if mode == "F" else (0.0, 65535.0)
    else:
        low, high = window
    scaled = np.clip((x - low) / (high - low), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)


def read_image(path, format="BGR", window=None):
    """
    Read ``path`` as an HxWxC uint8 array in ``format`` (Detectron2's ``INPUT.FORMAT``), with EXIF
    orientation applied; high-bit-depth single-channel images are scaled by ``window`` (None: full range).
    Raises what Pillow raises for unreadable files (``OSError``, ...).
    """
    with Image.open(path) as img:
        if img.mode not in HIGH_BIT_MODES:
            return detection_utils.read_image(path, format=format)
        img = ImageOps.exif_transpose(img)
        gray = scale_to_uint8(np.asarray(img), img.mode, window)
    if format in ("BGR", "RGB"):
        return np.repeat(gray[:, :, None], 3, axis=2)
    if format == "L":
        return gray[:, :, None]
    return detection_utils.convert_PIL_to_numpy(Image.fromarray(gray, mode="L"), format)


# (path, file size, mtime_ns) -> ((width, height), None) or (None, error message)
_SIZE_CACHE = {}


def image_size(path):
    """
    Decode an image file once per process and return its size as Detectron2 will see it.

    Returns:
        tuple: ``((width, height), None)`` or ``(None, "reason")`` if the file is missing or cannot be
        decoded. The EXIF orientation is applied like ``detectron2.data.detection_utils.read_image``.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None, "image file not found"
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SIZE_CACHE:
        try:
            with Image.open(path) as im:
                im.load()  # full decode: catches truncated files that the header alone does not
                w, h = im.size
                orientation = im.getexif().get(0x0112, 1)
            if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
            _SIZE_CACHE[key] = ((w, h), None)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            _SIZE_CACHE[key] = (None, f"image file cannot be decoded ({type(e).__name__}: {e})")
    return _SIZE_CACHE[key]


def decoded_images():
    """How many image files :func:`image_size` has decoded in this process (its cache size)."""
    return len(_SIZE_CACHE)


def clear_size_cache():
    """Forget the sizes :func:`image_size` decoded (benchmarks time the decoding)."""
    _SIZE_CACHE.clear()
