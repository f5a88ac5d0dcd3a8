"""One training step of ``fgpo.train.Trainer`` at real size, on meta tensors, tracked.

``simulate(spec)`` builds the model from a config JSON on the meta device (no weights, no
memory), gives it to the trainer as an in-memory model, and runs the trainer's own steps:
``load()`` (LoRA r=128 on the language model, gradient checkpointing, AdamW), ``load_data()``
and ``encode()`` on records written for the run (real images through the model's real image
processor, so the image-token count is the processor's), then ``train_step()`` under
``StepTracker`` (peak memory by category). The model's tensors live on the meta device, which
stands for the GPU: ``KnownValues`` answers the data-dependent ops, ``flash_attention_on_meta``
gives attention its GPU kernel's memory, and ``fgpo_kernels._fake.simulate_gpu`` hands the loss
the fake host code of impl "triton" / "cuda" (their real workspaces).

The text is synthetic: a word-level tokenizer whose special tokens have the model's ids, and
prompts and answers of the lengths in ``SequenceSpec`` (SLAKE-like by default). AdamW's state
exists before the tracked step, as in every step after the first (its own ``step()`` creates
it from zero gradients). The global batch is the recipe's 8: with micro-batches of B < 8 a step
accumulates 8 / B of them, and from the second one on the gradients already exist through the
whole forward and backward; the tracked micro-batch is such a one (gradients present from the
start), the step's peak. With B = 8 there is one micro-batch and no gradient before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fgpo.data.records import write_records
from fgpo.models import processor_for_config
from fgpo.train import TrainConfig, Trainer
from fgpo_kernels._fake import simulate_gpu

from .materialized import MaterializedTrainer
from .tracker import StepTracker
from .values import KnownValues, flash_attention_on_meta

WAYS = ("ours", "materialized")


@dataclass(frozen=True)
class SequenceSpec:
    """One example's sequences. Defaults: SLAKE-like, in tokens (question 8-12 words under
    the chat template's ~20 tokens; minimal-edit answers of ~15 words differing in ~2)."""

    image_size: int = 1024
    """Side of the square image (SLAKE images as the reference's pipeline stores them)."""
    max_pixels: int = 512 * 28 * 28
    """Qwen-VL processors' pixel cap (the FiRe-MPO recipe's); larger images are resized."""
    min_pixels: int = 56 * 56
    prompt_tokens: int = 30
    """Text tokens of the prompt (chat template + question), image tokens excluded."""
    response_tokens: int = 20
    """Tokens of each answer (y+ and y- alike), eos excluded."""
    span_tokens: int = 3
    """Tokens inside the ``<mask>`` span of each answer."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if int(getattr(self, f.name)) < 1:
                raise ValueError(f"SequenceSpec.{f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.span_tokens > self.response_tokens:
            raise ValueError(
                f"SequenceSpec.span_tokens ({self.span_tokens}) must not exceed "
                f"response_tokens ({self.response_tokens})"
            )


@dataclass
class SimSpec:
    """One simulated configuration."""

    config_path: str
    micro_batch: int = 4
    checkpointing: bool = True
    way: str = "ours"
    impl: str | None = "triton"
    """``fgpo_kernels`` impl of the fused loss (ours only)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Further ``TrainConfig`` fields (e.g. ``shared_prefix``)."""
    seq: SequenceSpec = field(default_factory=SequenceSpec)
    gpu: str = "H100/H200"
    sm_count: int = 132


def load_model_config(path: str):
    """A transformers config from a config.json (errors name the file and the field)."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model config {path}: cannot read it as JSON ({e})") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise ValueError(f"model config {path}: no 'model_type' field")
    if d["model_type"] not in CONFIG_MAPPING:
        raise ValueError(
            f"model config {path}: model_type {d['model_type']!r} is not known to this transformers"
        )
    config = CONFIG_MAPPING[d["model_type"]].from_dict(d)
    if type(config) not in AutoModelForImageTextToText._model_mapping:
        raise ValueError(
            f"model config {path}: model_type {d['model_type']!r} is not a vision-language "
            "model (no AutoModelForImageTextToText class)"
        )
    return config


def _special_tokens(config) -> dict[str, int]:
    """Token strings for the ids the model's config names (image, vision start/end)."""
    ids = {"<image>": getattr(config, "image_token_id", None)}
    if ids["<image>"] is None:
        ids["<image>"] = getattr(config, "image_token_index", None)
    for key in ("vision_start_token_id", "vision_end_token_id"):
        if getattr(config, key, None) is not None:
            ids[f"<|{key}|>"] = int(getattr(config, key))
    if ids["<image>"] is None:
        raise ValueError(f"{type(config).__name__} has no image_token_id / image_token_index")
    return {k: int(v) for k, v in ids.items()}


def words(config) -> list[str]:
    """The synthetic tokenizer's words (up to 200, as the vocabulary allows); the last two are
    the edits that tell y+ from y-."""
    room = config.get_text_config().vocab_size - 3 - len(_special_tokens(config))
    n = min(200, room)
    if n < 4:
        raise ValueError(f"vocab_size {config.get_text_config().vocab_size} is too small")
    return [f"w{i}" for i in range(n - 2)] + ["yes", "no"]


def sim_processor(config, seq: SequenceSpec):
    """A real ``VLProcessor`` for ``config``: the model family's image processor with the
    recipe's pixel cap, and a word-level tokenizer (each of ``words(config)`` is one token)
    with the model's ids for its special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = _special_tokens(config)
    free = (i for i in range(3, config.get_text_config().vocab_size) if i not in specials.values())
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **dict(zip(words(config), free))}
    tok = Tokenizer(models.WordLevel(vocab={**vocab, **specials}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )
    fast.add_special_tokens({"additional_special_tokens": list(specials)})
    vc = config.vision_config
    if getattr(config, "vision_start_token_id", None) is not None:  # Qwen-VL
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        ip = Qwen2VLImageProcessorPil(
            size={"shortest_edge": seq.min_pixels, "longest_edge": seq.max_pixels},
            patch_size=vc.patch_size,
            merge_size=vc.spatial_merge_size,
            temporal_patch_size=vc.temporal_patch_size,
        )
    else:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        side = int(vc.image_size)
        ip = LlavaImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
    return processor_for_config(config, fast, ip)


def write_examples(folder: str, n: int, seq: SequenceSpec, vocab: list[str]) -> str:
    """``n`` preference records (with corrupted images) in the trainer's format, in the words
    ``vocab`` (``words(config)``)."""
    from PIL import Image

    for name in ("v.png", "v_corrupt.png"):
        Image.new("RGB", (seq.image_size, seq.image_size), (96, 96, 96)).save(
            os.path.join(folder, name)
        )

    # Every example its own words (as real questions differ; the shared-prefix packing runs
    # identical examples once); y+ and y- a minimal edit of each other: the same words around a
    # span that differs, in the middle of the answer.
    def pick(i: int, k: int, start: int) -> list[str]:
        return [vocab[(start + 7 * i + j) % (len(vocab) - 2)] for j in range(k)]

    before = (seq.response_tokens - seq.span_tokens) // 2
    after = seq.response_tokens - seq.span_tokens - before
    records = []
    for i in range(n):
        head, tail = pick(i, before, 50), pick(i, after, 90)
        answer = [
            " ".join([*head, f"<mask>{' '.join([edit] * seq.span_tokens)}</mask>", *tail])
            for edit in vocab[-2:]
        ]
        records.append({
            "id": str(i), "prompt": " ".join(pick(i, seq.prompt_tokens, 0)),
            "chosen": answer[0], "rejected": answer[1], "image_path": "v.png",
            "rejected_image_path": "v_corrupt.png",
        })  # fmt: skip
    return str(write_records(records, os.path.join(folder, "records.json")))


def build_model(config):
    """The model of ``config`` on the meta device, bf16, SDPA attention (the tensors stand for
    the GPU's; ``flash_attention_on_meta`` gives SDPA its GPU memory)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )


def _prime(trainer: Trainer, grads_present: bool) -> None:
    """AdamW's state as after a first step (its own step() on zero gradients creates it), and
    the gradients of the micro-batches before the tracked one when the step accumulates."""
    for p in trainer.trainable.values():
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=not grads_present)


def simulate(spec: SimSpec) -> dict[str, Any]:
    """Run ``spec``'s step on meta tensors; the peak bytes by category and what was run."""
    if spec.way not in WAYS:
        raise ValueError(f"way must be one of {WAYS}, got {spec.way!r}")
    t0 = time.perf_counter()
    config = load_model_config(spec.config_path)
    b = int(spec.micro_batch)
    with tempfile.TemporaryDirectory(prefix="fgpo_memsim_") as tmp:
        cfg = TrainConfig(
            model=os.path.basename(spec.config_path), dtype="bfloat16",
            train_file=write_examples(tmp, max(8, b), spec.seq, words(config)), output_dir=tmp,
            micro_batch_size=b, global_batch_size=max(8, b),
            gradient_checkpointing=spec.checkpointing,
            impl=spec.impl if spec.way == "ours" else None, max_length=1 << 16,
            progress_bar=False, tensorboard=False, prefetch=False, device="cpu",
            **spec.options,
        )  # fmt: skip
        cls = MaterializedTrainer if spec.way == "materialized" else Trainer
        trainer = cls(cfg, model=build_model(config), processor=sim_processor(config, spec.seq))
        trainer.device = torch.device("meta")
        trainer.load()
        trainer.load_data()
        micro = trainer.encode(0)[:1]  # the tracked micro-batch (module doc)
        _prime(trainer, grads_present=trainer.accum > 1)
        tracker = StepTracker()
        tracker.track(trainer.model, trainer.optimizer)
        with simulate_gpu(spec.gpu, spec.sm_count), flash_attention_on_meta():
            with KnownValues() as known, tracker:
                trainer.train_step(0, micro)
    first = micro[0]
    mask = first[trainer.mask_key]
    return {
        "peak": tracker.peak_bytes("meta"),
        "seq_len": int(first["input_ids"].shape[1]),
        "sequences": int(first["input_ids"].shape[0]),
        "image_tokens": int((first["input_ids"][0] == trainer.processor.image_token_id).sum()),
        "weighted_rows": int((mask != 0).sum()),
        "accumulation": trainer.accum,
        "trainable_params": sum(p.numel() for p in trainer.trainable.values()),
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "assumed": dict(known.assumed),
        "sim_s": round(time.perf_counter() - t0, 1),
    }


def real_vs_simulated(
    tiny: str, *, checkpointing: bool, way: str = "ours", train_file: str, out_dir: str,
    options: dict[str, Any] | None = None,
) -> tuple[int, int, dict[str, int]]:  # fmt: skip
    """The same step of a tiny model (``fgpo.models.tiny``), for real on the CPU and simulated
    on meta tensors, each under ``StepTracker``: (real peak bytes, simulated peak bytes, what
    the simulation assumed). fp32, impl torch, LoRA r=8 with dropout, 2 micro-batches of 2.

    In both runs the micro-batch is on the device before the step and not counted: the real
    CPU step uses the host batch in place where a GPU step (and ``simulate``) copies it in.
    """
    from fgpo.models import tiny as tiny_models

    cfg = TrainConfig(
        model=tiny, dtype="float32", train_file=train_file, output_dir=out_dir, lora_r=8,
        lora_alpha=16, global_batch_size=4, micro_batch_size=2, max_steps=2,
        gradient_checkpointing=checkpointing, impl="torch", progress_bar=False,
        tensorboard=False, prefetch=False, device="cpu", cache_examples=True, **(options or {}),
    )  # fmt: skip
    cls = MaterializedTrainer if way == "materialized" else Trainer
    peaks = []
    for meta in (False, True):
        torch.manual_seed(0)
        with torch.device("meta" if meta else "cpu"):
            model, proc = tiny_models.build_tiny(tiny)
        trainer = cls(cfg, model=model, processor=proc)
        trainer.device = torch.device("meta" if meta else "cpu")
        trainer.load()
        trainer.load_data()
        micro = trainer.encode(0)
        _prime(trainer, grads_present=False)
        with contextlib.ExitStack() as stack:
            if meta:
                stack.enter_context(simulate_gpu())
                stack.enter_context(flash_attention_on_meta())
                known = stack.enter_context(KnownValues())
                micro = [{k: _to_meta(v) for k, v in b.items()} for b in micro]
            tracker = StepTracker()
            tracker.track(trainer.model, trainer.optimizer)
            tracker.ignore(*(v for b in micro for v in b.values() if torch.is_tensor(v)))
            with tracker:
                trainer.train_step(0, micro)
        peaks.append(tracker.peak_bytes("meta" if meta else "cpu")["total"])
    return peaks[0], peaks[1], dict(known.assumed)


def _to_meta(v: Any) -> Any:
    return v.to("meta") if torch.is_tensor(v) else v
