"""The unmodified CUDA kernels (csrc/kernels.cuh), run on the CPU through csrc/emulate.h.

csrc/cpu_emulate.cpp + csrc/emulate.h run the kernel bodies with one OS thread per CUDA thread;
ldmatrix / mma.sync / shfl are computed from the PTX fragment layouts, bf16 and fp16. Linked with
csrc/binding.cpp into a stand-in for fgpo_kernels._C, they let the whole stack run here: public
API -> cuda_kl (padding, splits, pointers, custom ops) -> pybind11 argument checks -> launchers
(grids, split arithmetic) -> kernels. cp.async is asynchronous in the emulation: its destination
is NaN until the wait_group that retires it, so the kernels built with a wait moved (a read
before its data can have landed) must fail here, and they do (``test_misordered_copies_fail``).
"""

from __future__ import annotations

import ctypes
import math
import shutil

import pytest
import torch
from emulation import CSRC, build, emu_call, emu_case, load, plain_lib, rel
from helpers import kl_offset_case, kl_offset_errors


@pytest.fixture(scope="module")
def emu_ext(tmp_path_factory):
    import importlib.util
    import sysconfig

    pybind11 = pytest.importorskip("pybind11")
    out = tmp_path_factory.mktemp("emu") / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    flags = ['-DFGPO_ARCHS="cpu-emulation"', f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}"]  # fmt: skip
    build(CSRC, out, [CSRC / "binding.cpp", CSRC / "cpu_emulate.cpp"], flags).wait_ok()
    spec = importlib.util.spec_from_file_location("_C", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.ARCHS == "cpu-emulation"
    return mod


@pytest.fixture
def emulated_cuda(emu_ext, monkeypatch):
    """impl 'cuda' on CPU tensors, with the emulated kernels behind it."""
    import contextlib

    torch = pytest.importorskip("torch")
    from fgpo_kernels import _launch, _registry, cuda_kl

    monkeypatch.setattr(cuda_kl, "_C", emu_ext)
    monkeypatch.setattr(cuda_kl, "_check_device", lambda x: None)
    monkeypatch.setattr(cuda_kl, "_launch_context", lambda dev: (contextlib.nullcontext(), 0))
    monkeypatch.setattr(_launch, "sm_count", lambda dev: 2)
    monkeypatch.setenv("FGPO_CUDA_BWD", "cuda")  # the CUDA backward kernel, not triton's gblock
    usable = _registry._usable_on
    monkeypatch.setattr(
        _registry,
        "_usable_on",
        lambda name, dev: (True, "") if name == "cuda" else usable(name, dev),
    )
    return cuda_kl, torch


@pytest.mark.parametrize(
    "mode,n,d,dr,v,splits,temp,dtype",
    [
        ("shared", 70, 72, 72, 301, 3, 0.9, "bf16"),  # ragged rows and columns, K % 32 != 0
        ("separate", 137, 40, 56, 260, 0, 1.0, "bf16"),  # 2 row blocks, D per side, auto splits
        ("separate", 5, 45, 19, 65, 1, 1.3, "bf16"),  # D % 8 != 0: zero-padded copies
        ("logprob", 9, 24, 24, 77, 2, 0.7, "bf16"),
        ("shared", 70, 72, 72, 301, 3, 0.9, "fp16"),  # the second instantiation of each kernel
        ("separate", 5, 45, 19, 65, 1, 1.3, "fp16"),
        ("logprob", 9, 24, 24, 77, 2, 0.7, "fp16"),
    ],
)
def test_emulated_kernels_match_float64(emulated_cuda, mode, n, d, dr, v, splits, temp, dtype):
    cuda_kl, torch = emulated_cuda
    from fgpo_kernels import torch_impl
    from fgpo_kernels._backend import Needs, RowGrads, RowStats

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    h, hr, w, wr, gs = emu_case(torch, mode, n, d, dr, v, seed=n * v + d, dtype=dt)
    kl, sep = mode != "logprob", mode == "separate"
    got = cuda_kl.forward(h, hr, w, wr, temp, splits=splits)
    dbl = lambda x: None if x is None else x.double()
    ref = torch_impl.forward(dbl(h), dbl(hr), dbl(w), dbl(wr), temp)
    for name, a, b in zip(("lse", "lser", "fkl", "rkl"), got, ref):
        assert (a is None) == (b is None), name
        if b is None:
            continue
        assert a.dtype == torch.float32 and a.shape == (n,)
        tol = 1e-6 if name.startswith("lse") else 1e-4
        assert rel(torch, a, b) <= tol, (name, rel(torch, a, b))
    need = Needs(True, kl, True, sep)
    ref32 = RowStats(*(None if x is None else x.float() for x in ref))
    got_b = cuda_kl.backward(h, hr, w, wr, temp, ref32, RowGrads(*gs), need)
    ref_b = torch_impl.backward(dbl(h), dbl(hr), dbl(w), dbl(wr), temp, ref,
                                RowGrads(*(dbl(x) for x in gs)), need)  # fmt: skip
    for name, a, b in zip(("dh", "dhr", "dw", "dwr"), got_b, ref_b):
        assert (a is None) == (b is None), name
        if b is None:
            continue
        assert a.shape == b.shape and a.dtype == torch.float32, name
        # G is rounded to the input dtype before the two backward products (as the
        # materialized path does).
        assert rel(torch, a, b) <= 6e-3, (name, rel(torch, a, b))


@pytest.mark.parametrize("group", [1, 2])
def test_emulated_grouped_launch_order(emulated_cuda, monkeypatch, group):
    """A launch-order group smaller than the row blocks (3 row blocks of 128, groups of 1 or 2:
    a partial last group) covers every (row block, split / tile) exactly once: the same forward
    and backward as the float64 reference (csrc/launch.h grouped_pos), and both launchers hand
    _C the plan's group."""
    cuda_kl, torch = emulated_cuda
    from fgpo_kernels import _launch, torch_impl
    from fgpo_kernels._backend import Needs, RowGrads

    real = _launch.group_rows
    monkeypatch.setattr(_launch, "group_rows", lambda *a: (group, real(*a)[1]))
    seen = []

    class Ext:  # the extension, recording the group each launch is given
        def __getattr__(self, name):
            attr = getattr(ext, name)
            if name not in ("fwd", "bwd"):
                return attr
            return lambda *a, **kw: seen.append((name, kw["group"])) or attr(*a, **kw)

    ext = cuda_kl._C
    monkeypatch.setattr(cuda_kl, "_C", Ext())
    n, d, v = 300, 24, 400
    h, hr, w, wr, gs = emu_case(torch, "shared", n, d, d, v, seed=group)
    assert cuda_kl._plan(n, v, d, d, True, h.device, 2).group == group
    got = cuda_kl.forward(h, hr, w, wr, 1.0, splits=2)
    dbl = lambda x: None if x is None else x.double()
    ref = torch_impl.forward(dbl(h), dbl(hr), dbl(w), None, 1.0)
    for name, a, b in zip(("lse", "lser", "fkl", "rkl"), got, ref):
        assert rel(torch, a, b) <= 1e-4, (name, rel(torch, a, b))
    need = Needs(True, True, True, False)
    got_b = cuda_kl.backward(h, hr, w, wr, 1.0, got, RowGrads(*gs), need)
    ref_b = torch_impl.backward(dbl(h), dbl(hr), dbl(w), None, 1.0, ref,
                                RowGrads(*(dbl(x) for x in gs)), need)  # fmt: skip
    for name, a, b in zip(("dh", "dhr", "dw"), got_b, ref_b):
        assert rel(torch, a, b) <= 6e-3, (name, rel(torch, a, b))
    assert seen == [("fwd", group), ("bwd", group)], seen  # the plan's group reaches _C


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_emulated_gradient_subsets(emulated_cuda, mode):
    """need_* flags: only what is asked for comes back, equal to the full computation; D = 200
    spans 4 backward chunks (the LoRA path double-buffers them)."""
    cuda_kl, torch = emulated_cuda
    from fgpo_kernels._backend import Needs, RowGrads, RowStats

    sep = mode == "separate"
    h, hr, w, wr, gs = emu_case(torch, mode, 20, 200, 136, 150, seed=5)
    gs = RowGrads(*gs)
    stats = cuda_kl.forward(h, hr, w, wr, 1.0)
    full = cuda_kl.backward(h, hr, w, wr, 1.0, stats, gs, Needs(True, True, True, sep))
    lora = cuda_kl.backward(h, hr, w, wr, 1.0, stats, gs, Needs(True, True, False, False))
    only_w = cuda_kl.backward(h, hr, w, wr, 1.0, stats, gs, Needs(False, False, True, False))
    assert lora[2] is None and lora[3] is None
    assert only_w[0] is None and only_w[1] is None and only_w[3] is None
    for a, b in ((lora[0], full[0]), (lora[1], full[1]), (only_w[2], full[2])):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    dbl = lambda x: None if x is None else x.double()
    from fgpo_kernels import torch_impl

    ref = torch_impl.backward(dbl(h), dbl(hr), dbl(w), dbl(wr), 1.0,
                              RowStats(*(dbl(x) for x in stats)), RowGrads(*(dbl(x) for x in gs)),
                              Needs(True, True, False, False))  # fmt: skip
    assert rel(torch, lora[0], ref[0]) <= 6e-3 and rel(torch, lora[1], ref[1]) <= 6e-3


def test_emulated_public_api_within_2x_of_pytorch(emulated_cuda):
    """token_kl(impl="cuda") end to end (autograd, custom ops) vs the float64 definition: error
    within 2x of the materialized path run in bf16 (+ small atol), as docs/design.md §4 asks."""
    import math

    import fgpo_kernels as fk

    _, torch = emulated_cuda
    g = torch.Generator().manual_seed(11)
    lead, d, v = (3, 9), 40, 300
    h = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    hr = h + 0.3 * torch.randn(*lead, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * (3 / math.sqrt(d))
    tgt = torch.randint(0, v, lead, generator=g)
    tgt[0, :2] = -100
    mask = torch.where(torch.rand(lead, generator=g) < 0.3, 5.0, 1.0).double()
    mask[1, 3] = 0.0
    h, hr, w = (x.bfloat16() for x in (h, hr, w))

    def run(impl, dtype):
        hh, hhr, ww = (x.detach().to(dtype).clone().requires_grad_() for x in (h, hr, w))
        o = fk.token_kl(hh, hhr, ww, mask=mask, targets=tgt, temperature=0.8, impl=impl)
        (o.loss + 0.5 * o.policy_logps.sum() - 0.3 * o.ref_logps.sum()).backward()
        vals = {"loss": o.loss, "fkl": o.forward_kl, "rkl": o.reverse_kl, "lp": o.policy_logps,
                "lpr": o.ref_logps, "dh": hh.grad, "dhr": hhr.grad, "dw": ww.grad}  # fmt: skip
        return {k: x.detach().double() for k, x in vals.items()}

    ref = run("reference", torch.float64)
    low = run("reference", torch.bfloat16)
    got = run("cuda", torch.bfloat16)
    for k, r in ref.items():
        e, e0 = rel(torch, got[k], r), rel(torch, low[k], r)
        assert math.isfinite(e), k
        assert e <= 2 * e0 + 1e-3, f"{k}: {e:.3e} vs materialized bf16 {e0:.3e}"


# ---- the emulator itself: fp16 rounding, and asynchrony that catches mis-ordered copies


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    return load(plain_lib(tmp_path_factory.mktemp("emu_plain") / "emu.so").wait_ok())


def test_fp16_rounding_matches_torch(emu_lib):
    """The emulation's float -> fp16 (round to nearest even: ties, subnormals, overflow to inf,
    NaN) and fp16 -> float agree bit for bit with torch on every half and on tricky floats."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    back = torch.empty(1 << 16, dtype=torch.float32)
    emu_lib.fgpo_emu_from_half(bits.data_ptr(), back.data_ptr(), 1 << 16)
    want = bits.view(torch.float16).float()
    assert torch.equal(back.isnan(), want.isnan())
    assert torch.equal(back[~want.isnan()], want[~want.isnan()])
    halves = want[want.isfinite()]
    mids = (halves[:-1].double() + halves[1:].double()) / 2  # exact ties between neighbours
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        halves, mids.float(), torch.randn(20000, generator=g) * 10.0 ** torch.randint(
            -9, 6, (20000,), generator=g).float(),
        torch.tensor([65504.0, 65519.99, 65520.0, 1e6, float("inf"), -float("inf"),
                      float("nan"), 2.0**-24, 2.0**-25, 2.0**-25 * 1.5, 2.0**-26, -0.0]),
    ]).contiguous()  # fmt: skip
    got = torch.empty(x.numel(), dtype=torch.int16)
    emu_lib.fgpo_emu_to_half(x.data_ptr(), got.data_ptr(), x.numel())
    ref = x.half().view(torch.int16)
    nan = x.isnan()
    assert got[nan].view(torch.float16).isnan().all()
    bad = (got != ref) & ~nan
    assert not bad.any(), f"{int(bad.sum())} differ, first {x[bad][:4].tolist()}"


def _stats_and_grads(so, case, dtype_code: int, dw: bool):
    """Run the forward (KL, shared weight) and the backward through the plain library: dh, dhr
    and, with ``dw``, the weight gradient (else the LoRA path: W chunks ping-pong). Returns
    (stats, grads) float32."""
    h, hr, w, _, gs = case
    n, d = h.shape
    v = w.shape[0]
    f32 = lambda *s: torch.zeros(*s, dtype=torch.float32)
    splits = 2
    partial = f32(splits * 6 * n)
    stats = [f32(n) for _ in range(4)]
    emu_call(so, "fgpo_emu_fwd", h, hr, w, None, n, d, d, v, 1.0, dtype_code, splits, partial,
              *stats)  # fmt: skip
    grads = [f32(n, d), f32(n, d)] + ([f32(v, d)] if dw else [])
    emu_call(so, "fgpo_emu_bwd", h, hr, w, None, n, d, d, v, 1.0, dtype_code, *stats, *gs,
              *grads, *([] if dw else [None]), None)  # fmt: skip
    return stats, grads


@pytest.mark.parametrize("dw", [False, True], ids=["lora", "dw"])
def test_l2_hints_keep_hidden_states_and_stream_weights(emu_lib, dw):
    """Every byte the kernels read from h and hr carries the evict_last hint and every byte of
    w the evict_first one (forward, then the backward's recompute and its LoRA ping-pong or dW
    chunks): the launch plan's L2 working set (fgpo_kernels/_launch.py) assumes both."""
    case = emu_case(torch, "shared", 20, 136, 136, 129, seed=5)
    h, hr, w, _, _ = case
    names = ("h", "hr", "w")
    for slot, x in enumerate((h, hr, w)):
        assert emu_lib.fgpo_emu_watch(slot, x.data_ptr(), x.numel() * x.element_size()) == 0
    _stats_and_grads(emu_lib, case, 0, dw)
    read = {n: [emu_lib.fgpo_emu_watched(i, hint) for hint in (0, 1)] for i, n in enumerate(names)}
    for slot in range(3):
        emu_lib.fgpo_emu_watch(slot, None, 0)
    for name in ("h", "hr"):
        assert read[name][0] > 0 and read[name][1] == 0, (name, "keep/stream bytes", read)
    assert read["w"][0] == 0 and read["w"][1] > 0, ("w keep/stream bytes", read)
    # at least every byte once in the forward and once in the backward's recompute
    for name, x in zip(names, (h, hr, w)):
        assert sum(read[name]) >= 2 * x.numel() * x.element_size(), (name, read)


# (name, the exact text in csrc/kernels.cuh, its mis-ordered replacement, run with dW). Each
# moves or drops one wait so that a thread reads a cp.async destination before the group that
# fills it is retired, or exits with a group no wait retired.
_MISORDERED = [
    # main loop: wait for one group fewer, so slice kt is still in flight when it is read
    ("mainloop_wait", "cp_async_wait<STAGES - 2>();", "cp_async_wait<STAGES - 1>();", False),
    # LoRA backward ping-pong: chunk i is read while it may still be in flight
    (
        "lora_wait",
        "cp_async_wait<1>();  // chunk i has landed",
        "cp_async_wait<2>();  // not",
        False,
    ),
    # backward with dW: the chunks are multiplied out without waiting for them
    (
        "dw_wait",
        "    cp_async_commit();\n    cp_async_wait<0>();\n    __syncthreads();\n\n",
        "    cp_async_commit();\n    __syncthreads();\n\n",
        True,
    ),
    # LoRA backward: the final wait dropped, so the thread exits with its last (empty) group
    # unretired: harmless on a GPU while the group is empty, but the emulator holds every
    # kernel to retiring all its groups (a non-empty one would race with the next CTA)
    ("lora_final_wait", "    cp_async_wait<0>();\n    return;", "    return;", False),
]


@pytest.fixture(scope="module")
def misordered_libs(tmp_path_factory):
    """One plain library per entry of _MISORDERED, built from a mutated copy of csrc/ (all
    builds overlap)."""
    source = (CSRC / "kernels.cuh").read_text()
    builds = {}
    for name, text, wrong, _ in _MISORDERED:
        assert source.count(text) == 1, f"{name}: {text!r} is no longer in csrc/kernels.cuh once"
        d = tmp_path_factory.mktemp(name)
        src = d / "csrc"
        shutil.copytree(CSRC, src)
        (src / "kernels.cuh").write_text(source.replace(text, wrong))
        builds[name] = plain_lib(d / "emu.so", src)
    return {name: load(b.wait_ok()) for name, b in builds.items()}


@pytest.mark.parametrize("dtype_code", [0, 1], ids=["bf16", "fp16"])
def test_shipped_copies_are_ordered(emu_lib, dtype_code):
    """The shipped kernels under the asynchronous cp.async (D = 136: 5 slices through the
    3-stage ring, 3 LoRA backward chunks; 2 vocabulary tiles): finite and equal to float64."""
    from fgpo_kernels import torch_impl
    from fgpo_kernels._backend import Needs, RowGrads

    dt = (torch.bfloat16, torch.float16)[dtype_code]
    case = emu_case(torch, "shared", 20, 136, 136, 129, seed=3, dtype=dt)
    h, hr, w, _, gs = case
    dbl = lambda x: None if x is None else x.double()
    ref = torch_impl.forward(dbl(h), dbl(hr), dbl(w), None, 1.0)
    g64 = RowGrads(*(dbl(x) for x in gs))
    for dw in (False, True):
        stats, grads = _stats_and_grads(emu_lib, case, dtype_code, dw)
        for a, b in zip(stats, ref):
            assert torch.isfinite(a).all() and rel(torch, a, b) <= 1e-4
        need = Needs(True, True, dw, False)
        ref_b = torch_impl.backward(dbl(h), dbl(hr), dbl(w), None, 1.0, ref, g64, need)
        for a, b in zip(grads, ref_b):
            assert torch.isfinite(a).all() and rel(torch, a, b) <= 6e-3, (dw, rel(torch, a, b))


@pytest.mark.parametrize("name", [m[0] for m in _MISORDERED])
def test_misordered_copies_fail(misordered_libs, name):
    """Each mis-ordered variant must fail under the emulator: NaN where a copy was read early,
    or the launch's error for a group never retired. (With copies landing at issue, as the
    emulator had it before, none of them changes a result: checked for the first two.)"""
    case = emu_case(torch, "shared", 20, 136, 136, 129, seed=3)
    dw = next(m[3] for m in _MISORDERED if m[0] == name)
    try:
        stats, grads = _stats_and_grads(misordered_libs[name], case, 0, dw)
    except RuntimeError as exc:
        assert "cp.async" in str(exc), exc
        return
    finite = all(torch.isfinite(x).all() for x in (*stats, *grads))
    assert not finite, f"{name}: the mis-ordered kernel ran clean under the emulator"


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_emulated_kl_near_offset_30_within_2x_of_materialized(emulated_cuda, shared):
    """tests/test_kl_numerics.py for impl 'cuda': the inputs are exact in bf16, so the kernels
    see the same logits as the float64 definition; kl_finish groups lse - lser as
    (m - mr) + (log s - log sr)."""
    for seed in (0, 1):
        ef, er, mf, mr = kl_offset_errors("cuda", torch.bfloat16, kl_offset_case(seed, shared))
        assert ef <= 2 * mf and er <= 2 * mr, (
            f"cuda seed {seed}: fkl {ef:.2e} rkl {er:.2e} vs materialized fp32 fkl {mf:.2e} "
            f"rkl {mr:.2e}"
        )


# ---- the first-use self-test of a GPU (cuda_kl._self_test), run here on the emulated kernels


def test_self_test_passes_on_emulated_kernels(emulated_cuda, monkeypatch):
    """The self-test's fp16, D >= 520 and LoRA cases pass on the emulated kernels (its bf16
    cases are the shapes test_emulated_kernels_match_float64 runs; all of them cost a minute
    here, milliseconds on a GPU)."""
    cuda_kl, _ = emulated_cuda
    new = [c for c in cuda_kl.SELF_TEST_CASES if c[6] == torch.float16 or c[7] or c[2] >= 520]
    assert len(new) >= 2
    monkeypatch.setattr(cuda_kl, "SELF_TEST_CASES", tuple(new))
    assert cuda_kl._self_test(torch.device("cpu")) is None


class _Broken:
    """The emulated _C with one path's results poisoned (NaN written into its first output)."""

    def __init__(self, ext, path: str) -> None:
        self._ext, self._path = ext, path

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def fwd(self, *a, **kw):
        self._ext.fwd(*a, **kw)
        d, dtype, lse = a[5], a[9], a[12]
        if (self._path == "fp16" and dtype == 1) or (self._path == "large_d" and d >= 520):
            ctypes.c_float.from_address(lse).value = math.nan

    def bwd(self, *a, **kw):
        self._ext.bwd(*a, **kw)
        wr, dh, dhr, dw = a[3], a[18], a[19], a[20]
        if self._path == "lora" and wr == 0 and dhr != 0 and dw == 0 and dh != 0:
            ctypes.c_float.from_address(dh).value = math.nan


@pytest.mark.parametrize("path,named", [("fp16", "float16"), ("large_d", "d=520"),
                                        ("lora", "LoRA")])  # fmt: skip
def test_self_test_covers(emulated_cuda, emu_ext, monkeypatch, path, named):
    """A kernel broken only for fp16, only at D >= 520 (ring refills), or only on the LoRA
    backward (ping-pong W buffers) makes the self-test fail, naming the case."""
    cuda_kl, _ = emulated_cuda
    monkeypatch.setattr(cuda_kl, "_C", _Broken(emu_ext, path))
    fail = cuda_kl._self_test(torch.device("cpu"))
    assert fail is not None and named in fail, fail


def test_emulated_wgmma_forward_through_the_public_api(emulated_cuda, emu_ext, monkeypatch):
    """FGPO_CUDA_FWD=wgmma: impl 'cuda' launches the sm_90a forward (csrc/fwd_wgmma.cuh, emulated)
    with a plan for its 4-slice ring; token_kl's values and gradients match float64, and the
    first-use self-test's fp16 / D = 520 / LoRA cases pass on it."""
    cuda_kl, _ = emulated_cuda
    monkeypatch.setenv("FGPO_CUDA_FWD", "wgmma")
    launched = []

    class Spy:
        def __getattr__(self, name):
            return getattr(emu_ext, name)

        def fwd(self, *a, **kw):
            launched.append(kw.get("wgmma"))
            return emu_ext.fwd(*a, **kw)

    monkeypatch.setattr(cuda_kl, "_C", Spy())
    h, hr, w, _, _ = emu_case(torch, "shared", 70, 136, 136, 301, seed=11)
    tgt = torch.randint(0, 301, (70,))
    import fgpo_kernels as fk

    def run(impl, cast):
        x = cast(h).requires_grad_()
        out = fk.token_kl(x, cast(hr), cast(w), targets=tgt, temperature=0.9,
                          reduction="none", impl=impl)  # fmt: skip
        (out.loss.sum() + out.policy_logps.sum()).backward()
        return [*(t.double() for t in out[:4]), x.grad.double()]

    ref = run("reference", lambda t: t.detach().double())
    got = run("cuda", lambda t: t.detach())
    assert launched and all(launched), launched
    for name, a, b in zip(("loss", "fkl", "rkl", "logp", "dh"), got, ref):
        assert rel(torch, a, b) <= (6e-3 if name == "dh" else 1e-4), (name, rel(torch, a, b))
    new = [c for c in cuda_kl.SELF_TEST_CASES if c[6] == torch.float16 and (c[7] or c[2] >= 520)]
    assert new
    monkeypatch.setattr(cuda_kl, "SELF_TEST_CASES", tuple(new))
    launched.clear()
    assert cuda_kl._self_test(torch.device("cpu")) is None
    assert launched and all(launched), launched
