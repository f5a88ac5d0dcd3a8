"""Lesion corruption: the visual negative ``v'`` of FiRe-MPO (docs/design.md §1).

Region (a boolean H x W mask), in order:
  1. the example's lesion annotation: the union of its mask image (nonzero pixels, resized with
     nearest neighbour to the image), polygons and boxes ``(x0, y0, x1, y1)``;
  2. else the pluggable ``segmenter(image, example) -> mask | None`` hook;
  3. else the fallback (``fallback="noise"``: noise over the whole image with ``fallback_std``
     = 12; ``"blur"``: the whole image blurred; ``"skip"``: no ``v'``, ``has_corrupt`` = 0).
An annotation that turns out empty (e.g. a box outside the image) counts as no region.

Modes inside the region:
  - ``noise`` (the paper's default): ``v' = clip(v + N(0, noise_std^2))``, std 45 on 0..255, per
    channel, only inside the mask. A bright lesion stays visible under it for a small model.
  - ``inpaint``: remove the evidence: the (slightly dilated) mask is filled from the surrounding
    background by a harmonic (membrane) fill, coarse-to-fine, plus pixel noise with the
    surroundings' own pixel-noise level (``texture``), so the patch is neither flat nor speckled.
    Where the surroundings hold two clearly different intensities (a lesion at an organ's
    border), the fill is edge-aware: the harmonic extension of the two-class indicator (Otsu on
    the ring) decides which side each hole pixel is on (its 0.5 level set continues the border
    across the hole) and each side is filled only from its own class, so the dark outside does
    not smear into the organ.
    That level is a robust estimate of the ring's high-frequency residual (pixel minus the mean
    of its two neighbours along the axis where they agree best, median absolute deviation),
    which ignores the ring's smooth shading and the edges it may cross (an organ border),
    unlike its raw standard deviation.
  - ``blur``: Gaussian blur (``blur_sigma``; default a quarter of the region's size) inside the
    dilated mask.

Every random draw comes from ``numpy.random.default_rng(seed_from_id(id, qid))``: the same
example always gets the same ``v'`` (the seed is a hash of the ids, stable across runs/machines).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("noise", "inpaint", "blur")
FALLBACKS = ("noise", "blur", "skip")

Segmenter = Callable[[Any, Any], "np.ndarray | None"]


@dataclass
class CorruptConfig:
    """How ``v'`` is made. ``segmenter`` is called only when the example has no annotation."""

    mode: str = "noise"
    noise_std: float = 45.0
    fallback: str = "noise"
    fallback_std: float = 12.0
    dilate: int = 2  # pixels added around the region for inpaint/blur (not for noise)
    blur_sigma: float | None = None
    texture: float = 1.0  # inpaint: scale of the background-matched noise (0 = smooth fill)
    segmenter: Segmenter | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        for name in ("noise_std", "fallback_std", "texture"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dilate < 0:
            raise ValueError(f"dilate must be >= 0, got {self.dilate}")
        if self.blur_sigma is not None and not self.blur_sigma > 0:
            raise ValueError(f"blur_sigma must be > 0 or None, got {self.blur_sigma}")
        if self.segmenter is not None and not callable(self.segmenter):
            raise TypeError(f"segmenter must be callable, got {type(self.segmenter).__name__}")


@dataclass
class CorruptResult:
    image: Any  # PIL image, or None when the fallback is "skip"
    has_corrupt: bool
    source: str  # "annotation" | "segmenter" | "fallback"
    region_fraction: float  # share of pixels inside the region (1.0 for whole-image fallback)
    path: str | None = None


def load_segmenter(spec: str) -> Segmenter:
    """``"package.module:function"`` -> the function (the CLI's ``--segmenter``).

    The function is called as ``fn(image, example)`` and returns a boolean/0-1 mask (array or
    PIL image, any size: it is resized to the image) or None when it finds nothing.
    """
    import importlib

    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"segmenter must be 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load segmenter {spec!r}: {e}") from e
    if not callable(fn):
        raise TypeError(f"segmenter {spec!r} is not callable")
    return fn


def seed_from_id(example_id: Any, qid: Any = None, salt: str = "") -> int:
    """A 63-bit seed from the example id (and qid): stable across runs, processes, machines."""
    msg = f"{example_id}|{'' if qid is None else qid}|{salt}".encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") >> 1


# ----------------------------------------------------------------------------- masks


def mask_from_image(mask: Any, size: tuple[int, int], threshold: float = 0) -> np.ndarray:
    """Boolean (H, W) mask from a path, PIL image or array; nonzero (> threshold) is lesion.

    ``size`` is the target image's PIL ``(width, height)``; a mask of another size is resized
    with nearest neighbour.
    """
    from PIL import Image

    if isinstance(mask, (str, Path)):
        p = Path(mask)
        if not p.is_file():
            raise FileNotFoundError(f"lesion mask image not found: {p}")
        try:
            with Image.open(p) as im:
                im.load()
                mask = im.copy()
        except OSError as e:  # PIL's "cannot identify image file" and truncated files
            raise ValueError(f"cannot read lesion mask image {p}: {e}") from e
    if isinstance(mask, Image.Image):
        m = np.asarray(mask.convert("L") if mask.mode not in ("L", "1", "I", "F") else mask)
    else:
        m = np.asarray(mask)
        if m.ndim == 3:
            m = m.max(axis=-1)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (or H x W x C), got shape {m.shape}")
    m = m > threshold
    w, h = size
    if m.shape != (h, w):
        im = Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
        m = np.asarray(im) > 127
    return m


def mask_from_boxes(boxes: Any, size: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the union of ``(x0, y0, x1, y1)`` boxes (pixel coordinates, clipped)."""
    w, h = size
    m = np.zeros((h, w), dtype=bool)
    for b in boxes:
        if len(b) != 4:
            raise ValueError(f"a box must be (x0, y0, x1, y1), got {b!r}")
        x0, y0, x1, y1 = (float(v) for v in b)
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box {b!r} has x1 < x0 or y1 < y0")
        c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), w)
        r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), h)
        if c1 > c0 and r1 > r0:
            m[r0:r1, c0:c1] = True
    return m


def mask_from_polygons(polygons: Any, size: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the union of polygons, each a list of ``(x, y)`` (or a flat list)."""
    from PIL import Image, ImageDraw

    im = Image.new("L", size, 0)
    draw = ImageDraw.Draw(im)
    for poly in polygons:
        pts = list(poly)
        if pts and not isinstance(pts[0], (list, tuple)):
            if len(pts) % 2:
                raise ValueError("a flat polygon must have an even number of coordinates")
            pts = list(zip(pts[0::2], pts[1::2]))
        if len(pts) < 3:
            raise ValueError(f"a polygon needs at least 3 points, got {len(pts)}")
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=255, outline=255)
    return np.asarray(im) > 127


def annotation_mask(example: Any, size: tuple[int, int]) -> np.ndarray | None:
    """Union of the example's mask image, polygons and boxes; None when it has none."""
    w, h = size
    m = np.zeros((h, w), dtype=bool)
    found = False
    if getattr(example, "lesion_mask_path", None):
        m |= mask_from_image(example.lesion_mask_path, size)
        found = True
    if getattr(example, "lesion_polygons", None):
        m |= mask_from_polygons(example.lesion_polygons, size)
        found = True
    if getattr(example, "lesion_boxes", None):
        m |= mask_from_boxes(example.lesion_boxes, size)
        found = True
    return m if found else None


def lesion_region(image: Any, example: Any, cfg: CorruptConfig) -> tuple[np.ndarray | None, str]:
    """(mask or None, source): annotation, else segmenter, else None (the fallback applies)."""
    m = annotation_mask(example, image.size) if example is not None else None
    if m is not None and m.any():
        return m, "annotation"
    if cfg.segmenter is not None:
        s = cfg.segmenter(image, example)
        if s is not None:
            s = mask_from_image(s, image.size) if not isinstance(s, np.ndarray) else s
            if s.shape != (image.size[1], image.size[0]):
                s = mask_from_image(s, image.size)
            s = s.astype(bool)
            if s.any():
                return s, "segmenter"
    return None, "fallback"


# ----------------------------------------------------------------------------- operations


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    out = m.copy()
    for _ in range(r):  # 3x3 cross per step: cheap and enough for a couple of pixels
        g = out.copy()
        g[1:] |= out[:-1]
        g[:-1] |= out[1:]
        g[:, 1:] |= out[:, :-1]
        g[:, :-1] |= out[:, 1:]
        out = g
    return out


def _neighbour_mean(a: np.ndarray) -> np.ndarray:
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return 0.25 * (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:])


def _harmonic_fill(a: np.ndarray, hole: np.ndarray, iters: int = 40) -> np.ndarray:
    """Fill ``hole`` pixels of (H, W, C) float ``a`` so that they are the mean of their
    neighbours (Laplace equation with the known pixels as boundary), solved coarse-to-fine:
    the coarse solution initializes the fine level, then a few Jacobi sweeps refine it."""
    h, w, _ = a.shape
    known = ~hole
    if min(h, w) >= 8 and hole.sum() > 16:
        # 2x2 average of the known pixels only; a coarse pixel with none of them is a hole.
        hh, ww = h // 2 * 2, w // 2 * 2
        wk = known[:hh, :ww].astype(np.float64)[..., None]
        s = (a[:hh, :ww] * wk).reshape(hh // 2, 2, ww // 2, 2, -1).sum(axis=(1, 3))
        n = wk.reshape(hh // 2, 2, ww // 2, 2, 1).sum(axis=(1, 3))
        coarse = np.where(n > 0, s / np.maximum(n, 1), 0.0)
        filled = _harmonic_fill(coarse, n[..., 0] == 0, iters)
        init = np.repeat(np.repeat(filled, 2, axis=0), 2, axis=1)
        init = np.pad(init, ((0, h - hh), (0, w - ww), (0, 0)), mode="edge")
    else:
        init = np.broadcast_to(a[known].mean(axis=0), a.shape)
    out = a.copy()
    out[hole] = init[hole]
    for _ in range(iters):
        out[hole] = _neighbour_mean(out)[hole]
    return out


def _otsu_threshold(v: np.ndarray) -> float:
    """The threshold between two intensity classes of ``v`` (max between-class variance)."""
    v = np.sort(v)
    k = np.arange(1, v.size)
    csum = np.cumsum(v)[:-1]
    m0, m1 = csum / k, (v.sum() - csum) / (v.size - k)
    best = int(np.argmax(k * (v.size - k) * (m0 - m1) ** 2))
    return float((m0[best] + m1[best]) / 2)


def _class_fill(a: np.ndarray, region: np.ndarray, allowed: np.ndarray, iters: int) -> None:
    """Harmonic fill of ``region`` in place, averaging only over ``allowed`` 4-neighbours (its
    own class: known pixels of the class and the region itself)."""
    pa = np.pad(allowed, 1)
    masks = [pa[:-2, 1:-1], pa[2:, 1:-1], pa[1:-1, :-2], pa[1:-1, 2:]]
    n = sum(m.astype(np.float64) for m in masks)[..., None]
    upd = region & (n[..., 0] > 0)
    for _ in range(iters):
        p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
        vals = [p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]
        s = sum(v * m[..., None] for v, m in zip(vals, masks))
        a[upd] = (s / np.maximum(n, 1.0))[upd]


def _largest_jump(lum: np.ndarray, ring: np.ndarray, known: np.ndarray) -> float:
    """Largest absolute difference between a ring pixel and a known 4-neighbour."""
    best = 0.0
    for axis in (0, 1):
        d = np.abs(np.diff(lum, axis=axis))
        both = np.logical_and(*(np.delete(known, i, axis=axis) for i in (-1, 0)))
        on_ring = np.logical_or(*(np.delete(ring, i, axis=axis) for i in (-1, 0)))
        sel = both & on_ring
        if sel.any():
            best = max(best, float(d[sel].max()))
    return best


def _edge_aware_fill(a: np.ndarray, hole: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The harmonic fill, or, when the ring around the hole crosses a step edge (two intensity
    classes more than 6 x the pixel noise apart, with neighbouring pixels that jump by half of
    that), a fill of each side of the continued border from its own class only (module doc)."""
    known = ~hole
    ring = _dilate(hole, 2) & known
    lum = a.mean(axis=-1)
    if ring.sum() < 8:
        return _harmonic_fill(a, hole)
    thr = _otsu_threshold(lum[ring])
    hi, lo = lum[ring & (lum > thr)], lum[ring & (lum <= thr)]
    gap = hi.mean() - lo.mean() if min(hi.size, lo.size) >= 3 else 0.0
    # a step edge, not noise and not a smooth gradient: somewhere on the ring two neighbouring
    # known pixels differ by at least half the gap (a ramp changes by its slope per pixel)
    if gap < 6.0 * max(float(noise.mean()), 1.0) or _largest_jump(lum, ring, known) < gap / 2:
        return _harmonic_fill(a, hole)
    side = _harmonic_fill((lum > thr).astype(np.float64)[..., None], hole)[..., 0] > 0.5
    label = np.where(hole, side, lum > thr)
    out = a.copy()
    iters = 2 * int(max(np.ptp(np.nonzero(hole)[0]), np.ptp(np.nonzero(hole)[1])) + 1)
    for c in (False, True):
        region = hole & (label == c)
        if region.any():
            out[region] = a[ring & (label == c)].mean(axis=0)
            _class_fill(out, region, label == c, max(iters, 20))
    return out


def _pixel_noise(a: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Per-channel pixel-noise std around ``hole`` (see the module doc): the residual of each
    ring pixel against its two neighbours along the smoother axis; the median absolute
    deviation makes the estimate robust to the edges and shading that remain."""
    known = ~hole
    ring = _dilate(hole, 3) & known
    # residuals only where the pixel and its 4 neighbours are all known background
    inner = known & ~_dilate(hole, 1)
    inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
    use = ring & inner
    if use.sum() < 8:
        use = inner if inner.sum() >= 8 else known
    # Residual along the axis whose two neighbours agree best: across a straight edge that is
    # the axis along it. For i.i.d. Gaussian noise (n1 - n2) is independent of (n1 + n2), so
    # choosing by |n1 - n2| leaves x - (n1 + n2) / 2 with std s * sqrt(3/2) on either axis.
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    up, down, left, right = p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]
    vertical = np.abs(up - down) <= np.abs(left - right)
    res = np.where(vertical, a - 0.5 * (up + down), a - 0.5 * (left + right))
    r = res[use]
    mad = np.median(np.abs(r - np.median(r, axis=0)), axis=0)
    return 1.4826 * mad / np.sqrt(1.5)


def _as_array(image: Any) -> tuple[np.ndarray, str]:
    mode = image.mode if image.mode in ("L", "RGB") else "RGB"
    a = np.asarray(image.convert(mode), dtype=np.float64)
    return (a[..., None] if a.ndim == 2 else a), mode


def _to_image(a: np.ndarray, mode: str):
    from PIL import Image

    u8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(u8[..., 0] if mode == "L" else u8, mode=mode)


def add_noise(image: Any, mask: np.ndarray | None, std: float, rng: np.random.Generator):
    """Zero-mean Gaussian noise (std on the 0..255 scale), clipped; only inside ``mask``
    (whole image when None). Pixels outside the mask are returned unchanged."""
    a, mode = _as_array(image)
    if mask is None:
        a += rng.normal(0.0, std, a.shape)
    else:  # draw only for the lesion's pixels (row-major order)
        a[mask] += rng.normal(0.0, std, (int(mask.sum()), a.shape[-1]))
    return _to_image(a, mode)


def inpaint(image: Any, mask: np.ndarray, rng: np.random.Generator, texture: float = 1.0):
    """Replace the masked pixels by a fill from the surrounding background (see module doc)."""
    a, mode = _as_array(image)
    if mask.all():
        raise ValueError("inpaint needs some background: the mask covers the whole image")
    # The fill depends only on the pixels around the hole: solve in its bounding box plus a
    # margin (the margin also feeds the coarse levels' initial guess).
    ys, xs = np.nonzero(mask)
    margin = max(4, int(max(np.ptp(ys), np.ptp(xs)) + 1) // 4)
    r0, r1 = max(ys.min() - margin, 0), min(ys.max() + margin + 1, a.shape[0])
    c0, c1 = max(xs.min() - margin, 0), min(xs.max() + margin + 1, a.shape[1])
    crop, hole = a[r0:r1, c0:c1], mask[r0:r1, c0:c1]
    if hole.all():  # the box has no background (mask fills it): solve on the whole image
        crop, hole, r0, c0 = a, mask, 0, 0
    noise = _pixel_noise(crop, hole)
    filled = _edge_aware_fill(crop, hole, noise)
    if texture > 0:
        filled[hole] += rng.normal(0.0, 1.0, (int(hole.sum()), a.shape[-1])) * noise * texture
    out = a.copy()
    out[r0 : r0 + filled.shape[0], c0 : c0 + filled.shape[1]] = filled
    return _to_image(out, mode)


def blur(image: Any, mask: np.ndarray | None, sigma: float | None = None):
    """Gaussian blur inside ``mask`` (whole image when None)."""
    from PIL import ImageFilter

    if sigma is None:
        ys, xs = np.nonzero(mask) if mask is not None else np.nonzero(np.ones(image.size[::-1]))
        extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) if ys.size else 4
        sigma = max(2.0, float(extent) / 4.0)
    a, mode = _as_array(image)
    blurred, _ = _as_array(_to_image(a, mode).filter(ImageFilter.GaussianBlur(radius=sigma)))
    if mask is None:
        return _to_image(blurred, mode)
    out = a.copy()
    out[mask] = blurred[mask]
    return _to_image(out, mode)


def corrupt_image(
    image: Any, example: Any, cfg: CorruptConfig | None = None, *, seed: int | None = None
) -> CorruptResult:
    """Make ``v'`` for one image; ``seed`` defaults to :func:`seed_from_id` of the example."""
    cfg = cfg or CorruptConfig()
    if seed is None:
        if example is None:
            raise ValueError("corrupt_image needs an example (for its id) or an explicit seed")
        seed = seed_from_id(example.id, getattr(example, "qid", None))
    rng = np.random.default_rng(seed)
    mask, source = lesion_region(image, example, cfg)
    if mask is None:
        if cfg.fallback == "skip":
            return CorruptResult(None, False, "fallback", 0.0)
        if cfg.fallback == "blur":
            return CorruptResult(blur(image, None, cfg.blur_sigma), True, "fallback", 1.0)
        return CorruptResult(add_noise(image, None, cfg.fallback_std, rng), True, "fallback", 1.0)
    frac = float(mask.mean())
    if cfg.mode == "noise":
        out = add_noise(image, mask, cfg.noise_std, rng)
    else:
        grown = _dilate(mask, cfg.dilate)
        if cfg.mode == "blur":
            out = blur(image, grown, cfg.blur_sigma)
        elif grown.all():  # nothing to take the background from: noise the whole region
            out = add_noise(image, grown, cfg.noise_std, rng)
        else:
            out = inpaint(image, grown, rng, cfg.texture)
    return CorruptResult(out, True, source, frac)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s))[:80] or "x"


def corrupt_example(example: Any, cfg: CorruptConfig | None, out_dir: str | Path) -> CorruptResult:
    """Corrupt ``example.image_path`` and write ``<out_dir>/<id>_<qid>_<mode>.png`` (lossless)."""
    from ..data import open_image

    cfg = cfg or CorruptConfig()
    image = open_image(example.image_path)
    res = corrupt_image(image, example, cfg)
    if res.image is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = cfg.mode if res.source != "fallback" else f"fallback-{cfg.fallback}"
        path = out_dir / f"{_safe(example.id)}_{_safe(example.qid)}_{tag}.png"
        res.image.save(path)
        res.path = str(path)
    return res
