"""The CUDA extension without a GPU: it builds for sm_80 and sm_90a, ptxas spills nothing, the
SASS holds tensor-core instructions (HMMA; HGMMA m64n128k16 in the sm_90a forward, with no
serialization ptxas had to add), and ``fgpo_kernels._C`` imports on a CPU-only machine.

One fresh build (``csrc.build.build_module`` with ptxas reports, archs "80;90a") is made per test
session into a temporary folder; the installed module is checked separately. Everything skips
with a reason when nvcc (or cuobjdump) is not present.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csrc import build as cbuild  # noqa: E402

KERNELS = ("fgpo_fwd_kernel", "fgpo_bwd_kernel", "fgpo_merge_kernel")
MMA_KERNELS = ("fgpo_fwd_kernel", "fgpo_bwd_kernel")


def _tool(name: str) -> str | None:
    """cuobjdump/nvdisasm: the CUDA toolkit's, else the copy shipped in the triton wheel."""
    nvcc = cbuild.find_nvcc()
    cands = []
    if nvcc:
        cands.append(Path(nvcc).resolve().parent / name)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "bin" / name)
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        cands.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name)
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which(name)


@pytest.fixture(scope="session")
def fresh_build(tmp_path_factory):
    """(path of a freshly built _C for archs 80;90a, combined compiler output with ptxas -v)."""
    if cbuild.find_nvcc() is None:
        pytest.skip("nvcc not found: the CUDA extension cannot be built here")
    out_dir = tmp_path_factory.mktemp("cuda_build")
    so = out_dir / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    log = cbuild.build_module(so, out_dir / "obj", archs="80;90a", verbose_ptxas=True)
    assert so.is_file()
    return so, log


@pytest.fixture(scope="session")
def cuobjdump():
    tool = _tool("cuobjdump")
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or the triton wheel ships it)")
    return tool


def _run(argv) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, f"{argv[0]} failed: {proc.stderr[-2000:]}"
    return proc.stdout


def test_arch_flags_default_and_validation():
    flags, names = cbuild.arch_flags("80;90")
    assert names == ["80", "90"]
    text = " ".join(flags)
    assert "arch=compute_80,code=sm_80" in text and "arch=compute_90,code=sm_90" in text
    assert "code=compute_90" in text  # PTX for the newest
    assert "code=compute_80" not in text
    _, names = cbuild.arch_flags("sm_90a, 80")
    assert names == ["80", "90a"]
    for bad in ("75", "x", ""):
        with pytest.raises(cbuild.CudaBuildError):
            cbuild.arch_flags(bad)


def test_default_archs_follow_the_nvcc_version(monkeypatch, tmp_path):
    """sm_90a (the wgmma forward, -DFGPO_WGMMA) by default; an nvcc older than 12.0 has no sm_90a,
    so its default build is 80;90 without the wgmma forward rather than a failed build."""
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 11.8, V11.8.89'\n")
    fake.chmod(0o755)
    assert cbuild.nvcc_version(str(fake)) == (11, 8)
    monkeypatch.delenv("FGPO_CUDA_ARCHS", raising=False)
    for version, arch, wgmma in (((13, 0), "sm_90a", True), ((11, 8), "sm_90", False)):
        monkeypatch.setattr(cbuild, "nvcc_version", lambda nvcc, v=version: v)
        argv = [a for c in cbuild.compile_commands("nvcc", tmp_path) for a in c[2]]
        assert f"arch=compute_{arch[3:]},code={arch}" in argv, argv
        assert ("-DFGPO_WGMMA=1" in argv) == wgmma, argv
    monkeypatch.setenv("FGPO_CUDA_ARCHS", "90a")  # an explicit choice is kept, whatever nvcc
    argv = [a for c in cbuild.compile_commands("nvcc", tmp_path) for a in c[2]]
    assert "arch=compute_90a,code=sm_90a" in argv and "arch=compute_80,code=sm_80" not in argv


def test_build_mode_env(monkeypatch):
    for raw, want in (("auto", "auto"), ("1", "1"), ("0", "0"), ("", "auto"), ("off", "0")):
        monkeypatch.setenv("FGPO_BUILD_CUDA", raw)
        assert cbuild.build_mode() == want
    monkeypatch.setenv("FGPO_BUILD_CUDA", "maybe")
    with pytest.raises(cbuild.CudaBuildError, match="FGPO_BUILD_CUDA"):
        cbuild.build_mode()


def test_setup_skips_cleanly_without_nvcc(monkeypatch, capsys):
    monkeypatch.setenv("FGPO_BUILD_CUDA", "auto")
    monkeypatch.setattr(cbuild, "find_nvcc", lambda: None)
    assert cbuild.cuda_extension_setup() == ([], {})
    assert "skipping the CUDA extension" in capsys.readouterr().err
    monkeypatch.setenv("FGPO_BUILD_CUDA", "1")
    with pytest.raises(cbuild.CudaBuildError, match="nvcc"):
        cbuild.cuda_extension_setup()
    monkeypatch.setenv("FGPO_BUILD_CUDA", "0")
    assert cbuild.cuda_extension_setup() == ([], {})


def _ptxas_reports(log: str) -> dict:
    """{(function, arch): (stack, spill stores, spill loads, registers)} from ptxas -v output."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            cur = (m.group(1), m.group(2))
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill", line)
        if m and cur:
            out[cur] = tuple(int(x) for x in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m and cur in out:
            out[cur] = (*out[cur][:3], int(m.group(1)))
    return out


def test_ptxas_no_spills_for_shipped_kernels(fresh_build):
    _, log = fresh_build
    reps = _ptxas_reports(log)
    for arch in ("sm_80", "sm_90a"):
        for k in KERNELS:
            found = [f for (f, a) in reps if a == arch and k in f]
            assert len(found) >= 2, f"no ptxas report for {k} on {arch}:\n{log[-3000:]}"
    for (fn, arch), rep in reps.items():
        stack, stores, loads = rep[:3]
        assert (stack, stores, loads) == (0, 0, 0), f"{fn} ({arch}): {rep}"


def test_fatbin_has_sm80_sm90_and_ptx(fresh_build, cuobjdump):
    so, _ = fresh_build
    elves = _run([cuobjdump, "-lelf", str(so)])
    assert "sm_80" in elves and "sm_90" in elves, elves
    ptx = _run([cuobjdump, "-lptx", str(so)])
    assert "sm_90" in ptx or "compute_90" in ptx, ptx


def test_cp_async_carries_l2_hints(fresh_build, cuobjdump):
    """Every cp.async of the shipped kernels carries an L2 cache policy (csrc/kernels.cuh
    L2Hint): evict_last for hidden states, evict_first for weights. The launch plan's L2 working
    set (fgpo_kernels/_launch.py cuda_plan_inputs) counts only the in-flight W slices because
    of it; a plain cp.async would hold whole W tiles and overflow L2/2."""
    so, _ = fresh_build
    ptx = _run([cuobjdump, "-ptx", str(so)])
    copies = re.findall(r"cp\.async\.cg\.shared\.global\S*", ptx)
    assert copies and set(copies) == {"cp.async.cg.shared.global.L2::cache_hint"}, set(copies)
    for policy in ("evict_last", "evict_first"):
        assert f"createpolicy.fractional.L2::{policy}.b64" in ptx, policy


def test_resource_usage_no_local_memory(fresh_build, cuobjdump):
    so, _ = fresh_build
    usage = _run([cuobjdump, "-res-usage", str(so)])
    seen = 0
    for fn, stats in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage):
        if "fgpo" not in fn:
            continue
        seen += 1
        stack = int(re.search(r"STACK:(\d+)", stats).group(1))
        local = int(re.search(r"LOCAL:(\d+)", stats).group(1))
        assert stack == 0 and local == 0, f"{fn}: {stats}"
    assert seen >= 2 * 6, usage[-2000:]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_sass_has_tensor_core_mma(fresh_build, cuobjdump, arch):
    so, _ = fresh_build
    sass = _run([cuobjdump, "-sass", "-arch", arch, str(so)])
    # Split the listing per function and check each mma kernel instantiation.
    parts = re.split(r"\n\s*Function : ", sass)
    checked = 0
    for part in parts[1:]:
        name = part.split("\n", 1)[0].strip()
        if not any(k in name for k in MMA_KERNELS):
            continue
        checked += 1
        has_mma = re.search(r"\bHMMA\.16816\.F32(\.BF16)?\b", part) or "HGMMA" in part
        assert has_mma, f"{arch} {name}: no HMMA/HGMMA in SASS"
        assert "LDSM" in part, f"{arch} {name}: no ldmatrix (LDSM)"
        assert "LDGSTS" in part, f"{arch} {name}: no cp.async (LDGSTS)"
        assert "STL" not in part and "LDL" not in part, f"{arch} {name}: local memory traffic"
        if "bwd" in name:
            assert re.search(r"\bRED(G)?\.E\.ADD\.F32", part), f"{arch} {name}: no fp32 red.add"
    assert checked == 8, f"expected 8 mma kernel instantiations on {arch}, saw {checked}"
    bf16 = re.search(r"HMMA\.16816\.F32\.BF16", sass)
    f16 = re.search(r"HMMA\.16816\.F32\s", sass)
    assert bf16 and f16, f"{arch}: both the bf16 and the fp16 mma must be present"


def _functions(sass: str) -> dict[str, str]:
    """{function name: its SASS} of a cuobjdump -sass listing."""
    parts = re.split(r"\n\s*Function : ", sass)
    return {p.split("\n", 1)[0].strip(): p for p in parts[1:]}


def test_wgmma_forward_sass(fresh_build, cuobjdump):
    """The sm_90a forward (csrc/fwd_wgmma.cuh): every instantiation (bf16 / fp16; log-prob, KL
    with a shared or a separate weight) multiplies with HGMMA 64x128x16 straight from shared
    memory (no ldmatrix), fills it with cp.async, touches no local memory; ptxas neither
    serialized its wgmmas nor injected a wait or an arrive of its own, and each slice's products
    form one group (one WARPGROUP.ARRIVE and one HGMMA closing a group per product loop: a group
    per HGMMA would leave only the last one in flight at wait_group 1)."""
    so, log = fresh_build
    funcs = _functions(_run([cuobjdump, "-sass", "-arch", "sm_90a", str(so)]))
    wg = {n: f for n, f in funcs.items() if "fgpo_fwd_wgmma_kernel" in n}
    assert len(wg) == 6, list(funcs)
    for name, sass in wg.items():
        arrives = sass.count("WARPGROUP.ARRIVE")
        closing = len(re.findall(r"HGMMA\.64x128x16\S* [^;]*gsb0", sass))
        loops = 2 if "Lb1ELb0E" in name else 1  # separate weights: one product loop per model
        assert arrives == closing == loops, (name, arrives, closing)
        kind = r"\.BF16\b" if "bfloat16" in name else r"\s"  # fp16 operands: no suffix
        assert re.search(rf"HGMMA\.64x128x16\.F32{kind}", sass), f"{name}: no m64n128k16"
        assert "LDSM" not in sass and "LDGSTS" in sass, name
        assert "STL" not in sass and "LDL" not in sass, f"{name}: local memory traffic"
    for line in log.splitlines():
        if "fgpo_fwd_wgmma_kernel" in line:
            assert not re.search(r"C75\d\d|serializ", line), line
    # The sm_80 copies are empty (wgmma is sm_90a only) and never launched there.
    sm80 = _functions(_run([cuobjdump, "-sass", "-arch", "sm_80", str(so)]))
    assert all("HGMMA" not in f for f in sm80.values())


def test_installed_module_imports_without_gpu():
    spec = importlib.util.find_spec("fgpo_kernels._C")
    if spec is None:
        if cbuild.find_nvcc() is not None:
            pytest.fail("nvcc is present but fgpo_kernels._C was not installed (pip install -e .)")
        pytest.skip("fgpo_kernels._C not built (no nvcc)")
    mod = importlib.import_module("fgpo_kernels._C")
    if not os.environ.get("FGPO_CUDA_ARCHS"):
        assert set(mod.ARCHS.split(";")) >= {"80", "90a"} and mod.WGMMA, mod.ARCHS
    assert mod.BLOCK_ROWS == 128 and mod.BLOCK_VOCAB == 128
    assert 48 * 1024 < mod.SMEM_BYTES <= 163 * 1024  # opt-in fits sm_80 (A100) and sm_90
    count, why = mod.device_count()
    if not torch.cuda.is_available():
        assert count == 0 and why, "no GPU here: the runtime must say why it sees none"


def test_backend_status_reports_built_but_no_device():
    if importlib.util.find_spec("fgpo_kernels._C") is None:
        pytest.skip("fgpo_kernels._C not built")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present (see tests/test_cuda_gpu.py)")
    import fgpo_kernels as fk

    st = fk.backend_status()["cuda"]
    assert st["built"] is True and st["available"] is False
    # the user's terms: a CPU-only torch says so (not a driver message); a CUDA build: no device
    if torch.version.cuda is None:
        assert "CPU-only build" in st["reason"] and "driver" not in st["reason"], st
    else:
        assert "sees no CUDA device" in st["reason"], st


def test_binding_rejects_bad_arguments():
    """CHECK-style argument checks fire before any CUDA call (so they work without a GPU)."""
    if importlib.util.find_spec("fgpo_kernels._C") is None:
        pytest.skip("fgpo_kernels._C not built")
    mod = importlib.import_module("fgpo_kernels._C")
    ok = dict(h=4096, hr=0, w=8192, wr=0, n=3, d=16, dr=0, v=10, inv_t=1.0, dtype=0, splits=1,
              partial=64, lse=128, lser=0, fkl=0, rkl=0, stream=0)  # fmt: skip
    cases = [
        (dict(d=12), "d must be a positive multiple of 8"),
        (dict(h=4100), "h must be 16-byte aligned"),
        (dict(w=0), "w must be a device pointer"),
        (dict(dtype=5), "dtype"),
        (dict(n=0), "n \\(rows\\)"),
        (dict(splits=0), "splits"),
        (dict(inv_t=float("nan")), "inv_t"),
        (dict(hr=4096, dr=16), "lser must be a device pointer"),
        (dict(wr=4096), "wr given without hr"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            mod.fwd(**{**ok, **bad})
