"""Computed (not measured) matmul FLOPs of one FiRe-MPO training step, plain vs shared prefix.

What is counted, per step:

- language model, per token: the linear layers, ``2 * (D*H*dh + 2*D*KV*dh + H*dh*D + 3*D*I)``
  per layer (q, k, v, o and a gated MLP); attention, ``4 * H * dh`` per (query, key) pair the
  mask lets through (a causal row of n tokens has n(n+1)/2 pairs; a packed row's tails see the
  shared part and themselves). Dense-mask kernels (sdpa with a mask) compute the whole padded
  square instead; the count is what the math needs;
- a training step of the policy = 3 forwards with gradient checkpointing (forward, recompute,
  and the input-gradient half of the backward: the frozen base weights get no weight gradient
  under LoRA), 2 without; the reference = 1 forward;
- vision tower, per image: ``2 * (4*Dv^2 + 3*Dv*Iv)`` per patch and layer, attention over the
  image's patches (full-attention layers) or over windows, and the patch merger; it runs once
  per sequence and pass in the plain step, once per distinct image in the shared step with
  LoRA (features serve both models);
- left out, the same in both modes: the LoRA adapters (they scale with the tokens like the
  layers they adapt), embeddings, norms, the loss's head projections (masked rows only).

    python -m benchmarks.prefix_flops          # Qwen2.5-VL-7B at the recipe's image sizes
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class LMDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class VisionDims:
    hidden: int
    intermediate: int
    layers: int
    full_layers: int  # layers with attention over the whole image (the rest: windows)
    window_patches: int  # patches per attention window (0 = every layer attends fully)
    merge: int  # patches per image token (spatial merge 2 x 2 = 4)
    out_hidden: int


# Qwen2.5-VL-7B-Instruct's config.json: text and vision towers.
QWEN25_VL_7B = (
    LMDims(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128),
    VisionDims(
        hidden=1280,
        intermediate=3420,
        layers=32,
        full_layers=4,
        window_patches=64,  # window_size 112 px = 8 x 8 patches of 14 px
        merge=4,
        out_hidden=3584,
    ),
)


def lm_forward(lm: LMDims, tokens: int, pairs: int) -> float:
    """Forward FLOPs of the language model over ``tokens`` with ``pairs`` attended pairs."""
    d, h, kv, dh = lm.hidden, lm.heads, lm.kv_heads, lm.head_dim
    linear = 2 * (d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * lm.intermediate)
    return lm.layers * (tokens * linear + pairs * 4 * h * dh)


def vision_forward(v: VisionDims, image_tokens: int) -> float:
    """Forward FLOPs of the vision tower and merger for one image of ``image_tokens`` tokens."""
    patches = image_tokens * v.merge
    linear = patches * 2 * (4 * v.hidden**2 + 3 * v.hidden * v.intermediate)
    full = 4 * v.hidden * patches**2
    window = 4 * v.hidden * patches * min(v.window_patches or patches, patches)
    attn = v.full_layers * full + (v.layers - v.full_layers) * window
    merged = v.hidden * v.merge
    merger = image_tokens * 2 * (merged * merged + merged * v.out_hidden)
    return v.layers * linear + attn + merger


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def packed_pairs(shared: int, tail1: int, tail2: int) -> int:
    """Pairs of one packed row: the shared part causally, each tail over shared + itself."""
    tails = sum(t * shared + causal_pairs(t) for t in (tail1, tail2))
    return causal_pairs(shared) + tails


def step_flops(
    lm: LMDims,
    vision: VisionDims,
    image_tokens: int,
    plain_lengths: list[int],
    packed_rows: list[tuple[int, int, int]],
    *,
    checkpointing: bool = True,
    share_vision: bool = True,
) -> dict[str, float]:
    """Computed FLOPs of one step in each mode (see the module doc for what is counted).

    ``plain_lengths``: the real length of every plain sequence (one image each);
    ``packed_rows``: (shared, tail of y+, tail of y-) of every packed row (one image each)."""
    passes = (3 if checkpointing else 2) + 1  # policy + reference
    img = vision_forward(vision, image_tokens)
    plain_lm = lm_forward(lm, sum(plain_lengths), sum(causal_pairs(n) for n in plain_lengths))
    packed_tokens = sum(c + a + b for c, a, b in packed_rows)
    packed_lm = lm_forward(lm, packed_tokens, sum(packed_pairs(*r) for r in packed_rows))
    plain_vision = 2 * len(plain_lengths) * img  # each sequence, in both passes
    shared_vision = (1 if share_vision else 2) * len(packed_rows) * img
    plain = passes * plain_lm + plain_vision
    shared = passes * packed_lm + shared_vision
    return {
        "plain_flop": plain,
        "shared_flop": shared,
        "ratio": shared / plain,
        "plain_tokens": float(sum(plain_lengths)),
        "shared_tokens": float(packed_tokens),
        "vision_share_of_plain": plain_vision / plain,
    }


def example_layout(
    batch: int, image_tokens: int, text_prefix: int, resp_chosen: int, resp_rejected: int
) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Plain lengths and packed rows of a batch where every example has v and v'."""
    prefix = image_tokens + text_prefix
    plain = [prefix + resp_chosen, prefix + resp_rejected] * (2 * batch)
    rows = [(prefix, resp_chosen, resp_rejected)] * (2 * batch)
    return plain, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-prefix", type=int, default=40, help="template + question tokens")
    p.add_argument("--response", type=int, default=17, help="answer tokens incl. eos (each)")
    args = p.parse_args(argv)
    lm, vision = QWEN25_VL_7B
    print("Qwen2.5-VL-7B, LoRA, gradient checkpointing, all four sequences, COMPUTED FLOPs")
    print("image_tokens  text_prefix  response  plain_TFLOP  shared_TFLOP  ratio  vision_share")
    for image_tokens in (256, 512):
        plain, rows = example_layout(
            args.batch, image_tokens, args.text_prefix, args.response, args.response
        )
        f = step_flops(lm, vision, image_tokens, plain, rows)
        print(
            f"{image_tokens:12d}  {args.text_prefix:11d}  {args.response:8d}  "
            f"{f['plain_flop'] / 1e12:11.1f}  {f['shared_flop'] / 1e12:12.1f}  "
            f"{f['ratio']:5.3f}  {f['vision_share_of_plain']:12.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
