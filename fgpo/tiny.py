"""Tiny random vision-language models and a small generated preference set, built offline.

``tiny-llava``, ``tiny-qwen2-vl``, ``tiny-qwen2.5-vl`` and ``tiny-qwen3-vl`` (when the installed
transformers has Qwen3-VL) are real Hub architectures with a few layers of width 64, random
weights, a word-level tokenizer trained on the generator's sentences and a PIL image processor
(no torchvision). ``ensure_tiny_model(name)`` builds one once into a cache directory
(``$FGPO_CACHE`` or ``~/.cache/fgpo``) so ``load_model`` can read it through the Auto classes.

``make_preference_set(out_dir, n)`` writes ``n`` records in the reference JSON format: a
synthetic "scan" with a bright lesion on the left or right, the question about it, a chosen
answer naming the right side and a rejected one naming the wrong side, the differing words
inside ``<mask>`` tags, and for every other record a lesion-corrupted copy of the image.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np

TINY_NAMES = ("tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl")
_VERSION = "v1"  # bump when the builders change so caches are rebuilt

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
]


def is_tiny_name(name: str) -> bool:
    return name in TINY_NAMES


def cache_dir() -> str:
    return os.environ.get("FGPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fgpo")


def build_tokenizer() -> Any:
    """A word-level fast tokenizer over the generator's vocabulary (lower-cased, punctuation
    split), with pad/unk/bos/eos and the image tokens of both families as special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [*_WORDS, *_SIDES, *_FINDINGS, *_ORGANS, ".", ",", "?", ":"]
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
    name: str, hidden: int = 64, layers: int = 2, seed: int = 0, vocab_size: int | None = None
) -> tuple[Any, Any]:
    """A random tiny model of the named architecture and its ``VLProcessor`` (in memory).

    ``vocab_size`` pads the model's vocabulary beyond the tokenizer's (for memory benchmarks
    with a realistic LM head); None = the tokenizer's size.
    """
    import torch
    import transformers as T

    from .models import processor_for_config

    if not is_tiny_name(name):
        raise ValueError(f"unknown tiny model {name!r}; choose from {TINY_NAMES}")
    torch.manual_seed(seed)
    tok = build_tokenizer()
    tid = tok.convert_tokens_to_ids
    heads = 4
    text = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        vocab_size=max(len(tok), vocab_size or 0),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        max_position_embeddings=1024,
    )
    if name == "tiny-llava":
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        vision = T.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=7,
        )
        cfg = T.LlavaConfig(
            vision_config=vision,
            text_config=T.LlamaConfig(**text),
            image_token_id=tid("<image>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        model = T.LlavaForConditionalGeneration(cfg)
        ip = LlavaImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        )
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        half = hidden // heads // 2
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
        vis = dict(depth=2, num_heads=2, patch_size=patch, spatial_merge_size=2)
        vis["temporal_patch_size"] = 2
        if name == "tiny-qwen2-vl":
            cfg = T.Qwen2VLConfig(
                text_config=text, vision_config=dict(vis, embed_dim=32, hidden_size=hidden), **ids
            )
            model = T.Qwen2VLForConditionalGeneration(cfg)
        elif name == "tiny-qwen2.5-vl":
            vis = dict(vis, hidden_size=32, out_hidden_size=hidden, intermediate_size=64)
            vis.update(fullatt_block_indexes=[1], window_size=4 * patch)
            cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=vis, **ids)
            model = T.Qwen2_5_VLForConditionalGeneration(cfg)
        else:
            if not hasattr(T, "Qwen3VLConfig"):
                raise ValueError("this transformers has no Qwen3-VL")
            patch = 16
            text["head_dim"] = hidden // heads
            text["rope_parameters"]["mrope_interleaved"] = True
            vis = dict(vis, patch_size=patch, hidden_size=32, out_hidden_size=hidden)
            vis.update(intermediate_size=64, num_position_embeddings=16)
            vis.update(deepstack_visual_indexes=[1])
            cfg = T.Qwen3VLConfig(text_config=text, vision_config=vis, **ids)
            model = T.Qwen3VLForConditionalGeneration(cfg)
        side = 2 * patch  # one merged token per 2x2 patches
        ip = Qwen2VLImageProcessorPil(
            size={"shortest_edge": (2 * side) ** 2, "longest_edge": (2 * side) ** 2},
            patch_size=patch,
            merge_size=2,
            temporal_patch_size=2,
        )
    model.eval()
    return model, processor_for_config(model.config, tok, ip)


def ensure_tiny_model(name: str) -> str:
    """Build (once) and return the directory of a tiny model saved for ``load_model``."""
    path = os.path.join(cache_dir(), "tiny", f"{name}-{_VERSION}")
    if os.path.exists(os.path.join(path, "fgpo_processor.json")):
        return path
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


# ----------------------------------------------------------------------------------------------
# Preference data
# ----------------------------------------------------------------------------------------------


def _scan(rng: np.random.Generator, side: str, size: int = 32) -> np.ndarray:
    img = rng.normal(60, 12, (size, size)).clip(0, 255)
    cx = size // 4 if side == "left" else 3 * size // 4
    cy = int(rng.integers(size // 4, 3 * size // 4))
    yy, xx = np.mgrid[:size, :size]
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2) <= (size // 8) ** 2
    img[blob] = 220
    return np.repeat(img[..., None], 3, axis=2).astype(np.uint8), blob


def make_preference_set(
    out_dir: str, n: int = 32, seed: int = 0, corrupt_every: int = 2, size: int = 32
) -> str:
    """Write ``n`` synthetic preference records and their images; returns the JSON path.

    Image paths in the JSON are relative to the JSON file's directory.
    """
    from PIL import Image

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    records = []
    for i in range(n):
        side = _SIDES[i % 2]
        wrong = _SIDES[1 - i % 2]
        finding = prng.choice(_FINDINGS)
        organ = prng.choice(_ORGANS)
        arr, blob = _scan(rng, side, size)
        rel = f"images/{i:05d}.png"
        Image.fromarray(arr).save(os.path.join(out_dir, rel))
        rec = {
            "id": f"tiny-{i:05d}",
            "qid": i,
            "prompt": f"which side of the {organ} shows the {finding} ?",
            "chosen": f"the {finding} is seen in the <mask>{side}</mask> {organ} .",
            "rejected": f"the {finding} is seen in the <mask>{wrong}</mask> {organ} .",
            "image_path": rel,
        }
        if corrupt_every and i % corrupt_every == 0:
            noisy = arr.astype(np.float64)
            noisy[blob] += rng.normal(0, 45, (int(blob.sum()), 3))
            crel = f"images/{i:05d}_corrupt.png"
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(os.path.join(out_dir, crel))
            rec["rejected_image_path"] = crel
        records.append(rec)
    path = os.path.join(out_dir, "preferences.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path
