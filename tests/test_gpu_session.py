"""benchmarks/gpu_session.sh rehearsed on the CPU (FGPO_DRY_RUN=1): the same phases, tiny shapes.

The GPU lease is 15 minutes in all, one call at most 10, each on a fresh machine with no network:
the phases' limits must fit, a phase that dies or times out must leave the earlier results and
let the later phases run, and the results must reach the device tool's $OUT as they appear.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
CALL_LIMIT_S = 600  # one call of the device tool
LEASE_S = 15 * 60  # all GPU time of a session, the machine's start included
START_S = 5 * 60  # a fresh machine's start ("a few minutes"), assumed at its worst
PHASES = ["machine", "install", "peers", "status", "gpu_tests", "bench", "backward", "tiles",
          "cuda_check", "model", "kernel_tests", "plot"]  # fmt: skip


def _run(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, Path, Path]:
    res, export = tmp_path / "res", tmp_path / "export"
    export.mkdir()
    full = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1", "FGPO_DRY_RUN": "1",
            "FGPO_RESULTS_DIR": str(res), "FGPO_EXPORT_DIR": str(export), **env}  # fmt: skip
    full.pop("OUT", None)
    proc = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    return proc, res, export


def _steps(res: Path) -> dict[str, str]:
    out = {}
    for line in (res / "steps.txt").read_text().splitlines():
        name, rest = line.split(None, 1)
        out[name] = rest.rsplit(None, 1)[0]
    return out


def _plan() -> dict[str, str]:
    """What ``FGPO_PLAN=1`` prints: each phase's limit, total, budget, cuda_archs."""
    proc = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "FGPO_PLAN": "1"},
                          capture_output=True, text=True, check=True)  # fmt: skip
    return dict(line.split() for line in proc.stdout.splitlines())


def test_plan_fits_the_lease():
    limits = _plan()
    assert [k for k in limits if k not in ("total", "budget", "cuda_archs")] == PHASES
    total, budget = int(limits["total"]), int(limits["budget"])
    assert total == sum(int(limits[p]) for p in PHASES)
    assert total <= budget <= CALL_LIMIT_S - 60, "leave a minute of the call for the transfers"
    assert budget + START_S <= LEASE_S, "the session and a slow machine start exceed the lease"


def test_documented_limits_are_the_plans():
    """The limits in the script's header and in benchmarks/README.md's table are the ones it
    runs under (they drifted once: the README kept an earlier split of the 540 s)."""
    plan = {k: v for k, v in _plan().items() if k in PHASES}
    header = re.findall(r"^#   (\w+) +(\d+) ", SCRIPT.read_text(), re.M)
    table = re.findall(r"^\| (\w+) \| (\d+) \|", (ROOT / "benchmarks/README.md").read_text(), re.M)
    assert dict(header) == plan and [p for p, _ in header] == PHASES, header
    assert dict(table) == plan and [p for p, _ in table] == PHASES, table


@pytest.mark.parametrize(
    "cap,env,archs", [("9.0", None, "90a"), ("8.0", None, "80"), ("9.0", "80;90", "80;90")]
)
def test_install_builds_for_this_gpu_with_the_wgmma_forward_on_hopper(tmp_path, cap, env, archs):
    """The install phase builds _C for the GPU nvidia-smi reports, an H100/H200 (9.0) as sm_90a:
    a plain sm_90 build has no wgmma forward, so the session could not time it;
    FGPO_CUDA_ARCHS overrides."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {cap}\n")
    smi.chmod(0o755)
    full = {**os.environ, "FGPO_PLAN": "1", "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    full.pop("FGPO_CUDA_ARCHS", None)
    if env:
        full["FGPO_CUDA_ARCHS"] = env
    proc = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True,
                          check=True)  # fmt: skip
    assert dict(line.split() for line in proc.stdout.splitlines())["cuda_archs"] == archs


@pytest.mark.slow
def test_dry_run_rehearses_every_phase(tmp_path):
    """Every phase runs on the CPU and writes its results; the GPU-only parts say why not. The
    kernel tests get a 1-second limit (pytest alone takes longer to start): they time out, and
    the phase after them still runs."""
    proc, res, export = _run(tmp_path, FGPO_T_KERNEL_TESTS="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = _steps(res)
    assert list(steps) == PHASES, steps
    assert steps["install"].startswith("skipped: dry run")
    assert steps["peers"].startswith("skipped: dry run")
    assert steps["kernel_tests"] == "TIMED OUT after 1s", steps
    assert steps["plot"] == "ok", (res / "plot.log").read_text()
    if (ROOT / "benchmarks" / "gpu_model.py").exists():
        assert steps["model"] == "ok"
    else:
        assert steps["model"].startswith("skipped: benchmarks/gpu_model.py")
    for name in ("machine", "status", "gpu_tests", "bench", "backward", "tiles", "cuda_check"):
        assert steps[name] == "ok", f"{name}: {steps[name]}\n{(res / f'{name}.log').read_text()}"
    status = (res / "status.log").read_text()
    assert "fgpo_kernels._C" in status
    # one line per impl as it answers, with its seconds (the GPU's self-tests are timed there)
    assert [line.split()[0] for line in status.splitlines()] == ["torch", "cuda", "triton"]
    rows = (res / "results.csv").read_text().splitlines()
    assert len(rows) >= 2 and ",ok," in rows[1], rows[:2]
    bwd = (res / "backward" / "backward.csv").read_text()
    for path in ("triton_gblock", "triton_atomic", "triton_held", "torch"):
        assert f"\n{path},33,48,515,float32,dh," in bwd, path
    assert ",skipped," in bwd  # cuda, with the reason, never a crash
    # impl triton as the session's processes see it (no test-only interpreter patch there)
    triton = json.loads(status.splitlines()[2].split(maxsplit=2)[2])
    if triton["available"]:
        tiles = (res / "tiles" / "tiles.csv").read_text().splitlines()
        # 2 dry cases x (fwd: shipped, 2 per SM, nested loop; g: shipped, 2 per SM, 1 tile)
        assert len(tiles) == 1 + 2 * (3 + 3) and all(",ok," in r for r in tiles[1:]), tiles
        assert sum("-nested," in r for r in tiles) == 2, tiles  # the shipped forward, unflattened
        assert sum("-1tile," in r for r in tiles) == 2 * 2, tiles  # G: one tile per program
    else:  # e.g. triton 3.6's interpreter under numpy 2: the phase says why it timed nothing
        said = f"skipped: impl triton is unavailable: {triton['reason']}"
        assert said in (res / "tiles.log").read_text()
    # Both CUDA forwards get a row per timing shape: skipped here with the reason, next to
    # their PREDICTED times, the mma.sync one the slower (the model tells them apart).
    with (res / "cuda_check" / "gpu_cuda_check.csv").open() as f:
        paths = {(r["path"], r["n"]): r for r in csv.DictReader(f)}
    assert sorted(paths) == [(p, n) for p in ("mma", "wgmma") for n in ("2048", "256")], paths
    for (_path, n), r in paths.items():
        assert r["status"] == "skipped" and "impl 'cuda' unavailable" in r["reason"], r
        assert r["model"].startswith("PREDICTED") and r["p50_ms"] == "", r
        mma, wgmma = (float(paths[p, n]["predicted_ms"]) for p in ("mma", "wgmma"))
        assert mma > 1.2 * wgmma, (mma, wgmma)
    # The device tool's folder got the steps and the whole results folder.
    assert (export / "steps.txt").read_text() == (res / "steps.txt").read_text()
    with tarfile.open(export / "session.tar.gz") as tar:
        names = tar.getnames()
    assert "res/results.csv" in names and "res/backward/backward.csv" in names
    assert "total" in proc.stdout.splitlines()[-1]


def test_budget_clips_the_phases(tmp_path):
    """With 6 seconds of budget and a Python that hangs, the first phase's limit is clipped to
    the 6 seconds left, and every phase past the deadline is skipped and recorded as such: the
    call never runs past its budget. A phase with no budget (here FGPO_T_MACHINE=0; a phase
    missing from PHASES alike) is skipped: `timeout 0` would have meant no limit at all."""
    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\nsleep 60\n")
    hang.chmod(0o755)
    proc, res, _ = _run(tmp_path, FGPO_BUDGET_S="6", PY=str(hang), FGPO_T_MACHINE="0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = _steps(res)
    assert list(steps) == PHASES, steps
    assert steps["machine"] == "skipped: no budget in PHASES", steps
    assert steps["status"] == "TIMED OUT after 6s", steps
    seconds = [int(line.rsplit(None, 1)[1].rstrip("s")) for line in
               (res / "steps.txt").read_text().splitlines()]  # fmt: skip
    assert sum(seconds) <= 6 + 5, steps  # + timeout's --kill-after grace
    skipped = {n for n, st in steps.items() if st == "SKIPPED (no time left)"}
    assert skipped == set(PHASES) - {"machine", "install", "peers", "status"}, steps


class _FakeCudaKl:
    """cuda_kl as ``impls.cuda_fwd_paths`` sees it: ``forward_path`` answers ``auto`` by default
    and reads FGPO_CUDA_FWD per call (``honours``), or answers ``auto`` whatever is asked (an
    implementation that ignores the switch); a forced wgmma without the kernel raises."""

    def __init__(self, wgmma_built: bool, auto: str, honours: bool = True):
        self._c = type("C", (), {"WGMMA": wgmma_built})()
        self.auto, self.honours = auto, honours

    def _ext(self):
        return self._c

    def forward_path(self, device):
        asked = os.environ.get("FGPO_CUDA_FWD", "auto")
        if asked == "auto" or not self.honours:
            return self.auto
        if asked == "wgmma" and not self._c.WGMMA:
            raise RuntimeError("FGPO_CUDA_FWD=wgmma: _C has no sm_90a kernel")
        return asked


@pytest.mark.parametrize(
    "kl,cap,default,why_wgmma,why_mma",
    [
        (None, (9, 0), "mma", "no cuda_kl.forward_path", None),  # before the wgmma forward
        (_FakeCudaKl(False, "mma"), (9, 0), "mma", "without an sm_90a target (_C.WGMMA)", None),
        (_FakeCudaKl(True, "mma"), (8, 0), "mma", "sm_80: the wgmma forward needs sm_90", None),
        (_FakeCudaKl(True, "wgmma"), (9, 0), "wgmma", None, None),
        (_FakeCudaKl(True, "wgmma", honours=False), (9, 0), "wgmma", None, "gives 'wgmma' for "),
    ],
    ids=["no-forward_path", "no-sm_90a-build", "sm_80", "both-run", "switch-ignored"],
)
def test_cuda_fwd_paths_say_which_forward_runs_and_why_not(
    monkeypatch, kl, cap, default, why_wgmma, why_mma
):
    """gpu_cuda_check times a CUDA forward path only where it runs: the extension's _C.WGMMA, the
    device and cuda_kl.forward_path under FGPO_CUDA_FWD=<path> all agree; else the reason."""
    import torch

    from benchmarks import impls
    from fgpo_kernels import _registry, cuda_kl

    monkeypatch.setattr(_registry, "status", lambda impl: {"available": True, "reason": ""})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    if kl is None:
        monkeypatch.delattr(cuda_kl, "forward_path", raising=False)
    else:
        monkeypatch.setattr(cuda_kl, "forward_path", kl.forward_path, raising=False)
        monkeypatch.setattr(cuda_kl, "_ext", kl._ext)
    monkeypatch.setenv("FGPO_CUDA_FWD", "mma")
    got_default, why = impls.cuda_fwd_paths()
    assert os.environ["FGPO_CUDA_FWD"] == "mma"  # the switch is put back
    assert got_default == default
    for path, expect in (("wgmma", why_wgmma), ("mma", why_mma)):
        if expect is None:
            assert why[path] is None, why
        else:
            assert expect in why[path], why
    monkeypatch.setattr(_registry, "status", lambda impl: {"available": False, "reason": "x"})
    assert impls.cuda_fwd_paths() == (
        None,
        dict.fromkeys(impls.CUDA_FWD_PATHS, "impl 'cuda' unavailable: x"),
    )


def test_cuda_check_checks_and_times_each_forward_path(monkeypatch):
    """gpu_cuda_check's GPU branch on the CPU at tiny shapes, impl "cuda" stood in by impl
    "torch": each CUDA forward that can run is checked and timed under FGPO_CUDA_FWD=<path>,
    next to the model's prediction for that path; forward+backward runs once per impl on the
    default path; a path that cannot run gets a "skipped" row with the reason and never runs."""
    import types

    import torch

    from benchmarks import gpu_cuda_check as cc
    from benchmarks import gpu_model as gm
    from fgpo_kernels import torch_impl

    calls = set()  # (impl, FGPO_CUDA_FWD, grad enabled) of every stand-in call
    broken = None  # the forward path whose stand-in is off by 1%
    real_token_kl = cc.fk.token_kl

    def token_kl(h, hr, w, targets, impl):
        calls.add((impl, os.environ.get("FGPO_CUDA_FWD"), torch.is_grad_enabled()))
        return real_token_kl(h, hr, w, targets=targets, impl="torch")

    class Backend:
        def __init__(self, name):
            self.name = name

        def forward(self, *args):
            path = os.environ.get("FGPO_CUDA_FWD")
            calls.add((self.name, path, "forward"))
            out = torch_impl.forward(*args)
            return type(out)(*(x * 1.01 for x in out)) if broken and path == broken else out

        def backward(self, *args, bwd=None):
            kind = "backward" if bwd is None else f"backward bwd={bwd}"
            calls.add((self.name, os.environ.get("FGPO_CUDA_FWD"), kind))
            return torch_impl.backward(*args)

    monkeypatch.delenv("FGPO_CUDA_FWD", raising=False)
    monkeypatch.setattr(cc, "DEVICE", "cpu")
    monkeypatch.setattr(cc, "CORRECTNESS_SHAPES", [("shared", 9, 16, 37), ("separate", 7, 8, 29)])
    monkeypatch.setattr(cc, "TIMING_SHAPES", [(9, 16, 37)])
    monkeypatch.setattr(cc, "fk", types.SimpleNamespace(token_kl=token_kl))
    monkeypatch.setattr(cc._registry, "status", lambda impl: {"available": True, "reason": ""})
    real_module = cc._registry.module
    monkeypatch.setattr(cc._registry, "module", lambda name: Backend(name) if name in (
        "cuda", "triton") else real_module(name))  # fmt: skip
    monkeypatch.setattr(cc, "bench", lambda fn, reps, sets: [fn(i % sets) for i in range(2)]
                        and (1.0, 2.0, 3.0))  # fmt: skip
    monkeypatch.setattr(cc, "model_device", lambda: ("H200-SXM", "PREDICTED on the H200"))
    for name in ("reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda: 0)

    both = {"wgmma": None, "mma": None}
    rows = cc.correctness(True, both)
    # (bf16 gradients at these 9-row shapes exceed the check's 2e-2 bound: fp16 rows only)
    assert [r["cuda_ok"] for r in rows if r["dtype"] == "float16"] == [True, True], rows
    assert {"cuda_wgmma_lse", "cuda_mma_rkl", "cuda_dh", "cuda_kernel_dw", "triton_lse"} <= set(
        rows[0]
    )
    assert not any(k.startswith(("cuda_wgmma_d", "cuda_mma_d")) for k in rows[0])
    # impl cuda's backward twice: its default (triton's gblock) and its own kernel
    assert {c for c in calls if c[0] == "cuda"} == {
        ("cuda", "wgmma", "forward"), ("cuda", "mma", "forward"), ("cuda", None, "backward"),
        ("cuda", None, "backward bwd=cuda"),
    }  # fmt: skip
    broken = "mma"  # one path off by 1% fails the check of every row, the other path passing
    assert not any(r["cuda_ok"] for r in cc.correctness(True, both))
    broken = None
    calls.clear()
    rows = cc.timing(True, both, "wgmma", 700.0)
    assert [(r["impl"], r["path"], r["kind"]) for r in rows] == [
        ("cuda", "wgmma", "fwd"), ("cuda", "mma", "fwd"), ("triton", "", "fwd"),
        ("cuda", "wgmma", "fwd+bwd(h)"), ("cuda", "wgmma", "fwd+bwd(h,w)"),
        ("triton", "", "fwd+bwd(h)"), ("triton", "", "fwd+bwd(h,w)"),
    ]  # fmt: skip
    assert calls == {("cuda", "wgmma", False), ("cuda", "mma", False), ("triton", None, False),
                     ("cuda", None, True), ("triton", None, True)}  # fmt: skip
    case = gm.Case(9, 16, 37, True, False)
    for r in rows[:2]:
        pred = gm.cuda_forward(case, gm.DEVICES["H200-SXM"], 700.0, r["path"]).seconds * 1e3
        assert r["predicted_ms"] == pytest.approx(pred) and r["status"] == "ok", r
        assert r["measured_over_predicted"] == pytest.approx(2.0 / pred)
    assert rows[0]["predicted_ms"] < rows[1]["predicted_ms"]
    calls.clear()
    rows = cc.timing(True, {"wgmma": "sm_80 here", "mma": None}, "mma", 700.0)
    assert not any(c[1] == "wgmma" for c in calls), calls
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [(r["path"], r["reason"]) for r in skipped] == [("wgmma", "sm_80 here")]
    assert "PREDICTED" in cc._line(skipped[0]) and "sm_80 here" in cc._line(skipped[0])
    assert "measured / predicted" in cc._line(rows[0])


def test_backward_phase_times_the_cuda_kernel_not_the_default(monkeypatch):
    """The backward phase's ``cuda`` row is impl cuda's own kernel (``bwd="cuda"``, what
    FGPO_CUDA_BWD=cuda runs): its default backward is triton's gblock, timed as triton_gblock."""
    from benchmarks import gpu_backward as gb

    seen = []

    class Cuda:
        def backward(self, *args, **kw):
            seen.append(kw)

    monkeypatch.setattr(gb._registry, "status", lambda impl: {"available": True, "reason": ""})
    real = gb._registry.module
    monkeypatch.setattr(gb._registry, "module",
                        lambda name: Cuda() if name == "cuda" else real(name))  # fmt: skip
    gb._paths(33, few_rows=True)["cuda"](None, None, None, None, None, None)
    assert seen == [{"bwd": "cuda"}], seen
