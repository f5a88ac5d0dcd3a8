"""benchmarks/gpu_session.sh rehearsed on the CPU (FGPO_DRY_RUN=1): the same phases, tiny shapes.

The GPU lease is 15 minutes in all, one call at most 10, each on a fresh machine with no network:
the phases' limits must fit, a phase that dies or times out must leave the earlier results and
let the later phases run, and the results must reach the device tool's $OUT as they appear.
"""

from __future__ import annotations

import os
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
PHASES = ["machine", "install", "status", "gpu_tests", "bench", "backward", "tiles", "model",
          "cuda_check", "kernel_tests", "plot"]  # fmt: skip


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


def test_plan_fits_the_lease():
    proc = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "FGPO_PLAN": "1"},
                          capture_output=True, text=True, check=True)  # fmt: skip
    limits = dict(line.split() for line in proc.stdout.splitlines())
    assert [k for k in limits if k not in ("total", "budget")] == PHASES
    total, budget = int(limits["total"]), int(limits["budget"])
    assert total == sum(int(limits[p]) for p in PHASES)
    assert total <= budget <= CALL_LIMIT_S - 60, "leave a minute of the call for the transfers"
    assert budget + START_S <= LEASE_S, "the session and a slow machine start exceed the lease"


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
    assert steps["kernel_tests"] == "TIMED OUT after 1s", steps
    assert steps["plot"] == "ok", (res / "plot.log").read_text()
    if (ROOT / "benchmarks" / "gpu_model.py").exists():
        assert steps["model"] == "ok"
    else:
        assert steps["model"].startswith("skipped: benchmarks/gpu_model.py")
    for name in ("machine", "status", "gpu_tests", "bench", "backward", "tiles", "cuda_check"):
        assert steps[name] == "ok", f"{name}: {steps[name]}\n{(res / f'{name}.log').read_text()}"
    assert "fgpo_kernels._C" in (res / "status.log").read_text()
    rows = (res / "results.csv").read_text().splitlines()
    assert len(rows) >= 2 and ",ok," in rows[1], rows[:2]
    bwd = (res / "backward" / "backward.csv").read_text()
    for path in ("triton_gblock", "triton_atomic", "triton_held", "torch"):
        assert f"\n{path},33,48,515,float32,dh," in bwd, path
    assert ",skipped," in bwd  # cuda, with the reason, never a crash
    tiles = (res / "tiles" / "tiles.csv").read_text().splitlines()
    assert len(tiles) == 1 + 2 * 2 * 2 and all(",ok," in r for r in tiles[1:]), tiles
    # The device tool's folder got the steps and the whole results folder.
    assert (export / "steps.txt").read_text() == (res / "steps.txt").read_text()
    with tarfile.open(export / "session.tar.gz") as tar:
        names = tar.getnames()
    assert "res/results.csv" in names and "res/backward/backward.csv" in names
    assert "total" in proc.stdout.splitlines()[-1]


def test_budget_clips_the_phases(tmp_path):
    """With 6 seconds of budget and a Python that hangs, the first phase's limit is clipped to
    the 6 seconds left, and every phase past the deadline is skipped and recorded as such: the
    call never runs past its budget."""
    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\nsleep 60\n")
    hang.chmod(0o755)
    proc, res, _ = _run(tmp_path, FGPO_BUDGET_S="6", PY=str(hang))
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = _steps(res)
    assert list(steps) == PHASES, steps
    assert steps["machine"] == "TIMED OUT after 6s", steps
    seconds = [int(line.rsplit(None, 1)[1].rstrip("s")) for line in
               (res / "steps.txt").read_text().splitlines()]  # fmt: skip
    assert sum(seconds) <= 6 + 5, steps  # + timeout's --kill-after grace
    skipped = {n for n, st in steps.items() if st == "SKIPPED (no time left)"}
    assert skipped == set(PHASES) - {"machine", "install"}, steps
