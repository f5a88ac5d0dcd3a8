"""The demo's tiny LVLM: a LLaVA model (CLIP vision tower + Llama text model, ~100k parameters)
built from a config, a word-level tokenizer built from the demo vocabulary, and the few model
calls the demo needs (batch encoding, backbone hidden states, answer log-probs, greedy answers).

No logits are ever built for more than the one position greedy decoding extends: answer
log-probs come from the backbone's hidden states and the LM-head weight through
``fgpo_kernels.token_logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

import fgpo_kernels as fk

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>")
IGNORE = -100


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary (special tokens first)."""

    def __init__(self, words: list[str]):
        self.vocab = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2, 3
        self.image_token_id = 4

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_token_id) for w in text.split()]

    def decode(self, ids: list[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        out = []
        for i in ids:
            if i == self.eos_token_id:
                break
            if i not in (self.pad_token_id, self.bos_token_id):
                out.append(self.vocab[i])
        return " ".join(out)


def build_tiny_llava(vocab_size: int, image_token_id: int, *, image_size: int = 32, seed: int = 0):
    """A ~100k-parameter LLaVA (CLIP vision: patch 8, hidden 32, 2 layers; Llama: hidden 64,
    2 layers), randomly initialized from ``seed``. One grayscale channel in."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=8,
        num_channels=1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    n_patches = (image_size // 8) ** 2
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=n_patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    cfg.image_token_id = image_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.n_image_tokens = n_patches
    return model


def lm_head_weight(model) -> Tensor:
    return model.get_output_embeddings().weight


def backbone_hidden(model, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor):
    """Last hidden states (B, L, D) of the language model, no logits."""
    return model.model(
        input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask
    ).last_hidden_state


def images_to_pixels(images: list[np.ndarray] | np.ndarray) -> Tensor:
    """uint8 (H, W) scans -> float (B, 1, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    if arr.ndim == 4:  # (B, H, W, C) RGB from a corruption routine: back to one channel
        arr = arr.mean(-1)
    return torch.from_numpy(arr / 127.5 - 1.0).unsqueeze(1)


@dataclass
class Batch:
    input_ids: Tensor  # (B, L) right-padded
    attention_mask: Tensor  # (B, L)
    pixel_values: Tensor  # (B, 1, H, W)
    targets: Tensor  # (B, L-1): token t+1 at response positions, IGNORE elsewhere
    weights: Tensor  # (B, L-1) float: per-response-token weight (e.g. a span mask)


def prompt_ids(tok: WordTokenizer, question: str, n_image_tokens: int) -> list[int]:
    return [tok.bos_token_id] + [tok.image_token_id] * n_image_tokens + tok.encode(question)


def make_batch(
    tok: WordTokenizer,
    n_image_tokens: int,
    questions: list[str],
    responses: list[list[int]],
    images: list[np.ndarray],
    weights: list[list[float]] | None = None,
) -> Batch:
    """Teacher-forcing batch. ``responses`` are answer token ids (EOS appended here);
    ``weights`` one value per answer token (EOS gets the weight of ... 1 when unspecified)."""
    seqs, tw = [], []
    for i, (q, r) in enumerate(zip(questions, responses)):
        p = prompt_ids(tok, q, n_image_tokens)
        seqs.append((p, [*r, tok.eos_token_id]))
        w = [1.0] * (len(r) + 1) if weights is None else [*weights[i], 0.0]
        tw.append(w)
    L = max(len(p) + len(r) for p, r in seqs)
    B = len(seqs)
    ids = torch.full((B, L), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros(B, L, dtype=torch.long)
    tgt = torch.full((B, L - 1), IGNORE, dtype=torch.long)
    wt = torch.zeros(B, L - 1)
    for b, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[b, :n] = torch.tensor(p + r)
        att[b, :n] = 1
        s = len(p) - 1  # hidden row s predicts the first answer token
        tgt[b, s : s + len(r)] = torch.tensor(r)
        wt[b, s : s + len(r)] = torch.tensor(tw[b])
    return Batch(ids, att, images_to_pixels(images), tgt, wt)


def sequence_logps(model, batch: Batch) -> Tensor:
    """Per-token answer log-probs (B, L-1), 0 outside the answer."""
    h = backbone_hidden(model, batch.input_ids, batch.pixel_values, batch.attention_mask)
    return fk.token_logprobs(h[:, :-1], lm_head_weight(model), batch.targets)


@torch.no_grad()
def greedy_answers(
    model,
    tok: WordTokenizer,
    questions: list[str],
    images: list[np.ndarray],
    max_new_tokens: int = 10,
    batch_size: int = 256,
) -> list[str]:
    """Greedy decoding, batched over examples with the same question (no padding needed)."""
    n_img = model.n_image_tokens
    out: list[str | None] = [None] * len(questions)
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(q, []).append(i)
    w = lm_head_weight(model)
    # never emit pad/bos/unk or the image placeholder (an extra <image> would break the model)
    banned = [tok.pad_token_id, tok.bos_token_id, tok.unk_token_id, tok.image_token_id]
    for q, idx in groups.items():
        for s in range(0, len(idx), batch_size):
            part = idx[s : s + batch_size]
            pix = images_to_pixels([images[i] for i in part])
            ids = torch.tensor([prompt_ids(tok, q, n_img)] * len(part))
            done = torch.zeros(len(part), dtype=torch.bool)
            for _ in range(max_new_tokens):
                h = backbone_hidden(model, ids, pix, torch.ones_like(ids))
                logits = h[:, -1] @ w.T  # one position per row: (B, V), V tiny
                logits[:, banned] = float("-inf")
                nxt = logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
                ids = torch.cat([ids, nxt[:, None]], 1)
                done |= nxt == tok.eos_token_id
                if done.all():
                    break
            start = len(prompt_ids(tok, q, n_img))
            for j, i in enumerate(part):
                out[i] = tok.decode(ids[j, start:])
    return out  # type: ignore[return-value]
