"""The matmul floor of token_kl: only the matmuls the op must do, nothing else.

Per chunk of rows, over the whole vocabulary: the two logit matmuls (policy and frozen
reference), dH = Z W and, when the head is trained, dW += Z^T H (``Z`` stands in for the logit
gradient: the values do not matter, only the work). Computed in the forward and handed out by
the backward, as Liger's chunked losses and our held plan do, so ``full`` times the 4 (frozen
head: 3) matmul-equivalents and no elementwise work: the floor any implementation of the op
can reach on this machine. Not a loss: its value is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per chunk: enough to keep every matmul efficient (the floor's memory is not a concern).
ROWS = 1024


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, hr: Tensor, w: Tensor) -> Tensor:
        wd = w.detach()
        dh = torch.empty_like(h)
        dw = torch.zeros_like(w) if ctx.needs_input_grad[2] else None
        for s0 in range(0, h.shape[0], ROWS):
            hs = h[s0 : s0 + ROWS]
            z = hs @ wd.T
            hr[s0 : s0 + ROWS] @ wd.T  # the reference logits (their values are not used)
            torch.mm(z, wd, out=dh[s0 : s0 + ROWS])
            if dw is not None:
                dw.addmm_(z.T, hs)
        ctx.grads = (dh, dw)
        return h.new_zeros(())

    @staticmethod
    def backward(ctx, g: Tensor):
        dh, dw = ctx.grads
        return dh, None, dw


def token_kl_floor(h: Tensor, hr: Tensor, w: Tensor) -> Tensor:
    """A zero scalar whose forward + backward do token_kl's matmuls and nothing else."""
    return _Floor.apply(h, hr, w)
