"""The gblock G kernel's launch split (``configs.g_launches``): on sm_90 the entry that writes G
and Gr from recomputed logits ("g_both", m64n128 tiles) compiles without spills only for chunk
widths that are multiples of 16, so each chunk runs a 16-aligned main launch with it and a ragged
tail (< 16 columns, last chunk only) with "g_narrow" into the buffer columns after it. Checked
here on the host arithmetic and through the interpreter (distinct tiles per entry so a spy can
tell the launches apart), against float64, TMA and pointer paths. The compiled side (0 B of
spill, m64n128k16): ``test_triton_aot.py``."""

from __future__ import annotations

import pytest
import torch
from test_triton_kl import _check_grads, _grads_in, _inputs, needs_triton

from fgpo_kernels._backend import Needs

pytestmark = needs_triton

# Distinct block widths per entry under the interpreter: the spy reads BLOCK_V to tell which
# entry a launch used (the interpreter's own tiles are the same for every entry).
_WIDE_V, _NARROW_V = 64, 32


def _covers(launches, width):
    """The launches tile [0, width) in order, without gaps or overlaps."""
    at = 0
    for off, cols, _name in launches:
        assert off == at and cols > 0, launches
        at += cols
    assert at == width, launches


@pytest.mark.parametrize("v", [1, 13, 15, 16, 17, 203, 1007, 1024, 152064])
@pytest.mark.parametrize("vc", [64, 128, 512, 2048, 16384])
def test_g_launches_hand_the_aligned_entry_only_multiples_of_16(v, vc):
    from fgpo_kernels.triton_kl import configs

    for v0 in range(0, v, vc):
        vl = min(vc, v - v0)
        split = configs.g_launches("g_both", vl)
        _covers(split, vl)
        for off, cols, name in split:
            assert off % configs.G_ALIGN == 0, split  # a TMA base stays 16-byte aligned
            if name == "g_both":
                assert cols % configs.G_ALIGN == 0, split
            else:  # the ragged tail: narrow entry, last chunk of a V that is not a multiple
                assert name == configs.G_TAIL and cols < configs.G_ALIGN, split
                assert v0 + vc >= v and v % configs.G_ALIGN, split
        assert len(split) == 1 + bool(vl % 16 and vl > 16), split
    # Any other entry: the whole chunk in one launch; an empty chunk: nothing.
    assert configs.g_launches("g", 203) == [(0, 203, "g")]
    assert configs.g_launches("g_both", 0) == []
    with pytest.raises(ValueError, match="width"):
        configs.g_launches("g_both", -1)


def test_g_entry_choice():
    """G and Gr from recomputed logits on sm_90 (16-bit): the aligned wide entry; from kept
    logits with a reference, or on sm_80: the narrow one; one of them: "g"."""
    from fgpo_kernels.triton_kl import configs

    def name(**kw):
        return configs.gpu_config_name("g", 300, kw.pop("dtype", torch.bfloat16), True, **kw)

    assert name(both=True) == name(both=True, dtype=torch.float16) == "g_both"
    assert name(both=True, shared=False) == "g_both"
    assert name(both=True, held=True) == name(both=False, held=True) == "g_narrow"
    assert name(both=True, arch=80) == "g_narrow"
    assert name(both=False) == "g" and name(both=True, dtype=torch.float32) == "g_fp32"
    assert "g_both" in configs.G_ALIGNED and "g_both" in configs.SM90_ONLY


def _force_split(monkeypatch, fp32: bool):
    """Run the launcher as on sm_90 with distinguishable tiles per entry; ``fp32``: fp32 inputs
    take the 16-bit entry choice (so the split is checked at fp32 accuracy). Returns the list the
    spies fill with (BLOCK_V, v0, chunk_v) per launch; they also check that wide launches, and
    only those, use ``_g_kernel_aligned`` (chunk_v specialized as a multiple of 16)."""
    from fgpo_kernels.triton_kl import bwd_gblock, configs

    tiles = {
        "g_both": configs.KernelConfig(16, _WIDE_V, 16, 4, 1),
        "g_narrow": configs.KernelConfig(16, _NARROW_V, 16, 4, 1),
    }
    monkeypatch.setattr(bwd_gblock, "named_config", lambda name, n, d: tiles[name])
    if fp32:
        real_name = bwd_gblock.gpu_config_name

        def name16(kind, n, dtype, *a, **kw):
            return real_name(kind, n, torch.bfloat16, *a, **kw)

        monkeypatch.setattr(bwd_gblock, "gpu_config_name", name16)
    calls = []

    class Spy:
        def __init__(self, real, aligned: bool) -> None:
            self.real, self.aligned = real, aligned

        def __getitem__(self, grid):
            def launch(*args, **kw):
                v0, chunk_v = args[21], args[22]  # _g_kernel's v0, chunk_v
                # a wide launch must go through the kernel compiled for aligned widths
                assert self.aligned == (kw["BLOCK_V"] == _WIDE_V), (self.aligned, kw["BLOCK_V"])
                calls.append((kw["BLOCK_V"], v0, chunk_v))
                return self.real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(bwd_gblock, "_g_kernel", Spy(bwd_gblock._g_kernel, False))
    monkeypatch.setattr(bwd_gblock, "_g_kernel_aligned", Spy(bwd_gblock._g_kernel_aligned, True))
    return calls


def _check_calls(calls, v):
    assert calls, "no G launch"
    at = 0
    for block_v, v0, chunk_v in calls:
        assert v0 == at and chunk_v > 0, calls
        at += chunk_v
        if block_v == _WIDE_V:
            assert chunk_v % 16 == 0 and v0 % 16 == 0, f"wide launch of {chunk_v}: {calls}"
        else:
            assert block_v == _NARROW_V and chunk_v < 16 and at == v, calls
    assert at == v, calls


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("v", [13, 203, 1007])
@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_split_g_and_gr_match_float64(mode, v, tma, monkeypatch):
    """G and Gr both written (dh, dhr, dW and dWr needed), V ragged (13 < 16: a tail only;
    203 = 128 + 64 + 11; 1007 = 7 x 128 + 96 + 15), chunks of 128 columns, TMA descriptors
    (tails through a column view of the buffer) and pointer stores: float64 accuracy."""
    from fgpo_kernels.triton_kl import bwd_gblock, fwd

    monkeypatch.setenv("FGPO_TRITON_TMA", "1" if tma else "0")
    n, d, dr, t = 21, 19, 27, 0.8
    h, hr, w, wr = _inputs(n, d, v, dr, shared=mode == "shared")
    stats = fwd.forward(h, hr, w, wr, t)
    gs = _grads_in(n, True)
    need = Needs(True, True, True, mode == "separate")
    calls = _force_split(monkeypatch, fp32=True)
    got = bwd_gblock.backward_gblock(h, hr, w, wr, t, stats, gs, need, chunk_elems=2 * n * 128)
    _check_calls(calls, v)
    assert any(b == _NARROW_V for b, _, _ in calls) == bool(v % 16)
    _check_grads(got, (h, hr, w, wr, t), stats, gs, need, 2e-5, f"[{mode}/V={v}/tma={tma}] ")


def test_split_is_the_default_for_16_bit_g_and_gr(monkeypatch):
    """bf16 inputs, no entry forced: the launcher itself picks "g_both" and splits (the spy sees
    a 16-aligned main launch and a tail), results within bf16 rounding of float64."""
    from fgpo_kernels.triton_kl import bwd_gblock, fwd

    n, d, v, t = 21, 19, 203, 1.0
    h, hr, w, wr = _inputs(n, d, v, shared=True, dtype=torch.bfloat16)
    stats = fwd.forward(h, hr, w, wr, t)
    gs = _grads_in(n, True)
    need = Needs(True, True, True, False)
    calls = _force_split(monkeypatch, fp32=False)
    got = bwd_gblock.backward_gblock(h, hr, w, wr, t, stats, gs, need, chunk_elems=2 * n * 128)
    _check_calls(calls, v)
    assert [b for b, _, _ in calls] == [_WIDE_V] * 2 + [_NARROW_V], calls  # 128, 64 + 11
    _check_grads(got, (h, hr, w, wr, t), stats, gs, need, 1.5e-2, "[bf16] ")
