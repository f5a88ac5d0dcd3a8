"""Builds the CUDA extension ``fgpo_kernels._C`` with nvcc + pybind11 (no torch build helpers).

``setup.py`` calls :func:`cuda_extension_setup`, which returns ``(ext_modules, cmdclass)``.
Environment:

- ``FGPO_BUILD_CUDA``: ``auto`` (default: build iff nvcc is found; a failed build warns and the
  install goes on without ``_C``), ``1`` (build or fail loudly), ``0`` (skip).
- ``FGPO_CUDA_ARCHS``: ``"80;90a"`` by default -> SASS for sm_80 and sm_90a (Hopper with its
  arch-specific wgmma: the forward of ``fwd_wgmma.cuh``, built only when ``90a`` is listed), plus
  portable PTX for the newest (``compute_90``, mma.sync only, JIT-compiled by the driver on later
  GPUs); "80;90" with an nvcc older than 12.0 (it has no sm_90a). Entries like ``90`` or ``100``
  work too; below 80 is rejected (the kernels use mma.sync bf16, ldmatrix and cp.async).
- ``MAX_JOBS``: parallel compile jobs (default: CPU count); ``NVCC_THREADS``: nvcc ``--threads``
  per job (default 1). ``CUDA_HOME``/``CUDA_PATH``: where nvcc lives (else ``PATH``).

Compilation runs through ninja when the ``ninja`` executable is found, else through a thread
pool; linking uses nvcc with ``--cudart static`` so the module imports on machines without the
CUDA runtime library (and without a GPU). ``python -m csrc.build --out DIR`` builds the module
into DIR (used by tests).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXT_NAME = "fgpo_kernels._C"
CUDA_SOURCES = ("fwd_bf16.cu", "fwd_f16.cu", "bwd_bf16.cu", "bwd_f16.cu")
HOST_SOURCES = ("binding.cpp",)
HEADERS = ("kernels.cuh", "fwd_wgmma.cuh", "tile_math.h", "launch.h")
DEFAULT_ARCHS = "80;90a"


class CudaBuildError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[fgpo_kernels._C] {msg}", file=sys.stderr, flush=True)


def build_mode() -> str:
    """'auto', '1' or '0' from FGPO_BUILD_CUDA."""
    raw = os.environ.get("FGPO_BUILD_CUDA", "auto").strip().lower()
    aliases = {"": "auto", "auto": "auto", "1": "1", "true": "1", "yes": "1", "on": "1"}
    aliases.update({"0": "0", "false": "0", "no": "0", "off": "0"})
    if raw not in aliases:
        raise CudaBuildError(f"FGPO_BUILD_CUDA must be auto, 0 or 1, got {raw!r}")
    return aliases[raw]


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


def arch_flags(spec: str | None = None) -> tuple[list[str], list[str]]:
    """(nvcc -gencode flags, arch names) for a spec like "80;90" (PTX for the newest)."""
    spec = os.environ.get("FGPO_CUDA_ARCHS", DEFAULT_ARCHS) if spec is None else spec
    names = [a for a in spec.replace(",", ";").replace(" ", ";").split(";") if a]
    if not names:
        raise CudaBuildError(f"FGPO_CUDA_ARCHS is empty (got {spec!r}); e.g. '80;90'")
    parsed = []
    for name in names:
        core = name.lower().removeprefix("sm_").removeprefix("compute_")
        suffix = core[-1] if core and core[-1] in "af" else ""
        num = core[: len(core) - len(suffix)]
        if not num.isdigit() or int(num) < 80:
            raise CudaBuildError(
                f"FGPO_CUDA_ARCHS entry {name!r} is not a compute capability >= 80 "
                "(the kernels need sm_80+: mma.sync bf16, ldmatrix, cp.async)"
            )
        parsed.append((int(num), suffix))
    parsed = sorted(set(parsed))
    flags = []
    for num, suffix in parsed:
        flags += ["-gencode", f"arch=compute_{num}{suffix},code=sm_{num}{suffix}"]
    newest = parsed[-1][0]
    # Portable PTX (no arch-specific suffix) so later GPUs can JIT it.
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags, [f"{n}{s}" for n, s in parsed]


def _python_includes() -> list[str]:
    import pybind11  # build requirement (pyproject.toml)

    incs = [pybind11.get_include(), sysconfig.get_paths()["include"]]
    plat = sysconfig.get_paths().get("platinclude")
    if plat and plat not in incs:
        incs.append(plat)
    return incs


def _jobs() -> int:
    raw = os.environ.get("MAX_JOBS")
    if raw:
        try:
            return max(1, int(raw))
        except ValueError as exc:
            raise CudaBuildError(f"MAX_JOBS must be an integer, got {raw!r}") from exc
    return max(1, os.cpu_count() or 1)


def nvcc_version(nvcc: str) -> tuple[int, int] | None:
    """(major, minor) of ``nvcc --version`` ("release 12.4"), None when it does not say."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def default_archs(nvcc: str) -> str:
    """``DEFAULT_ARCHS``, or "80;90" for an nvcc older than 12.0 (no sm_90a target there: the
    build goes on without the wgmma forward instead of failing)."""
    version = nvcc_version(nvcc)
    if version is not None and version < (12, 0):
        _log(f"nvcc {version[0]}.{version[1]} has no sm_90a: building 80;90 (mma.sync only)")
        return "80;90"
    return DEFAULT_ARCHS


def compile_commands(nvcc: str, obj_dir: Path, archs: str | None = None, verbose_ptxas=False):
    """[(source, object, argv)] for every translation unit."""
    if archs is None and not os.environ.get("FGPO_CUDA_ARCHS"):
        archs = default_archs(nvcc)
    gencode, names = arch_flags(archs)
    # The wgmma forward exists only in sm_90a code (wgmma is arch-specific to Hopper).
    wgmma = ["-DFGPO_WGMMA=1"] if "90a" in names else []
    threads = os.environ.get("NVCC_THREADS", "1")
    common = [
        "-std=c++17",
        "-O3",
        "-Xcompiler",
        "-fPIC",
        "-Xcompiler",
        "-fvisibility=hidden",
        f"-I{HERE}",
    ]
    cmds = []
    for src in CUDA_SOURCES:
        obj = obj_dir / (src + ".o")
        argv = [nvcc, *common, *wgmma, *gencode, "--threads", threads, "-lineinfo"]
        if verbose_ptxas:
            argv += ["-Xptxas", "-v"]
        cmds.append((HERE / src, obj, [*argv, "-c", str(HERE / src), "-o", str(obj)]))
    defs = [f'-DFGPO_ARCHS="{";".join(names)}"', *wgmma]
    incs = [f"-I{p}" for p in _python_includes()]
    for src in HOST_SOURCES:
        obj = obj_dir / (src + ".o")
        argv = [nvcc, *common, *defs, *incs, "-c", str(HERE / src), "-o", str(obj)]
        cmds.append((HERE / src, obj, argv))
    return cmds


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    out = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        raise CudaBuildError(f"command failed ({proc.returncode}): {shlex.join(argv)}\n{out}")
    return out


def _ninja_build(cmds, build_dir: Path, jobs: int) -> str:
    ninja = shutil.which("ninja")
    lines = ["ninja_required_version = 1.3", "rule cc", "  command = $cmd", "  description = $desc"]
    for src, obj, argv in cmds:
        deps = " ".join(str(HERE / h) for h in HEADERS)
        lines.append(f"build {obj}: cc {src} | {deps}")
        lines.append(f"  cmd = {shlex.join(argv)}")
        lines.append(f"  desc = nvcc {src.name}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    return _run([ninja, "-C", str(build_dir), "-j", str(jobs)])


def build_module(out_path: Path, build_dir: Path, archs: str | None = None, verbose_ptxas=False):
    """Compile and link ``_C`` to ``out_path``; returns the combined compiler output."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaBuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    build_dir.mkdir(parents=True, exist_ok=True)
    cmds = compile_commands(nvcc, build_dir, archs, verbose_ptxas)
    jobs = _jobs()
    if shutil.which("ninja") and not verbose_ptxas:
        log = _ninja_build(cmds, build_dir, jobs)
    else:  # the thread pool also keeps each TU's ptxas report
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            log = "".join(pool.map(lambda c: f"== {c[0].name}\n" + _run(c[2]), cmds))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    objs = [str(obj) for _, obj, _ in cmds]
    tmp = out_path.with_name(out_path.name + ".tmp")
    _run([nvcc, "-shared", "--cudart", "static", "-o", str(tmp), *objs])
    os.replace(tmp, out_path)  # atomic: a loaded module is never overwritten in place
    return log


def cuda_extension_setup():
    """(ext_modules, cmdclass) for setup(); empty when the build is skipped."""
    from setuptools import Extension
    from setuptools.command.build_ext import build_ext

    mode = build_mode()
    if mode == "0":
        _log("FGPO_BUILD_CUDA=0: skipping the CUDA extension (CPU/Triton install)")
        return [], {}
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "1":
            raise CudaBuildError("FGPO_BUILD_CUDA=1 but nvcc was not found (CUDA_HOME/PATH)")
        _log(
            "nvcc not found: skipping the CUDA extension (impl 'cuda' unavailable; CPU/Triton "
            "install). Set FGPO_BUILD_CUDA=1 to make this an error."
        )
        return [], {}
    try:
        arch_flags()  # validate FGPO_CUDA_ARCHS before anything is compiled
    except CudaBuildError as exc:
        if mode == "1":
            raise
        _log(f"WARNING: {exc}; skipping the CUDA extension")
        return [], {}

    class NvccBuildExt(build_ext):
        """build_ext that hands ``fgpo_kernels._C`` to nvcc and the rest to setuptools."""

        def build_extension(self, ext):
            if ext.name != EXT_NAME:
                return super().build_extension(ext)
            out = Path(self.get_ext_fullpath(ext.name)).resolve()
            tmp = Path(self.build_temp).resolve() / "fgpo_cuda"
            archs = None if os.environ.get("FGPO_CUDA_ARCHS") else default_archs(nvcc)
            _log(f"building with {nvcc} for archs {arch_flags(archs)[1]} ({_jobs()} jobs) -> {out}")
            try:
                build_module(out, tmp)
            except Exception as exc:
                if mode == "1":
                    raise
                _log(f"WARNING: CUDA extension build failed; continuing without it.\n{exc}")
                self._fgpo_failed = True  # outputs that do not exist are dropped below
                return None
            _log("built")
            return None

        def copy_extensions_to_source(self):
            if getattr(self, "_fgpo_failed", False):
                self.extensions = [e for e in self.extensions if e.name != EXT_NAME]
            return super().copy_extensions_to_source()

        def get_outputs(self):
            outs = super().get_outputs()
            if getattr(self, "_fgpo_failed", False):
                outs = [o for o in outs if os.path.exists(o)]
            return outs

    sources = [str(Path("csrc") / s) for s in CUDA_SOURCES + HOST_SOURCES]
    ext = Extension(EXT_NAME, sources=sources, depends=[str(Path("csrc") / h) for h in HEADERS])
    return [ext], {"build_ext": NvccBuildExt}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build fgpo_kernels._C into a folder")
    ap.add_argument("--out", required=True, help="folder for _C<suffix>.so")
    ap.add_argument("--archs", default=None, help='e.g. "80;90" (default FGPO_CUDA_ARCHS)')
    ap.add_argument("--ptxas-v", action="store_true", help="print ptxas resource reports")
    args = ap.parse_args(argv)
    out = Path(args.out) / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    log = build_module(out, Path(args.out) / "obj", args.archs, args.ptxas_v)
    print(log)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
