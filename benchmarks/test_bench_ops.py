"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

Small shapes (seconds per test on a CPU; the GPU picks a real head), every impl of every op
side by side, grouped per (op, mode) so that pytest-benchmark's table compares them. Impls
that cannot run here are skipped with the reason. Peak memory and the full shape sweeps are the
runner's job (``python -m benchmarks.run``), not this suite's.
"""

from __future__ import annotations

import pytest
import torch

from .impls import IMPLS, build, skip_reason
from .shapes import Case, e2e_case

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (N, D, V, dtype): on CPU small enough for seconds; on a GPU Qwen2.5-VL-7B's head, few rows.
SHAPE = (1024, 3584, 152064, "bfloat16") if CUDA else (256, 128, 8192, "float32")
TINY = (64, 64, 1000, "float32")  # the Triton interpreter on CPU


def _case(op: str, impl: str) -> Case:
    if op == "fire_mpo_step":
        if CUDA:
            return e2e_case("qwen2.5-vl-7b", "bfloat16", 1, 1024, 256, 64)
        return e2e_case("qwen2.5-vl-7b", "float32", 1, 256, 64, 16, f=16)
    interp = impl == "triton" and not CUDA
    n, d, v, dt = TINY if interp else SHAPE
    label, note = ("tiny", "interpreter") if interp else ("bench", "")
    return Case(op, n, d, v, dt, label, note=note)


OPS = ("token_kl", "token_logprobs", "fire_mpo_step")
PARAMS = [(op, impl) for op in OPS for impl in IMPLS[op]]


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize(("op", "impl"), PARAMS, ids=[f"{o}-{i}" for o, i in PARAMS])
def test_bench(benchmark, op, impl, mode):
    case = _case(op, impl)
    why = skip_reason(impl, case, DEVICE, interpreter_ok=True)
    if why:
        pytest.skip(why)
    fn, leaves, note = build(impl, case, DEVICE, liger_eager=True)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def clear():
        for t in leaves:
            t.grad = None

    def step():
        out = fn()
        if mode == "full":
            out.backward()
        sync()

    benchmark.group = f"{op} {mode} N={case.n} D={case.d} V={case.v} {case.dtype}"
    benchmark.extra_info.update(impl=impl, device=DEVICE, note=note)
    benchmark.pedantic(step, setup=clear, rounds=5, warmup_rounds=1)
