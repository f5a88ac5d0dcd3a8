"""The PREDICTED traffic and time model of the GPU kernels (``benchmarks/gpu_model.py``): its
invariants at the SPEC shape and the few-rows case, shared and separate weights, with and
without dW, and that it reads the kernels' own launch configuration (no copied numbers)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("triton")

from benchmarks import gpu_model as gm

CASES = gm.cases()


def _ids(cases):
    return [c.label.replace(" ", "-") for c in cases]


@pytest.mark.parametrize("device", sorted(gm.DEVICES))
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_kernels_fit_half_of_l2_and_stay_near_compulsory_traffic(device, case):
    """One wave of the Triton forward, of both CUDA forwards (wgmma and mma.sync: their rings
    differ) and of the gblock G kernel touches at most L2/2; forward HBM bytes stay within 2x
    the compulsory bytes when the hidden states fit L2/2 (the few-rows case), and within 2% of
    the least any L2-resident order can read otherwise (which is itself above 2x the compulsory
    bytes there: no order meets 2x at N=8192)."""
    dev = gm.DEVICES[device]
    cudas = tuple(gm.cuda_forward(case, dev, path=path) for path in gm.CUDA_FWD_PATHS)
    fwds = (gm.triton_forward(case, dev), *cudas)
    for pred in (*fwds, gm.gblock_backward(case, dev)):
        assert pred.working_set <= pred.budget <= dev.l2_bytes // 2 + 1, pred
    least, compulsory = gm.least_forward_hbm(case, dev)
    partials = 2 * 6 * case.n * 4 * 1188  # split partials, written and merged (at most)
    for fwd in fwds:
        assert fwd.hbm_bytes <= 1.02 * least + partials, (fwd, least)
    if case.n * 2 * case.d * gm.BF16 <= dev.l2_bytes // 2:
        for fwd in fwds:
            assert fwd.hbm_bytes <= 2 * fwd.compulsory_bytes, fwd
    else:
        assert least > 2 * compulsory, (least, compulsory)


@pytest.mark.parametrize("device", sorted(gm.DEVICES))
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_predicted_forwards_are_at_least_70_percent_of_the_matmul_roofline(device, case):
    """The Triton forward and the CUDA forward's sm_90a wgmma path (the default on H100/H200)."""
    dev = gm.DEVICES[device]
    for pred in (gm.triton_forward(case, dev), gm.cuda_forward(case, dev, path="wgmma")):
        assert pred.roofline_fraction >= 0.70, pred
        assert pred.executed_flops == pred.useful_flops == 4.0 * case.n * case.d * case.v


@pytest.mark.parametrize("device", sorted(gm.DEVICES))
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_cuda_mma_path_is_predicted_below_the_wgmma_path(device, case):
    """The two CUDA forwards are two kernels: mma.sync at ``MMA_SYNC_EFFICIENCY`` stays below
    wgmma's shared-memory-bound rate, and each prediction names its kernel."""
    dev = gm.DEVICES[device]
    wgmma = gm.cuda_forward(case, dev)  # the default path
    mma = gm.cuda_forward(case, dev, path="mma")
    assert "wgmma m64n128" in wgmma.kernel and "mma.sync" in mma.kernel
    assert mma.compute_s > 1.1 * wgmma.compute_s, (mma, wgmma)
    assert mma.roofline_fraction < wgmma.roofline_fraction - 0.1, (mma, wgmma)
    with pytest.raises(ValueError, match="path must be one of"):
        gm.cuda_forward(case, dev, path="wmma")


def test_cuda_wgmma_efficiency_counts_what_its_ring_fills():
    """2 warpgroups of m64n128k16 read A and B from shared memory per k16 step; the ring fills
    H, Hr and one W per slice with a shared weight, and runs one loop per model (H + W, then
    Hr + Wr) with separate weights: 144 and 160 bytes per clock against 128 (PREDICTED)."""
    shared, separate = gm.cuda_wgmma_efficiency(True), gm.cuda_wgmma_efficiency(False)
    assert shared == pytest.approx(128 / 144) and separate == pytest.approx(128 / 160)
    assert separate == gm._smem_efficiency(128, 128, 1, 1) == gm._smem_efficiency(128, 128, 2, 2)


def test_backward_counts_recompute_as_executed_not_useful():
    case = gm.Case(*gm.SPEC, shared=True, grad_w=False)
    pred = gm.gblock_backward(case, gm.DEVICES["H200-SXM"])
    one = 2.0 * case.n * case.d * case.v
    assert pred.useful_flops == one  # dH only (LoRA: frozen head, frozen reference)
    assert pred.executed_flops == pytest.approx(3 * one)  # + both models' logits again


def test_model_reads_the_kernels_launch_configuration(monkeypatch):
    """Change the shipped forward tile or the L2 budget share and the prediction follows:
    the model imports the kernels' functions, it does not copy their numbers."""
    from fgpo_kernels import _launch
    from fgpo_kernels.triton_kl import configs

    case, dev = gm.Case(*gm.SPEC, shared=True, grad_w=False), gm.DEVICES["H100-SXM"]
    base = gm.triton_forward(case, dev)
    cfg = configs.GPU_CONFIGS["fwd"]
    monkeypatch.setitem(configs.GPU_CONFIGS, "fwd", cfg._replace(block_v=64))
    narrow = gm.triton_forward(case, dev)
    assert narrow.seconds > base.seconds  # m64n64: shared-memory bound
    monkeypatch.setitem(configs.GPU_CONFIGS, "fwd", cfg)
    # config= (benchmarks/gpu_tiles.py) predicts those tiles without touching the table
    assert gm.triton_forward(case, dev, config=cfg._replace(block_v=64)) == narrow
    monkeypatch.setattr(_launch, "L2_FRACTION", 0.25)
    assert gm.triton_forward(case, dev).budget == (50 << 20) // 4
    # the CUDA forward's paths plan with their own rings (csrc/launch.h kStages / kStagesWgmma)
    wgmma, mma = (gm.cuda_forward(case, dev, path=p).working_set for p in ("wgmma", "mma"))
    monkeypatch.setattr(_launch, "CUDA_STAGES_WGMMA", 8)
    assert gm.cuda_forward(case, dev, path="wgmma").working_set > wgmma
    assert gm.cuda_forward(case, dev, path="mma").working_set == mma


def test_measured_rate_rescales_and_output_is_labelled_predicted(capsys):
    case, dev = gm.Case(*gm.SPEC, shared=True, grad_w=False), gm.DEVICES["H200-SXM"]
    peak = gm.triton_forward(case, dev)
    slow = gm.triton_forward(case, dev, tflops=dev.bf16_flops / 2e12)
    assert slow.compute_s == pytest.approx(2 * peak.compute_s)
    assert slow.roofline_fraction == pytest.approx(peak.roofline_fraction)
    assert gm.main(["--device", "H100-SXM"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTED" in out and "triton fwd" in out
    assert "cuda fwd [128x128 wgmma m64n128]" in out and "cuda fwd [128x128 mma.sync]" in out


def test_measured_rows_are_compared_with_predictions_on_their_own_matmul_rate(tmp_path):
    """--measured DIR: every GPU token_kl forward row of triton / cuda gets the prediction for
    its N on the matmul rate that run measured; other rows (CPU, full mode, peers, skipped) are
    left out; --out writes both tables."""
    import csv

    cols = ["op", "impl", "device", "mode", "status", "N", "D", "V", "dtype", "p50_ms",
            "matmul_tflops"]  # fmt: skip
    rows = [
        ["token_kl", "triton", "cuda", "forward", "ok", 8192, 3584, 152064, "bfloat16", 40.0, 600],
        ["token_kl", "cuda", "cuda", "forward", "ok", 256, 3584, 152064, "bfloat16", 3.0, 600],
        ["token_kl", "triton", "cuda", "full", "ok", 8192, 3584, 152064, "bfloat16", 90.0, 600],
        ["token_kl", "torch", "cuda", "forward", "ok", 8192, 3584, 152064, "bfloat16", 80.0, 600],
        ["token_kl", "triton", "cpu", "forward", "ok", 64, 64, 1000, "float32", 9.0, 0.1],
        ["token_kl", "cuda", "cuda", "forward", "skipped", 1024, 3584, 152064, "bfloat16", "", ""],
    ]
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    dev = gm.DEVICES["H200-SXM"]
    got = gm.compare(tmp_path / "results.csv", dev, cuda_path="mma")
    assert [(r["impl"], r["path"], r["case"]) for r in got] == [
        ("triton", "", "N=8192 separate no dW"),
        ("cuda", "mma", "N=256 separate no dW"),
    ]
    # the bench's reference weight is w.detach(): a separate weight to the kernels
    case256 = gm.Case(256, 3584, 152064, False, False)
    assert got[1]["predicted_ms"] == pytest.approx(
        gm.cuda_forward(case256, dev, 600.0, path="mma").seconds * 1e3
    )
    # The CSV does not say which CUDA forward ran: unknown, the row is predicted for both paths
    # and marked so (never silently the default's).
    both = gm.compare(tmp_path / "results.csv", dev)
    assert [(r["path"], r["path_known"]) for r in both if r["impl"] == "cuda"] == [
        ("wgmma", False),
        ("mma", False),
    ]
    assert "| cuda wgmma (path not recorded) | N=256" in gm.compare_table(both)
    pred = gm.triton_forward(gm.Case(8192, 3584, 152064, False, False), dev, 600.0).seconds
    assert got[0]["predicted_ms"] == pytest.approx(pred * 1e3)
    assert got[0]["measured_over_predicted"] == pytest.approx(0.040 / pred)
    assert pred != gm.triton_forward(gm.Case(8192, 3584, 152064, False, False), dev).seconds
    out = tmp_path / "model"
    assert gm.main(["--measured", str(tmp_path), "--out", str(out), "--device", "H200-SXM",
                    "--cuda-path", "wgmma"]) == 0  # fmt: skip
    text = (out / "gpu_model.md").read_text()
    assert "PREDICTED vs measured" in text and "| triton | N=8192 separate no dW |" in text
    assert "| cuda wgmma | N=256 separate no dW |" in text
    assert "backward" not in text  # no backward/backward.csv in that folder

    # The backward phase's CSV: its triton_gblock rows against gblock_backward (shared head,
    # "dh+dW" = trained head), on the bench's median matmul rate; other paths left out.
    (tmp_path / "backward").mkdir()
    with open(tmp_path / "backward" / "backward.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "n", "d", "v", "dtype", "need", "p50_ms", "status"])
        w.writerow(["triton_gblock", 8192, 3584, 152064, "bfloat16", "dh", 50.0, "ok"])
        w.writerow(["triton_gblock", 1024, 3584, 152064, "bfloat16", "dh+dW", 9.0, "ok"])
        w.writerow(["triton_atomic", 8192, 3584, 152064, "bfloat16", "dh", 90.0, "ok"])
        w.writerow(["triton_held", 256, 3584, 152064, "bfloat16", "dh", 2.0, "ok"])
        w.writerow(["triton_gblock", 256, 3584, 152064, "bfloat16", "dh", "", "error"])
    assert gm._bench_rate(tmp_path / "results.csv") == 600.0
    bwd = gm.compare_backward(tmp_path / "backward" / "backward.csv", dev, 600.0)
    assert [(r["impl"], r["case"]) for r in bwd] == [
        ("triton gblock bwd", "N=8192 shared no dW"),
        ("triton gblock bwd", "N=1024 shared +dW"),
        ("triton fwd+logits + held bwd", "N=256 shared no dW"),
    ]
    few = gm.Case(256, 3584, 152064, True, False)
    pair = (gm.triton_forward(few, dev, 600.0, store=True).seconds
            + gm.gblock_backward(few, dev, 600.0, held=True).seconds)  # fmt: skip
    assert bwd[2]["predicted_ms"] == pytest.approx(pair * 1e3)
    pred = gm.gblock_backward(gm.Case(1024, 3584, 152064, True, True), dev, 600.0).seconds
    assert bwd[1]["predicted_ms"] == pytest.approx(pred * 1e3)
    assert bwd[1]["measured_over_predicted"] == pytest.approx(0.009 / pred)
    assert gm.main(["--measured", str(tmp_path), "--out", str(out), "--device", "H200-SXM"]) == 0
    text = (out / "gpu_model.md").read_text()
    assert "PREDICTED vs measured backward" in text
    assert "| triton gblock bwd | N=1024 shared +dW | bfloat16 | 600.0 |" in text


def test_gblock_g_and_gr_use_the_launchers_split_and_wide_entry(monkeypatch):
    """A trained shared head writes G and Gr: the model names the wide entry, runs the chunks
    through ``configs.g_launches`` (a ragged V adds a narrow tail launch) and the old 128 x 64
    tiles there would be slower (PREDICTED; m64n64 is shared-memory bound)."""
    from fgpo_kernels.triton_kl import configs

    dev = gm.DEVICES["H200-SXM"]
    case = gm.Case(*gm.SPEC, shared=True, grad_w=True)
    wide = gm.gblock_backward(case, dev)
    assert "[g_both," in wide.kernel
    seen = []
    real = configs.g_launches
    monkeypatch.setattr(
        configs, "g_launches", lambda name, w: seen.append(real(name, w)) or real(name, w)
    )
    ragged = gm.gblock_backward(case._replace(v=case.v + 7), dev)
    assert seen[-1][-1] == (seen[-1][-1][0], 7, "g_narrow") and ragged.seconds > wide.seconds
    monkeypatch.setitem(configs.GPU_CONFIGS, "g_both", configs.GPU_CONFIGS["g_narrow"])
    assert gm.gblock_backward(case, dev).seconds > 1.1 * wide.seconds


def test_readme_table_is_the_models():
    """The README's PREDICTED table is what ``--readme`` prints now: a change to the kernels'
    plans, tiles or the model shows up as a failing test until the README is regenerated
    (``python -m benchmarks.gpu_model --readme``)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = gm.readme_table()
    assert table in readme, "README.md's PREDICTED table differs from the model:\n" + table
    assert "H200 ms" in table and table.count("\n") == 1 + 4 * (2 + len(gm.CUDA_FWD_PATHS))


@pytest.mark.parametrize("device", sorted(gm.DEVICES))
@pytest.mark.parametrize("n", gm.FEW_ROWS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_gblock_traffic_beyond_2x_is_its_g_round_trip_and_gemm_reads(device, n, shared):
    """With few rows (hidden states within L2/2) and no dW, the gblock backward's HBM bytes
    exceed 2x the compulsory bytes only by what gblock pays to run its products in cuBLAS: G
    written and read back by the dh GEMM, that GEMM's second read of W, and the fp32 dh sum read
    and written once per chunk. Set those aside and the rest (the G kernel's reads of H and W,
    as the forward's) is within 2x; with them a shared head's is above it (README's claim)."""
    dev = gm.DEVICES[device]
    case = gm.Case(n, *gm.SPEC[1:], shared, False)
    assert n * 2 * case.d * gm.BF16 <= dev.l2_bytes // 2
    pred = gm.gblock_backward(case, dev)
    chunks = int(pred.kernel.split(", ")[1].split()[0])  # "[g, 10 chunks of 16384]"
    rows = n  # LoRA: G only (the reference is frozen)
    extra = (
        2 * rows * case.v * gm.BF16  # G written, read by the dh GEMM
        + case.v * case.d * gm.BF16  # the dh GEMM's read of W
        + chunks * 2 * n * case.d * 4
    )  # fp32 dh sum read and written per chunk
    if shared:  # LoRA: W read once is most of the compulsory bytes, and the GEMM reads it again
        assert pred.hbm_bytes > 2 * pred.compulsory_bytes, pred
    assert pred.compulsory_bytes <= pred.hbm_bytes - extra <= 2 * pred.compulsory_bytes, pred


FEW = [c for c in CASES if c.n in gm.FEW_ROWS]


@pytest.mark.parametrize("device", sorted(gm.DEVICES))
@pytest.mark.parametrize("case", FEW, ids=_ids(FEW))
def test_gradients_in_the_forward_pay_at_few_rows(device, case):
    """The few-rows plan (design §3.8), per kernel: the forward that keeps both models' logits
    (entry fwd_store) and G read back from them (FROM_LOGITS, entry g_narrow with a reference).
    Each wave within L2/2, HBM within 2x the compulsory bytes (the kept logits count as the
    store forward's output and the held backward's input), the held backward executes only
    useful FLOPs, and the pair is PREDICTED faster than the plain forward + the recomputing
    gblock backward: what the plan is for."""
    dev = gm.DEVICES[device]
    fwd, store = gm.triton_forward(case, dev), gm.triton_forward(case, dev, store=True)
    rec, held = gm.gblock_backward(case, dev), gm.gblock_backward(case, dev, held=True)
    assert "[fwd_store]" in store.kernel and "[g_narrow," in held.kernel, (store, held)
    for p in (store, held):
        assert p.working_set <= p.budget <= dev.l2_bytes // 2 + 1, p
        assert p.hbm_bytes <= 2 * p.compulsory_bytes, p
    assert store.hbm_bytes - fwd.hbm_bytes >= 2 * case.n * case.v * 4  # the logits written
    assert store.executed_flops == fwd.executed_flops
    assert held.executed_flops == held.useful_flops == rec.useful_flops < rec.executed_flops
    assert store.seconds + held.seconds < fwd.seconds + rec.seconds, (store, held, fwd, rec)
