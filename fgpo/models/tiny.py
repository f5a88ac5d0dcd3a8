"""Tiny random vision-language models, built offline: the one tiny-model builder and the one
tokenizer of the project (tests, the demo, ``fgpo train --config tiny``).

``tiny-llava`` (LLaVA-1.5: CLIP + Llama), ``tiny-llava-med`` (LLaVA-Med's shape: CLIP +
Mistral), ``tiny-medgemma`` (MedGemma's: Gemma 3, tied embeddings), ``tiny-qwen2-vl``,
``tiny-qwen2.5-vl`` and ``tiny-qwen3-vl`` (when the installed transformers has Qwen3-VL) are real
Hub architectures with a few layers of width 64, random
weights, a word-level tokenizer over a fixed vocabulary (the generated data's words and common
radiology words) and a PIL image processor
(no torchvision). ``ensure_tiny_model(name)`` builds one once into a cache directory
(``$FGPO_CACHE`` or ``~/.cache/fgpo``) so ``load_model`` can read it through the Auto classes.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from ..data import synthetic

TINY_NAMES = (
    "tiny-llava",
    "tiny-llava-med",
    "tiny-medgemma",
    "tiny-qwen2-vl",
    "tiny-qwen2.5-vl",
    "tiny-qwen3-vl",
)
_VERSION = "v3"  # bump when the builders change so caches are rebuilt

_SIDES = ("left", "right")
_FINDINGS = ("nodule", "opacity", "effusion", "mass", "lesion")
_ORGANS = ("lung", "kidney", "breast", "lobe")
_WORDS = (
    "there is a an no the in of and with image scan shows what where which side finding is "
    "seen located normal abnormal small large round bright dark upper lower middle yes "
    "answer question describe report size"
).split()
_SPECIALS = [
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "<image>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<mask>",
    "</mask>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]


def is_tiny_name(name: str) -> bool:
    return name in TINY_NAMES


def cache_dir() -> str:
    return os.environ.get("FGPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fgpo")


def vocabulary() -> list[str]:
    """The tiny tokenizer's words: the generated data's (:mod:`fgpo.data.synthetic`) and a few
    common radiology words, so small hand-written test answers encode without unknown words."""
    words = [*_WORDS, *_SIDES, *_FINDINGS, *_ORGANS, ".", ",", "?", ":", *synthetic.vocabulary()]
    return list(dict.fromkeys(words))


def build_tokenizer(words: list[str] | None = None) -> Any:
    """A word-level fast tokenizer (lower-cased, punctuation split) over ``words`` (default:
    :func:`vocabulary`), with pad/unk/bos/eos and the image tokens of both families as special
    tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = vocabulary() if words is None else words
    trainer = trainers.WordLevelTrainer(special_tokens=_SPECIALS, min_frequency=1)
    tok.train_from_iterator([" ".join(words)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def build_tiny(
    name: str,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    vocab_size: int | None = None,
    *,
    image_side: int | None = None,
    vision_hidden: int = 32,
    vision_layers: int = 2,
) -> tuple[Any, Any]:
    """A random tiny model of the named architecture and its ``VLProcessor`` (in memory).

    ``vocab_size`` pads the model's vocabulary beyond the tokenizer's (for memory benchmarks
    with a realistic LM head); None = the tokenizer's size. ``image_side`` makes every image
    ``image_side x image_side`` image tokens (default: 4 x 4 for LLaVA, 2 x 2 for the others),
    and ``vision_hidden`` / ``vision_layers`` size the vision tower: benchmarks proportioned
    like a real task (hundreds of image tokens) use them.
    """
    import torch

    from .processor import processor_for_config

    if not is_tiny_name(name):
        raise ValueError(f"unknown tiny model {name!r}; choose from {TINY_NAMES}")
    torch.manual_seed(seed)
    tok = build_tokenizer()
    text = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=_HEADS,
        num_key_value_heads=2,
        vocab_size=max(len(tok), vocab_size or 0),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        max_position_embeddings=1024,
    )
    vision = _Vision(image_side, vision_hidden, vision_layers)
    model, image_processor = _BUILDERS[name](name, tok, text, vision)
    model.eval()
    return model, processor_for_config(model.config, tok, image_processor)


_HEADS = 4


class _Vision(NamedTuple):
    """The vision tower's size and the image tokens per image (None: the family's default)."""

    side: int | None
    hidden: int
    layers: int


def _llava(name: str, tok: Any, text: dict, v: _Vision) -> tuple[Any, Any]:
    """LLaVA-1.5 (CLIP + Llama), or LLaVA-Med's shape (CLIP + Mistral) for ``tiny-llava-med``."""
    import transformers as T
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    side = 7 * (v.side or 4)  # patch 7: side/7 x side/7 image tokens
    vision = T.CLIPVisionConfig(
        hidden_size=v.hidden,
        intermediate_size=2 * v.hidden,
        num_hidden_layers=v.layers,
        num_attention_heads=2,
        image_size=side,
        patch_size=7,
    )
    lm = T.MistralConfig(**text, sliding_window=None) if name == "tiny-llava-med" else None
    cfg = T.LlavaConfig(
        vision_config=vision,
        text_config=lm if lm is not None else T.LlamaConfig(**text),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    ip = LlavaImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    return T.LlavaForConditionalGeneration(cfg), ip


def _gemma3(name: str, tok: Any, text: dict, v: _Vision) -> tuple[Any, Any]:
    """MedGemma's architecture (Gemma 3: SigLIP + Gemma 3 text model, tied embeddings: the LM
    head weight is the embedding matrix), with 4 pooled soft tokens per image."""
    import transformers as T
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tid = tok.convert_tokens_to_ids
    head_dim = text["hidden_size"] // _HEADS
    layer_types = ["sliding_attention", "full_attention"] * text["num_hidden_layers"]
    tc = T.Gemma3TextConfig(
        **text,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=64,
        layer_types=layer_types[: text["num_hidden_layers"]],
    )
    side = v.side or 2  # side x side soft tokens: 2 side x 2 side patches of 8, pooled 2 x 2
    vision = T.SiglipVisionConfig(
        hidden_size=v.hidden,
        intermediate_size=2 * v.hidden,
        num_hidden_layers=v.layers,
        num_attention_heads=2,
        image_size=16 * side,
        patch_size=8,
    )
    cfg = T.Gemma3Config(
        text_config=tc,
        vision_config=vision,
        mm_tokens_per_image=side * side,
        boi_token_index=tid("<start_of_image>"),
        eoi_token_index=tid("<end_of_image>"),
        image_token_index=tid("<image_soft_token>"),
    )
    ip = Gemma3ImageProcessorPil(size={"height": 16 * side, "width": 16 * side})
    return T.Gemma3ForConditionalGeneration(cfg), ip


def _qwen(name: str, tok: Any, text: dict, v: _Vision) -> tuple[Any, Any]:
    """Qwen2-VL, Qwen2.5-VL or Qwen3-VL (dynamic resolution, 3-D M-RoPE)."""
    import transformers as T
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tid = tok.convert_tokens_to_ids
    hidden = text["hidden_size"]
    half = hidden // _HEADS // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": section,
    }
    ids = dict(
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )
    patch = 14
    vis = dict(depth=v.layers, num_heads=2, patch_size=patch, spatial_merge_size=2)
    vis["temporal_patch_size"] = 2
    if name == "tiny-qwen2-vl":
        cfg = T.Qwen2VLConfig(
            text_config=text, vision_config=dict(vis, embed_dim=v.hidden, hidden_size=hidden), **ids
        )
        model = T.Qwen2VLForConditionalGeneration(cfg)
    elif name == "tiny-qwen2.5-vl":
        vis = dict(vis, hidden_size=v.hidden, out_hidden_size=hidden)
        vis.update(intermediate_size=2 * v.hidden, window_size=4 * patch)
        vis.update(fullatt_block_indexes=list(range(1, v.layers, 2)))
        cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=vis, **ids)
        model = T.Qwen2_5_VLForConditionalGeneration(cfg)
    else:
        if not hasattr(T, "Qwen3VLConfig"):
            raise ValueError("this transformers has no Qwen3-VL")
        patch = 16
        text["head_dim"] = hidden // _HEADS
        text["rope_parameters"]["mrope_interleaved"] = True
        vis = dict(vis, patch_size=patch, hidden_size=v.hidden, out_hidden_size=hidden)
        vis.update(intermediate_size=2 * v.hidden, num_position_embeddings=16)
        vis.update(deepstack_visual_indexes=[1])
        cfg = T.Qwen3VLConfig(text_config=text, vision_config=vis, **ids)
        model = T.Qwen3VLForConditionalGeneration(cfg)
    pixels = ((v.side or 2) * 2 * patch) ** 2  # one merged token per 2x2 patches
    ip = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
    )
    return model, ip


_BUILDERS = {
    "tiny-llava": _llava,
    "tiny-llava-med": _llava,
    "tiny-medgemma": _gemma3,
    "tiny-qwen2-vl": _qwen,
    "tiny-qwen2.5-vl": _qwen,
    "tiny-qwen3-vl": _qwen,
}


def ensure_tiny_model(name: str) -> str:
    """Build (once) and return the directory of a tiny model saved for ``load_model``."""
    path = os.path.join(cache_dir(), "tiny", f"{name}-{_VERSION}")
    if os.path.exists(os.path.join(path, "fgpo_processor.json")):
        return path
    import torch

    # Building draws from the global generators (build_tiny seeds them); a run must not depend
    # on whether the cache was empty, so the caller's generator states are put back after it.
    with torch.random.fork_rng(devices=[]):
        model, proc = build_tiny(name)
    tmp = f"{path}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    proc.save_pretrained(tmp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path
