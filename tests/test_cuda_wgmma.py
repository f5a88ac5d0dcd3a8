"""The sm_90a forward (csrc/fwd_wgmma.cuh: wgmma.mma_async m64n128k16), run unmodified on the CPU.

The emulator (csrc/emulate.h) computes each thread's wgmma accumulators from the shared-memory
descriptors (K-major operands, no swizzle or a 128 / 64 / 32-byte one: the kernel uses 64; the
D fragment layout of the PTX ISA) and makes the instruction asynchronous: the accumulators read
NaN from mma_async to the wait_group that retires it, and the operands are read at issue and
again at that wait (a stage refilled in between fails the launch; so does a read of cp.async
data with no fence.proxy.async after its wait). Against float64 on odd shapes (ragged rows and
vocabulary, D not a multiple of 32, rings that wrap many times, several tiles per split so the
pipeline runs across tiles, separate D and Dr), bf16 and fp16; and mis-ordered variants that
must fail.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from emulation import CSRC, emu_call, emu_case, load, plain_lib, rel

from fgpo_kernels import torch_impl

MODES = {"shared": (True, True), "separate": (True, False), "logprob": (False, True)}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return load(plain_lib(tmp_path_factory.mktemp("emu_wgmma") / "emu.so").wait_ok())


def _forward(so, case, mode: str, splits: int, inv_t: float, dtype_code: int, wgmma: bool):
    """lse, lser, fkl, rkl (the last three None in log-prob mode) from fgpo_emu_fwd."""
    h, hr, w, wr, _ = case
    n, d = h.shape
    dr = hr.shape[1] if hr is not None else d
    kl = MODES[mode][0]
    f32 = lambda *s: torch.zeros(*s, dtype=torch.float32)
    partial = f32(max(splits, 1) * 6 * n + 64)
    stats = [f32(n) for _ in range(4 if kl else 1)]
    so.fgpo_emu_fwd_path(1 if wgmma else 0)
    try:
        emu_call(so, "fgpo_emu_fwd", h, hr, w, wr, n, d, dr, w.shape[0], inv_t, dtype_code,
                 splits, partial, *stats, *([None] * (4 - len(stats))))  # fmt: skip
    finally:
        so.fgpo_emu_fwd_path(0)
    return stats + [None] * (4 - len(stats))


@pytest.mark.parametrize(
    "mode,n,d,dr,v,splits,dtype_code",
    [
        ("shared", 70, 136, 136, 301, 1, 0),  # 5 slices: the 4-stage ring wraps; 3 tiles a split
        ("shared", 131, 72, 72, 260, 2, 1),  # 2 row blocks, ragged last one; fp16
        ("separate", 40, 40, 56, 200, 1, 0),  # D != Dr, neither a multiple of 32
        ("separate", 9, 24, 136, 129, 2, 1),
        ("logprob", 33, 104, 104, 385, 3, 0),
        ("logprob", 5, 8, 8, 65, 1, 1),  # one slice of 8 (zero-filled), one ragged tile
    ],
)
def test_wgmma_forward_matches_float64(lib, mode, n, d, dr, v, splits, dtype_code):
    dt = (torch.bfloat16, torch.float16)[dtype_code]
    case = emu_case(torch, mode, n, d, dr, v, seed=n + d + v, dtype=dt)
    h, hr, w, wr, _ = case
    dbl = lambda x: None if x is None else x.double()
    ref = torch_impl.forward(dbl(h), dbl(hr), dbl(w), dbl(wr), 0.8)
    got = _forward(lib, case, mode, splits, 1 / 0.8, dtype_code, wgmma=True)
    mma = _forward(lib, case, mode, splits, 1 / 0.8, dtype_code, wgmma=False)
    for name, a, m, b in zip(("lse", "lser", "fkl", "rkl"), got, mma, ref):
        if b is None:
            continue
        assert torch.isfinite(a).all(), name
        tol = 1e-6 if name.startswith("lse") else 1e-4
        assert rel(torch, a, b) <= tol, (name, rel(torch, a, b))
        # Same products, other summation order than the mma.sync kernel: fp32 rounding apart.
        assert rel(torch, a, m) <= tol, (name, rel(torch, a, m))


# (name, text in fwd_wgmma.cuh, mis-ordered replacement): each must fail under the emulator.
_MISORDERED = [
    # loads 3 slices ahead: the stage of slice q - 1 is refilled while its products may run
    ("refill_in_flight", "WG_AHEAD = WG_STAGES - 2;", "WG_AHEAD = WG_STAGES - 1;"),
    # multiplies slice q before its copies are waited for
    ("no_copy_wait", "cp_async_wait<WG_AHEAD - 1>();", "cp_async_wait<WG_AHEAD>();"),
    # reads the accumulators while the tile's last products are in flight
    ("no_final_wait", "wgmma_wait<0>();  // the tile's", "wgmma_wait<1>();  // the tile's"),
    # wgmma (async proxy) reads what cp.async (generic proxy) wrote with no proxy fence between
    ("no_proxy_fence", "    fence_proxy_async();\n", ""),
]


@pytest.fixture(scope="module")
def misordered(tmp_path_factory):
    source = (CSRC / "fwd_wgmma.cuh").read_text()
    builds = {}
    for name, text, wrong in _MISORDERED:
        assert source.count(text) == 1, f"{name}: {text!r} is no longer in fwd_wgmma.cuh once"
        d = tmp_path_factory.mktemp(name)
        shutil.copytree(CSRC, d / "csrc")
        (d / "csrc" / "fwd_wgmma.cuh").write_text(source.replace(text, wrong))
        builds[name] = plain_lib(d / "emu.so", d / "csrc")
    return {name: load(b.wait_ok()) for name, b in builds.items()}


@pytest.mark.parametrize("name", [m[0] for m in _MISORDERED])
def test_misordered_wgmma_fails(misordered, name):
    """A refill of a stage the tensor cores may still read, a product issued before its copies
    landed, an epilogue that reads accumulators still in flight, operands written by cp.async
    without the proxy fence: NaN or the launch's error."""
    case = emu_case(torch, "shared", 70, 136, 136, 301, seed=7)
    try:
        stats = _forward(misordered[name], case, "shared", 1, 1.0, 0, wgmma=True)
    except RuntimeError as exc:
        assert "wgmma" in str(exc), exc
        return
    assert not all(torch.isfinite(x).all() for x in stats), f"{name} ran clean"


# ---- which forward runs (cuda_kl.forward_path, env FGPO_CUDA_FWD) ------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """cuda_kl with a stand-in _C (WGMMA as given) on a pretend GPU of capability ``cap``."""
    import types

    from fgpo_kernels import cuda_kl

    def setup(wgmma: bool, cap: tuple[int, int]):
        ext = types.SimpleNamespace(WGMMA=wgmma, ARCHS="80;90a" if wgmma else "80;90",
                                    SMEM_BYTES=124928)  # fmt: skip
        monkeypatch.setattr(cuda_kl, "_C", ext)
        monkeypatch.setattr(cuda_kl, "_WGMMA_FAILED", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
        return cuda_kl

    return setup


@pytest.mark.parametrize(
    "env,wgmma,cap,want",
    [
        ("", True, (9, 0), "wgmma"),  # auto: H100/H200 with an sm_90a build
        ("auto", True, (8, 0), "mma"),  # A100
        ("", True, (10, 0), "mma"),  # wgmma is sm_90a only
        ("", False, (9, 0), "mma"),  # built without 90a
        ("mma", True, (9, 0), "mma"),
        ("wgmma", True, (9, 0), "wgmma"),
    ],
)
def test_forward_path(fake_gpu, monkeypatch, env, wgmma, cap, want):
    cuda_kl = fake_gpu(wgmma, cap)
    monkeypatch.setenv("FGPO_CUDA_FWD", env)
    assert cuda_kl.forward_path() == want
    assert cuda_kl.forward_path(torch.device("cpu")) == ("wgmma" if env == "wgmma" else "mma")


@pytest.mark.parametrize(
    "env,wgmma,cap,err,words",
    [
        ("tensorcore", True, (9, 0), ValueError, "FGPO_CUDA_FWD must be one of"),
        ("wgmma", False, (9, 0), RuntimeError, "without an sm_90a target"),
        ("wgmma", True, (8, 0), RuntimeError, "compute capability 9.0"),
    ],
)
def test_forward_path_errors_name_the_setting(fake_gpu, monkeypatch, env, wgmma, cap, err, words):
    cuda_kl = fake_gpu(wgmma, cap)
    monkeypatch.setenv("FGPO_CUDA_FWD", env)
    with pytest.raises(err, match=words):
        cuda_kl.forward_path()


def test_wgmma_failing_its_self_test_falls_back_to_mma(fake_gpu, monkeypatch):
    """On first use (probe) a wgmma forward that fails the self-test is dropped for the
    mma.sync one, which then has to pass it; the reason says so."""
    cuda_kl = fake_gpu(True, (9, 0))
    props = type("P", (), {"shared_memory_per_block_optin": 232448})()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: props)
    monkeypatch.setattr(cuda_kl, "_PROBE", None)
    monkeypatch.delenv("FGPO_CUDA_FWD", raising=False)
    monkeypatch.delenv("FGPO_CUDA_SELFTEST", raising=False)
    seen = []

    def self_test():
        seen.append(cuda_kl.forward_path())
        return "shared float16 (n=40) forward lse: rel err 0.9" if seen[-1] == "wgmma" else None

    monkeypatch.setattr(cuda_kl, "_self_test", self_test)
    got = cuda_kl.probe()
    assert seen == ["wgmma", "mma"] and got["available"], (seen, got)
    assert "forward: mma.sync; the wgmma forward failed its self-test" in got["reason"], got
    assert cuda_kl.forward_path() == "mma"
