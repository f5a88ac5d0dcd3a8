"""Test-only patch of Triton's CPU interpreter (TRITON_INTERPRET=1).

The interpreter stores bfloat16 values as raw uint16 bit patterns and its ``tl.dot`` hands them to
``np.matmul`` as integers, so a bf16 dot returns silently wrong numbers. On a GPU the same code
multiplies bf16 values with fp32 accumulation; this patch makes the interpreter do that (convert
bf16 operands to fp32 exactly: the bf16 bits are the top half of the fp32 bits). The kernels are
unchanged; only the CPU emulation is corrected.
"""

from __future__ import annotations

import numpy as np


def install() -> bool:
    """Patch ``InterpreterBuilder.create_dot`` once; returns whether a patch was installed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:
        return False
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_fgpo_bf16_patch", False):
        return False
    original = builder.create_dot

    def as_fp32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            bits = handle.data.astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, as_fp32(a), as_fp32(b), d, input_precision, max_num_imprecise_acc)

    create_dot._fgpo_bf16_patch = True
    builder.create_dot = create_dot
    return True
