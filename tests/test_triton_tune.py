"""Opt-in tile tuning (``triton_kl/tune.py``, env FGPO_TRITON_TUNE=1): when it is on and off, the
choice (fastest beyond the margin, results that disagree dropped, failures dropped, the shipped
tiles' failure raised), one tuning per key, and the forward and G kernel running the tiles it
picks (the 2-per-SM candidates, through the patched interpreter, against float64)."""

from __future__ import annotations

import os

import pytest
import torch
from test_triton_kl import (
    DEV,
    _check_forward,
    _check_grads,
    _f64,
    _grads_in,
    _inputs,
    _ok,
    needs_triton,
)

from fgpo_kernels import torch_impl
from fgpo_kernels._backend import Needs

if _ok:
    from fgpo_kernels.triton_kl import bwd_gblock, configs, fwd, tune


SHIPPED = (
    {name: configs.named_config(name, 64, 64) for name in ("fwd", "g", "g_both")} if _ok else {}
)


@pytest.fixture(autouse=True)
def fresh_choices():
    """Every test starts and ends with no choices made (they live in the process)."""
    if _ok:
        tune.clear()
    yield
    if _ok:
        tune.clear()


class _Times:
    """A fake ``time_fn``: runs the call once, returns the next of ``ms`` (the tuner times the
    shipped tiles first, then each candidate in order)."""

    def __init__(self, *ms):
        self.ms, self.calls = list(ms), 0

    def __call__(self, call):
        call()
        self.calls += 1
        return self.ms.pop(0)


def _on(monkeypatch):
    """Tuning on as on a GPU (the interpreter's CPU tensors stand in for the device)."""
    monkeypatch.setenv("FGPO_TRITON_TUNE", "1")
    monkeypatch.setattr(tune, "enabled", lambda device: tune.requested())


@needs_triton
def test_env_and_device_decide_whether_to_tune(monkeypatch):
    monkeypatch.delenv("FGPO_TRITON_TUNE", raising=False)
    assert not tune.requested()
    for raw, want in (("0", False), ("", False), ("1", True)):
        monkeypatch.setenv("FGPO_TRITON_TUNE", raw)
        assert tune.requested() is want
    monkeypatch.setenv("FGPO_TRITON_TUNE", "yes")
    with pytest.raises(ValueError, match="FGPO_TRITON_TUNE"):
        tune.requested()
    monkeypatch.setenv("FGPO_TRITON_TUNE", "1")
    assert not tune.enabled(torch.device("cpu"))  # a CPU, the interpreter: shipped tiles
    runs = []
    cfg = tune.config_for("fwd", SHIPPED["fwd"], torch.device("cpu"), (), runs.append)
    assert cfg == SHIPPED["fwd"] and not runs and not tune.choices()


@needs_triton
def test_choice_is_the_fastest_beyond_the_margin(monkeypatch):
    _on(monkeypatch)
    (alt,) = configs.TUNE_CANDIDATES["fwd"]
    result = (torch.ones(5), None)
    ran = []

    def run(cfg):
        ran.append(cfg)
        return result

    pick = tune.config_for("fwd", SHIPPED["fwd"], torch.device(DEV), ("a",), run, _Times(10.0, 9.0))
    assert pick == alt, "a candidate 10 % faster must be taken"
    assert tune.choices()[0]["chosen"] == tune.label(alt)
    n = len(ran)
    again = tune.config_for("fwd", SHIPPED["fwd"], torch.device(DEV), ("a",), run, _Times())
    assert again == alt and len(ran) == n, "a key is tuned once"
    close = tune.config_for(
        "fwd", SHIPPED["fwd"], torch.device(DEV), ("b",), run, _Times(10.0, 9.9)
    )
    assert close == SHIPPED["fwd"], "within the margin: the shipped tiles"
    slower = tune.config_for("g", SHIPPED["g"], torch.device(DEV), ("b",), run, _Times(10.0, 12.0))
    assert slower == SHIPPED["g"]
    assert len(tune.choices()) == 3
    # while a CUDA graph is captured: an earlier choice holds, no new one is made (no timing)
    monkeypatch.setattr(tune, "_capturing", lambda: True)
    n = len(ran)
    assert tune.config_for("fwd", SHIPPED["fwd"], torch.device(DEV), ("a",), run) == alt
    assert (
        tune.config_for("fwd", SHIPPED["fwd"], torch.device(DEV), ("new",), run) == (SHIPPED["fwd"])
    )
    assert len(ran) == n and len(tune.choices()) == 3
    monkeypatch.setattr(tune, "_capturing", lambda: False)
    # entries without candidates are never timed
    assert (
        tune.config_for("g_both", SHIPPED["g_both"], torch.device(DEV), ("c",), run)
        == (SHIPPED["g_both"])
    )
    assert len(tune.choices()) == 3


@needs_triton
def test_disagreeing_or_failing_candidates_are_dropped(monkeypatch):
    _on(monkeypatch)
    (alt,) = configs.TUNE_CANDIDATES["fwd"]
    good = torch.linspace(1.0, 2.0, 600)

    def wrong(cfg):
        return (good if cfg != alt else good * 1.05, None)

    times = _Times(10.0)  # the candidate is never timed: its result is wrong
    cfg = tune.config_for("fwd", SHIPPED["fwd"], torch.device(DEV), ("w",), wrong, times)
    assert cfg != alt and times.calls == 1
    (c,) = tune.choices()
    assert "differs from the shipped tiles'" in c["dropped"][tune.label(alt)]

    def broken(cfg):
        if cfg == alt:
            raise RuntimeError("out of resources: shared memory")
        return (good, None)

    cfg = tune.config_for("fwd", SHIPPED["fwd"], torch.device(DEV), ("x",), broken, _Times(10.0))
    assert cfg != alt
    assert "out of resources" in tune.choices()[1]["dropped"][tune.label(alt)]

    def shipped_broken(cfg):
        raise RuntimeError("no kernel image")

    with pytest.raises(RuntimeError, match="no kernel image"):
        tune.config_for("fwd", SHIPPED["fwd"], torch.device(DEV), ("y",), shipped_broken, _Times())

    nan = torch.full((4,), float("nan"))
    assert tune._difference([nan], [torch.ones(4)]) == float("inf")
    assert tune._difference([None], [torch.ones(4)]) == float("inf")
    assert tune._difference([torch.ones(4) * 1.001], [torch.ones(4)]) < tune.AGREE


@needs_triton
@pytest.mark.parametrize("faster", ["shipped", "candidate"])
def test_forward_and_g_kernel_run_the_tiles_tuning_picks(monkeypatch, faster):
    """Both kernels through the tuner, with a fake clock that favours one tiles: the result is
    right against float64 either way, the launch uses the picked tiles, one tuning per key."""
    _on(monkeypatch)
    ms = (10.0, 5.0) if faster == "candidate" else (10.0, 11.0)
    monkeypatch.setattr(tune, "_cuda_ms", _Times(*ms, *ms))
    launched = []
    real = fwd.grid_plan

    def spy(cfg, *args, **kwargs):
        launched.append(cfg)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(fwd, "grid_plan", spy)
    monkeypatch.setattr(bwd_gblock, "grid_plan", spy)
    n, d, v = 37, 48, 700
    h, hr, w, wr = _inputs(n, d, v, dtype=torch.bfloat16)
    stats = fwd.forward(h, hr, w, wr, 1.0)
    _check_forward(stats, torch_impl.forward(*_f64((h, hr, w, wr)), 1.0), 1e-5, f"[{faster}] ")
    (alt,) = configs.TUNE_CANDIDATES["fwd"]
    want = alt if faster == "candidate" else configs.named_config("fwd", n, d)
    assert launched[-1] == want
    launched.clear()
    fwd.forward(h, hr, w, wr, 1.0)
    assert launched == [want], "the second call reuses the choice without timing"

    gs = _grads_in(n, True)
    need = (True, False, False, False)  # LoRA against a frozen reference: entry "g"
    got = bwd_gblock.backward_gblock(h, hr, w, wr, 1.0, stats, gs, Needs(*need))
    (galt,) = configs.TUNE_CANDIDATES["g"]
    gwant = galt if faster == "candidate" else configs.named_config("g", n, d)
    assert launched[-1] == gwant
    _check_grads(got, (h, hr, w, wr, 1.0), stats, gs, need, 1.5e-2, f"[{faster}/g] ")
    assert [c["entry"] for c in tune.choices()] == ["fwd", "g"]


@needs_triton
def test_gpu_tiles_reports_the_tuned_choice(monkeypatch):
    """The GPU session's tiles phase ends each case with what FGPO_TRITON_TUNE=1 picks on the
    same inputs (run here through the interpreter, with a clock that favours the candidate)."""
    from benchmarks import gpu_tiles

    monkeypatch.delenv("FGPO_TRITON_TUNE", raising=False)
    monkeypatch.setattr(tune, "enabled", lambda device: tune.requested())
    monkeypatch.setattr(tune, "_cuda_ms", _Times(10.0, 5.0, 10.0, 5.0))
    n = 21
    h, hr, w, _ = _inputs(n, 32, 300, dtype=torch.bfloat16)
    inputs = (h, hr, w, None, fwd.forward(h, hr, w, None, 1.0), _grads_in(n, True))
    rows = list(gpu_tiles._tuned_rows(inputs, n, True, {"d": 32, "v": 300}))
    assert [r["kernel"] for r in rows] == ["fwd", "g"]
    for r, entry in zip(rows, ("fwd", "g")):
        (alt,) = configs.TUNE_CANDIDATES[entry]
        assert r["status"] == "ok", r
        assert r["tiles"] == f"tuned: {tune.label(alt)}" and r["p50_ms"] == 5.0, r
    assert "FGPO_TRITON_TUNE" not in os.environ and not tune.choices()
