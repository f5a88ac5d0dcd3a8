"""Peak memory of one training step by category, with PyTorch's ``MemTracker``.

``MemTracker`` (``torch.distributed._tools.mem_tracker``) follows every tensor storage created
inside it and files it as parameter, buffer, gradient, activation, temporary (backward) or
optimizer state, keeping the snapshot at the peak of the total. ``StepTracker`` adapts it to a
training step of the trainer:

- frozen parameters get no gradient hook (``MemTracker`` registers one on every parameter it
  meets, which fails on a tensor that needs no gradient: the frozen base model, and the LoRA
  weights while PEFT has the adapters disabled for the reference pass);
- the same backbone is called again for every micro-batch (and once for the reference):
  ``MemTracker`` refuses a second top-level call of a module it has seen, since its per-module
  statistics would mix two iterations; only the step's peak is used here, so the per-module
  statistics are reset instead.

The same class measures a real step (CPU tensors) and a simulated one (meta tensors).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _UpdateType

# MemTracker's categories, in the order of the report's columns.
CATEGORIES = {
    "Parameter": "params",
    "Buffer": "buffers",
    "Gradient": "grads",
    "Activation": "activations",
    "Temp": "temporaries",
    "Optstate": "optimizer",
    "Other": "other",
}


class _NoHook:
    def remove(self) -> None:
        pass


class StepTracker(MemTracker):
    """``MemTracker`` for a trainer's step: ``track(model, optimizer)`` before entering."""

    def track(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for p in model.parameters():
            if not p.requires_grad:  # see the module doc: no gradient, no hook
                self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
        self._track_module_params_and_buffers(model, install_grad_hooks=True)
        self.track_external(optimizer)

    def ignore(self, *tensors: torch.Tensor) -> None:
        """Count these storages as zero bytes: host tensors that a real CPU step uses in place,
        where a GPU step copies them in (the copies are counted when they are made). Without
        this, MemTracker would count a storage from outside at its first view inside."""
        for t in tensors:
            for winfo in self._update_and_maybe_create_winfos(t, self._ref_class.OTH):
                self._update_snap(_UpdateType.DEL, winfo)
                winfo.mem_consumed = 0
                winfo.size = winfo.element_size = 0

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        try:
            super()._pre_fw_hook(module, inputs)
        except NotImplementedError:  # a module called again at top level (see the module doc)
            self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state: Any) -> None:
        # Only the step's peak is used: MemTracker's per-module peaks cost a pass over every
        # module seen (thousands with LoRA) for every op, which dominates a real-size run.
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)

    def peak_bytes(self, device: str) -> dict[str, int]:
        """The snapshot at ``device``'s peak: bytes per category (``CATEGORIES``' values) and
        ``total``. One device only: a simulated step's host-side tensors (what the code moves to
        the CPU, e.g. ids for the shared-prefix packing) are on "cpu", its GPU's on "meta"."""
        out = dict.fromkeys((*CATEGORIES.values(), "total"), 0)
        for dev, snap in self.get_tracker_snapshot("peak").items():
            if torch.device(dev).type != device:
                continue
            for key, n in snap.items():
                name = "total" if key == "Total" else CATEGORIES[getattr(key, "value", key)]
                out[name] += int(n)
        return out
