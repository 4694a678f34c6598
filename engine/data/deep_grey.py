"""Grey images deeper than 8 bits (X-ray, CT and MRI exports): how they become 8-bit pixels, and how to tell them
from their bytes."""

from __future__ import annotations

import io
import warnings

DEEP_GREY_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # Pillow's modes for grey images deeper than 8 bits


def is_deep_grey(data: bytes) -> bool:
    """Whether a file's bytes hold a grey image deeper than 8 bits: PNG from its header, TIFF by Pillow's lazy
    open; the other formats the app reads (JPEG, BMP, GIF, WebP) hold at most 8 bits per channel."""
    from PIL import Image

    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return len(data) > 25 and data[24] == 16 and data[25] == 0  # IHDR: bit depth 16, colour type grey
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.mode in DEEP_GREY_MODES
    except Exception:
        return False


def grey_to_8_bits(im):
    """A 16-bit, 32-bit integer or float grey image as uint8, scaled by the bit depth its values use.

    Medical scanners write 10-, 12- or 14-bit values into 16-bit files: scaled by 65535, a 12-bit X-ray came out
    nearly black with 16 grey levels. The depth is read from the brightest value, rounded up to an even number of
    bits (10, 12, 14, 16), so the images of one scanner scale alike; values up to 255 stay as they are, floats up to
    1.0 are fractions of white."""
    import numpy as np

    arr = np.asarray(im, dtype=np.float32)
    hi = float(arr.max()) if arr.size else 0.0
    if im.mode == "F" and hi <= 1.0:
        top = 1.0
    elif hi <= 255:
        top = 255.0
    else:
        bits = int(np.ceil(np.log2(hi + 1)))
        top = float(2 ** min(32, bits + bits % 2) - 1)
    return (arr * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
