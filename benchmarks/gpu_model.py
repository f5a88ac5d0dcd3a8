"""PREDICTED (not measured) HBM traffic and time of the GPU kernels (`-m benchmarks.gpu_model`).

A roofline-style model of the GPU kernels that run by default at the SPEC shape (bf16, N=8192,
D=3584, V=152064: Qwen2.5-VL-7B's head) and the few-rows case (N=256..1024), shared (LoRA) and
separate (full fine-tuning) weights, with and without dW: the Triton forward, the CUDA forward
(wgmma and mma.sync paths), the gblock backward (G recomputed, cuBLAS products) and, for few
rows, the gradients-in-the-forward pair (the forward that keeps its logits, G read back from
them). Not modelled: the atomic Triton backward and the CUDA backward kernel (neither runs
unless asked for: ``FGPO_TRITON_BWD=atomic``, ``FGPO_CUDA_BWD=cuda``), whose time is set by the
rate of fp32 atomics in L2, which no datasheet gives; the GPU session times them
(``benchmarks.gpu_backward``). It imports the launch-configuration
functions the kernels use (``fgpo_kernels._launch``: splits, launch-order group, waves;
``triton_kl.configs``: the tile table, the gblock chunk width), so no number is copied.

Per kernel and case it reports executed and useful FLOPs, HBM bytes under a one-wave L2 model,
the compulsory bytes (every input read once, every output written once), waves, and a
predicted time on H100 and H200 datasheet numbers (``DEVICES``), or on a measured matmul rate
(``--tflops``, e.g. the ``matmul_tflops`` column of a GPU run).

The model, per tiled kernel (``_launch.py`` for the L2 working set):
- one-wave L2 model: a hidden-state block stays in L2 between its uses when the working set of
  one wave fits the cache; then H is read once and W once per launch-order group, else every
  program re-reads its H block for every vocabulary tile and W is read once per row block;
- MMA time: executed FLOPs / (peak x efficiency), efficiency = the shared-memory bandwidth of an
  SM (128 B/clock) over what the tile's wgmma operands and cp.async fills need (the Triton
  kernels, and the CUDA forward's sm_90a path: ``cuda_wgmma_efficiency``), or
  ``MMA_SYNC_EFFICIENCY`` for the CUDA kernels' mma.sync (``cuda_forward(path="mma")``: every
  GPU but sm_90a builds on H100/H200);
- epilogue: exponentials on the SFU (16/clock/SM) and FP32 ALU work (128 lanes/clock/SM) per
  logit (``EPILOGUE``, counted from the kernels' source), added to the MMA time when one program
  runs per SM (nothing overlaps it), else hidden behind the other program's MMAs;
- wave quantization: the makespan of ``waves`` x ``tiles per program`` tile-steps;
- time = max(compute, HBM bytes / bandwidth). cuBLAS GEMMs (gblock's products) run at
  ``GEMM_EFFICIENCY`` of peak and read each operand once.
Everything printed is a prediction; GPU runs replace it (benchmarks/gpu_session.sh).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks.impls import CUDA_FWD_PATHS
from fgpo_kernels import _launch
from fgpo_kernels.triton_kl import configs
from fgpo_kernels.triton_kl.common import logit_stride


class Device(NamedTuple):
    name: str
    sms: int
    l2_bytes: int
    hbm_bytes_per_s: float
    bf16_flops: float  # dense tensor-core FLOP/s
    hbm_capacity: int


# Datasheet numbers (sources: NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: 3.35 TB/s,
# 989 TFLOPS bf16 dense (1979 with sparsity), 80 GB; NVIDIA H200 Tensor Core GPU datasheet, SXM:
# 4.8 TB/s, 989 TFLOPS bf16 dense, 141 GB; NVIDIA H100 (Hopper) architecture whitepaper: 132
# SMs on the SXM5 part, 50 MB L2; the H200 is the same GH100 die, whose full L2 is 60 MB: the
# device library's record of the H200 machines this project's GPU sessions are lent
# (/work/.library/device/KINDS.md, 2026-10-28, read by the workplace, not by this project: PyTorch
# reported 'NVIDIA H200', 132 multiprocessors, 60 MB of L2), and the launch plan sizes its waves
# with what the device reports (``_launch.l2_bytes``), so the model does too).
DEVICES = {
    "H100-SXM": Device("H100 SXM5", 132, 50 << 20, 3.35e12, 989.4e12, 80 * 10**9),
    "H200-SXM": Device("H200 SXM", 132, 60 << 20, 4.8e12, 989.4e12, 141 * 10**9),
}
# Per SM and clock on sm_90: dense bf16 tensor FLOPs (989.4 TFLOPS / 132 SMs / 1.83 GHz), shared
# memory bytes (32 banks x 4 B), SFU exponentials and FP32 lanes (CUDA C++ Programming Guide,
# arithmetic instruction throughput, compute capability 9.0).
MMA_FLOP_PER_CLK, SMEM_BYTES_PER_CLK, SFU_PER_CLK, FP32_PER_CLK = 4096, 128, 16, 128
# Assumptions (replace with measurements): mma.sync vs wgmma on Hopper (the static review's
# 60-65%), cuBLAS bf16 GEMMs at these sizes, and the free memory the gblock chunk sees.
MMA_SYNC_EFFICIENCY, GEMM_EFFICIENCY, FREE_FRACTION = 0.62, 0.8, 0.5
# Per logit element: (exponentials, other FP32 operations), counted from the kernels' source.
EPILOGUE = {"fwd_kl": (2, 16), "fwd_lp": (1, 6), "g_kl": (2, 22), "g_lp": (1, 6)}
BF16 = 2


class Case(NamedTuple):
    n: int
    d: int
    v: int
    shared: bool  # LoRA: the reference uses the policy's head
    grad_w: bool  # the head is trained (dW)

    @property
    def label(self) -> str:
        return (f"N={self.n} {'shared' if self.shared else 'separate'} "
                f"{'+dW' if self.grad_w else 'no dW'}")  # fmt: skip


SPEC = (8192, 3584, 152064)
FEW_ROWS = (256, 512, 1024)


def cases() -> list[Case]:
    """SPEC and the few-rows case, shared and separate weights, with and without dW."""
    _, d, v = SPEC
    return [Case(n, d, v, shared, grad_w) for n in (SPEC[0], *FEW_ROWS)
            for shared in (True, False) for grad_w in (False, True)]  # fmt: skip


class Prediction(NamedTuple):
    kernel: str
    case: Case
    useful_flops: float
    executed_flops: float
    hbm_bytes: float
    compulsory_bytes: float
    waves: int
    working_set: int
    budget: int
    seconds: float
    compute_s: float
    memory_s: float
    roofline_s: float  # useful FLOPs at the matmul peak (datasheet or measured)

    @property
    def roofline_fraction(self) -> float:
        """The matmul roofline over the predicted time (1 = at the roofline)."""
        return self.roofline_s / self.seconds if self.seconds else 0.0


def _smem_efficiency(bn: int, bv: int, models_h: int, models_w: int) -> float:
    """wgmma with both operands from shared memory: bytes per clock one k16 slice needs (operand
    reads of every m64 instruction + the cp.async fills) against 128 B/clock."""
    flops = 2 * bn * bv * 16 * models_h
    reads = models_h * (bn // 64) * (64 * 16 + bv * 16) * BF16
    fills = (bn * models_h + bv * models_w) * 16 * BF16
    return min(1.0, SMEM_BYTES_PER_CLK / ((reads + fills) / (flops / MMA_FLOP_PER_CLK)))


def _tiled(
    plan: _launch.GridPlan, dev: Device, flops: float, epi: tuple[int, int], *, logits: int,
    per_sm: int, efficiency: float, h_bytes: int, w_bytes: int, tile_h: int,
) -> tuple[float, float]:  # fmt: skip
    """(compute seconds, HBM bytes) of one tiled launch: ``logits`` logit elements computed,
    ``h_bytes`` / ``w_bytes`` the hidden states and weights it reads, ``tile_h`` the hidden-state
    bytes of one row block (re-read per tile when the wave does not fit L2)."""
    peak = dev.bf16_flops
    clock = peak / (dev.sms * MMA_FLOP_PER_CLK)
    mma = flops / (peak * efficiency)
    exps, alu = epi
    epilogue = logits * (exps / SFU_PER_CLK + alu / FP32_PER_CLK) / (dev.sms * clock)
    compute = mma + epilogue if per_sm == 1 else max(mma, epilogue)
    steps = plan.row_blocks * plan.splits * plan.tiles_per_split
    compute *= plan.waves * plan.per_wave * plan.tiles_per_split / steps  # the last wave
    if plan.working_set <= dev.l2_bytes:  # reuse in L2 (the kernels aim at half of it)
        groups = math.ceil(plan.row_blocks / plan.group)
        hbm = h_bytes + groups * w_bytes
    else:
        hbm = plan.programs * plan.tiles_per_split * tile_h + plan.row_blocks * w_bytes
    return compute, hbm


def _finish(kernel, case, dev, useful, executed, compute, hbm, compulsory, plan, tflops):
    memory = hbm / dev.hbm_bytes_per_s
    peak = tflops * 1e12 if tflops else dev.bf16_flops
    scale = dev.bf16_flops / peak  # a measured rate rescales every compute term
    seconds = max(compute * scale, memory)
    return Prediction(kernel, case, useful, executed, hbm, compulsory, plan.waves,
                      plan.working_set, plan.budget, seconds, compute * scale, memory,
                      useful / peak)  # fmt: skip


def triton_forward(
    case: Case, dev: Device, tflops: float | None = None,
    config: configs.KernelConfig | None = None, *, store: bool = False,
) -> Prediction:  # fmt: skip
    """impl "triton" forward (token_kl: both models), the shipped sm_90 config (or ``config``'s
    tiles, as ``fwd.forward(config=)`` takes them) and plan. ``store``: the forward that also
    writes both models' logits for the held backward (gradients in the forward, few rows:
    entry "fwd_store", fp32 rows padded as ``common.logit_stride``)."""
    n, d, v = case.n, case.d, case.v
    kind = "fwd_store" if store else "fwd"
    name = configs.gpu_config_name(kind, n, torch.bfloat16, True, shared=case.shared, arch=90)
    cfg = config or configs.GPU_CONFIGS[name]
    h_row, w_win = configs.plan_inputs(cfg, d, d, True, case.shared, BF16)
    plan = _launch.plan(n, v, cfg.block_n, cfg.block_v, h_row_bytes=h_row, w_window=w_win,
                        per_wave=dev.sms * cfg.per_sm, l2=dev.l2_bytes)  # fmt: skip
    w_models = 1 if case.shared else 2
    flops = 2 * 2.0 * n * d * v
    eff = _smem_efficiency(cfg.block_n, cfg.block_v, 2, w_models)
    compute, hbm = _tiled(plan, dev, flops, EPILOGUE["fwd_kl"], logits=2 * n * v,
                          per_sm=cfg.per_sm, efficiency=eff, h_bytes=n * h_row,
                          w_bytes=w_models * v * d * BF16, tile_h=cfg.block_n * h_row)  # fmt: skip
    hbm += 2 * 6 * n * plan.splits * 4  # split partials written, merged
    kept = 2 * n * logit_stride(v) * 4 if store else 0  # an output of this kernel
    hbm += kept
    compulsory = n * h_row + w_models * v * d * BF16 + 4 * n * 4 + kept
    label = "triton fwd+logits" if store else "triton fwd"
    return _finish(f"{label} [{name}]", case, dev, flops, flops, compute, hbm, compulsory,
                   plan, tflops)  # fmt: skip


def cuda_wgmma_efficiency(shared: bool) -> float:
    """Tensor-core efficiency of the sm_90a CUDA forward's main loop (``_smem_efficiency``).

    Its CTA is 2 warpgroups, each issuing wgmma m64n128k16 with both operands from shared memory
    over 64 of the tile's 128 rows: per k16 step and model, 2 reads of a 64 x 16 A slice and 2
    of the same 128 x 16 B slice, which is ``_smem_efficiency``'s ``bn // 64`` m64 instructions
    (shared memory serves each warpgroup's read of B separately). The cp.async ring fills, per
    slice of 32, A0 (H), A1 (Hr) and one B: a shared weight feeds both models' wgmmas (2 models
    of A, 1 of W); separate weights run one loop per model (H and W, then Hr and Wr: 1 and 1),
    so their fills are counted per loop, not as the Triton forward's single loop of 2 and 2
    (the ratio, and so the rate, happens to be the same at D = Dr)."""
    bn, bv = _launch.CUDA_BLOCK_ROWS, _launch.CUDA_BLOCK_VOCAB
    return _smem_efficiency(bn, bv, 2, 1) if shared else _smem_efficiency(bn, bv, 1, 1)


def cuda_forward(
    case: Case, dev: Device, tflops: float | None = None, path: str = "wgmma"
) -> Prediction:
    """impl "cuda" forward: 128 x 128 tiles, one CTA per SM, cp.async with L2 hints (weights
    evict_first, hidden states evict_last), the epilogue not overlapped (the registers hold one
    pair of accumulators). ``path``: "wgmma" (sm_90a: 2 warpgroups of m64n128k16 from shared
    memory, a ring of ``CUDA_STAGES_WGMMA`` slices) or "mma" (mma.sync m16n8k16 at
    ``MMA_SYNC_EFFICIENCY``, a ring of ``CUDA_STAGES``)."""
    if path not in CUDA_FWD_PATHS:
        raise ValueError(f"cuda_forward: path must be one of {CUDA_FWD_PATHS}, got {path!r}")
    wgmma = path == "wgmma"
    n, d, v = case.n, case.d, case.v
    bn, bv = _launch.CUDA_BLOCK_ROWS, _launch.CUDA_BLOCK_VOCAB
    h_row, w_win = _launch.cuda_plan_inputs(d, d, True, BF16, wgmma=wgmma)
    plan = _launch.plan(n, v, bn, bv, h_row_bytes=h_row, w_window=w_win, per_wave=dev.sms,
                        l2=dev.l2_bytes)  # fmt: skip
    w_models = 1 if case.shared else 2
    flops = 2 * 2.0 * n * d * v
    eff = cuda_wgmma_efficiency(case.shared) if wgmma else MMA_SYNC_EFFICIENCY
    compute, hbm = _tiled(plan, dev, flops, EPILOGUE["fwd_kl"], logits=2 * n * v, per_sm=1,
                          efficiency=eff, h_bytes=n * h_row, w_bytes=w_models * v * d * BF16,
                          tile_h=bn * h_row)  # fmt: skip
    hbm += 2 * 6 * n * plan.splits * 4
    compulsory = n * h_row + w_models * v * d * BF16 + 4 * n * 4
    label = f"{bn}x{bv} wgmma m64n{bv}" if wgmma else f"{bn}x{bv} mma.sync"
    return _finish(f"cuda fwd [{label}]", case, dev, flops, flops, compute, hbm, compulsory,
                   plan, tflops)  # fmt: skip


def least_forward_hbm(case: Case, dev: Device) -> tuple[int, int]:
    """(least HBM bytes any L2-resident order of the forward's tiles can read, compulsory bytes):
    the forward reads every (hidden-state block, weight tile) pair once; with at most L2/2 of
    either kept resident while the other streams past it, the other is re-read once per
    resident set: H-resident reads H once and W ceil(|H| / (L2/2)) times, W-resident the
    reverse. When neither operand fits L2/2 (N=8192: H is 117 MB) the least of the two exceeds
    2x the compulsory bytes: that target is then out of reach for every launch order."""
    h = case.n * 2 * case.d * BF16
    w = (1 if case.shared else 2) * case.v * case.d * BF16
    half = dev.l2_bytes // 2
    least = min(h + w * math.ceil(h / half), w + h * math.ceil(w / half))
    return least, h + w


def _needs(case: Case) -> tuple[bool, bool]:
    """(G written, Gr written) by gblock for ``case``: the policy hidden states always need a
    gradient; a trained shared head also needs Gr (dW = [G; Gr]^T [h; hr])."""
    return True, case.shared and case.grad_w


def gblock_backward(
    case: Case, dev: Device, tflops: float | None = None,
    config: configs.KernelConfig | None = None, *, held: bool = False,
) -> Prediction:  # fmt: skip
    """impl "triton" gblock backward (the default on CUDA): per vocabulary chunk, the G kernel
    (logits recomputed) and cuBLAS GEMMs dh += G W_c, dW_c = G^T h (in place, fp32 sums).
    ``config``: tiles for every G launch, as ``backward_gblock(config=)`` takes them. ``held``:
    G from the logits ``triton_forward(store=True)`` kept (gradients in the forward, few rows:
    no logit matmul, the kept logits read instead)."""
    n, d, v = case.n, case.d, case.v
    do_g, do_gr = _needs(case)
    name = configs.gpu_config_name("g", n, torch.bfloat16, True, shared=case.shared,
                                   both=do_g and do_gr, held=held, arch=90)  # fmt: skip
    cfg = config or configs.GPU_CONFIGS[name]
    rows = n * (int(do_g) + int(do_gr))
    budget = configs.gblock_budget(int(dev.hbm_capacity * FREE_FRACTION), BF16)
    vc = configs.chunk_columns(rows, v, cfg.block_v, budget)
    chunks = math.ceil(v / vc)
    h_row = configs.plan_inputs(cfg, d, d, True, case.shared, BF16)[0]
    w_models = 1 if case.shared else 2
    one = 2.0 * n * d * v
    compute = hbm = 0.0
    waves, widest = 0, None  # over every G launch: waves summed, the largest wave working set
    for v0 in range(0, v, vc):  # each chunk: the G kernel launches, then the GEMMs
        width = min(vc, v - v0)
        for _off, cols, part in configs.g_launches(name, width):  # the launcher's split
            pcfg = config or configs.GPU_CONFIGS[part]
            w_win = configs.plan_inputs(pcfg, d, d, True, case.shared, BF16)[1]
            plan = _launch.plan(n, cols, pcfg.block_n, pcfg.block_v, h_row_bytes=h_row,
                                w_window=w_win, per_wave=dev.sms * pcfg.per_sm,
                                l2=dev.l2_bytes,
                                tiles_per_program=configs.g_tiles_per_program(pcfg))  # fmt: skip
            if held:  # no dot: both models' kept fp32 logits of these columns read instead
                g_compute, g_hbm = _tiled(plan, dev, 0.0, EPILOGUE["g_kl"], logits=2 * n * cols,
                                          per_sm=pcfg.per_sm, efficiency=1.0, h_bytes=0,
                                          w_bytes=0, tile_h=0)  # fmt: skip
                g_hbm += 2 * n * cols * 4
            else:
                eff = _smem_efficiency(pcfg.block_n, pcfg.block_v, 2, w_models)
                g_compute, g_hbm = _tiled(plan, dev, 2 * 2.0 * n * d * cols, EPILOGUE["g_kl"],
                                          logits=2 * n * cols, per_sm=pcfg.per_sm,
                                          efficiency=eff, h_bytes=n * h_row,
                                          w_bytes=w_models * cols * d * BF16,
                                          tile_h=pcfg.block_n * h_row)  # fmt: skip
            compute += g_compute
            hbm += g_hbm
            waves += plan.waves
            if widest is None or plan.working_set > widest.working_set:
                widest = plan
        # dh += G W_c (policy rows only: the reference is frozen); dW_c = G^T [h; hr] if trained.
        gemm = 2.0 * n * width * d + (2.0 * rows * width * d if case.grad_w else 0.0)
        gemm_hbm = rows * width * BF16 + width * d * BF16 + 2 * n * d * 4  # G, W_c, fp32 sum
        if case.grad_w:
            gemm_hbm += rows * width * BF16 + rows * d * BF16 + width * d * 4  # G, [h; hr], dW_c
        compute += gemm / (dev.bf16_flops * GEMM_EFFICIENCY)
        hbm += rows * width * BF16 + gemm_hbm  # + the G buffer written
    useful = one + (one * (2 if do_gr else 1) if case.grad_w else 0.0)  # dH (+ dW)
    executed = useful if held else 2 * one + useful  # recomputed: both models' logits again
    if held:  # inputs: the kept logits, W for dh (and h, hr for dW); outputs: dh (and dW)
        compulsory = (2 * n * v * 4 + v * d * BF16 + n * d * 4
                      + ((rows * d * BF16 + v * d * 4) if case.grad_w else 0))  # fmt: skip
    else:
        compulsory = n * h_row + w_models * v * d * BF16 + n * d * 4 + (
            v * d * 4 if case.grad_w else 0)  # fmt: skip
    label = "triton held bwd" if held else "triton gblock bwd"
    return _finish(f"{label} [{name}, {chunks} chunks of {vc}]", case, dev, useful,
                   executed, compute, hbm, compulsory, widest._replace(waves=waves),
                   tflops)  # fmt: skip


def predict(dev: Device, tflops: float | None = None) -> list[Prediction]:
    out = []
    for case in cases():
        out += [triton_forward(case, dev, tflops),
                *(cuda_forward(case, dev, tflops, path) for path in CUDA_FWD_PATHS),
                gblock_backward(case, dev, tflops)]  # fmt: skip
        if case.n in FEW_ROWS:  # gradients in the forward: the logits kept, G read from them
            out += [triton_forward(case, dev, tflops, store=True),
                    gblock_backward(case, dev, tflops, held=True)]  # fmt: skip
    return out


def table(preds: list[Prediction]) -> str:
    head = ("| kernel | case | useful TFLOP | executed TFLOP | HBM GB (compulsory) | waves | "
            "wave working set MB (L2/2) | predicted ms | % of matmul roofline |\n"
            "|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    rows = [
        f"| {p.kernel} | {p.case.label} | {p.useful_flops / 1e12:.2f} | "
        f"{p.executed_flops / 1e12:.2f} | {p.hbm_bytes / 1e9:.2f} ({p.compulsory_bytes / 1e9:.2f})"
        f" | {p.waves} | {p.working_set / 1e6:.1f} ({p.budget / 1e6:.1f}) | "
        f"{p.seconds * 1e3:.2f} | {100 * p.roofline_fraction:.0f}% |"
        for p in preds
    ]
    return "\n".join([head, *rows])


# The README's table: these cases, each kernel's time on both GPUs, the rest on the H200 (the
# GPU the project's sessions are lent). ``tests/test_gpu_model.py`` keeps the README in step.
README_CASES = [Case(8192, *SPEC[1:], True, False), Case(8192, *SPEC[1:], False, True),
                Case(1024, *SPEC[1:], True, False), Case(256, *SPEC[1:], True, False)]  # fmt: skip


def readme_table() -> str:
    """The PREDICTED table of the README (``--readme`` prints it)."""
    h100, h200 = DEVICES["H100-SXM"], DEVICES["H200-SXM"]
    kernels = [("triton fwd", triton_forward),
               *((f"cuda fwd, {'mma.sync' if p == 'mma' else p}",
                  lambda c, d, p=p: cuda_forward(c, d, path=p)) for p in CUDA_FWD_PATHS),
               ("triton gblock bwd", gblock_backward)]  # fmt: skip
    budget = int(h200.l2_bytes * _launch.L2_FRACTION) / 1e6
    head = ("| case (bf16, D=3584, V=152064) | kernel | H100 SXM ms | H200 ms | of matmul roofline "
            "| executed / useful TFLOP | HBM GB on H200 (compulsory) | wave working set MB on H200 "
            f"(L2/2 = {budget:.1f}) |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    rows = []
    for case in README_CASES:
        for name, fn in kernels:
            a, b = fn(case, h100), fn(case, h200)
            cells = [case.label, name, f"{a.seconds * 1e3:.1f}", f"{b.seconds * 1e3:.1f}",
                     f"{100 * b.roofline_fraction:.0f}%",
                     f"{b.executed_flops / 1e12:.1f} / {b.useful_flops / 1e12:.1f}",
                     f"{b.hbm_bytes / 1e9:.1f} ({b.compulsory_bytes / 1e9:.2f})",
                     f"{b.working_set / 1e6:.1f}"]  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, *rows])


def compare(results_csv, dev: Device, cuda_path: str | None = None) -> list[dict]:
    """Predicted vs measured forward time for every GPU ``token_kl`` forward row of a
    ``benchmarks.run`` CSV (impls triton and cuda; the bench's reference weight is
    ``w.detach()``, a distinct tensor, which the kernels read as a separate weight: predicted
    as such), each predicted on the matmul rate that run measured. A cuda row is
    predicted for ``cuda_path`` (the forward kernel that ran); the CSV does not record it, so
    with None every cuda row is predicted for both paths, each marked "path not recorded"."""
    out = []
    with open(results_csv, newline="") as f:
        for row in csv.DictReader(f):
            if (row.get("op"), row.get("mode"), row.get("device"), row.get("status")) != (
                "token_kl",
                "forward",
                "cuda",
                "ok",
            ) or row.get("impl") not in ("triton", "cuda"):
                continue
            rate = float(row["matmul_tflops"]) if row.get("matmul_tflops") else None
            case = Case(int(row["N"]), int(row["D"]), int(row["V"]), False, False)
            measured = float(row["p50_ms"]) / 1e3
            if row["impl"] == "triton":
                preds = [("", triton_forward(case, dev, rate))]
            else:
                paths = [cuda_path] if cuda_path else CUDA_FWD_PATHS
                preds = [(p, cuda_forward(case, dev, rate, p)) for p in paths]
            for path, pred in preds:
                out.append(_compared(row["impl"], path, bool(cuda_path or not path), case,
                                     row, rate, pred.seconds, measured))  # fmt: skip
    return out


def _compared(impl, path, path_known, case, row, rate, seconds, measured) -> dict:
    """One row of ``compare_table``: ``seconds`` PREDICTED against ``measured``."""
    return {"impl": impl, "path": path, "path_known": path_known, "case": case.label,
            "dtype": row.get("dtype", ""), "rate_tflops": rate, "predicted_ms": seconds * 1e3,
            "measured_ms": measured * 1e3,
            "measured_over_predicted": measured / seconds}  # fmt: skip


def compare_backward(backward_csv, dev: Device, rate: float | None = None) -> list[dict]:
    """Predicted vs measured time of the ``triton_gblock`` rows of a ``benchmarks.gpu_backward``
    CSV (the default backward on CUDA; shared head, ``dh`` = LoRA, ``dh+dW`` = trained head,
    both sides' dW) and of its ``triton_held`` rows (the forward that keeps the logits + G read
    back from them: the row's time includes that forward), predicted on ``rate`` (the bench's
    measured matmul rate) or the datasheet."""
    out = []
    with open(backward_csv, newline="") as f:
        for row in csv.DictReader(f):
            path = row.get("path")
            if path not in ("triton_gblock", "triton_held") or row.get("status") != "ok":
                continue
            case = Case(int(row["n"]), int(row["d"]), int(row["v"]), True, row["need"] == "dh+dW")
            if path == "triton_gblock":
                label, seconds = "triton gblock bwd", gblock_backward(case, dev, rate).seconds
            else:
                label = "triton fwd+logits + held bwd"
                seconds = (triton_forward(case, dev, rate, store=True).seconds
                           + gblock_backward(case, dev, rate, held=True).seconds)  # fmt: skip
            measured = float(row["p50_ms"]) / 1e3
            out.append(_compared(label, "", True, case, row, rate, seconds, measured))
    return out


def _bench_rate(results_csv) -> float | None:
    """The median matmul rate (TFLOP/s) a ``benchmarks.run`` CSV measured on a GPU, or None."""
    with open(results_csv, newline="") as f:
        rates = sorted(float(r["matmul_tflops"]) for r in csv.DictReader(f)
                       if r.get("device") == "cuda" and r.get("matmul_tflops"))  # fmt: skip
    return rates[len(rates) // 2] if rates else None


def _impl_label(r: dict) -> str:
    if not r["path"]:
        return r["impl"]
    return f"{r['impl']} {r['path']}" + ("" if r["path_known"] else " (path not recorded)")


def compare_table(rows: list[dict]) -> str:
    head = ("| impl | case | dtype | matmul rate used (TFLOP/s) | PREDICTED ms | measured ms | "
            "measured / predicted |\n|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [f"| {_impl_label(r)} | {r['case']} | {r['dtype']} | "
             f"{'datasheet' if r['rate_tflops'] is None else r['rate_tflops']} | "
             f"{r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | "
             f"{r['measured_over_predicted']:.2f} |" for r in rows]  # fmt: skip
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=sorted(DEVICES), action="append",
                    help="datasheet to predict for (default: all)")  # fmt: skip
    ap.add_argument(
        "--tflops",
        type=float,
        default=None,
        help="a measured bf16 matmul rate (TFLOP/s) instead of the datasheet's",
    )
    ap.add_argument(
        "--measured",
        default=None,
        metavar="DIR",
        help="a GPU run's folder (its results.csv and backward/backward.csv): predicted vs "
        "measured forward and gblock backward",
    )
    ap.add_argument("--cuda-path", choices=CUDA_FWD_PATHS, default=None,
                    help="the CUDA forward the --measured run took (gpu_cuda_check.py writes "
                    "it to cuda_fwd_path.txt); unknown: both are listed")  # fmt: skip
    ap.add_argument("--out", default=None, metavar="DIR", help="also write the tables here")
    ap.add_argument("--readme", action="store_true", help="print the README's table and exit")
    args = ap.parse_args(argv)
    if args.readme:
        print(readme_table())
        return 0
    texts = []
    if args.measured:
        dev = DEVICES[(args.device or ["H200-SXM"])[0]]
        csv_path = Path(args.measured) / "results.csv"
        if not csv_path.is_file():
            print(f"--measured: no results.csv in {args.measured}; predictions only")
        else:
            rows = compare(csv_path, dev, args.cuda_path)
            body = compare_table(rows) if rows else "(no GPU token_kl forward rows)"
            text = f"\n## PREDICTED vs measured: {dev.name} model, {csv_path}\n\n{body}"
            print(text)
            texts.append(text)
        bwd_csv = Path(args.measured) / "backward" / "backward.csv"
        if bwd_csv.is_file():
            rate = _bench_rate(csv_path) if csv_path.is_file() else None
            rows = compare_backward(bwd_csv, dev, rate)
            body = compare_table(rows) if rows else "(no measured triton_gblock / held rows)"
            text = f"\n## PREDICTED vs measured backward: {dev.name} model, {bwd_csv}\n\n{body}"
            print(text)
            texts.append(text)
    for key in args.device or sorted(DEVICES):
        dev = DEVICES[key]
        rate = f"measured {args.tflops} TFLOP/s" if args.tflops else "datasheet peak"
        text = (f"\n## PREDICTED (model, not measured): {dev.name}, {rate}, "
                f"{dev.hbm_bytes_per_s / 1e12:.2f} TB/s, L2 {dev.l2_bytes >> 20} MiB\n\n"
                + table(predict(dev, args.tflops)))  # fmt: skip
        print(text)
        texts.append(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_model.md").write_text("\n".join(texts) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
