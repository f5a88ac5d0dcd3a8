"""The grouped launch order reaches the kernels: Triton's ``_grouped_pid`` (run in the
interpreter) and CUDA's ``grouped_pos`` (csrc/launch.h, compiled with g++ against the emulation
header) map program ids exactly as ``tests/test_launch.py``'s ``_order`` does, and every Triton
launcher hands its kernel the group of its own launch plan (a launcher that passed, say, the
row-block count would still compute the right numbers: only the order, and so the L2 reuse,
would be lost)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from emulation import CSRC
from test_launch import _order
from test_triton_kl import _grads_in, _inputs, _ok, needs_triton

from fgpo_kernels import _launch
from fgpo_kernels._backend import Needs

# (row blocks, columns, group): whole groups, a partial last group, one group, group 1
ORDERS = [(6, 5, 2), (7, 3, 3), (4, 4, 4), (5, 2, 1), (3, 7, 8)]

if _ok:
    import triton
    import triton.language as tl

    from fgpo_kernels.triton_kl import bwd_atomic, bwd_gblock, configs, fwd
    from fgpo_kernels.triton_kl.common import _grouped_pid, logit_buffer

    @triton.jit
    def _pid_map(out_ptr, n_row_blocks, n_col_blocks, group):
        pid_n, pid_v = _grouped_pid(n_row_blocks, n_col_blocks, group)
        pid = tl.program_id(0)
        tl.store(out_ptr + 2 * pid, pid_n)
        tl.store(out_ptr + 2 * pid + 1, pid_v)


@needs_triton
@pytest.mark.parametrize("rb,cols,group", ORDERS)
def test_triton_grouped_pid_is_the_planned_order(rb, cols, group):
    out = torch.full((rb * cols, 2), -1, dtype=torch.int64)
    _pid_map[(rb * cols,)](out, rb, cols, min(group, rb))
    assert [tuple(r) for r in out.tolist()] == _order(rb, cols, min(group, rb))


@pytest.mark.parametrize("rb,cols,group", ORDERS)
def test_cuda_grouped_pos_is_the_planned_order(tmp_path, rb, cols, group):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    src = tmp_path / "order.cpp"
    src.write_text(
        '#include "launch.h"\n#include <cstdio>\n#include <cstdlib>\n'
        "int main(int, char** argv) {\n"
        "  long long rb = atoll(argv[1]), cols = atoll(argv[2]), group = atoll(argv[3]);\n"
        "  for (long long pid = 0; pid < rb * cols; ++pid) {\n"
        "    fgpo::GridPos p = fgpo::grouped_pos(pid, rb, cols, group);\n"
        '    std::printf("%lld %lld\\n", p.row, p.col);\n  }\n}\n'
    )
    exe = tmp_path / "order"
    subprocess.run([cxx, "-std=c++20", "-pthread", "-DFGPO_EMULATE=1", f"-I{CSRC}", str(src),
                    "-o", str(exe)], check=True, capture_output=True)  # fmt: skip
    got = subprocess.run([str(exe), str(rb), str(cols), str(group)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    pairs = [tuple(map(int, line.split())) for line in got.splitlines()]
    assert pairs == _order(rb, cols, min(group, rb))


class _Spy:
    """Stands in for a jitted kernel: records the ``group`` argument of each launch, then
    launches the real kernel."""

    def __init__(self, kernel, seen: list) -> None:
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.seen.append(args[self.kernel.arg_names.index("group")])
            return self.kernel[grid](*args, **kw)

        return launch


@needs_triton
def test_triton_launchers_pass_their_plans_group(monkeypatch):
    """With the plan's group forced to 3 (of 4 row blocks: a partial last group), the forward,
    the forward that keeps its logits, the G kernel and the atomic backward are all launched
    with group 3."""
    real = _launch.group_rows
    monkeypatch.setattr(_launch, "group_rows", lambda *a: (3, real(*a)[1]))
    seen = []
    monkeypatch.setattr(fwd, "_fwd_kernel", _Spy(fwd._fwd_kernel, seen))
    monkeypatch.setattr(bwd_gblock, "_g_kernel", _Spy(bwd_gblock._g_kernel, seen))
    monkeypatch.setattr(bwd_atomic, "_bwd_kernel", _Spy(bwd_atomic._bwd_kernel, seen))
    n, d, v = 200, 32, 300  # interpreter tiles: 64 rows a block, 4 row blocks
    assert configs.named_config("fwd", n, d).block_n == 64
    h, hr, w, wr = _inputs(n, d, v)
    stats = fwd.forward(h, hr, w, wr, 1.0)
    fwd.forward(
        h, hr, w, wr, 1.0, logits=(logit_buffer(n, v, h.device), logit_buffer(n, v, h.device))
    )
    gs = _grads_in(n, True)
    need = Needs(True, False, False, False)
    bwd_gblock.backward_gblock(h, hr, w, wr, 1.0, stats, gs, need)
    bwd_atomic.backward_atomic(h, hr, w, wr, 1.0, stats, gs, need)
    assert seen == [3, 3, 3, 3], seen
