"""Loading Hugging Face vision-language models and getting hidden states without logits.

The trainer needs three things from a model, and nothing else:

* ``backbone_hidden_states(model, **inputs)``: the last hidden state ``(B, L, D)`` of the
  language model after the vision features are merged in — the inner ``model.model`` of every
  ``*ForConditionalGeneration`` class, which stops before ``lm_head``, so no logits exist;
* ``lm_head_weight(model)``: the ``(V, D)`` weight ``W`` that the fused loss streams over;
* ``reference_context(model)``: a context in which the same call gives the reference model
  (LoRA adapters disabled; no second copy in memory). For full fine-tuning the reference is a
  frozen copy (``frozen_reference``) and the context is not used.

Images and text are encoded by ``VLProcessor``, a small wrapper over the model's tokenizer and
image processor that expands the image placeholder into the right number of image tokens for
the two families we support (LLaVA-style: a fixed patch count; Qwen-VL-style: dynamic
resolution with ``image_grid_thw``). It does not need the Hub processor class (whose Qwen
variants require torchvision for their video processor) but uses it when it loads.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

IMAGE_PLACEHOLDER = "<image>"
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


# ----------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------


class VLProcessor:
    """Tokenizer + image processor + the rule that expands one image into image tokens.

    ``family`` is ``"qwen"`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``image_grid_thw``, tokens =
    ``prod(grid) / merge_size**2`` between vision start/end tokens) or ``"llava"`` (a fixed
    number of patch tokens per image). ``__call__(text=..., images=...)`` mimics the Hub
    processors (the text carries ``image_token`` once per image) so evaluation code can use
    either.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        family: str,
        *,
        image_token: str,
        num_image_tokens: int | None = None,
        vision_start: str | None = None,
        vision_end: str | None = None,
        chat_template: str | None = None,
        hf_processor: Any = None,
    ) -> None:
        if family not in ("qwen", "llava"):
            raise ValueError(f"family must be 'qwen' or 'llava', got {family!r}")
        if family == "llava" and not num_image_tokens:
            raise ValueError("a llava-family processor needs num_image_tokens (> 0)")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.family = family
        self.image_token = image_token
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(image_token))
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"image token {image_token!r} is not in the tokenizer's vocabulary")
        self.num_image_tokens_fixed = num_image_tokens
        self.vision_start = vision_start
        self.vision_end = vision_end
        self.chat_template = chat_template
        self.hf_processor = hf_processor

    # -- ids -----------------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        t = self.tokenizer
        pid = t.pad_token_id if t.pad_token_id is not None else t.eos_token_id
        return int(pid if pid is not None else 0)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def decode(self, ids, **kw) -> str:
        return self.tokenizer.decode(ids, **kw)

    def batch_decode(self, ids, **kw) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kw)

    # -- images --------------------------------------------------------------------------------
    def image_inputs(self, images: Any) -> dict[str, torch.Tensor]:
        """Pixel tensors for one image or a list: ``pixel_values`` (+ ``image_grid_thw``)."""
        images = images if isinstance(images, (list, tuple)) else [images]
        images = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
        out = self.image_processor(images=images, return_tensors="pt")
        keys = ("pixel_values", "image_grid_thw") if self.family == "qwen" else ("pixel_values",)
        return {k: out[k] for k in keys if k in out}

    def image_token_counts(self, image_inputs: dict[str, torch.Tensor]) -> list[int]:
        """Number of image tokens for each image of ``image_inputs``."""
        if self.family == "qwen":
            merge = int(getattr(self.image_processor, "merge_size", 2))
            return [int(g.prod()) // (merge * merge) for g in image_inputs["image_grid_thw"]]
        return [int(self.num_image_tokens_fixed)] * int(image_inputs["pixel_values"].shape[0])

    def image_text(self, n_tokens: int) -> str:
        """The text that stands for one image of ``n_tokens`` tokens."""
        body = self.image_token * n_tokens
        if self.family == "qwen":
            return f"{self.vision_start or ''}{body}{self.vision_end or ''}"
        return body

    # -- prompts -------------------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        """The user turn with one ``IMAGE_PLACEHOLDER`` and the assistant prefix.

        Uses the chat template when there is one, else ``"<image>\\n{prompt}\\n"``.
        """
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if template:
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": prompt}],
                }
            ]
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True
            )
            # Templates write the image as the family's own marker; normalise it to one placeholder.
            marker = self.image_text(1)
            if marker in text:
                return text.replace(marker, IMAGE_PLACEHOLDER, 1)
            if self.image_token in text:
                return text.replace(self.image_token, IMAGE_PLACEHOLDER, 1)
            return f"{IMAGE_PLACEHOLDER}\n{text}"
        return f"{IMAGE_PLACEHOLDER}\n{prompt}\n"

    def encode_prompt(self, image: Any, prompt: str) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Token ids of the formatted prompt with the image expanded, and the image tensors."""
        img = self.image_inputs(image)
        n = self.image_token_counts(img)[0]
        text = self.format_prompt(prompt)
        before, _, after = text.partition(IMAGE_PLACEHOLDER)
        tok = self.tokenizer
        bos = getattr(tok, "bos_token", None)
        add_special = not (bos and text.startswith(bos))
        ids = tok(before, add_special_tokens=add_special)["input_ids"] if before else []
        if not before and add_special:
            ids = tok("", add_special_tokens=True)["input_ids"]
        ids = list(ids) + tok(self.image_text(n), add_special_tokens=False)["input_ids"]
        ids += tok(after, add_special_tokens=False)["input_ids"] if after else []
        got = sum(1 for i in ids if i == self.image_token_id)
        if got != n:
            raise ValueError(
                f"prompt encodes {got} image tokens but the image needs {n}: does the prompt "
                f"contain the image token {self.image_token!r} itself?"
            )
        return ids, img

    def extra_model_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inputs the model needs beside ids/mask/pixels (Qwen: ``mm_token_type_ids``)."""
        if self.family == "qwen":
            return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}
        return {}

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        return_tensors: str = "pt",
        padding: bool | str = True,
        **kw: Any,
    ) -> dict[str, torch.Tensor]:
        """Hub-processor-like call: each ``image_token`` in ``text`` is expanded for its image.

        Left-pads (the convention for generation). Returns ``input_ids``, ``attention_mask``,
        pixel tensors and the family's extra inputs.
        """
        texts = [text] if isinstance(text, str) else list(text or [])
        img = self.image_inputs(images) if images is not None else {}
        counts = self.image_token_counts(img) if img else []
        k = 0
        ids_list = []
        for t in texts:
            pieces = t.split(self.image_token)
            if k + len(pieces) - 1 > len(counts):
                raise ValueError(f"text has more {self.image_token!r} than images ({len(counts)})")
            s = pieces[0]
            for p in pieces[1:]:
                s += self.image_text(counts[k]) + p
                k += 1
            ids_list.append(self.tokenizer(s, add_special_tokens=True)["input_ids"])
        if k != len(counts):
            raise ValueError(f"{len(counts)} images but {k} image tokens in the text")
        width = max(len(x) for x in ids_list)
        ids = torch.full((len(ids_list), width), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(ids_list), width), dtype=torch.long)
        for i, x in enumerate(ids_list):
            ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
            att[i, width - len(x) :] = 1
        out = {"input_ids": ids, "attention_mask": att, **img}
        out.update(self.extra_model_inputs(ids))
        return out

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        meta = {
            "family": self.family,
            "image_token": self.image_token,
            "num_image_tokens": self.num_image_tokens_fixed,
            "vision_start": self.vision_start,
            "vision_end": self.vision_end,
            "chat_template": self.chat_template,
        }
        with open(os.path.join(path, "fgpo_processor.json"), "w") as f:
            json.dump(meta, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str, model_config: Any = None) -> VLProcessor:
        """Load from a directory written by ``save_pretrained`` or a Hub model directory."""
        from transformers import AutoTokenizer

        meta_path = os.path.join(path, "fgpo_processor.json") if os.path.isdir(path) else ""
        if meta_path and os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            tok = AutoTokenizer.from_pretrained(path)
            ip = _load_image_processor(path)
            return cls(tok, ip, meta.pop("family"), **meta)
        hf = None
        try:
            from transformers import AutoProcessor

            hf = AutoProcessor.from_pretrained(path)
        except Exception:  # e.g. Qwen processors need torchvision for video; not for us
            hf = None
        tok = hf.tokenizer if hf is not None else AutoTokenizer.from_pretrained(path)
        ip = hf.image_processor if hf is not None else _load_image_processor(path)
        if model_config is None:
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(path)
        return processor_for_config(model_config, tok, ip, hf_processor=hf)


def _load_image_processor(path: str) -> Any:
    from transformers import AutoImageProcessor

    try:  # the PIL backend needs no torchvision
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    except Exception:
        return AutoImageProcessor.from_pretrained(path)


def model_family(config: Any) -> str:
    """``"qwen"`` when the config has vision start/end tokens (Qwen-VL style), else ``"llava"``."""
    return "qwen" if getattr(config, "vision_start_token_id", None) is not None else "llava"


def processor_for_config(
    config: Any, tokenizer: Any, image_processor: Any, *, hf_processor: Any = None
) -> VLProcessor:
    """Build the ``VLProcessor`` matching a model config (image token ids, patch counts)."""
    family = model_family(config)
    template = getattr(hf_processor, "chat_template", None) or getattr(
        tokenizer, "chat_template", None
    )
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    if image_token_id is None:
        raise ValueError(f"model config {type(config).__name__} has no image_token_id")
    image_token = tokenizer.convert_ids_to_tokens(int(image_token_id))
    if family == "qwen":
        return VLProcessor(
            tokenizer,
            image_processor,
            "qwen",
            image_token=image_token,
            vision_start=tokenizer.convert_ids_to_tokens(int(config.vision_start_token_id)),
            vision_end=tokenizer.convert_ids_to_tokens(int(config.vision_end_token_id)),
            chat_template=template,
            hf_processor=hf_processor,
        )
    vc = config.vision_config
    crop = getattr(image_processor, "crop_size", None)
    side = int(crop["height"]) if isinstance(crop, dict) and crop else int(vc.image_size)
    patches = (side // int(vc.patch_size)) ** 2
    # CLIP-like towers add a CLS token; the "default" strategy drops it again.
    cls_token = 1 if "clip" in str(getattr(vc, "model_type", "")) else 0
    n = patches + cls_token
    if getattr(config, "vision_feature_select_strategy", "default") == "default":
        n -= 1
    return VLProcessor(
        tokenizer,
        image_processor,
        "llava",
        image_token=image_token,
        num_image_tokens=n,
        chat_template=template,
        hf_processor=hf_processor,
    )


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = "bfloat16",
    attn_implementation: str | None = None,
) -> tuple[nn.Module, VLProcessor]:
    """Load a vision-language model and its processor through the Auto classes.

    ``name_or_path`` is a Hub id, a local directory, or ``tiny-llava`` / ``tiny-qwen2-vl`` /
    ``tiny-qwen2.5-vl`` / ``tiny-qwen3-vl`` (random tiny models built offline by
    ``fgpo.tiny``). ``attn_implementation`` None picks flash-attn 2 when importable (GPU), else
    sdpa.
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


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hub model inside DDP / PEFT wrappers (LoRA layers stay injected in it)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "get_base_model"):  # PeftModel
        model = model.get_base_model()
    return model


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The ``(V, D)`` output-projection weight (shared by policy and reference under LoRA)."""
    m = _unwrap(model)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    if head is None:
        head = getattr(m, "lm_head", None)
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"cannot find the LM head of {type(m).__name__}")
    if getattr(head, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported by the fused loss")
    return head.weight


def backbone(model: nn.Module) -> nn.Module:
    """The inner multimodal model (vision tower + projector + language model, no ``lm_head``)."""
    m = _unwrap(model)
    inner = getattr(m, "model", None)
    if inner is None or isinstance(inner, (nn.Linear,)):
        raise ValueError(f"{type(m).__name__} has no inner `.model` backbone")
    return inner


def backbone_hidden_states(model: nn.Module, **inputs: Any) -> torch.Tensor:
    """Last hidden state ``(B, L, D)`` of the backbone; ``lm_head`` is never applied.

    ``inputs`` are what the processor/collator produce (``input_ids``, ``attention_mask``,
    ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``). The inner model is called
    through the PEFT wrapper's module tree so LoRA layers (and ``disable_adapter``) apply.
    """
    inner = backbone(model)
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
    m = _unwrap(model)
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
    m = _unwrap(model)
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
    ref = copy.deepcopy(_unwrap(model))
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of the Hub model's layers."""
    m = _unwrap(model)
    if getattr(m, "supports_gradient_checkpointing", False):
        kwargs = {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):  # the transformers >= 5.x name
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        m.config.use_cache = False
