"""What pair preparation, evaluation and the demo ask of a model: greedy answers and the
log-probability of a given answer, batched.

- :func:`greedy_answers`: ``model.generate`` without sampling; prompts are grouped by their
  token length, so a batch never needs padding and every answer equals the one-by-one answer.
  Image placeholder tokens are never generated (one more would break the model's image merge).
- :func:`answer_logprobs`: the summed log-prob of each answer's tokens (eos included, encoded
  exactly as the trainer encodes responses, :func:`fgpo.data.encode_example`) given image and
  question, from backbone hidden states and the LM-head weight through
  ``fgpo_kernels.token_logprobs``: no logits tensor.
- :func:`model_fns`: the batched pair as ``fgpo.eval.evaluate`` takes it;
  :func:`greedy_answer_fn` / :func:`answer_logprob_fn`: one-example callables of the two (the
  shape ``fgpo.pairs.prepare_pairs`` takes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import fgpo_kernels as fk

from ..data import IGNORE_INDEX, encode_example, open_image, pad_sequences
from .loading import backbone_hidden_states, lm_head_weight, load_model

DEFAULT_MAX_NEW_TOKENS = 64
REPORT_MAX_NEW_TOKENS = 160  # reports (IU-Xray) are paragraphs, not short answers


def default_max_new_tokens(dataset: str | None) -> int:
    """Greedy answer length limit: 160 tokens for report datasets (IU-Xray), else 64."""
    return REPORT_MAX_NEW_TOKENS if dataset == "iu_xray" else DEFAULT_MAX_NEW_TOKENS


def load_for_inference(
    model_name: str,
    *,
    dtype: str = "float32",
    adapter: str | None = None,
    device: str | None = None,
) -> tuple[nn.Module, Any, str]:
    """(model in eval mode, processor, device) via :func:`load_model` (+ a PEFT adapter dir)."""
    model, proc = load_model(model_name, dtype=dtype)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return model, proc, device


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal length (no padding), each group cut into batches."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]


def _progress(items: list, desc: str | None):
    if desc is None:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True)


def _to(d: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in d.items()}


def _cat_images(images: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([im[k] for im in images], 0) for k in images[0]}


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    proc: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 64,
    desc: str | None = None,
) -> list[str]:
    """The model's greedy answer to each (image, question); images are PIL images or paths.
    ``desc`` shows a progress bar with that label."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    prompts = [
        proc.encode_prompt(open_image(im) if isinstance(im, str) else im, q)
        for im, q in zip(images, questions)
    ]
    banned = sorted({proc.image_token_id, *getattr(proc, "vision_token_ids", ())})
    out: list[str] = [""] * len(prompts)
    for idx in _progress(_batches_by_length([len(p[0]) for p in prompts], batch_size), desc):
        ids = torch.tensor([prompts[i][0] for i in idx], device=device)
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            **_to(_cat_images([prompts[i][1] for i in idx]), device),
            **_to(proc.extra_model_inputs(ids), device),
        }
        gen = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=proc.pad_token_id,
            eos_token_id=proc.eos_token_id,
            suppress_tokens=banned,
        )
        n = ids.shape[1]
        for row, i in enumerate(idx):
            out[i] = proc.decode(gen[row, n:], skip_special_tokens=True).strip()
    return out


@torch.no_grad()
def answer_logprobs(
    model: nn.Module,
    proc: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> list[float]:
    """Summed log-prob of each answer (eos included) given its image and question."""
    if not len(images) == len(questions) == len(answers):
        raise ValueError(
            f"{len(images)} images, {len(questions)} questions, {len(answers)} answers"
        )
    w = lm_head_weight(model)
    out: list[float] = []
    for s in range(0, len(images), batch_size):
        part = slice(s, s + batch_size)
        encs = [
            encode_example(proc, im, q, a.strip())
            for im, q, a in zip(images[part], questions[part], answers[part])
        ]
        b = pad_sequences(encs, proc.pad_token_id)
        ids = b["input_ids"].to(device)
        inputs = {
            "input_ids": ids,
            "attention_mask": b["attention_mask"].to(device),
            **_to(_cat_images([e["image"] for e in encs]), device),
            **_to(proc.extra_model_inputs(ids), device),
        }
        hidden = backbone_hidden_states(model, **inputs)
        targets = b["targets"].to(hidden.device)
        # already aligned: hidden row t predicts targets[t]; -100 elsewhere reads 0
        lp = fk.token_logprobs(hidden, w, targets, ignore_index=IGNORE_INDEX)
        out += lp.sum(-1).tolist()
    return out


def model_fns(
    model: nn.Module, proc: Any, device, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> dict[str, Callable]:
    """``{"answers": answers(images, questions), "logprobs": logprobs(images, questions,
    answers)}``: the batched callables :func:`fgpo.eval.evaluate` takes."""

    def answers(images, questions):
        return greedy_answers(
            model, proc, images, questions, device=device, max_new_tokens=max_new_tokens
        )

    def logprobs(images, questions, answer_texts):
        return answer_logprobs(model, proc, images, questions, answer_texts, device=device)

    return {"answers": answers, "logprobs": logprobs}


def greedy_answer_fn(
    model: nn.Module, proc: Any, device, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> Callable[[Any], str]:
    """``answer(example) -> str``: the greedy answer to one ``VQAExample``."""

    def answer(ex: Any) -> str:
        image = open_image(ex.image_path)
        return greedy_answers(
            model, proc, [image], [ex.question], device=device, max_new_tokens=max_new_tokens
        )[0]

    return answer


def answer_logprob_fn(model: nn.Module, proc: Any, device) -> Callable[[Any, str, str], float]:
    """``logprob(image, question, answer) -> float`` for one example (see the module doc)."""

    def logprob(image: Any, question: str, answer: str) -> float:
        return answer_logprobs(model, proc, [image], [question], [answer], device=device)[0]

    return logprob
