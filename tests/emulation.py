"""Building and calling the CPU emulation of the CUDA kernels (csrc/emulate.h): g++ builds run
in the background, the plain library's extern "C" entry points through ctypes, and the random
cases the emulation tests share (tests/test_cuda_emulate.py, tests/test_cuda_wgmma.py)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


class Build:
    """A g++ run started in the background (several builds overlap on the two cores)."""

    def __init__(self, cmd: list[str], out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def wait_ok(self) -> Path:
        log, _ = self.proc.communicate()
        assert self.proc.returncode == 0, f"emulation build failed:\n{log[-4000:]}"
        return self.out


def build(src_dir: Path, out: Path, sources: list[Path], flags: list[str] = ()) -> Build:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    cmd = [cxx, "-O1", "-std=c++20", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror",
           "-Wno-unknown-pragmas", "-DFGPO_EMULATE=1", *flags, f"-I{src_dir}",
           *map(str, sources), "-o", str(out)]  # fmt: skip
    return Build(cmd, out)


def emu_case(torch, mode, n, d, dr, v, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    kl = mode != "logprob"
    h = rnd(n, d).to(dtype)
    hr = None
    if kl:
        hr = (h.double() + 0.3 * rnd(n, d) if mode == "shared" else rnd(n, dr)).to(dtype)
    w = (rnd(v, d) * 2 / d**0.5).to(dtype)
    wr = (rnd(v, dr) * 2 / dr**0.5).to(dtype) if mode == "separate" else None
    grads = [rnd(n).float() if (kl or k == 2) else None for k in range(4)]
    return h, hr, w, wr, grads


def rel(torch, a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def plain_lib(out: Path, src_dir: Path = CSRC) -> Build:
    """cpu_emulate.cpp alone (its extern "C" entry points, no pybind11: a fast build)."""
    return build(src_dir, out, [src_dir / "cpu_emulate.cpp"])


def load(path: Path):
    so = ctypes.CDLL(str(path))
    ptr, ll, f32, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_float, ctypes.c_int
    so.fgpo_emu_error.restype = ctypes.c_char_p
    so.fgpo_emu_fwd.argtypes = [ptr] * 4 + [ll] * 4 + [f32, i32, i32] + [ptr] * 5
    so.fgpo_emu_bwd.argtypes = [ptr] * 4 + [ll] * 4 + [f32, i32] + [ptr] * 12
    for fn in (so.fgpo_emu_to_half, so.fgpo_emu_from_half):
        fn.argtypes, fn.restype = [ptr, ptr, ll], None
    so.fgpo_emu_watch.argtypes = [i32, ptr, ll]
    so.fgpo_emu_watched.argtypes, so.fgpo_emu_watched.restype = [i32, i32], ll
    so.fgpo_emu_fwd_path.argtypes, so.fgpo_emu_fwd_path.restype = [i32], None
    return so


def emu_call(so, fn: str, *args) -> None:
    """so.fn(*args) with tensors passed as pointers; a nonzero return raises with the reason."""
    if getattr(so, fn)(*(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)):
        raise RuntimeError(so.fgpo_emu_error().decode())
