"""Test-only patches of Triton's CPU interpreter (TRITON_INTERPRET=1).

The interpreter stores bfloat16 values as raw uint16 bit patterns and its ``tl.dot`` hands them to
``np.matmul`` as integers, so a bf16 dot returns silently wrong numbers. On a GPU the same code
multiplies bf16 values with fp32 accumulation; this patch makes the interpreter do that (convert
bf16 operands to fp32 exactly: the bf16 bits are the top half of the fp32 bits). Second, triton
3.6's interpreter (the GPU machine's release) fails every loop with a runtime bound under numpy 2;
the patch does what triton 3.7 does, so ``make test-oldest`` runs the Triton tests on 3.6 too.
The kernels are unchanged; only the CPU emulation is corrected (the package itself refuses the
unpatched 3.6 interpreter, ``triton_kl.common.interpreter_loop_error``).
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
    _index_of_one_element(interpreter)
    return True


def _index_of_one_element(interpreter) -> None:
    """triton 3.6's interpreter turns a scalar into an index with ``int(array)``, which numpy 2
    refuses for its 1-element arrays (a loop with a runtime bound fails); 3.7 squeezes first."""
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
