"""``VLProcessor``: the tokenizer, the image processor and the rule that expands one image
into the model's image tokens, for the two families we support (LLaVA-style: a fixed patch
count; Qwen-VL-style: dynamic resolution with ``image_grid_thw``).

It does not need the Hub processor class (whose Qwen variants require torchvision for their
video processor) but uses it when it loads.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

IMAGE_PLACEHOLDER = "<image>"
FAMILIES = ("qwen", "llava", "gemma3")


class VLProcessor:
    """Tokenizer + image processor + the rule that expands one image into image tokens.

    ``family`` is ``"qwen"`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``image_grid_thw``, tokens =
    ``prod(grid) / merge_size**2`` between vision start/end tokens), ``"llava"`` (a fixed
    number of patch tokens per image; LLaVA-1.5, LLaVA-Med) or ``"gemma3"`` (Gemma 3 / MedGemma:
    a fixed number of soft image tokens between the begin/end-of-image tokens, written
    ``\n\n<boi>...<eoi>\n\n`` as the Hub processor does, and ``token_type_ids`` marking them
    so the model attends bidirectionally within an image). ``__call__(text=..., images=...)``
    mimics the Hub processors (the text carries ``image_token`` once per image) so evaluation
    code can use either.
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
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if family != "qwen" and not num_image_tokens:
            raise ValueError(f"a {family}-family processor needs num_image_tokens (> 0)")
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

    @property
    def vision_token_ids(self) -> tuple[int, ...]:
        """Ids of the vision start/end markers (Qwen-VL), which a generated answer never holds."""
        marks = (self.vision_start, self.vision_end)
        return tuple(int(self.tokenizer.convert_tokens_to_ids(t)) for t in marks if t)

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
        if self.family == "gemma3":
            return f"\n\n{self.vision_start}{body}{self.vision_end}\n\n"
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
            marker = self.vision_start if self.family == "gemma3" else self.image_text(1)
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
        """Inputs the model needs beside ids/mask/pixels (Qwen: ``mm_token_type_ids``; Gemma 3:
        ``token_type_ids``, 1 on image tokens)."""
        if self.family == "qwen":
            return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}
        if self.family == "gemma3":
            return {"token_type_ids": (input_ids == self.image_token_id).long()}
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
    """The image processor saved at ``path``, on the PIL backend where this transformers has one
    (it needs no torchvision). Releases before ``backend=`` (5.17, the GPU machine's) gate
    ``AutoImageProcessor`` itself on torchvision but ship each model's PIL class: the class the
    config names is loaded then."""
    import transformers

    errors: list[Exception] = []
    for kwargs in ({"backend": "pil"}, {}):
        try:
            return transformers.AutoImageProcessor.from_pretrained(path, **kwargs)
        except Exception as e:
            errors.append(e)
    from transformers.image_processing_base import ImageProcessingMixin

    config, _ = ImageProcessingMixin.get_image_processor_dict(path)
    name = str(config.get("image_processor_type") or "").removesuffix("Fast")
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name, None)
    if not name or cls is None:
        raise ImportError(
            f"{path}: cannot load its image processor ({name or 'no image_processor_type'}) with "
            f"transformers {transformers.__version__}: {errors[-1]}"
        ) from errors[-1]
    return cls.from_pretrained(path)


def model_family(config: Any) -> str:
    """``"qwen"`` when the config has vision start/end tokens (Qwen-VL style), ``"gemma3"`` for
    Gemma 3 (MedGemma), else ``"llava"``."""
    if getattr(config, "vision_start_token_id", None) is not None:
        return "qwen"
    if getattr(config, "model_type", "") == "gemma3":
        return "gemma3"
    return "llava"


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
    if family == "gemma3":
        return VLProcessor(
            tokenizer,
            image_processor,
            "gemma3",
            image_token=image_token,
            num_image_tokens=int(config.mm_tokens_per_image),
            vision_start=tokenizer.convert_ids_to_tokens(int(config.boi_token_index)),
            vision_end=tokenizer.convert_ids_to_tokens(int(config.eoi_token_index)),
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
