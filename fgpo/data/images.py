"""The one image reader: PNG/JPEG (8- and 16-bit) and DICOM, with errors that name the file.

Every part of ``fgpo`` that opens an image (dataset loaders, the trainer's encoder, pair
preparation, evaluation, the demo) goes through :func:`open_image`. A missing or unreadable file
raises :class:`~fgpo.data.errors.ImageError`, which is both a ``DatasetError`` (a loader or a
command reports it) and a ``SkipExample`` with reason ``missing_image`` / ``unreadable_image`` /
``image_too_large``
(the trainer and ``fgpo prepare`` count it and go on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ImageError


def is_dicom(path: str | Path) -> bool:
    """True for ``.dcm``/``.dicom`` files and for files with the DICOM preamble magic."""
    p = Path(path)
    if p.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def open_image(path: str | Path, *, window: Any = "auto"):
    """Open an image as a PIL image in mode ``L`` or ``RGB`` (DICOM with windowing).

    Raises :class:`~fgpo.data.errors.ImageError` naming the path when the file is missing
    (reason ``missing_image``), unreadable (``unreadable_image``) or larger than PIL's
    decompression-bomb limit (``image_too_large``).
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ImageError("missing_image", f"image file not found: {p}")
    if is_dicom(p):
        from .dicom import DicomError, read_dicom

        try:
            return read_dicom(p, window=window)
        except DicomError as e:
            raise ImageError("unreadable_image", str(e)) from e
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("L", "RGB"):
                return im.copy()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                import numpy as np

                a = np.asarray(im, dtype=np.float64)
                lo, hi = float(a.min()), float(a.max())
                a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
                return Image.fromarray(a.round().astype(np.uint8), mode="L")
            return im.convert("RGB")
    except Image.DecompressionBombError as e:  # PIL's guard against images that fill memory
        raise ImageError(
            "image_too_large",
            f"image {p} is too large to decode safely ({e}; PIL.Image.MAX_IMAGE_PIXELS sets the "
            "limit)",
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError("unreadable_image", f"cannot read image {p}: {e}") from e
