"""The Triton kernels themselves: odd shapes, forced vocabulary splits, every gradient flag, both
backward modes (gblock: G chunks + library GEMMs, with several forced chunks; atomic), bf16
through the (patched) interpreter. Ahead-of-time compilation of the shipped GPU configurations:
``test_triton_aot.py``."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err, worst

from fgpo_kernels import _launch, _registry, torch_impl
from fgpo_kernels._backend import Needs, RowGrads, RowStats

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_ok, _why = _registry._usable_on("triton", torch.device(DEV))
needs_triton = pytest.mark.skipif(not _ok, reason=_why)

if _ok:
    from fgpo_kernels import triton_kl
    from fgpo_kernels.triton_kl import bwd_gblock

    # Small tiles so that even small shapes have several row blocks, vocabulary tiles, D chunks
    # and ragged tails everywhere.
    TINY = triton_kl.KernelConfig(16, 64, 16, 4, 1)


def _inputs(n, d, v, d_ref=None, shared=True, dtype=torch.float32, logprob_only=False):
    h = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(v, d, dtype=torch.float64) * 2.5 / math.sqrt(d)
    if logprob_only:
        hr = wr = None
    elif shared:
        hr = h + 0.4 * torch.randn_like(h)
        wr = None
    else:
        hr = torch.randn(n, d_ref, dtype=torch.float64)
        wr = torch.randn(v, d_ref, dtype=torch.float64) * 2.5 / math.sqrt(d_ref)

    def cast(x):
        return None if x is None else x.to(dtype).to(DEV)

    return cast(h), cast(hr), cast(w), cast(wr)


def _f64(xs):
    return [None if x is None else x.double() for x in xs]


def _check_forward(got, ref, tol, label):
    for name, g, r in zip(("lse", "lser", "fkl", "rkl"), got, ref):
        if r is None:
            assert g is None, f"{label}{name}: expected None"
            continue
        assert g.dtype == torch.float32 and g.shape == r.shape, (
            f"{label}{name}: {g.dtype} {g.shape}"
        )
        e = rel_err(g.cpu(), r.cpu())
        assert e <= tol, f"{label}{name}: rel err {e:.3e} > {tol:.1e}; {worst(g, r)}"


def _grads_in(n, has_ref):
    gs = [torch.randn(n, device=DEV) for _ in range(4)]
    if not has_ref:
        gs[0] = gs[1] = gs[3] = None
    return RowGrads(*gs)


def _f64_stats(stats):
    return RowStats(*_f64(stats))


def _f64_grads(gs):
    return RowGrads(*_f64(gs))


BWD = ["gblock", "atomic"]


def _check_backward(args, stats, gs, need, tol, label, config=None, mode=None, chunk_elems=None):
    """Backend backward against the float64 chunked PyTorch impl (same contract)."""
    h, hr, w, wr, t = args
    got = triton_kl.backward(
        h, hr, w, wr, t, stats, gs, Needs(*need), config=config, mode=mode,
        chunk_elems=chunk_elems,
    )  # fmt: skip
    _check_grads(got, args, stats, gs, need, tol, label)


def _check_grads(got, args, stats, gs, need, tol, label):
    """Gradients ``got`` (dh, dhr, dw, dwr) against the float64 chunked PyTorch backward of
    ``args`` = (h, hr, w, wr, temperature): the same ones present, fp32, within ``tol``."""
    h, hr, w, wr, t = args
    need = Needs(*need)
    ref = torch_impl.backward(*_f64((h, hr, w, wr)), t, _f64_stats(stats), _f64_grads(gs), need)
    for name, g, r in zip(("dh", "dhr", "dw", "dwr"), got, ref):
        if r is None:
            assert g is None, f"{label}{name}: expected None"
            continue
        assert g is not None, f"{label}{name}: missing"
        assert g.dtype == torch.float32 and g.shape == r.shape, f"{label}{name}: {g.shape}"
        e = rel_err(g.cpu(), r.cpu())
        assert e <= tol, f"{label}{name}: rel err {e:.3e} > {tol:.1e}; {worst(g, r)}"


# --------------------------------------------------------------------------- correctness


@needs_triton
@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("mode", ["shared", "separate", "logprob"])
def test_forward_odd_sizes_and_forced_splits(mode, splits):
    n, d, v, dr = 37, 45, 1009, 29  # nothing divides any block size
    h, hr, w, wr = _inputs(n, d, v, dr, shared=mode == "shared", logprob_only=mode == "logprob")
    t = 0.85
    got = triton_kl.forward(h, hr, w, wr, t, splits=splits, config=TINY)
    ref = torch_impl.forward(*_f64((h, hr, w, wr)), t)
    _check_forward(got, ref, 2e-5, f"[{mode}/splits={splits}] ")
    # The flattened (tile, D slice) loop of the shipped forward configs: same numbers (the
    # interpreter runs the loop nest as written; the compiled nest: test_triton_aot.py).
    flat = triton_kl.forward(h, hr, w, wr, t, splits=splits, config=TINY._replace(flatten=True))
    _check_forward(flat, ref, 2e-5, f"[{mode}/splits={splits}/flatten] ")
    # The default (interpreter) configuration and split choice give the same numbers.
    again = triton_kl.forward(h, hr, w, wr, t)
    _check_forward(again, ref, 2e-5, f"[{mode}/default] ")


@needs_triton
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("mode", ["shared", "separate", "logprob"])
def test_kept_logits_and_g_tiles_tma_and_pointer_paths(mode, tma, monkeypatch):
    """The forward that keeps its logits and the G kernel reading them back, through TMA
    descriptors (sm_90's path) and per-element pointers (sm_80's, FGPO_TRITON_TMA=0): ragged
    row and column tails, V not a multiple of 16 (padded row stride), several G chunks."""
    from fgpo_kernels.triton_kl.common import logit_buffer

    monkeypatch.setenv("FGPO_TRITON_TMA", "1" if tma else "0")
    n, d, v, dr = 37, 45, 203, 29
    h, hr, w, wr = _inputs(n, d, v, dr, shared=mode == "shared", logprob_only=mode == "logprob")
    t = 0.85
    z = logit_buffer(n, v, DEV)
    zr = None if hr is None else logit_buffer(n, v, DEV)
    assert z.stride(0) == 208 and z.shape == (n, v)
    stats = triton_kl.fwd.forward(h, hr, w, wr, t, splits=3, config=TINY, logits=(z, zr))
    _check_forward(stats, torch_impl.forward(*_f64((h, hr, w, wr)), t), 2e-5, f"[{mode}] ")
    ref_z = h.double() @ w.double().T / t
    assert rel_err(z.cpu(), ref_z.cpu()) <= 1e-6, worst(z, ref_z)
    if zr is not None:
        ref_zr = hr.double() @ (w if wr is None else wr).double().T / t
        assert rel_err(zr.cpu(), ref_zr.cpu()) <= 1e-6, worst(zr, ref_zr)
    gs = _grads_in(n, hr is not None)
    need = Needs(True, hr is not None, True, wr is not None)
    kept = bwd_gblock.backward_gblock(h, hr, w, wr, t, stats, gs, need, config=TINY,
                                      chunk_elems=2 * n * 64, logits=(z, zr))  # fmt: skip
    again = bwd_gblock.backward_gblock(h, hr, w, wr, t, stats, gs, need, config=TINY,
                                       chunk_elems=2 * n * 64)  # fmt: skip
    for label, got in (("kept", kept), ("recomputed", again)):
        _check_grads(got, (h, hr, w, wr, t), stats, gs, need, 2e-5, f"[{mode}] {label} ")


@needs_triton
@pytest.mark.parametrize("bwd", BWD)
@pytest.mark.parametrize("mode", ["shared", "separate", "logprob"])
def test_single_row(mode, bwd):
    h, hr, w, wr = _inputs(1, 24, 333, 40, shared=mode == "shared", logprob_only=mode == "logprob")
    stats = triton_kl.forward(h, hr, w, wr, 1.0, splits=2, config=TINY)
    _check_forward(stats, torch_impl.forward(*_f64((h, hr, w, wr)), 1.0), 2e-5, f"[{mode}] ")
    has_ref = hr is not None
    need = (True, has_ref, True, has_ref and wr is not None)
    gs = _grads_in(1, has_ref)
    label = f"[{mode}/{bwd}] "
    # gblock: a budget of one tile per chunk (333 columns = 6 chunks, the last one ragged).
    args = (h, hr, w, wr, 1.0)
    _check_backward(args, stats, gs, need, 1e-5, label, config=TINY, mode=bwd, chunk_elems=1)


@needs_triton
@pytest.mark.parametrize(
    "mode,need",
    [
        ("shared", (True, False, False, False)),  # LoRA: hidden states only, no dW at all
        ("shared", (True, True, True, False)),  # shared dW gets both terms
        ("shared", (False, False, True, False)),  # dW only
        ("shared", (False, True, False, False)),  # reference hidden only
        ("separate", (True, True, True, True)),  # reference requires grad, own weight
        ("separate", (False, True, False, True)),  # only the reference side
        ("separate", (True, False, True, False)),
        ("logprob", (True, False, True, False)),
        ("logprob", (True, False, False, False)),
    ],
)
@pytest.mark.parametrize("bwd", BWD)
def test_backward_every_gradient_flag(mode, need, bwd):
    n, d, v, dr = 29, 37, 517, 53
    h, hr, w, wr = _inputs(n, d, v, dr, shared=mode == "shared", logprob_only=mode == "logprob")
    t = 1.3
    stats = triton_kl.forward(h, hr, w, wr, t)
    gs = _grads_in(n, hr is not None)
    if hr is not None:
        gs[1][::4] = 0.0  # some rows without a reverse-KL gradient
    label = f"[{mode}/{need}/{bwd}] "
    args = (h, hr, w, wr, t)
    # gblock: chunks of 128 (2N buffer rows) or 256 columns (N rows); the last one is ragged.
    elems = 2 * n * 128
    _check_backward(args, stats, gs, need, 1e-5, label, TINY, mode=bwd, chunk_elems=elems)
    _check_backward(args, stats, gs, need, 1e-5, label + "default ", mode=bwd)


@needs_triton
@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("mode,need", [
    ("shared", (True, False, False, False)),  # LoRA: the "g" entry's G-only launches
    ("separate", (True, True, True, True)),
    ("logprob", (True, False, True, False)),
])  # fmt: skip
def test_gblock_flattened_tile_loop(mode, need, kept, monkeypatch):
    """The G kernel with several tiles per program (KernelConfig.flatten, the shipped "g"
    entry): chunks of 3 tiles over 2 splits, so a program's second tile lies past the chunk
    (masked, writes nothing), from recomputed and from kept logits, against float64."""
    from fgpo_kernels.triton_kl.common import logit_buffer

    n, d, v, dr = 37, 45, 517, 29
    h, hr, w, wr = _inputs(n, d, v, dr, shared=mode == "shared", logprob_only=mode == "logprob")
    t = 0.85
    flat = TINY._replace(flatten=True)
    logits = None
    if kept:
        logits = (logit_buffer(n, v, DEV), None if hr is None else logit_buffer(n, v, DEV))
    stats = triton_kl.fwd.forward(h, hr, w, wr, t, splits=2, config=TINY, logits=logits)
    gs = _grads_in(n, hr is not None)
    need = Needs(*need)
    plans, real = [], bwd_gblock.grid_plan
    monkeypatch.setattr(bwd_gblock, "grid_plan", lambda *a, **k: plans.append(real(*a, **k))
                        or plans[-1])  # fmt: skip
    rows = n * (1 + int(hr is not None and (need.hr or need.wr or (wr is None and need.w))))
    got = bwd_gblock.backward_gblock(h, hr, w, wr, t, stats, gs, need, config=flat,
                                     chunk_elems=rows * 3 * 64, logits=logits)  # fmt: skip
    assert any(p.tiles_per_split == 2 and p.splits * 2 > p.n_tiles for p in plans), plans
    _check_grads(got, (h, hr, w, wr, t), stats, gs, need, 2e-5, f"[{mode}/{kept}] ")


@needs_triton
@pytest.mark.parametrize("bwd", BWD)
def test_backward_many_row_blocks_grouped_order(bwd, monkeypatch):
    """More row blocks than one launch-order group, with a partial last group (the group is
    forced small; TINY has 16-row blocks)."""
    n = 16 * (3 + 2) - 5
    h, hr, w, wr = _inputs(n, 20, 150, 24, shared=False)
    real = _launch.group_rows
    monkeypatch.setattr(_launch, "group_rows", lambda *a: (3, real(*a)[1]))
    stats = triton_kl.forward(h, hr, w, wr, 1.0, splits=2, config=TINY)
    _check_forward(stats, torch_impl.forward(*_f64((h, hr, w, wr)), 1.0), 2e-5, "[groups] ")
    gs = _grads_in(n, True)
    need = (True, True, True, True)
    _check_backward((h, hr, w, wr, 1.0), stats, gs, need, 1e-5, "[groups] ", TINY, mode=bwd)


@needs_triton
@pytest.mark.parametrize("bwd", BWD)
def test_backward_none_incoming_gradients_are_zero(bwd):
    """g_fkl / g_rkl / g_lpr may be None (= zero), as the contract says."""
    n, d, v = 17, 24, 301
    h, hr, w, wr = _inputs(n, d, v)
    stats = triton_kl.forward(h, hr, w, wr, 1.0)
    g_lp = torch.randn(n, device=DEV)
    need = Needs(True, True, True, False)
    only_lp = RowGrads(None, None, g_lp, None)
    got = triton_kl.backward(h, hr, w, wr, 1.0, stats, only_lp, need, mode=bwd)
    zero = torch.zeros(n, device=DEV)
    zeros = RowGrads(zero, zero, g_lp, zero)
    ref = triton_kl.backward(h, hr, w, wr, 1.0, stats, zeros, need, mode=bwd)
    for a, b in zip(got, ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    assert got[1].abs().max() == 0  # the reference gets nothing from a policy log-prob


@needs_triton
@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_gblock_env_budget_and_modes_agree(mode, monkeypatch):
    """FGPO_TRITON_GBLOCK_ELEMS forces chunks (V = 7 * 64 + 3, not a multiple of the tile or of
    the chunk); gblock and atomic agree with each other and with float64."""
    n, d, v, dr = 21, 19, 451, 27
    h, hr, w, wr = _inputs(n, d, v, dr, shared=mode == "shared")
    t = 0.7
    stats = triton_kl.forward(h, hr, w, wr, t)
    gs = _grads_in(n, True)
    need = Needs(True, True, True, mode == "separate")
    vc = triton_kl.chunk_columns(2 * n, v, TINY.block_v, 2 * n * 150)
    assert vc == 128 and -(-v // vc) == 4 and v % vc
    monkeypatch.setenv("FGPO_TRITON_GBLOCK_ELEMS", str(2 * n * 150))
    label = f"[{mode}/env budget] "
    _check_backward((h, hr, w, wr, t), stats, gs, need, 1e-5, label, config=TINY)
    calls = []
    real = bwd_gblock._g_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(bwd_gblock, "_g_kernel", Spy())
    monkeypatch.setenv("FGPO_TRITON_BWD", "gblock")
    gb = triton_kl.backward(h, hr, w, wr, t, stats, gs, need, config=TINY)
    assert len(calls) == 4, f"expected 4 vocabulary chunks, got launches {calls}"
    monkeypatch.setenv("FGPO_TRITON_BWD", "atomic")
    at = triton_kl.backward(h, hr, w, wr, t, stats, gs, need, config=TINY)
    assert len(calls) == 4, "FGPO_TRITON_BWD=atomic must not launch the G kernel"
    for name, a, b in zip(("dh", "dhr", "dw", "dwr"), gb, at):
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel_err(a.cpu(), b.cpu()) < 1e-5, name


@needs_triton
@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_gblock_fp32_output_gemm_path(mode, monkeypatch):
    """The CUDA path of the gblock GEMMs (16-bit operands, fp32 output through ``out_dtype``,
    each fp32 sum accumulated in place: ``out`` IS the sum, so PyTorch copies nothing per chunk)
    emulated on CPU: same results as float64 over several chunks."""
    n, d, v, dr = 19, 24, 389, 20
    h, hr, w, wr = _inputs(n, d, v, dr, shared=mode == "shared", dtype=torch.bfloat16)
    stats = triton_kl.forward(h, hr, w, wr, 1.0)
    gs = _grads_in(n, True)
    need = Needs(True, True, True, mode == "separate")
    ref = torch_impl.backward(*_f64((h, hr, w, wr)), 1.0, _f64_stats(stats), _f64_grads(gs), need)
    real_mm, used = torch.mm, []

    def mm(a, b, out_dtype=None, out=None):
        if out_dtype is None:
            return real_mm(a, b) if out is None else real_mm(a, b, out=out)
        assert out_dtype == torch.float32 and out is not None and out.dtype == torch.float32
        used.append("mm")
        return out.copy_(real_mm(a.float(), b.float()))

    def addmm(c, a, b, out_dtype=None, out=None):
        assert out_dtype == torch.float32 and out is not None
        assert out.data_ptr() == c.data_ptr(), "addmm into another buffer copies the sum first"
        used.append("addmm")
        return c.add_(real_mm(a.float(), b.float()))

    monkeypatch.setattr(bwd_gblock, "_fp32_out_gemm", lambda a: a.dtype != torch.float32)
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    got = triton_kl.backward(
        h, hr, w, wr, 1.0, stats, gs, need, config=TINY, mode="gblock", chunk_elems=1
    )  # fmt: skip
    monkeypatch.undo()
    assert used.count("addmm") >= 7 and "mm" in used  # 389 columns = 7 chunks of 64
    for name, g, r in zip(("dh", "dhr", "dw", "dwr"), got, ref):
        assert (g is None) == (r is None), name
        if r is not None:
            e = rel_err(g.cpu(), r.cpu())
            assert e <= 1.5e-2, f"[{mode}] {name}: rel err {e:.3e}; {worst(g, r)}"


@needs_triton
def test_gblock_zero_rows_and_nothing_needed():
    """No rows: zero gradients of the right shapes, and nothing asked: all None (no launch)."""
    h, hr, w, wr = _inputs(5, 16, 100, 12, shared=False)
    stats = triton_kl.forward(h, hr, w, wr, 1.0)
    gs = _grads_in(5, True)
    empty = lambda xs: [None if x is None else x[:0] for x in xs]
    everything = Needs(True, True, True, True)
    got = triton_kl.backward(
        h[:0], hr[:0], w, wr, 1.0, RowStats(*empty(stats)), RowGrads(*empty(gs)), everything,
        mode="gblock",
    )  # fmt: skip
    shapes = [(0, 16), (0, 12), (100, 16), (100, 12)]
    for g, shape in zip(got, shapes):
        assert g.shape == shape and g.dtype == torch.float32 and not g.abs().sum()
    none = triton_kl.backward(h, hr, w, wr, 1.0, stats, gs, Needs(False, False, False, False))
    assert none == (None, None, None, None)


def test_bwd_mode_and_budget_validation(monkeypatch):
    pytest.importorskip("triton")
    from fgpo_kernels.triton_kl import configs as tk

    monkeypatch.delenv("FGPO_TRITON_BWD", raising=False)
    assert tk.bwd_mode() == "gblock"
    monkeypatch.setenv("FGPO_TRITON_BWD", "atomic")
    assert tk.bwd_mode() == "atomic"
    assert tk.bwd_mode("gblock") == "gblock"  # the argument wins over the environment
    monkeypatch.setenv("FGPO_TRITON_BWD", "fast")
    with pytest.raises(ValueError, match="FGPO_TRITON_BWD"):
        tk.bwd_mode()
    with pytest.raises(ValueError, match="mode"):
        tk.bwd_mode("gemm")
    monkeypatch.setenv("FGPO_TRITON_GBLOCK_ELEMS", "lots")
    with pytest.raises(ValueError, match="FGPO_TRITON_GBLOCK_ELEMS"):
        tk.gblock_elems(None)
    monkeypatch.setenv("FGPO_TRITON_GBLOCK_ELEMS", "0")
    with pytest.raises(ValueError, match="FGPO_TRITON_GBLOCK_ELEMS"):
        tk.gblock_elems(None)
    monkeypatch.delenv("FGPO_TRITON_GBLOCK_ELEMS")
    assert tk.gblock_elems(None) == 1 << 25 and tk.gblock_elems(1000) == 1000


def test_gblock_budget_from_free_memory(monkeypatch):
    """On a GPU the gblock buffer is GBLOCK_FREE_FRACTION of the free memory, clamped (fake
    free-memory numbers; torch.cuda.mem_get_info is replaced)."""
    pytest.importorskip("triton")
    from fgpo_kernels import _fake
    from fgpo_kernels.triton_kl import configs as tk

    gib = 1 << 30
    assert tk.gblock_budget(1 * gib, 2) == gib // 8 // 2  # 1/8 of 1 GiB in bf16 elements
    assert tk.gblock_budget(1 * gib, 4) == gib // 8 // 4
    assert tk.gblock_budget(120 * gib, 2) == tk.GBLOCK_MAX_ELEMS  # an idle H200: the cap
    assert tk.gblock_budget(16 << 20, 2) == tk.GBLOCK_MIN_ELEMS  # nearly full: the floor
    monkeypatch.delenv("FGPO_TRITON_GBLOCK_ELEMS", raising=False)
    asked = []
    fake_free = lambda dev: asked.append(dev) or (3 * gib, 141 * gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", fake_free)
    cuda = torch.device("cuda", 1)
    assert tk.gblock_elems(None, cuda, 2) == 3 * gib // 8 // 2 and asked == [cuda]
    assert tk.gblock_elems(None, torch.device("cpu"), 2) == tk.GBLOCK_ELEMS
    monkeypatch.setenv("FGPO_TRITON_GBLOCK_ELEMS", "4096")  # the environment wins
    assert tk.gblock_elems(None, cuda, 2) == 4096
    monkeypatch.delenv("FGPO_TRITON_GBLOCK_ELEMS")
    with _fake.simulate_gpu():
        assert tk.gblock_elems(None, cuda, 2) == tk.GBLOCK_MAX_ELEMS
    # The SPEC backward (2N = 16384 buffer rows) on an idle H200: 10 chunks of 16384 columns
    # instead of 75 of 2048 at the old fixed 2^25 budget.
    vc = tk.chunk_columns(16384, 152064, 128, tk.gblock_budget(120 * gib, 2))
    assert vc == tk.GBLOCK_MAX_COLS and -(-152064 // vc) == 10


def test_chunk_columns_respect_budget_and_tile():
    pytest.importorskip("triton")
    from fgpo_kernels.triton_kl import configs as tk

    v = 152064
    for rows in (1, 300, 600, 8192, 16384, 65536):
        for block_v in (64, 128):
            for budget in (1 << 20, 1 << 25):
                vc = tk.chunk_columns(rows, v, block_v, budget)
                assert vc % block_v == 0 and block_v <= vc <= tk.GBLOCK_MAX_COLS
                assert vc < v  # never a (rows x whole vocabulary) buffer
                assert rows * vc <= budget or vc == block_v
    # docs/design.md §4's GPU shape: 2N buffer rows (policy and reference) within 2^25 elements.
    assert tk.chunk_columns(2 * 8192, v, 128, 1 << 25) == 2048
    # A small vocabulary: one chunk, no wider than V rounded up to a tile.
    assert tk.chunk_columns(10, 1000, 128, 1 << 25) == 1024


@needs_triton
@pytest.mark.parametrize("mode", ["shared", "separate", "logprob"])
def test_bf16_through_patched_interpreter(mode):
    """bf16 products accumulate exactly in fp32: the forward matches float64 of the same
    (bf16-rounded) inputs to fp32 accuracy; the backward rounds G to bf16 like PyTorch does."""
    n, d, v, dr = 33, 48, 700, 40
    h, hr, w, wr = _inputs(
        n, d, v, dr, shared=mode == "shared", dtype=torch.bfloat16, logprob_only=mode == "logprob"
    )
    stats = triton_kl.forward(h, hr, w, wr, 1.0, splits=3)
    _check_forward(stats, torch_impl.forward(*_f64((h, hr, w, wr)), 1.0), 1e-5, f"[{mode}] ")
    has_ref = hr is not None
    need = (True, has_ref, True, mode == "separate")
    gs = _grads_in(n, has_ref)
    for bwd in BWD:  # gblock: one (interpreter) tile per chunk, 512 + 188 columns
        label = f"[{mode}/bf16/{bwd}] "
        args = (h, hr, w, wr, 1.0)
        _check_backward(args, stats, gs, need, 1.5e-2, label, mode=bwd, chunk_elems=1)


@needs_triton
def test_nan_row_stays_in_its_row():
    h, hr, w, wr = _inputs(20, 16, 300)
    h[7, 3] = float("nan")
    lse, lser, fkl, rkl = triton_kl.forward(h, hr, w, wr, 1.0, splits=3, config=TINY)
    assert torch.isnan(lse[7]) and torch.isnan(fkl[7]) and torch.isnan(rkl[7])
    others = torch.arange(20) != 7
    assert torch.isfinite(torch.stack([lse, lser, fkl, rkl])[:, others]).all()


def test_probe_says_why_when_unusable(monkeypatch):
    pytest.importorskip("triton")
    from fgpo_kernels import triton_kl as tk

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    st = tk.probe()
    assert not st["available"] and "CUDA" in st["reason"] and "TRITON_INTERPRET" in st["reason"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tk, "_old_interpreter", lambda: "TypeError: int() of an array")
    st = tk.probe()
    assert not st["available"] and ">= 3.7" in st["reason"]
    assert "(TypeError: int() of an array;" in st["reason"]
    monkeypatch.setattr(tk, "_old_interpreter", lambda: None)
    assert tk.probe()["available"]
    monkeypatch.setattr(tk, "triton", None)
    st = tk.probe()
    assert not st["available"] and "triton" in st["reason"]


def test_interpreter_loop_check_runs_a_kernel(monkeypatch):
    """``common.interpreter_loop_error`` runs a loop with a runtime bound in the interpreter:
    None here (triton 3.7, or 3.6 with the tests' interpreter patch); triton 3.6's own
    conversion of a scalar to an index, ``int()`` of a 1-element array, fails it under numpy 2."""
    pytest.importorskip("triton")
    import numpy as np
    from triton.runtime import interpreter

    from fgpo_kernels.triton_kl import common

    assert common.interpreter_loop_error() is None
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("numpy 1 converts 1-element arrays to int")
    original = interpreter._patch_lang_tensor

    def like_triton_36(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", like_triton_36)
    assert "0-dimensional arrays" in common.interpreter_loop_error()


def test_split_choice_fills_the_gpu(monkeypatch):
    pytest.importorskip("triton")
    from fgpo_kernels.triton_kl import configs as tk

    monkeypatch.setattr(tk, "triton_interpret", lambda: False)
    monkeypatch.setattr(_launch, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    cfg = tk.GPU_CONFIGS["fwd"]
    tiles = -(-152064 // cfg.block_v)

    def plan(n):
        return tk.grid_plan(cfg, n, 152064, 3584, 3584, True, True, torch.bfloat16, cuda)

    # Few rows (300 masked positions = 3 row blocks), huge V: splits fill whole waves.
    p = plan(300)
    assert p.row_blocks * p.splits >= 132 and p.splits <= tiles
    assert p.programs % 132 == 0 or p.waves >= 4, p
    # Many rows: the split count keeps the last wave nearly full.
    p = plan(8192)
    assert p.row_blocks * p.splits / (p.waves * 132) > 0.95, p
    # Never more splits than tiles.
    assert tk.grid_plan(cfg, 1, 300, 64, 64, True, True, torch.bfloat16, cuda).splits == 3


# --------------------------------------------------------------------------- first-use self-test


@needs_triton
def test_self_test_passes():
    """The first-use self-test (``triton_kl._self_test``: forward, backward, kept logits; bf16
    and fp16; LoRA, trained shared head, separate, log-prob) passes: in the patched interpreter
    here, on the GPU in a GPU session."""
    assert triton_kl._self_test(torch.device(DEV)) is None


@needs_triton
@pytest.mark.parametrize("path,named", [
    ("fp16 forward", "float16 (n=33, d=96, v=515) forward lse"),
    ("LoRA backward", "LoRA frozen-ref (n=40, d=528, v=1003) backward dh"),
    ("kept logits", "separate bfloat16 (n=70, d=64, v=301) kept-logit backward dw"),
    ("jacobians", "logprob float16 (n=9, d=32, v=77) jacobian lp"),
])  # fmt: skip
def test_self_test_names_what_failed(monkeypatch, path, named):
    """A kernel wrong only for fp16 forwards, only for LoRA backwards, only for the gradients
    from kept logits with a separate reference, or only for log-prob jacobians makes the
    self-test fail, naming the case and the statistic."""
    tk = triton_kl
    fwd0, bwd0 = tk.forward, tk.backward
    held0, jac0 = tk.forward_with_grads, tk.forward_with_jacobians

    def forward(h, *a, **kw):
        out = fwd0(h, *a, **kw)
        return out._replace(lse=out.lse + 1.0) if h.dtype == torch.float16 else out

    def backward(*a, **kw):
        out = bwd0(*a, **kw)
        lora = a[3] is None and not a[7].w  # shared weight, head not trained
        return out._replace(dh=out.dh * 1.5) if lora else out

    def held(h, hr, w, wr, *a, **kw):
        stats, grads = held0(h, hr, w, wr, *a, **kw)
        return stats, (grads._replace(dw=-grads.dw) if wr is not None else grads)

    def jacobians(h, hr, *a, **kw):
        stats, jac = jac0(h, hr, *a, **kw)
        return stats, (jac._replace(lp=jac.lp * 0.5) if hr is None else jac)

    monkeypatch.setattr(tk, {"fp16 forward": "forward", "LoRA backward": "backward",
                             "kept logits": "forward_with_grads",
                             "jacobians": "forward_with_jacobians"}[path],
                        {"fp16 forward": forward, "LoRA backward": backward,
                         "kept logits": held, "jacobians": jacobians}[path])  # fmt: skip
    fail = tk._self_test(torch.device(DEV))
    assert fail is not None and named in fail, fail


def test_probe_runs_the_self_test_once_on_a_gpu(monkeypatch):
    """On a GPU, ``probe`` runs the self-test once and keeps the answer: a failure makes impl
    'triton' unavailable with the failure in the reason (auto-selection then skips it);
    FGPO_TRITON_SELFTEST=0 skips the test."""
    pytest.importorskip("triton")
    from fgpo_kernels import triton_kl as tk

    calls = []
    monkeypatch.setattr(tk, "_PROBE", None)
    monkeypatch.setattr(tk, "_old_interpreter", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(tk, "_self_test", lambda: calls.append(1) or "shared bf16 forward lse")
    monkeypatch.delenv("FGPO_TRITON_SELFTEST", raising=False)
    st = tk.probe()
    assert not st["available"] and "self-test FAILED: shared bf16 forward lse" in st["reason"]
    assert "NVIDIA H200" in st["reason"]
    assert tk.probe() is st and calls == [1]  # kept
    ok, why = _registry._usable_on("triton", torch.device("cuda"))
    assert not ok and "self-test FAILED" in why
    monkeypatch.setattr(tk, "_PROBE", None)
    monkeypatch.setenv("FGPO_TRITON_SELFTEST", "0")
    st = tk.probe()
    assert st["available"] and calls == [1], st
