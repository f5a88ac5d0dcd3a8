"""Ahead-of-time compilation of every shipped Triton GPU configuration (``triton_kl.configs``)
for the architectures it serves (sm_80 / sm_90), no GPU needed, with the installed triton (CI:
3.7.1) and with the GPU machine's release (``OTHER_TRITON``, installed by pip on first use into
a cache folder; skipped, saying why, where pip cannot get it): every kernel variant
compiles (16-bit entries with bf16 and with fp16 inputs), nothing spills registers, 16-bit
inputs use tensor cores (mma / wgmma), and on sm_90 the widest wgmma instruction is the one the
table promises (m64n128k16 for the main forward, the forward that keeps its logits and the G
kernel), shared memory fits a block and ``per_sm`` programs fit an SM. Tile buffers (kept
logits, G) go as TMA descriptors on sm_90."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Kernel variants each configuration serves: the constexpr flags of the launches that use it.
_FWD_MODES = {
    "logprob": dict(HAS_REF=False, SHARED=True),
    "shared": dict(HAS_REF=True, SHARED=True),
    "separate": dict(HAS_REF=True, SHARED=False),
}
# The forward that also writes its logits (gradients in the forward, ``triton_kl/fused.py``).
_STORE_MODES = {f"{k}_store": k for k in _FWD_MODES}
_BWD_MODES = {  # (mode, DO_DH, DO_DW, DO_DHR, DO_DWR)
    "logprob_full": ("logprob", True, True, False, False),
    "logprob_lora": ("logprob", True, False, False, False),
    "shared_lora": ("shared", True, False, False, False),
    "shared_full": ("shared", True, True, True, False),
    "separate_policy": ("separate", True, True, False, False),
    "separate_full": ("separate", True, True, True, True),
}
_G_MODES = {  # gblock G kernel: (mode, DO_G, DO_GR, FROM_LOGITS)
    "logprob": ("logprob", True, False, False),
    "shared_lora": ("shared", True, False, False),
    "shared_ref": ("shared", False, True, False),
    "shared_full": ("shared", True, True, False),
    "separate_policy": ("separate", True, False, False),
    "separate_ref": ("separate", False, True, False),
    "separate_full": ("separate", True, True, False),
    # G from the logits the forward kept (fused.py): the jacobians and the trained head.
    "logprob_held": ("logprob", True, False, True),
    "shared_lora_held": ("shared", True, False, True),
    "shared_full_held": ("shared", True, True, True),
    "separate_full_held": ("separate", True, True, True),
}
# "g" (128 x 128) serves sm_90 launches that write one of G / Gr from recomputed logits (or a
# log-prob G from kept ones); "g_both" (64 x 128, sm_90) those that write G and Gr from
# recomputed logits; "g_narrow" everything (tails of "g_both" chunks, kept logits with a
# reference, every gblock launch on sm_80).
_G_ONE = tuple(k for k, (m, g, gr, held) in _G_MODES.items()
               if not (g and gr) and not (held and m != "logprob"))  # fmt: skip
_G_BOTH = tuple(k for k, (m, g, gr, held) in _G_MODES.items() if g and gr and not held)
_SHIPPED = {  # config name -> (dtype, kernel, variants, widest wgmma on sm_90 or None)
    "fwd": ("bf16", "fwd", tuple(_FWD_MODES), "m64n128k16"),
    "fwd_sm80": ("bf16", "fwd", tuple(_FWD_MODES), None),
    "fwd_store": ("bf16", "fwd", tuple(_STORE_MODES), "m64n128k16"),
    "fwd_store_sm80": ("bf16", "fwd", tuple(_STORE_MODES), None),
    "bwd": ("bf16", "bwd", tuple(_BWD_MODES), "m64n64k16"),
    "fwd_fp32": ("fp32", "fwd", ("shared", "separate", "shared_store", "separate_store"), None),
    "fwd_fp32_logprob": ("fp32", "fwd", ("logprob", "logprob_store"), None),
    "bwd_fp32": ("fp32", "bwd", tuple(_BWD_MODES), None),
    "g": ("bf16", "g", _G_ONE, "m64n128k16"),
    "g_both": ("bf16", "g", _G_BOTH, "m64n128k16"),
    "g_narrow": ("bf16", "g", tuple(_G_MODES), "m64n64k16"),
    "g_fp32": ("fp32", "g", tuple(_G_MODES), None),
}


def _archs(config: str) -> tuple[int, ...]:
    from fgpo_kernels.triton_kl import configs

    if config in configs.SM90_ONLY:
        return (90,)
    return (80,) if config in configs.SM80_ONLY else (80, 90)


# sm_90 resources per SM and per block (CUDA programming guide, compute capability 9.0).
_SM90_REGS, _SM90_SMEM, _SM90_SMEM_BLOCK, _SM90_SMEM_RESERVED = 65536, 233472, 232448, 1024


def _resident(regs: int, warps: int, smem: int) -> int:
    """Programs one sm_90 SM holds: registers (allocated per warp in units of 256) and shared
    memory (1 KB reserved per block), at most 32 blocks."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = _SM90_REGS // (per_warp * warps)
    by_smem = _SM90_SMEM // (smem + _SM90_SMEM_RESERVED) if smem else 32
    return min(by_regs, by_smem, 32)


def _aot_worker(jobs_json: str) -> None:
    """Compile kernels for a GPU target; prints one JSON line per job.

    Runs in a fresh Python without TRITON_INTERPRET: a process whose triton was imported in
    interpreter mode has interpreter versions of triton's own standard library and cannot
    generate code. Self-contained (its source is sent to ``python -c``)."""
    import json
    import os
    import re
    import subprocess
    import tempfile
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fgpo_kernels.triton_kl import bwd_atomic, bwd_gblock, configs, fwd

    kernels = {"fwd": fwd._fwd_kernel, "bwd": bwd_atomic._bwd_kernel, "g": bwd_gblock._g_kernel,
               "g_aligned": bwd_gblock._g_kernel_aligned}  # fmt: skip
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for job in json.loads(jobs_json):
        cfg = configs.KernelConfig(*job["tiles"])
        aligned_g = job["kernel"] == "g" and "chunk_v" in job.get("aligned", ())
        kernel = kernels["g_aligned" if aligned_g else job["kernel"]]
        consts = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d)
        consts.update(job["flags"])
        # Tile buffers go as TMA descriptors where the launcher passes them (configs.tma_tiles:
        # sm_90; the forward's only when it keeps logits, the G kernel's z only from logits).
        tma = job["arch"] >= 90
        desc = {"g_out": tma, "gr_out": tma, "z_in": tma and consts.get("FROM_LOGITS", False)}
        desc["z_out"] = tma and consts.get("STORE_LOGITS", False)
        desc.update(zr_in=desc["z_in"], zr_out=desc["z_out"])
        if "TMA" in kernel.arg_names:
            consts["TMA"] = desc["g_out"] if job["kernel"] == "g" else desc["z_out"]
        sig, attrs = {}, {}
        for i, name in enumerate(kernel.arg_names):
            tile_dtype = job["dtype"] if name.startswith("g") else "fp32"
            if name in consts:
                sig[name] = "constexpr"
            elif desc.get(name):
                sig[name] = f"tensordesc<{tile_dtype}[{cfg.block_n}, {cfg.block_v}]>"
            elif name in desc:
                sig[name] = "*" + tile_dtype
            elif name in ("h_ptr", "hr_ptr", "w_ptr", "wr_ptr"):
                sig[name] = "*" + job["dtype"]
            elif name.endswith("_ptr"):
                sig[name] = "*fp32"
            elif name == "inv_t":
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
            # What the launcher specializes for 16-byte aligned tensors with D % 16 == 0 (the
            # SPEC shape; without it the loads cannot be vectorized and nothing is pipelined).
            pointer = name.endswith("_ptr") or (name in desc and not desc[name])
            aligned = name in job.get("aligned", ())  # ints the launcher keeps % 16 == 0
            if pointer or aligned or name.startswith("stride") or name in ("D", "DR"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        ints = [n for n in kernel.arg_names if sig[n] == "i32"]
        int_aligned = [n for i, n in enumerate(kernel.arg_names) if n in ints and (i,) in attrs]
        unknown = sorted(set(consts) - set(kernel.arg_names))
        # A constexpr the job does not set would compile as a runtime int (another kernel).
        unknown += sorted(p.name for p in kernel.params if p.is_constexpr and p.name not in consts)
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        started = time.perf_counter()
        k = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=opts)
        seconds = time.perf_counter() - started  # what a first launch on a GPU pays, about
        ptx, cubin = k.asm["ptx"], k.asm["cubin"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            out = subprocess.run(
                [tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True
            ).stdout
        usage = {key: int(v) for key, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}
        result = dict(job, usage=usage, unknown_constexprs=unknown, cubin_bytes=len(cubin))
        result["compile_s"] = round(seconds, 2)
        result["target_ok"] = f".target sm_{job['arch']}" in ptx
        result["wgmma"] = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\w+?)\.", ptx)))
        result["mma_sync"] = "mma.sync" in ptx
        # Flattened loop nest (KernelConfig.flatten): a compiled scf.for with no loop inside it
        # that both issues async copies and runs the epilogue's exponentials. Unflattened, the
        # D loop copies (no exp) and the tile loop around it holds the exp and that loop.
        lines, flat = k.asm["ttgir"].splitlines(), False
        for i, line in enumerate(lines):
            if " scf.for " not in line:
                continue
            depth, body = 0, []
            for inner in lines[i:]:
                depth += inner.count("{") - inner.count("}")
                body.append(inner)
                if depth <= 0:
                    break
            text = "\n".join(body[1:])
            copies = "async_copy_global_to_local" in text or "async_tma_copy" in text
            flat |= " scf.for " not in text and copies and "math.exp" in text
        result["flat"] = flat
        result["shared"] = int(k.metadata.shared)
        dns = getattr(kernel, "do_not_specialize", [])
        result["not_specialized"] = [kernel.arg_names[x] if isinstance(x, int) else str(x)
                                     for x in dns]  # fmt: skip
        result["ints"], result["int_aligned"] = ints, int_aligned
        print("AOT " + json.dumps(result), flush=True)


def _aligned(config: str, kernel: str) -> tuple[str, ...]:
    """Int arguments compiled as multiples of 16, as the launcher guarantees them (triton
    specializes such values): every G launch starts at a multiple of 16 columns (``v0``: chunks
    start at multiples of their width, a multiple of BLOCK_V, tails at a multiple of 16), and
    ``configs.g_launches`` hands an entry of ``G_ALIGNED`` only widths (``chunk_v``) that are
    multiples of 16 (its tiles spill otherwise). Other widths stay unspecialized."""
    from fgpo_kernels.triton_kl import configs

    if kernel != "g":
        return ()
    return ("v0", "chunk_v") if config.split(":")[0] in configs.G_ALIGNED else ("v0",)


def _alternatives() -> dict:
    """``benchmarks/gpu_tiles.py``'s candidate tiles, compiled like the shipped entries (a GPU
    session times them; one that spilled would waste its minutes): "tiles:<kernel>:<i>" ->
    (config, kernel, variants the session launches, widest wgmma)."""
    from benchmarks import gpu_tiles

    variants = {"fwd": ("shared", "separate"), "g": ("shared_lora", "separate_policy")}
    return {f"tiles:{kernel}:{i}": (cfg, kernel, variants[kernel], "m64n128k16")
            for kernel, cfgs in gpu_tiles.ALTERNATIVES.items()
            for i, cfg in enumerate(cfgs)}  # fmt: skip


def _jobs() -> list:
    from fgpo_kernels.triton_kl import configs

    jobs = []
    entries = [(name, configs.GPU_CONFIGS[name], dtype, kernel, variants, _archs(name))
               for name, (dtype, kernel, variants, _shape) in _SHIPPED.items()]  # fmt: skip
    entries += [(name, cfg, "bf16", kernel, variants, (90,))
                for name, (cfg, kernel, variants, _shape) in _alternatives().items()]  # fmt: skip
    # fp16 runs the same 16-bit entries (other dot instructions, other conversions)
    entries += [(f"{name}:fp16", configs.GPU_CONFIGS[name], "fp16", kernel, variants,
                 _archs(name))
                for name, (dtype, kernel, variants, _shape) in _SHIPPED.items()
                if dtype == "bf16"]  # fmt: skip
    for config, cfg, dtype, kernel, variants, archs in entries:
        for arch in archs:
            prec = "ieee" if dtype == "fp32" else "tf32"
            for variant in variants:
                if kernel == "fwd":
                    mode = _STORE_MODES.get(variant, variant)
                    flags = dict(_FWD_MODES[mode], STORE_LOGITS=variant in _STORE_MODES)
                    flags["FLATTEN"] = cfg.flatten
                elif kernel == "g":
                    mode, do_g, do_gr, held = _G_MODES[variant]
                    flags = dict(_FWD_MODES[mode], DO_G=do_g, DO_GR=do_gr, FROM_LOGITS=held,
                                 FLATTEN=cfg.flatten)  # fmt: skip
                else:
                    mode, dh, dw, dhr, dwr = _BWD_MODES[variant]
                    flags = dict(_FWD_MODES[mode], DO_DH=dh, DO_DW=dw, DO_DHR=dhr, DO_DWR=dwr)
                flags.update(PREC=prec, PREC_R=prec)
                jobs.append(dict(arch=arch, config=config, dtype=dtype, kernel=kernel,
                                 variant=variant, flags=flags, tiles=list(cfg),
                                 aligned=_aligned(config, kernel)))  # fmt: skip
    return jobs


def _have_nvidia_backend() -> bool:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception:
        return False
    root = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(root, t)) for t in ("ptxas", "cuobjdump"))


# The triton release of the GPU machine (benchmarks/gpu_session.sh runs there): every shipped
# config must compile without spills with it too. FGPO_AOT_TRITON_DIR: where it is installed
# (default: a folder in the temp directory, reused by later runs).
OTHER_TRITON = "3.6.0"


def _triton_folder(version: str) -> Path:
    """A folder holding triton ``version`` alone (``pip install --target``, no dependencies),
    made once; skips the caller with pip's reason when it cannot be installed (offline)."""
    base = os.environ.get("FGPO_AOT_TRITON_DIR") or os.path.join(tempfile.gettempdir(),
                                                                  "fgpo-aot-triton")  # fmt: skip
    folder = Path(base) / version
    if (folder / "triton" / "__init__.py").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{version}.part{os.getpid()}")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
         f"triton=={version}"], capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if proc.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"pip could not install triton {version}: {proc.stderr.strip()[-400:]}")
    try:
        tmp.rename(folder)  # atomic: a half-installed folder is never used
    except OSError:  # another run installed it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@pytest.fixture(scope="module", params=["installed", OTHER_TRITON])
def aot_results(request):
    """(triton version, {(config, arch): results}): every (config, variant, arch) compiled once,
    in one subprocess, with the installed triton or with ``OTHER_TRITON``."""
    if not _have_nvidia_backend():
        pytest.skip("triton's NVIDIA backend tools not found")
    code = inspect.getsource(_aot_worker) + f"\n_aot_worker({json.dumps(_jobs())!r})\n"
    code += "import triton\nprint('TRITON ' + triton.__version__)\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if request.param != "installed":
        paths = [str(_triton_folder(request.param)), root, env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"AOT compilation failed:\n{proc.stderr[-6000:]}"
    out, version = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("AOT "):
            r = json.loads(line[4:])
            out.setdefault((r["config"], r["arch"]), []).append(r)
        elif line.startswith("TRITON "):
            version = line.split()[1]
    if request.param != "installed":
        assert version == request.param, f"compiled with triton {version}, not {request.param}"
    return version, out


@pytest.mark.skipif(not _have_nvidia_backend(), reason="triton's NVIDIA backend tools not found")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("config_name", list(_SHIPPED))
def test_aot_compile_shipped_configs(aot_results, config_name, arch):
    """Every variant of a shipped config: compiles, no spills, tensor cores; on sm_90 the wgmma
    instruction shape the table promises, shared memory within a block's limit, and exactly
    ``per_sm`` programs resident per SM (what the launch plan sizes waves with)."""
    from fgpo_kernels import triton_kl as tk

    assert set(_SHIPPED) == set(tk.GPU_CONFIGS), "every shipped config must be compiled here"
    cfg = tk.GPU_CONFIGS[config_name]
    if arch not in _archs(config_name):
        pytest.skip(f"{config_name} serves sm_{_archs(config_name)[0]} only")
    version, by_config = aot_results
    results = by_config.get((config_name, arch), [])
    job_kernel, variants, shape = _SHIPPED[config_name][1:]
    assert not cfg.flatten or (job_kernel in ("fwd", "g") and cfg.num_stages > 1), (
        f"{config_name}: flatten is for pipelined forward and G configs only"
    )
    assert len(results) == len(variants), f"missing compiles: {results}"
    problems = _problems(config_name, cfg, job_kernel, shape, arch, version, results)
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(not _have_nvidia_backend(), reason="triton's NVIDIA backend tools not found")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("config_name", [k for k, v in _SHIPPED.items() if v[0] == "bf16"])
def test_aot_compile_shipped_configs_in_fp16(aot_results, config_name, arch):
    """The 16-bit entries serve fp16 too: every variant compiled with fp16 inputs passes the
    same checks (no spills, tensor cores, the widest wgmma, shared memory, per_sm)."""
    from fgpo_kernels import triton_kl as tk

    if arch not in _archs(config_name):
        pytest.skip(f"{config_name} serves sm_{_archs(config_name)[0]} only")
    version, by_config = aot_results
    results = by_config.get((f"{config_name}:fp16", arch), [])
    job_kernel, variants, shape = _SHIPPED[config_name][1:]
    assert len(results) == len(variants) and {r["dtype"] for r in results} == {"fp16"}, results
    cfg = tk.GPU_CONFIGS[config_name]
    problems = _problems(config_name, cfg, job_kernel, shape, arch, version, results)
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(not _have_nvidia_backend(), reason="triton's NVIDIA backend tools not found")
@pytest.mark.parametrize("name", list(_alternatives()))
def test_aot_compile_gpu_tiles_alternatives(aot_results, name):
    """The tiles ``benchmarks/gpu_tiles.py`` times against the shipped ones pass the same checks
    on sm_90 (no spills, m64n128k16, the loop nest, shared memory, programs per SM)."""
    cfg, kernel, variants, shape = _alternatives()[name]
    version, by_config = aot_results
    results = by_config.get((name, 90), [])
    assert len(results) == len(variants), f"missing compiles: {results}"
    # per_sm is what the GPU session's triton (OTHER_TRITON) fits; another release may fit more
    # (the G-only 64 x 128 kernel: 167 registers, 3 per SM, with 3.7.1; 244, 2, with 3.6.0).
    exact = version == OTHER_TRITON
    problems = _problems(name, cfg, kernel, shape, 90, version, results, exact_per_sm=exact)
    assert not problems, "\n".join(problems)


def _problems(name, cfg, job_kernel, shape, arch, version, results,
              exact_per_sm: bool = True) -> list[str]:  # fmt: skip
    """What is wrong with the compiles ``results`` of one entry (tiles ``cfg``) on ``arch``:
    bad compiles, ints a launch may specialize, spills, the loop nest, no tensor cores; on
    sm_90 the widest wgmma (``shape``), shared memory and programs per SM (``per_sm`` exactly,
    or at least with ``exact_per_sm`` False)."""
    problems, resident = [], []
    for r in results:
        label = f"{name} {cfg} {r['dtype']} {r['variant']} sm_{arch} (triton {version})"
        if r["unknown_constexprs"] or not r["target_ok"] or not r["cubin_bytes"]:
            problems.append(f"{label}: bad compile {r}")
        # The kernel a GPU runs is the one compiled here: every int argument is either compiled
        # as a multiple of 16 (D, DR, the strides: the SPEC-shape case; the launcher's aligned
        # ints) or never specialized by triton's launcher (do_not_specialize); otherwise a
        # value that is a multiple of 16 or 1 would run another, unchecked kernel (N = 8192
        # made "g_both" spill 16 B that way).
        unchecked = sorted(set(r["ints"]) - set(r["int_aligned"]) - set(r["not_specialized"]))
        both = sorted(set(r["int_aligned"]) & set(r["not_specialized"]))
        if unchecked or both:
            problems.append(
                f"{label}: ints a launch may specialize but compiled plain {unchecked}; "
                f"compiled aligned but never specialized {both}"
            )
        use = r["usage"]
        if "REG" not in use or use.get("STACK", 0) or use.get("LOCAL", 0):
            problems.append(f"{label}: register spills or no usage info ({use})")
        if job_kernel in ("fwd", "g") and r["flat"] != cfg.flatten:
            problems.append(f"{label}: flatten={cfg.flatten} but the compiled loop nest is "
                            f"{'one' if r['flat'] else 'not one tile-and-D loop'}")  # fmt: skip
        # G from kept logits does no dot at all (nothing for tensor cores to do).
        dots = not r["flags"].get("FROM_LOGITS")
        if r["dtype"] != "fp32" and dots and not r["wgmma" if arch == 90 else "mma_sync"]:
            problems.append(f"{label}: no tensor-core instruction in the PTX")
        if arch != 90:
            continue
        want = shape if shape and dots else None
        widest = max(r["wgmma"], key=lambda x: int(x.split("n")[1].split("k")[0]), default=None)
        if widest != want:
            problems.append(f"{label}: widest wgmma {widest} ({r['wgmma']}), expected {want}")
        if r["shared"] > _SM90_SMEM_BLOCK:
            problems.append(f"{label}: {r['shared']} B of shared memory per program")
        if "REG" in use:
            resident.append(_resident(use["REG"], cfg.num_warps, r["shared"]))
    fit = min(resident, default=cfg.per_sm)
    if fit != cfg.per_sm and (exact_per_sm or fit < cfg.per_sm):
        problems.append(f"{name}: {fit} programs fit an SM, per_sm says "
                        f"{cfg.per_sm} ({resident})")  # fmt: skip
    return problems


def test_resident_programs_arithmetic():
    """The residency rule the per_sm check uses, on hand-checked cases."""
    assert _resident(255, 8, 147456) == 1  # 2 x 256 threads x 256 regs > 64K
    assert _resident(128, 4, 98304) == 2  # registers allow 4, shared memory 2
    assert _resident(64, 4, 0) == 8


def test_gpu_config_choice_names_shipped_entries():
    pytest.importorskip("triton")
    from fgpo_kernels import triton_kl as tk

    for kind in tk.configs.KINDS:
        for n in (1, 300, 5000):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for has_ref in (False, True):
                    for shared in (False, True):
                        for both in (False, True):
                            name = tk.gpu_config_name(kind, n, dtype, has_ref, shared=shared,
                                                      both=both)  # fmt: skip
                            assert name in _SHIPPED
