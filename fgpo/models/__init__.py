"""Models: loading, processors, tiny offline models and the inference that pairs and eval share.

- :mod:`.loading`: :func:`load_model` (any Hub vision-language model through the Auto classes,
  or a ``tiny-*`` name), :func:`backbone_hidden_states` (never logits), :func:`lm_head_weight`,
  LoRA on the language model only, the reference (adapters off, or a frozen copy).
- :mod:`.processor`: :class:`VLProcessor`, prompts with the image expanded into image tokens.
- :mod:`.tiny`: random tiny LLaVA / Qwen2-VL / Qwen2.5-VL / Qwen3-VL models and their tokenizer.
- :mod:`.inference`: batched greedy answers and answer log-probs (from hidden states).
- :mod:`.prefix`: shared-prefix packing (chosen and rejected continue one pass over the image
  and the prompt), one small adapter per model family.
"""

from . import prefix
from .loading import (
    apply_lora,
    backbone,
    backbone_hidden_states,
    check_logit_transforms,
    default_attn_implementation,
    enable_gradient_checkpointing,
    freeze_vision,
    frozen_reference,
    is_peft,
    language_model,
    lm_head_weight,
    load_model,
    lora_target_regex,
    reference_context,
    resolve_dtype,
    unwrap,
)
from .processor import IMAGE_PLACEHOLDER, VLProcessor, model_family, processor_for_config

__all__ = [
    "IMAGE_PLACEHOLDER",
    "VLProcessor",
    "apply_lora",
    "backbone",
    "backbone_hidden_states",
    "check_logit_transforms",
    "default_attn_implementation",
    "enable_gradient_checkpointing",
    "freeze_vision",
    "frozen_reference",
    "is_peft",
    "language_model",
    "lm_head_weight",
    "load_model",
    "lora_target_regex",
    "model_family",
    "prefix",
    "processor_for_config",
    "reference_context",
    "resolve_dtype",
    "unwrap",
]
