"""The benchmark runner works from a fresh install, and its end-to-end baseline is the same loss;
the shared-prefix step benchmark runs and its FLOP count matches the model and the mask.

Runs ``python -m benchmarks.run`` on the ``tiny`` preset (a few subprocesses, seconds each),
checks the CSV it writes, draws it with ``benchmarks.plot``, and checks that the materialized
FiRe-MPO step the end-to-end benchmark times computes the same loss and gradients as
``FiReMPOLoss``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REQUIRED = ["op", "impl", "device", "dtype", "N", "D", "V", "mode", "p20_ms", "p50_ms",
            "p80_ms", "peak_mb", "commit", "version"]  # fmt: skip


def test_runner_tiny_preset_writes_rows_and_plots(tmp_path):
    out = tmp_path / "res"
    cmd = [
        sys.executable, "-m", "benchmarks.run", "--preset", "tiny", "--device", "cpu",
        "--ops", "token_kl", "fire_mpo_step", "--impls", "torch", "materialized", "cuda",
        "liger_jsd_b0", "torch_recompute", "matmul_floor", "--repeats", "2", "--no-matmul-rate",
        "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(REQUIRED) <= set(rows[0]), sorted(rows[0])
    got = {(r["op"], r["impl"], r["mode"]): r for r in rows}
    for op in ("token_kl", "fire_mpo_step"):
        for impl in ("torch", "materialized", "torch_recompute"):
            for mode in ("forward", "full"):
                r = got[(op, impl, mode)]
                assert r["status"] == "ok", r
                assert 0 < float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"]), r
                assert float(r["peak_mb"]) >= 0, r
                assert r["device"] == "cpu" and r["dtype"] == "float32", r
        cuda = got[(op, "cuda", "all")]
        assert cuda["status"] == "skipped" and "CUDA" in cuda["reason"], cuda
    # The same op with its gradients computed in the forward and recomputed (design §3.8),
    # and the floor of its matmuls.
    assert "computed in the forward" in got[("token_kl", "torch", "full")]["note"]
    assert "recomputed" in got[("token_kl", "torch_recompute", "full")]["note"]
    assert got[("token_kl", "matmul_floor", "full")]["status"] == "ok"
    # Honest scoring: the plan each op of ours took (its DEBUG log) and executed FLOPs with the
    # recomputation counted: the recompute path executes 2 more logit matmuls than it is
    # credited for (useful: 2 logits + dH + dW = 4 units; executed: 6), the held path none.
    held, rec = got[("token_kl", "torch", "full")], got[("token_kl", "torch_recompute", "full")]
    assert (held["plan"], rec["plan"]) == ("held", "recompute"), (held, rec)
    assert float(held["exec_tflops"]) == pytest.approx(float(held["tflops"]), rel=1e-3)
    assert float(rec["exec_tflops"]) == pytest.approx(1.5 * float(rec["tflops"]), rel=1e-3)
    liger = [r for r in rows if r["impl"] == "liger_jsd_b0"]
    assert liger, "a peer row (ok, or skipped with a reason) must be written"
    assert all(r["status"] == "ok" or r["reason"] for r in liger), liger
    # The materialized step keeps full logits: it must need more memory than ours.
    e2e = {r["impl"]: float(r["peak_mb"]) for r in rows
           if r["op"] == "fire_mpo_step" and r["mode"] == "full"}  # fmt: skip
    assert e2e["materialized"] > e2e["torch"], e2e

    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.plot", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs), pngs


def test_materialized_step_is_the_same_objective():
    fk = pytest.importorskip("fgpo_kernels")
    if not hasattr(fk, "FiReMPOLoss"):
        pytest.skip("FiReMPOLoss not available")
    from benchmarks import e2e

    b, seq_len, resp, span, d, v = 3, 23, 11, 5, 17, 301
    w, seqs, hc = e2e.make_inputs(b, seq_len, resp, span, d, v, torch.float64, "cpu", seed=3)
    hc = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    ref = e2e.materialized_step(w, seqs, hc)
    g_ref = torch.autograd.grad(ref, [s.policy for s in seqs.values()])
    ours = e2e.ours_step(w, seqs, hc, "torch")
    g_ours = torch.autograd.grad(ours, [s.policy for s in seqs.values()])
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12), (ours.item(), ref.item())
    for a, r in zip(g_ours, g_ref):
        assert torch.allclose(a, r, rtol=1e-8, atol=1e-12), (a - r).abs().max()


def test_loss_variants_runs_every_variant(capsys):
    """benchmarks.loss_variants at a tiny shape: a row for every loss type and both RRPO KLs."""
    fk = pytest.importorskip("fgpo_kernels")
    from benchmarks import loss_variants

    argv = "--d 16 --v 97 --b 2 --seq-len 12 --resp 6 --span 2 --repeats 1".split()
    assert loss_variants.main(argv) == 0
    out = capsys.readouterr().out
    for t in fk.LOSS_TYPES:
        assert f"| fire_mpo/{t} |" in out
    assert "| rrpo/span_kl |" in out and "| rrpo/response_kl |" in out


def test_prefix_flop_count_matches_the_model_and_the_mask():
    """The computed FLOPs of benchmarks/prefix_flops.py count a real model's linear layers and
    exactly the (query, key) pairs the packed mask lets through."""
    from benchmarks import prefix_flops as pf
    from benchmarks.train_step import _dims
    from fgpo.models import prefix, tiny

    model, _ = tiny.build_tiny("tiny-qwen2.5-vl", hidden=64, layers=3)
    lm, _ = _dims(model.config)
    weights = [
        p.numel()
        for n, p in model.model.language_model.named_parameters()
        if n.endswith(".weight") and p.ndim == 2 and "embed" not in n
    ]
    assert pf.lm_forward(lm, tokens=7, pairs=0) == 2 * 7 * sum(weights)
    seg = torch.tensor([[0] * 5 + [1] * 3 + [2] * 4 + [-1] * 2])
    allowed = prefix.Family().attend(SimpleNamespace(segments=seg))[0]
    real = seg[0] >= 0
    assert int(allowed[real][:, real].sum()) == pf.packed_pairs(5, 3, 4)
    assert pf.packed_pairs(9, 0, 0) == pf.causal_pairs(9) == 45


def test_train_step_benchmark_writes_both_modes(tmp_path):
    """benchmarks.train_step on a very small config: a row per mode, the same first loss, fewer
    tokens and vision runs in the shared mode."""
    import yaml

    cfg = yaml.safe_load((ROOT / "fgpo" / "configs" / "bench_prefix.yaml").read_text())
    cfg["extra"] = {
        "tiny": {"hidden": 32, "layers": 1, "image_side": 4, "vision_layers": 1},
        "data": {"examples": 2, "prompt_words": 5, "response_words": [2, 4]},
    }
    cfg.update(global_batch_size=2, micro_batch_size=2)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "rows.csv"
    from benchmarks import train_step

    threads = torch.get_num_threads()
    try:  # in this process (the memory workers are subprocesses of their own)
        assert train_step.main(["--config", str(path), "--steps", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(out, newline="") as f:
        rows = {r["mode"]: r for r in csv.DictReader(f)}
    plain, shared = rows["plain"], rows["shared"]
    assert float(shared["first_loss"]) == pytest.approx(float(plain["first_loss"]), rel=1e-5)
    assert int(shared["tokens_per_pass"]) < int(plain["tokens_per_pass"])
    from transformers import Qwen2_5_VLModel

    from fgpo.models.prefix import takes_vision_features

    once = takes_vision_features(Qwen2_5_VLModel)  # else the tower runs in each model's pass
    runs = (int(plain["vision_runs_per_step"]), int(shared["vision_runs_per_step"]))
    assert runs == (16, 4 if once else 8)
    assert shared["plan"].startswith("shared prefix on (qwen-vl, sdpa)")
    assert plain["image_tokens"] == "16" and float(plain["peak_mib"]) > 0


def test_loss_memory_modes_agree(tmp_path):
    """benchmarks.loss_memory at a tiny head: ours (gradients in the forward), ours with
    recomputation and the materialized trainer compute the same loss; the floor runs."""
    out = tmp_path / "loss.jsonl"
    modes = "ours,ours_recompute,floor,materialized"
    cmd = [sys.executable, "-m", "benchmarks.loss_memory", "--b", "2", "--seq-len", "8",
           "--masked", "4", "--d", "16", "--v", "301", "--modes", modes, "--repeats", "2",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["mode"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"ours", "ours_recompute", "floor", "materialized"}, rows
    for mode in ("ours_recompute", "materialized"):
        assert rows[mode]["loss"] == pytest.approx(rows["ours"]["loss"], rel=1e-5), rows
    assert all(r["rows"] == 2 * 4 * 4 and len(r["times_s"]) == 2 for r in rows.values()), rows
    assert "| ours |" in proc.stdout and "matmul share" in proc.stdout


def test_side_by_side_interleaves_impls_and_keeps_variant_env_to_its_calls(tmp_path, monkeypatch):
    """benchmarks.side_by_side at a tiny shape: a row per impl, the recompute variant's switch
    applied only around its own calls (the plain impl keeps computing gradients in the
    forward), floor share = floor time / impl time."""
    from benchmarks import side_by_side

    monkeypatch.delenv("FGPO_GRADS_IN_FORWARD", raising=False)
    seen = []
    real = side_by_side._step

    def spy(fn, leaves, env):
        import os

        out = real(fn, leaves, env)
        seen.append(os.environ.get("FGPO_GRADS_IN_FORWARD"))
        return out

    monkeypatch.setattr(side_by_side, "_step", spy)
    out = tmp_path / "sbs.csv"
    threads = torch.get_num_threads()
    try:
        impls = ["torch", "torch_recompute", "matmul_floor"]
        args = ["--n", "48", "--d", "16", "--v", "301", "--rounds", "2", "--peer", "torch",
                "--out", str(out), "--impls", *impls]  # fmt: skip
        assert side_by_side.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen and all(v is None for v in seen)  # restored after every call
    with open(out, newline="") as f:
        rows = {r["impl"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"torch", "torch_recompute", "matmul_floor"}
    assert "computed in the forward" in rows["torch"]["note"]
    assert "recomputed in the backward" in rows["torch_recompute"]["note"]
    t = rows["torch"]
    assert float(t["cpu_vs_peer"]) == 1.0 and t["rounds"] == "2"
    share = float(rows["matmul_floor"]["cpu_p50_s"]) / float(t["cpu_p50_s"])
    assert float(t["floor_share"]) == pytest.approx(share, rel=0.01, abs=0.002)


def test_executed_flops_per_plan_and_the_gpu_verdict():
    from benchmarks import impls, report
    from benchmarks.shapes import Case

    case = Case("token_kl", 8192, 3584, 152064, "bfloat16", "qwen2.5-vl-7b")
    one = 2.0 * 8192 * 3584 * 152064
    useful = impls.matmul_flops(case, "full", True)
    assert useful == 4 * one  # 2 logits + dH + dW
    assert impls.executed_flops(case, "full", True, "recompute") == 6 * one
    assert impls.executed_flops(case, "backward", True, "recompute") == 4 * one
    assert impls.executed_flops(case, "forward", True, "held") == 4 * one
    assert impls.executed_flops(case, "full", False, "jacobian") == 5 * one  # + lp, fkl, rkl
    assert impls.executed_flops(case, "full", True, "mixed") == 0  # not scored
    base = dict(op="token_kl", N="8192", D="3584", V="152064", dtype="bfloat16", status="ok")
    rows = [
        {**base, "impl": "triton", "mode": "forward", "plan": "recompute", "matmul_frac": "0.8",
         "exec_frac": "0.8"},
        {**base, "impl": "triton", "mode": "full", "plan": "recompute", "matmul_frac": "0.5",
         "exec_frac": "0.75"},
        {**base, "impl": "cuda", "mode": "full", "plan": "recompute", "matmul_frac": "0.4",
         "exec_frac": "0.6"},
    ]  # fmt: skip
    verdict = report.gpu_verdict(rows)
    assert "triton: forward 80% of matmul (useful; PASS)" in verdict
    assert "fwd+bwd 75% executed, plan recompute (PASS)" in verdict
    assert "cuda: fwd+bwd 60% executed, plan recompute (FAIL)" in verdict
