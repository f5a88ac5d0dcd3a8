"""The KL of nearly equal models at large logits: every impl within 2x of the materialized path.

Real heads give logits near 30 and more, and a policy a few steps away from its reference has a
token KL near 1e-4. rkl = a/s - (lse - lser) then subtracts two numbers near 40 whose difference
is O(0.01) and must be right to 1e-6: formed from fp32 lse and lser (ulp(40) ~ 4e-6) it cost
about 1% of the KL here, 6-12x the materialized fp32 path's error (torch, triton and cuda, each
measured with that grouping). Every impl therefore forms lse - lser as (m - mr) +
(log s - log sr) (``_backend.finish_kl``, csrc/tile_math.h ``kl_finish``): 0.5-0.7x.

The inputs are built so that every logit is EXACT in fp32, bf16 inputs and any summation order
(entries are small multiples of 2^-6, a column of ones times 30 shifts every logit by 30): all
impls and the float64 definition see identical logits, and what is measured is the arithmetic
of the statistics alone. The materialized fp32 path (impl "reference" in fp32: log_softmax,
then sum p (log p - log r)) is the yardstick, as design §4.1 asks.
"""

from __future__ import annotations

import pytest
import torch
from helpers import kl_offset_case, kl_offset_errors

from fgpo_kernels import _registry


def _available(impl: str) -> bool:
    return _registry.status(impl)["available"]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
@pytest.mark.parametrize("impl", ["torch", "triton", "cuda"])
def test_kl_near_offset_30_within_2x_of_materialized(impl, shared):
    """fp32 inputs (cuda: bf16, the dtype its kernels run; the values are the same). On a CPU,
    impl 'cuda' runs emulated in tests/test_cuda_emulate.py."""
    if not _available(impl):
        pytest.skip(_registry.status(impl)["reason"])
    dtype = torch.bfloat16 if impl == "cuda" else torch.float32
    for seed in (0, 1):
        ef, er, mf, mr = kl_offset_errors(impl, dtype, kl_offset_case(seed, shared))
        assert ef <= 2 * mf and er <= 2 * mr, (
            f"{impl} seed {seed}: fkl {ef:.2e} rkl {er:.2e} vs materialized fp32 fkl {mf:.2e} "
            f"rkl {mr:.2e}"
        )
