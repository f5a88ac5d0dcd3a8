"""Loading Hugging Face vision-language models and getting hidden states without logits.

The trainer needs three things from a model, and nothing else:

* ``backbone_hidden_states(model, **inputs)``: the last hidden state ``(B, L, D)`` of the
  language model after the vision features are merged in — the inner ``model.model`` of every
  ``*ForConditionalGeneration`` class, which stops before ``lm_head``, so no logits exist;
* ``lm_head_weight(model)``: the ``(V, D)`` weight ``W`` that the fused loss streams over;
* ``reference_context(model)``: a context in which the same call gives the reference model
  (LoRA adapters disabled; no second copy in memory). For full fine-tuning the reference is a
  frozen copy (``frozen_reference``) and the context is not used.

Images and text are encoded by :class:`fgpo.models.processor.VLProcessor`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .prefix import VisionFeatures
from .processor import VLProcessor

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"bfloat16"``/``"float32"``/... or a ``torch.dtype`` → ``torch.dtype`` (None = float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def default_attn_implementation() -> str:
    """``flash_attention_2`` when flash-attn is importable and a GPU is present, else ``sdpa``."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = "bfloat16",
    attn_implementation: str | None = None,
) -> tuple[nn.Module, VLProcessor]:
    """Load a vision-language model and its processor through the Auto classes.

    ``name_or_path`` is a Hub id, a local directory, or ``tiny-llava`` / ``tiny-qwen2-vl`` /
    ``tiny-qwen2.5-vl`` / ``tiny-qwen3-vl`` (random tiny models built offline by
    :mod:`fgpo.models.tiny`). ``attn_implementation`` None picks flash-attn 2 when importable
    (GPU), else sdpa.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from . import tiny

    if tiny.is_tiny_name(name_or_path):
        name_or_path = tiny.ensure_tiny_model(name_or_path)
    attn = attn_implementation or default_attn_implementation()
    config = AutoConfig.from_pretrained(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype), attn_implementation=attn
    )
    processor = VLProcessor.from_pretrained(name_or_path, model_config=config)
    return model, processor


def unwrap(model: nn.Module) -> nn.Module:
    """The Hub model inside DDP / PEFT wrappers (LoRA layers stay injected in it)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "get_base_model"):  # PeftModel
        model = model.get_base_model()
    return model


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The ``(V, D)`` output-projection weight (shared by policy and reference under LoRA)."""
    m = unwrap(model)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    if head is None:
        head = getattr(m, "lm_head", None)
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"cannot find the LM head of {type(m).__name__}")
    if getattr(head, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported by the fused loss")
    return head.weight


# Transforms a model family applies to its logits before the softmax, which the fused loss (a
# softmax of hidden @ W^T) does not: the model's distribution would silently differ from ours.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": "tanh soft-capping of the logits (Gemma 2 style)",
    "logit_scale": "a scale on the logits (Cohere style)",
    "logits_scaling": "a division of the logits (Granite style)",
}


def check_logit_transforms(model: nn.Module) -> None:
    """Refuse a model whose config transforms the logits before the softmax (soft-capping, a
    logit scale), naming the family and the setting: every ``fgpo_kernels`` impl computes the
    softmax of ``hidden @ W^T`` itself, so such a model would be trained on another
    distribution than the one it samples from. Gemma 3 / MedGemma leave the logits as they are
    (``final_logit_softcapping=None``) and pass."""
    config = getattr(unwrap(model), "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for key, what in _LOGIT_TRANSFORMS.items():
            value = getattr(cfg, key, None) if cfg is not None else None
            if value is None or (key != "final_logit_softcapping" and float(value) == 1.0):
                continue
            family = getattr(cfg, "model_type", type(cfg).__name__)
            raise ValueError(
                f"{family}: {key}={value} applies {what} before the softmax, which the fused "
                f"loss does not (it uses the raw logits hidden @ W^T); this model is not supported "
                f"as configured"
            )


def backbone(model: nn.Module) -> nn.Module:
    """The inner multimodal model (vision tower + projector + language model, no ``lm_head``)."""
    m = unwrap(model)
    inner = getattr(m, "model", None)
    if inner is None or isinstance(inner, (nn.Linear,)):
        raise ValueError(f"{type(m).__name__} has no inner `.model` backbone")
    return inner


def backbone_hidden_states(model: nn.Module, **inputs: Any) -> torch.Tensor:
    """Last hidden state ``(B, L, D)`` of the backbone; ``lm_head`` is never applied.

    ``inputs`` are what the processor/collator produce (``input_ids``, ``attention_mask``,
    ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``), or a packed batch's (a 4-D
    ``attention_mask``, ``position_ids``, and maybe ``mm_encoder_outputs`` as
    :class:`~fgpo.models.prefix.VisionFeatures`; see :mod:`fgpo.models.prefix`). The inner model
    is called through the PEFT wrapper's module tree so LoRA layers (and ``disable_adapter``)
    apply.
    """
    inner = backbone(model)
    feats = inputs.get("mm_encoder_outputs")
    if isinstance(feats, VisionFeatures):
        inputs["mm_encoder_outputs"] = feats.outputs
    pix = inputs.get("pixel_values")
    if pix is not None and pix.is_floating_point():
        dtype = next((p.dtype for p in inner.parameters() if p.is_floating_point()), pix.dtype)
        inputs["pixel_values"] = pix.to(dtype)  # processors return fp32; bf16 models want bf16
    out = inner(**inputs, use_cache=False, return_dict=True)
    return out.last_hidden_state


def language_model(model: nn.Module) -> nn.Module:
    """The decoder of the language model (target of LoRA)."""
    inner = backbone(model)
    lm = getattr(inner, "language_model", None)
    if lm is None and hasattr(inner, "get_decoder"):
        lm = inner.get_decoder()
    if lm is None:
        raise ValueError(f"cannot find the language model inside {type(inner).__name__}")
    return lm


def freeze_vision(model: nn.Module) -> int:
    """Freeze everything but the language model and ``lm_head``; returns #frozen params."""
    m = unwrap(model)
    keep = {id(p) for p in language_model(m).parameters()}
    keep |= {id(lm_head_weight(m))}
    n = 0
    for p in m.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
            n += p.numel()
    return n


def lora_target_regex(model: nn.Module) -> str:
    """A PEFT ``target_modules`` regex: every ``nn.Linear`` inside the language model only."""
    m = unwrap(model)
    lm = language_model(m)
    prefix = next(name for name, mod in m.named_modules() if mod is lm)
    leaves = sorted(
        {name.rsplit(".", 1)[-1] for name, mod in lm.named_modules() if isinstance(mod, nn.Linear)}
    )
    if not leaves:
        raise ValueError("the language model has no nn.Linear layers to adapt")
    return rf"{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})"


def apply_lora(model: nn.Module, cfg: Any) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on the language model's linear layers only.

    ``cfg`` has ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora`` (a ``TrainConfig``
    or any object with those attributes). The vision tower, projector and ``lm_head`` stay
    frozen; returns the ``PeftModel``.
    """
    from peft import LoraConfig, get_peft_model

    target = lora_target_regex(model)
    lcfg = LoraConfig(
        r=int(cfg.lora_r),
        lora_alpha=float(cfg.lora_alpha),
        lora_dropout=float(cfg.lora_dropout),
        use_rslora=bool(cfg.use_rslora),
        target_modules=target,
        bias="none",
    )
    return get_peft_model(model, lcfg)


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` (possibly inside DDP) is a PEFT model with adapters."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def reference_context(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model`` computes the reference: LoRA adapters disabled, no grad.

    Yields the module to call (``backbone_hidden_states(ref, ...)``). For a non-PEFT model
    (full fine-tuning) pass the frozen copy from ``frozen_reference``; it is yielded as is.
    """
    m = model
    while isinstance(m, nn.parallel.DistributedDataParallel):
        m = m.module
    with torch.no_grad():
        if is_peft(m):
            with m.disable_adapter():
                yield m
        else:
            yield m


def frozen_reference(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` (eval mode, no grad) for full fine-tuning."""
    ref = copy.deepcopy(unwrap(model))
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of the Hub model's layers."""
    m = unwrap(model)
    if getattr(m, "supports_gradient_checkpointing", False):
        kwargs = {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):  # the transformers >= 5.x name
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        m.config.use_cache = False
