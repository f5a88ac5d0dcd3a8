"""Lesion corruption: region from mask/polygon/box, modes, fallbacks, seeds from the id."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from PIL import Image

from fgpo.data import VQAExample
from fgpo.pairs.corrupt import (
    CorruptConfig,
    corrupt_example,
    corrupt_image,
    mask_from_boxes,
    mask_from_image,
    mask_from_polygons,
    seed_from_id,
)

H, W = 97, 131  # odd sizes
BOX = (40, 30, 81, 61)  # x0, y0, x1, y1 (exclusive ends)


def scan(rng, mode="L", bg=90.0, lesion=225.0, tex=8.0):
    a = bg + tex * rng.standard_normal((H, W))
    x0, y0, x1, y1 = BOX
    a[y0:y1, x0:x1] = lesion
    a = np.clip(a, 0, 255).astype(np.uint8)
    if mode == "RGB":
        a = np.stack([a, a, a], axis=-1)
    return Image.fromarray(a, mode=mode)


def example(**kw):
    base = dict(id="ex1", qid="3", image_path="", question="q?", answer="a")
    base.update(kw)
    return VQAExample(**base)


def box_mask():
    m = np.zeros((H, W), bool)
    x0, y0, x1, y1 = BOX
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def rng(request):
    # crc32, not hash(): str hashes change per process (PYTHONHASHSEED), the draws must not
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def test_seed_is_deterministic_and_depends_on_id():
    assert seed_from_id("a", 1) == seed_from_id("a", "1")  # stable, str/int agnostic
    assert seed_from_id("a", 1) != seed_from_id("b", 1)
    assert seed_from_id("a", 1) != seed_from_id("a", 2)
    assert 0 <= seed_from_id("x") < 2**63
    # a fixed value: the seed must not depend on the process (no hash() randomization)
    assert seed_from_id("ex1", "3") == seed_from_id("ex1", "3")


def test_masks_from_box_polygon_and_image_agree(tmp_path):
    m_box = mask_from_boxes([BOX], (W, H))
    assert (m_box == box_mask()).all()
    x0, y0, x1, y1 = BOX
    # a polygon on the box's pixel boundary (inclusive ends) draws the same pixels
    poly = [(x0, y0), (x1 - 1, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)]
    assert (mask_from_polygons([poly], (W, H)) == m_box).all()
    flat = [c for p in poly for c in p]
    assert (mask_from_polygons([flat], (W, H)) == m_box).all()
    p = tmp_path / "mask.png"
    Image.fromarray(m_box.astype(np.uint8) * 255).save(p)
    assert (mask_from_image(p, (W, H)) == m_box).all()
    # a mask of another size is resized (nearest) to the image
    half = Image.fromarray(m_box.astype(np.uint8) * 7).resize((W * 2, H * 2), Image.NEAREST)
    assert (mask_from_image(half, (W, H)) == m_box).mean() > 0.99
    # boxes are clipped to the image; a box outside it is empty
    assert not mask_from_boxes([(W + 5, H + 5, W + 9, H + 9)], (W, H)).any()
    with pytest.raises(ValueError, match="x1 < x0"):
        mask_from_boxes([(10, 10, 5, 20)], (W, H))
    with pytest.raises(ValueError, match="at least 3 points"):
        mask_from_polygons([[(1, 1), (2, 2)]], (W, H))
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        mask_from_image(tmp_path / "nope.png", (W, H))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read lesion mask image .*bad\.png"):
        mask_from_image(tmp_path / "bad.png", (W, H))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_noise_only_inside_the_lesion_with_std_45(rng, mode):
    img = scan(rng, mode, bg=128.0, lesion=128.0, tex=0.0)  # mid-gray: no clipping
    ex = example(lesion_boxes=[BOX])
    res = corrupt_image(img, ex, CorruptConfig(mode="noise"))
    assert res.has_corrupt and res.source == "annotation"
    assert res.region_fraction == pytest.approx(box_mask().mean())
    a0 = np.asarray(img).astype(float)
    a1 = np.asarray(res.image).astype(float)
    assert res.image.mode == mode and a1.shape == a0.shape
    inside = box_mask()
    assert (a1[~inside] == a0[~inside]).all(), "pixels outside the lesion changed"
    d = (a1 - a0)[inside]
    assert abs(d.mean()) < 3.0
    assert d.std() == pytest.approx(45.0, rel=0.08)


def test_noise_is_clipped_and_deterministic(rng):
    img = scan(rng)
    ex = example(lesion_boxes=[BOX])
    a = np.asarray(corrupt_image(img, ex).image)
    b = np.asarray(corrupt_image(img, example(lesion_boxes=[BOX])).image)
    c = np.asarray(corrupt_image(img, example(id="other", lesion_boxes=[BOX])).image)
    assert (a == b).all(), "same id must give the same corrupted image"
    assert (a != c).any(), "another id must give other noise"
    assert a.max() == 255  # bright lesion + noise saturates: clipped, not wrapped
    assert (a[box_mask()] < 120).mean() < 0.05  # no uint8 wrap-around to dark values


def test_no_region_falls_back_to_whole_image_noise_std_12(rng):
    img = scan(rng, bg=128.0, lesion=128.0, tex=0.0)
    res = corrupt_image(img, example())
    assert res.has_corrupt and res.source == "fallback" and res.region_fraction == 1.0
    d = np.asarray(res.image).astype(float) - 128.0
    assert d.std() == pytest.approx(12.0, rel=0.05)
    assert (d != 0).mean() > 0.9
    skip = corrupt_image(img, example(), CorruptConfig(fallback="skip"))
    assert skip.image is None and not skip.has_corrupt
    blur = corrupt_image(img, example(), CorruptConfig(fallback="blur"))
    assert blur.has_corrupt and blur.source == "fallback"
    # an annotation that is empty on this image is no region either
    off = corrupt_image(img, example(lesion_boxes=[(500, 500, 510, 510)]))
    assert off.source == "fallback"


def test_inpaint_removes_the_lesion_and_keeps_the_background(rng):
    img = scan(rng, bg=90.0, lesion=225.0, tex=8.0)
    res = corrupt_image(img, example(lesion_boxes=[BOX]), CorruptConfig(mode="inpaint"))
    a0 = np.asarray(img).astype(float)
    a1 = np.asarray(res.image).astype(float)
    inside = box_mask()
    assert abs(a1[inside].mean() - 90.0) < 6.0, "the fill should look like the background"
    assert a1[inside].std() == pytest.approx(8.0, rel=0.5)  # textured, not a flat patch
    grown = np.zeros_like(inside)
    x0, y0, x1, y1 = BOX
    grown[y0 - 2 : y1 + 2, x0 - 2 : x1 + 2] = True  # dilation by `dilate`=2 (cross steps)
    assert (a1[~grown] == a0[~grown]).all(), "pixels away from the lesion changed"
    smooth = corrupt_image(
        img, example(lesion_boxes=[BOX]), CorruptConfig(mode="inpaint", texture=0.0)
    )
    s = np.asarray(smooth.image).astype(float)[inside]
    assert abs(s.mean() - 90.0) < 4.0 and s.std() < 4.0


def test_inpaint_follows_a_background_gradient(rng):
    # background ramps left -> right; the fill must interpolate the ramp, not use one mean
    ramp = np.tile(np.linspace(20, 220, W), (H, 1))
    a = ramp.copy()
    x0, y0, x1, y1 = BOX
    a[y0:y1, x0:x1] = 255
    img = Image.fromarray(a.astype(np.uint8), "L")
    cfg = CorruptConfig(mode="inpaint", texture=0.0)
    out = np.asarray(corrupt_image(img, example(lesion_boxes=[BOX]), cfg).image).astype(float)
    err = np.abs(out[y0:y1, x0:x1] - ramp[y0:y1, x0:x1])
    assert err.mean() < 6.0, f"mean error {err.mean():.1f} against the ramp"


def _edge_case(rng, noise: float):
    """A lesion just inside an organ border (the border outside the dilated lesion), pixel noise
    of std ``noise``: (image, the inpainted patch inside the lesion box)."""
    a = np.full((H, W), 100.0)
    x0, y0, x1, y1 = BOX
    a[:, : x0 - 4] = 20.0  # an organ border just outside the (dilated) lesion
    a += rng.normal(0.0, noise, a.shape)
    a[y0:y1, x0:x1] += 90.0  # the lesion
    img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    out = np.asarray(
        corrupt_image(img, example(lesion_boxes=[BOX]), CorruptConfig(mode="inpaint")).image
    )
    return img, out.astype(float)[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]


def _noise_ratio(patch: np.ndarray, noise: float) -> float:
    """The patch's high-frequency residual (pixel minus the mean of its 4 neighbours) over what
    i.i.d. pixel noise of std ``noise`` gives."""
    res = patch[1:-1, 1:-1] - 0.25 * (patch[:-2, 1:-1] + patch[2:, 1:-1] + patch[1:-1, :-2]
                                      + patch[1:-1, 2:])  # fmt: skip
    return float(res.std() / (noise * np.sqrt(1.25)))


def test_inpaint_texture_matches_the_pixel_noise_even_next_to_an_edge(rng):
    """The fill carries the surroundings' pixel noise (not the raw spread of a ring that
    crosses an organ border, which speckled the patch): patch mean and noise level match."""
    img, patch = _edge_case(rng, 6.0)
    ratio = _noise_ratio(patch, 6.0)
    assert 0.6 < ratio < 1.5, f"patch noise {ratio:.2f}x the surroundings'"
    x0, y0, x1, y1 = BOX
    smooth = corrupt_image(
        img, example(lesion_boxes=[BOX]), CorruptConfig(mode="inpaint", texture=0.0)
    ).image
    flat = np.asarray(smooth).astype(float)[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]
    assert abs(patch.mean() - flat.mean()) < 2.0  # zero-mean texture on the smooth fill


def test_inpaint_noise_estimate_is_unbiased_next_to_an_edge():
    """Over 20 draws the patch's noise level is the surroundings' on median: an estimate that
    lets the organ border's step into its residuals reads high (1.33x on median)."""
    ratios = [_noise_ratio(_edge_case(np.random.default_rng(seed), 6.0)[1], 6.0)
              for seed in range(20)]  # fmt: skip
    assert 0.85 < float(np.median(ratios)) < 1.2, sorted(ratios)


def test_inpaint_continues_an_organ_border_across_the_lesion(rng):
    """A lesion straddling a step edge (organ 120, outside 20): each side of the continued
    border is filled from its own side, so the dark outside does not smear into the organ."""
    x0, y0, x1, y1 = BOX
    edge = (x0 + x1) // 2 - 3
    truth = np.where(np.arange(W)[None, :] < edge, 20.0, 120.0) * np.ones((H, 1))
    a = truth + rng.normal(0.0, 4.0, truth.shape)
    a[y0:y1, x0:x1] += 80.0
    img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    cfg = CorruptConfig(mode="inpaint", texture=0.0)
    out = np.asarray(corrupt_image(img, example(lesion_boxes=[BOX]), cfg).image).astype(float)
    err = np.abs(out - truth)[y0:y1, x0:x1]
    assert err.mean() < 8.0, f"mean error {err.mean():.1f} against the two sides"
    # inside the organ, away from the border, the fill is the organ's intensity
    assert np.abs(out[y0:y1, edge + 2 : x1] - 120.0).max() < 20.0


def test_blur_lowers_lesion_contrast_only_near_the_lesion(rng):
    img = scan(rng, tex=0.0)
    res = corrupt_image(img, example(lesion_boxes=[BOX]), CorruptConfig(mode="blur"))
    a0 = np.asarray(img).astype(float)
    a1 = np.asarray(res.image).astype(float)
    inside = box_mask()
    assert a1[inside].mean() < a0[inside].mean() - 15
    far = np.ones_like(inside)
    x0, y0, x1, y1 = BOX
    far[y0 - 3 : y1 + 3, x0 - 3 : x1 + 3] = False
    assert (a1[far] == a0[far]).all()


def test_segmenter_hook_used_only_without_annotation(rng):
    img = scan(rng)
    calls = []

    def seg(image, ex):
        calls.append(ex.id)
        return box_mask()

    cfg = CorruptConfig(segmenter=seg)
    res = corrupt_image(img, example(), cfg)
    assert res.source == "segmenter" and calls == ["ex1"]
    a0, a1 = np.asarray(img), np.asarray(res.image)
    assert (a0[~box_mask()] == a1[~box_mask()]).all()
    res2 = corrupt_image(img, example(lesion_boxes=[BOX]), cfg)
    assert res2.source == "annotation" and calls == ["ex1"]
    # a segmenter that finds nothing -> fallback
    res3 = corrupt_image(img, example(), CorruptConfig(segmenter=lambda i, e: None))
    assert res3.source == "fallback"
    # a segmenter may return a PIL mask of another size
    small = Image.fromarray(box_mask().astype(np.uint8) * 255).resize((W // 2, H // 2))
    res4 = corrupt_image(img, example(), CorruptConfig(segmenter=lambda i, e: small))
    assert res4.source == "segmenter"


def test_union_of_mask_image_polygon_and_box(rng, tmp_path):
    img = scan(rng, bg=128.0, lesion=128.0, tex=0.0)
    m = np.zeros((H, W), np.uint8)
    m[5:15, 5:15] = 1  # label value 1 (nonzero = lesion)
    mp = tmp_path / "m.png"
    Image.fromarray(m).save(mp)
    ex = example(
        lesion_mask_path=str(mp),
        lesion_polygons=[[(100, 70), (120, 70), (110, 90)]],
        lesion_boxes=[BOX],
    )
    changed = np.asarray(corrupt_image(img, ex).image) != 128
    assert changed[5:15, 5:15].mean() > 0.9
    assert changed[75:85, 108:112].mean() > 0.9
    assert changed[box_mask()].mean() > 0.9
    assert not changed[0:4, 60:70].any()


def test_corrupt_example_writes_a_png(rng, tmp_path):
    p = tmp_path / "img.png"
    scan(rng).save(p)
    ex = example(image_path=str(p), lesion_boxes=[BOX], id="a/b c")
    res = corrupt_example(ex, CorruptConfig(mode="inpaint"), tmp_path / "out")
    assert res.path and res.path.endswith("_inpaint.png")
    assert "/" not in res.path.split("out/")[1]  # the id is made safe for a file name
    again = corrupt_example(ex, CorruptConfig(mode="inpaint"), tmp_path / "out2")
    assert (np.asarray(Image.open(res.path)) == np.asarray(Image.open(again.path))).all()
    none = corrupt_example(example(image_path=str(p)), CorruptConfig(fallback="skip"), tmp_path)
    assert none.path is None and not none.has_corrupt


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        CorruptConfig(mode="erase")
    with pytest.raises(ValueError, match="fallback"):
        CorruptConfig(fallback="none")
    with pytest.raises(ValueError, match="noise_std"):
        CorruptConfig(noise_std=-1)
    with pytest.raises(TypeError, match="segmenter"):
        CorruptConfig(segmenter="medsam")
    with pytest.raises(ValueError, match="seed"):
        corrupt_image(Image.new("L", (4, 4)), None)


def test_inpaint_at_the_image_border_and_of_a_thin_polygon(rng):
    a = 90 + 8 * rng.standard_normal((H, W))
    a[0:15, 0:20] = 240  # lesion in the corner
    a[60:64, 10:120] = 240  # a thin diagonal-ish streak, annotated by a polygon
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    ex = example(
        lesion_boxes=[(0, 0, 20, 15)],
        lesion_polygons=[[(10, 60), (119, 60), (119, 63), (10, 63)]],
    )
    out = np.asarray(corrupt_image(img, ex, CorruptConfig(mode="inpaint")).image).astype(float)
    assert abs(out[0:15, 0:20].mean() - 90) < 8
    assert abs(out[60:64, 10:120].mean() - 90) < 8


def centre_segmenter(image, ex):
    """A stand-in segmenter for the ``module:function`` hook (the centre quarter)."""
    w, h = image.size
    return mask_from_boxes([(w / 4, h / 4, 3 * w / 4, 3 * h / 4)], (w, h))


def test_load_segmenter_from_a_spec(rng):
    from fgpo.pairs.corrupt import load_segmenter

    seg = load_segmenter("test_corrupt:centre_segmenter")
    res = corrupt_image(scan(rng), example(), CorruptConfig(segmenter=seg))
    assert res.source == "segmenter" and res.region_fraction == pytest.approx(0.25, abs=0.02)
    with pytest.raises(ValueError, match="module:function"):
        load_segmenter("test_corrupt.centre_segmenter")
    with pytest.raises(ValueError, match="cannot load segmenter"):
        load_segmenter("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="cannot load segmenter"):
        load_segmenter("test_corrupt:no_such_function")
