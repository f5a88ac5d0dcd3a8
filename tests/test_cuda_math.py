"""The CUDA kernels' tile math (csrc/tile_math.h), compiled for the CPU, against float64.

csrc/cpu_harness.cpp replays per row exactly what the kernels do with their accumulator
fragments (column ownership per quad lane, NaN in every slot the row must not read, online
statistics, quad butterfly merge, vocabulary-split merge, finish; the backward epilogue's G/Gr
with masking); here it is driven with random logits and compared to a float64 numpy reference.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _block_vocab() -> int:
    m = re.search(r"kBlockVocab\s*=\s*(\d+)", (CSRC / "launch.h").read_text())
    assert m, "kBlockVocab not found in csrc/launch.h"
    return int(m.group(1))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    out = tmp_path_factory.mktemp("harness") / "harness.so"
    nt = _block_vocab() // 8
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", f"-DFGPO_NT={nt}"]
    cmd += [f"-I{CSRC}", str(CSRC / "cpu_harness.cpp"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"harness build failed:\n{proc.stderr}"
    so = ctypes.CDLL(str(out))
    fp = ctypes.POINTER(ctypes.c_float)
    so.fgpo_row_stats.argtypes = [fp, fp, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_float, fp]  # fmt: skip
    so.fgpo_row_stats.restype = ctypes.c_int
    so.fgpo_row_grads.argtypes = [fp, fp, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, fp, ctypes.c_float, fp, fp]  # fmt: skip
    so.fgpo_merge_pair.argtypes = [fp, fp, fp]
    so.tile = _block_vocab()
    return so


def _p(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _ref_stats(z, zr, inv_t):
    z = z.astype(np.float64) * inv_t
    zr = zr.astype(np.float64) * inv_t
    lse = np.logaddexp.reduce(z)
    lser = np.logaddexp.reduce(zr)
    logp, logr = z - lse, zr - lser
    p, r = np.exp(logp), np.exp(logr)
    return lse, lser, float(np.sum(r * (logr - logp))), float(np.sum(p * (logp - logr)))


def _row_stats(lib, z, zr, kl, splits, half, inv_t):
    out = np.zeros(4, dtype=np.float32)
    z = _f32(z)
    zr = _f32(zr) if zr is not None else None
    used = lib.fgpo_row_stats(_p(z), _p(zr) if kl else None, len(z), int(kl), splits, half,
                              inv_t, _p(out))  # fmt: skip
    return out.astype(np.float64), used


def _logits(rng, v, scale, shape="random"):
    z = rng.standard_normal(v) * scale
    if shape == "ascending":  # the running maximum moves at every tile
        z = np.sort(z)
    zr = z + 0.5 * rng.standard_normal(v) * max(1.0, scale / 4)
    return z, zr


@pytest.mark.parametrize("v", [1, 7, 64, 65, 127, 1003, 4099])
@pytest.mark.parametrize("splits", [1, 3, 50])
def test_kl_stats_match_float64(lib, v, splits):
    rng = np.random.default_rng(1000 * v + splits)
    for shape, scale, inv_t, half in (("random", 3.0, 1.0, 0), ("ascending", 25.0, 1 / 0.7, 1)):
        z, zr = _logits(rng, v, scale, shape)
        got, used = _row_stats(lib, z, zr, True, splits, half, inv_t)
        tiles = -(-v // lib.tile)
        assert 1 <= used <= min(splits, tiles)
        lse, lser, fkl, rkl = _ref_stats(_f32(z), _f32(zr), inv_t)
        assert np.all(np.isfinite(got)), got
        assert abs(got[0] - lse) <= 2e-6 * max(1.0, abs(lse)), (got[0], lse)
        assert abs(got[1] - lser) <= 2e-6 * max(1.0, abs(lser)), (got[1], lser)
        # KL: fp32 cancellation of O(|lse|) terms, so the bound scales with the logit size.
        tol = 3e-6 * (1.0 + abs(lse) + abs(lser)) + 1e-5 * max(fkl, rkl)
        assert abs(got[2] - fkl) <= tol, (shape, got[2], fkl)
        assert abs(got[3] - rkl) <= tol, (shape, got[3], rkl)
        assert got[2] >= -tol and got[3] >= -tol


@pytest.mark.parametrize("v", [1, 63, 200, 3001])
def test_lse_only_matches_float64(lib, v):
    rng = np.random.default_rng(v)
    z = rng.standard_normal(v) * 10
    for splits in (1, 4):
        got, _ = _row_stats(lib, z, None, False, splits, 0, 1 / 1.3)
        ref = np.logaddexp.reduce(_f32(z).astype(np.float64) / 1.3)
        assert abs(got[0] - ref) <= 2e-6 * max(1.0, abs(ref))


def test_identical_models_have_zero_kl(lib):
    z = np.random.default_rng(0).standard_normal(777) * 4
    got, _ = _row_stats(lib, z, z, True, 5, 0, 1.0)
    assert abs(got[0] - got[1]) == 0.0
    assert abs(got[2]) < 1e-6 and abs(got[3]) < 1e-6


def test_nan_logit_poisons_the_row(lib):
    z, zr = _logits(np.random.default_rng(1), 300, 2.0)
    z[123] = np.nan
    got, _ = _row_stats(lib, z, zr, True, 3, 0, 1.0)
    assert np.isnan(got[0]) and np.isnan(got[2]) and np.isnan(got[3])
    zr[5] = np.inf
    z[123] = 0.0
    got, _ = _row_stats(lib, z, zr, True, 1, 0, 1.0)
    assert not np.isfinite(got[1]) or np.isnan(got[2])


def test_merge_with_empty_partial_is_identity(lib):
    x = _f32([1.5, 2.0, 0.3, -0.5, 4.0, 0.7])
    empty = _f32([-np.inf, 0.0, 0.0, -np.inf, 0.0, 0.0])
    out = np.zeros(6, dtype=np.float32)
    lib.fgpo_merge_pair(_p(x), _p(empty), _p(out))
    np.testing.assert_array_equal(out, x)
    lib.fgpo_merge_pair(_p(empty), _p(x), _p(out))
    np.testing.assert_array_equal(out, x)
    lib.fgpo_merge_pair(_p(empty), _p(empty), _p(out))
    assert out[0] == -np.inf and out[1] == 0 and not np.isnan(out).any()


def test_merge_matches_single_pass(lib):
    rng = np.random.default_rng(7)
    z, zr = rng.standard_normal(50) * 5, rng.standard_normal(50) * 5

    def state(a, b):
        m, mr = a.max(), b.max()
        e, er = np.exp(a - m), np.exp(b - mr)
        return _f32([m, e.sum(), (e * (a - b)).sum(), mr, er.sum(), (er * (b - a)).sum()])

    out = np.zeros(6, dtype=np.float32)
    lib.fgpo_merge_pair(_p(state(z[:20], zr[:20])), _p(state(z[20:], zr[20:])), _p(out))
    np.testing.assert_allclose(out, state(z, zr), rtol=2e-6, atol=1e-6)


def _ref_grads(z, zr, inv_t, stats, g):
    z = z.astype(np.float64) * inv_t
    zr = zr.astype(np.float64) * inv_t
    lse, lser, fkl, rkl = stats
    g_fkl, g_rkl, g_lp, g_lpr = g
    logp, logr = z - lse, zr - lser
    p, r = np.exp(logp), np.exp(logr)
    d = logp - logr
    gp = g_fkl * (p - r) + g_rkl * p * (d - rkl) - g_lp * p
    gr = g_fkl * r * (-d - fkl) + g_rkl * (r - p) - g_lpr * r
    return gp, gr


@pytest.mark.parametrize("v", [1, 64, 100, 1003])
@pytest.mark.parametrize("kl", [True, False])
def test_grad_epilogue_matches_float64(lib, v, kl):
    rng = np.random.default_rng(v + 7 * kl)
    z, zr = _logits(rng, v, 3.0)
    inv_t = 1 / 0.8
    stats = _ref_stats(_f32(z), _f32(zr), inv_t)
    g = rng.standard_normal(4) if kl else np.array([0.0, 0.0, rng.standard_normal(), 0.0])
    rg = _f32([*stats, *g])
    pad = -(-v // lib.tile) * lib.tile
    for half, row_ok in ((0, 1), (1, 1), (0, 0)):
        gbuf = np.full(pad, np.nan, dtype=np.float32)
        grbuf = np.full(pad, np.nan, dtype=np.float32)
        lib.fgpo_row_grads(_p(_f32(z)), _p(_f32(zr)), v, int(kl), half, row_ok, _p(rg),
                           inv_t, _p(gbuf), _p(grbuf))  # fmt: skip
        assert not np.isnan(gbuf).any() and not np.isnan(grbuf).any(), "a slot was not written"
        assert np.all(gbuf[v:] == 0) and np.all(grbuf[v:] == 0), "columns past V must be 0"
        if not row_ok:
            assert np.all(gbuf == 0) and np.all(grbuf == 0), "rows past N must be 0"
            continue
        gp, gr = _ref_grads(_f32(z), _f32(zr), inv_t, [np.float64(x) for x in rg[:4]], g)
        if not kl:
            gp, gr = -g[2] * np.exp(_f32(z).astype(np.float64) * inv_t - stats[0]), 0 * gr
        scale = max(np.abs(gp).max(), 1e-30)
        np.testing.assert_allclose(gbuf[:v], gp, rtol=0, atol=5e-6 * scale)
        if kl:
            np.testing.assert_allclose(grbuf[:v], gr, rtol=0, atol=5e-6 * max(np.abs(gr).max(),
                                                                              1e-30))  # fmt: skip
        else:
            assert np.all(grbuf == 0)


def test_gradients_sum_to_zero_over_vocab(lib):
    """Softmax-gradient identities: sum_j G = 0 and sum_j Gr = 0 (fkl/rkl/logp terms)."""
    rng = np.random.default_rng(3)
    v = 517
    z, zr = _logits(rng, v, 2.0)
    stats = _ref_stats(_f32(z), _f32(zr), 1.0)
    rg = _f32([*stats, 0.7, -0.3, 0.0, 0.0])
    pad = -(-v // lib.tile) * lib.tile
    gbuf, grbuf = np.zeros(pad, np.float32), np.zeros(pad, np.float32)
    lib.fgpo_row_grads(_p(_f32(z)), _p(_f32(zr)), v, 1, 0, 1, _p(rg), 1.0, _p(gbuf), _p(grbuf))
    assert abs(gbuf.astype(np.float64).sum()) < 1e-5
    assert abs(grbuf.astype(np.float64).sum()) < 1e-5
