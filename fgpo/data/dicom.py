"""DICOM -> windowed 8-bit PIL image (pydicom; nothing else).

Steps: stored values -> modality LUT (``RescaleSlope``/``RescaleIntercept``, e.g. CT Hounsfield
units) -> VOI window -> 0..255. The window is, in order: an explicit ``(center, width)``, a named
preset, the file's own ``WindowCenter``/``WindowWidth`` (first value when several), a modality
preset (CT: soft tissue), else the image's min..max. The window is the DICOM linear VOI function
(PS3.3 C.11.2.1.2):

    y = 0                                   if x <= c - 0.5 - (w - 1) / 2
    y = 255                                 if x >  c - 0.5 + (w - 1) / 2
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255   otherwise

``MONOCHROME1`` images are inverted so that bright always means dense. RGB DICOMs are returned as
``RGB`` without windowing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError

# (center, width) in the modality's units (HU for CT).
PRESETS: dict[str, tuple[float, float]] = {
    "ct_soft_tissue": (40.0, 400.0),
    "ct_abdomen": (60.0, 400.0),
    "ct_liver": (60.0, 160.0),
    "ct_lung": (-600.0, 1500.0),
    "ct_mediastinum": (50.0, 350.0),
    "ct_bone": (400.0, 1800.0),
    "ct_brain": (40.0, 80.0),
}
_MODALITY_DEFAULT = {"CT": "ct_soft_tissue"}


class DicomError(DatasetError):
    """A DICOM file that cannot be turned into an image (the message names the file)."""


def _first(v: Any) -> float | None:
    if v is None:
        return None
    try:
        v = v[0] if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else v
        return float(v)
    except (TypeError, ValueError, IndexError):
        return None


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI window -> uint8 (see the module docstring)."""
    if not width >= 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    x = np.asarray(values, dtype=np.float64)
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / max(width - 1, 1e-12) + 0.5) * 255.0
    y = np.where(x <= lo, 0.0, np.where(x > hi, 255.0, y))
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def resolve_window(ds: Any, values: np.ndarray, window: Any = "auto") -> tuple[float, float, str]:
    """(center, width, source) for a dataset; ``window`` as in :func:`read_dicom`."""
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"window must be (center, width), got {window!r}")
        return float(window[0]), float(window[1]), "explicit"
    if isinstance(window, str) and window != "auto":
        if window in ("minmax", "full"):
            lo, hi = float(values.min()), float(values.max())
            return (lo + hi) / 2 + 0.5, max(hi - lo + 1, 1.0), "minmax"
        if window not in PRESETS:
            raise ValueError(
                f"window must be 'auto', 'minmax', one of {sorted(PRESETS)}, "
                f"or (center, width); got {window!r}"
            )
        c, w = PRESETS[window]
        return c, w, window
    if window != "auto":
        raise ValueError(f"window must be a string or (center, width), got {window!r}")
    c, w = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if c is not None and w is not None and w >= 1:
        return c, w, "file"
    preset = _MODALITY_DEFAULT.get(str(ds.get("Modality", "")).upper())
    if preset:
        c, w = PRESETS[preset]
        return c, w, preset
    lo, hi = float(values.min()), float(values.max())
    return (lo + hi) / 2 + 0.5, max(hi - lo + 1, 1.0), "minmax"


def read_dicom(path: str | Path, *, window: Any = "auto", frame: int = 0):
    """Read a DICOM file as a PIL image (``L`` after windowing, or ``RGB`` for colour data).

    ``window``: ``"auto"`` (file -> modality preset -> min/max), ``"minmax"``, a preset name
    from :data:`PRESETS`, or ``(center, width)``. ``frame`` picks one frame of a multi-frame file.
    """
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as e:  # pragma: no cover - pydicom is in the data/dev extras
        raise ImportError("reading DICOM needs pydicom: pip install 'fgpo[data]'") from e
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DicomError(f"DICOM file not found: {path}")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as e:
        raise DicomError(f"{path} is not a readable DICOM file: {e}") from e
    if "PixelData" not in ds:
        raise DicomError(f"{path} has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as e:  # decoders raise many types (missing codec, truncated data, ...)
        raise DicomError(f"cannot decode the pixels of {path}: {e}") from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1:
        if not 0 <= frame < n_frames:
            raise ValueError(f"frame must be in [0, {n_frames}) for {path}, got {frame}")
        arr = arr[frame]
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        a = arr.astype(np.float64)
        if arr.dtype != np.uint8:
            lo, hi = a.min(), a.max()
            a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="RGB")
    if arr.ndim != 2:
        raise DicomError(f"{path}: unsupported pixel array shape {arr.shape}")
    slope = _first(ds.get("RescaleSlope"))
    intercept = _first(ds.get("RescaleIntercept"))
    values = arr.astype(np.float64) * (1.0 if slope is None else slope)
    values += 0.0 if intercept is None else intercept
    c, w, _ = resolve_window(ds, values, window)
    out = apply_window(values, c, w)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out, mode="L")
