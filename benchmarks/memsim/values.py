"""Real values for the small tensors of a step run on meta tensors.

A step simulated on ``meta`` tensors allocates nothing, so it cannot read data. Yet the real
code reads data to decide shapes: the loss gathers the span-masked rows (``nonzero``), the
Qwen-VL models build position ids and window indices from ``input_ids`` and
``image_grid_thw`` (``.tolist()``, boolean indexing), the optimizer reads its step counter.
``KnownValues`` (a dispatch mode) keeps, beside every meta tensor of at most ``limit`` elements
whose inputs are all known, the real CPU tensor the same op gives on the known inputs: the
batch's ids, masks, targets and image grids (copied in from real CPU tensors) and everything
computed from them alone. A data-dependent op on known inputs is answered from the real values,
so every row count and position id is the real one.

Hidden states, logits and gradients stay unknown (they are big and come from random weights
anyway). Three stated rules read them where the code asks about them, each use counted in
``assumed`` with the line that asked (the report lists them):

- an unknown float tensor is finite and nonzero everywhere: ``x != 0`` and ``isfinite(x)`` are
  all true, ``x == 0``, ``isnan(x)``, ``isinf(x)`` all false (in a step: every selected row has a
  nonzero gradient, no metric is NaN);
- an unknown float scalar reads as 1.0, finite and nonzero too (the losses and norms the
  trainer logs and checks for finiteness);
- anything else unknown that the code reads is an error naming the op and the shape.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

_ATTR = "_fgpo_known_value"
_META = torch.device("meta")
_CPU = torch.device("cpu")
aten = torch.ops.aten
_SCALAR = aten._local_scalar_dense.default
# Uninitialized memory has no value to carry (a kernel fills it later, or nothing does).
_UNINITIALIZED = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
    aten.new_empty.default, aten.new_empty_strided.default,
}  # fmt: skip
# Predicates on an unknown float tensor and what they read as ("finite and nonzero").
_ASSUMED = {
    aten.ne.Scalar: True,
    aten.eq.Scalar: False,
    aten.isnan.default: False,
    aten.isinf.default: False,
    aten.isfinite.default: True,
}


def _is_meta(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def _to_cpu_arg(x: Any) -> Any:
    """Device arguments of a replayed op: meta becomes cpu (the values live on the CPU)."""
    if isinstance(x, torch.device) and x.type == "meta":
        return _CPU
    if isinstance(x, str) and x == "meta":
        return "cpu"
    return x


def _leaves_meta(func, args, kwargs) -> bool:
    """Whether the op moves data off the meta device (its result is a real tensor)."""
    if func is aten._to_copy.default:
        dev = kwargs.get("device")
        return dev is not None and torch.device(dev).type != "meta"
    if func is aten.copy_.default:
        return not _is_meta(args[0])
    return False


class KnownValues(TorchDispatchMode):
    """Carry real values beside small meta tensors; answer data-dependent ops from them.

    ``limit``: the most elements a tensor may have to get a value (values are computed on the
    CPU, op by op, so big tensors such as hidden states never get one).
    """

    def __init__(self, limit: int = 1 << 22) -> None:
        super().__init__()
        self.limit = limit
        self.assumed: Counter[str] = Counter()

    def __enter__(self):
        self._constructors = _MetaConstructors(self)
        self._constructors.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._constructors.__exit__(*exc)

    # -- values --------------------------------------------------------------------------
    def value(self, t: Any) -> Any:
        """The real value of ``t`` (itself when it is not a meta tensor), or None."""
        if not _is_meta(t):
            return t
        return t.__dict__.get(_ATTR)

    def _replay(self, func, args, kwargs) -> tuple | None:
        """``(func on the values of args,)``, or None when an argument is unknown."""
        unknown = False

        def val(x: Any) -> Any:
            nonlocal unknown
            if isinstance(x, torch.Tensor):
                v = self.value(x)
                unknown |= v is None
                return v
            return _to_cpu_arg(x)

        rargs, rkwargs = tree_map(val, args), tree_map(val, kwargs)
        if unknown:
            return None
        with _disable_current_modes():
            return (func(*rargs, **rkwargs),)

    def _attach(self, out: Any, real: Any) -> None:
        for o, r in zip(tree_flatten(out)[0], tree_flatten(real)[0]):
            if _is_meta(o) and isinstance(r, torch.Tensor):
                o.__dict__[_ATTR] = r

    def _forget_mutated(self, func, args) -> None:
        for spec, x in zip(func._schema.arguments, args):
            if spec.alias_info is not None and spec.alias_info.is_write and _is_meta(x):
                x.__dict__.pop(_ATTR, None)

    def _note(self, what: str) -> None:
        # The innermost frame outside torch and this file names the code that relied on it.
        here = __file__.rsplit("/", 1)[-1]
        site = next(
            (
                f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                for f in reversed(traceback.extract_stack())
                if "/torch/" not in f.filename and not f.filename.endswith(here)
            ),
            "?",
        )
        self.assumed[f"{what} ({site})"] += 1

    def _meta_like(self, r: Any) -> Any:
        """A meta tensor standing for the real CPU tensor ``r`` (carrying it when small)."""
        if not isinstance(r, torch.Tensor):
            return r
        t = torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=_META)
        if r.numel() <= self.limit:
            t.__dict__[_ATTR] = r
        return t

    # -- dispatch ------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SCALAR:
            return self._scalar(args[0])
        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as err:
            # Meta kernels refuse data-dependent ops (nonzero, item, boolean indexing, ...).
            return self._data_dependent(func, args, kwargs, err)
        flat = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not any(_is_meta(o) for o in flat):
            return out  # real tensors only: nothing to carry
        real = None
        if func in _UNINITIALIZED:
            pass
        elif func is aten._to_copy.default and not _is_meta(args[0]):
            # Data copied in (the batch): its value is the source itself, whatever its size.
            real = (args[0].to(kwargs.get("dtype") or args[0].dtype),)
        elif all(o.numel() <= self.limit for o in flat) and self._maybe_known(args, kwargs):
            real = self._replay(func, args, kwargs)
        if real is None and func in _ASSUMED and self.value(args[0]) is None:
            self._note(f"unknown float {func.__name__} read as {_ASSUMED[func]}")
            real = (torch.full(out.shape, _ASSUMED[func], dtype=torch.bool),)
        if real is None:
            self._forget_mutated(func, args)
        else:
            self._attach(out, real[0])
        return out

    def _maybe_known(self, args, kwargs) -> bool:
        """False when a tensor argument is a meta tensor without a value (the common case:
        hidden states), checked before paying for a replay."""
        for x in (*args, *kwargs.values()):
            if isinstance(x, torch.Tensor):
                if _is_meta(x) and _ATTR not in x.__dict__:
                    return False
            elif isinstance(x, (list, tuple)):
                if not self._maybe_known(x, {}):
                    return False
        return True

    def _scalar(self, t: torch.Tensor) -> Any:
        v = self.value(t)
        if v is not None:
            return v.item()
        if t.dtype.is_floating_point:
            self._note("unknown float scalar read as 1.0")
            return 1.0
        raise RuntimeError(
            f"simulation: the code reads an unknown {t.dtype} tensor {tuple(t.shape)}; only "
            "values computed from the batch are known (benchmarks/memsim/values.py)"
        )

    def _data_dependent(self, func, args, kwargs, err: Exception) -> Any:
        if func is aten.index.Tensor and self.value(args[0]) is None:
            return self._index_rows(func, args, kwargs, err)
        real = self._replay(func, args, kwargs)
        if real is None:
            raise err
        if _leaves_meta(func, args, kwargs):  # .cpu(), .tolist(), a copy into a CPU tensor
            return real[0]
        return tree_map(self._meta_like, real[0])

    def _index_rows(self, func, args, kwargs, err: Exception) -> Any:
        """``x[mask]`` with an unknown ``x`` (hidden states) and a known boolean mask: the
        mask becomes its integer indices, so the gather has its real row count."""
        x, new = args[0], []
        for idx in args[1]:
            if _is_meta(idx) and idx.dtype == torch.bool:
                found = self._replay(aten.nonzero.default, (idx,), {})
                if found is None:
                    raise err
                new += [self._meta_like(c.contiguous()) for c in found[0].unbind(1)]
            else:
                new.append(idx)
        return self.__torch_dispatch__(func, (), (x, new, *args[2:]), kwargs)


class _MetaConstructors(TorchFunctionMode):
    """``torch.tensor(data, device="meta")`` builds on the meta device without a dispatched op
    (so without a value): built on the CPU and moved instead, the move carries the value."""

    _FUNCS = (torch.tensor, torch.as_tensor)

    def __init__(self, known: KnownValues) -> None:
        super().__init__()
        self.known = known

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self._FUNCS or not args:
            return func(*args, **kwargs)
        # Elements that are meta tensors (a list of 0-d results) are read from their values.
        data = tree_map(lambda x: self.known.value(x) if _is_meta(x) else x, args[0])
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "meta":
            return func(data, *args[1:], **{**kwargs, "device": _CPU}).to(_META)
        return func(data, *args[1:], **kwargs)


def _flash_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
    enable_gqa=False,
):  # fmt: skip
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.where(attn_mask, 0.0, float("-inf")).to(query.dtype)
    out, _ = aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out


@contextlib.contextmanager
def flash_attention_on_meta() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` on meta tensors as a flash-style kernel.

    It picks its kernel in C++ from the device, and on meta always falls back to the math
    kernel, which keeps the whole (L x L) attention matrix for the backward. On an H100/H200 it
    runs flash or memory-efficient attention, which keep the output and one log-sum-exp per row;
    so does PyTorch's CPU flash kernel, which meta tensors get instead (its meta kernel gives
    the shapes), called as the CPU calls it (a boolean mask becomes an additive one first).
    Registered for the AutogradMeta key, so checkpoint recomputation in the backward takes it
    too; removed on exit.
    """
    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl("scaled_dot_product_attention", _flash_attention, "AutogradMeta")
        yield
    finally:
        lib._destroy()
