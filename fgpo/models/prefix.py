"""Shared-prefix packing: chosen and rejected continue ONE pass over the image and the prompt.

The plain layout runs every (image, answer) sequence as its own row, so the image tokens and the
prompt go through the backbone once per answer: four times per example and model for FiRe-MPO.
The packed layout has one row per example and image:

    [ shared | tail of y+ | tail of y- ]        (then right padding)

``shared`` is the longest common token prefix of the two sequences: the image, the prompt and
any leading answer tokens both answers start with. Every packed token is run under

    mask:       query q sees key k  <=>  k <= q, k is real, and k is shared or in q's own tail
                (a padding query sees only itself, so no softmax row is empty); plus the
                family's own rules, and for sliding-window layers q - k < window counted in
                plain token indices (what the model's own mask counts)
    positions:  the position the token has in its own plain sequence

so y- sees the prefix and itself but never y+, and starts at the position where y+ starts (for
Qwen-VL, the 3-D M-RoPE positions of the text after the image). Each real token therefore sees
the same tokens at the same positions as in its plain row: its hidden state is the same function
of the same inputs, and :meth:`Packed.unpack` gives back the plain ``(S, L, D)`` hidden states
(padding rows zero). Only the summation order inside attention changes (fp32: ~1e-7 relative).

The positions are not re-derived: each family computes them for the plain batch with the model's
own rule (:meth:`Family.plain_positions`) and the packer gathers them, so the packed positions
are the plain ones by construction (and the packer checks that both sequences agree on the
shared part).

**Vision features.** Each packed row holds one image, so a pass runs the vision tower once per
distinct (example, image) instead of once per sequence; examples without v' (their corrupted
group repeats the clean one) are not packed twice. When the reference is the same model with its
LoRA adapters off and nothing on the vision path trains, carries an adapter or drops out, the
features of each image are computed once (:meth:`Family.image_features`) and serve both the
reference and the policy pass (``mm_encoder_outputs`` of transformers >= 5.x).

**How a family plugs in.** Subclass :class:`Family` and register its ``config.model_type`` in
``FAMILIES`` (LLaVA-Med is LLaVA with a Mistral text model, MedGemma is Gemma 3: both are here):

- ``image_keys``, ``split_images``, ``join_images``: the per-sequence image tensors of a batch;
- ``plain_positions``: the positions the model computes by itself for the plain batch;
- ``attend``: the packed pattern of a full-attention layer; override it to OR in the family's
  own rules (Gemma 3: the soft tokens of one image see each other in both directions). Sliding
  windows are generic (:meth:`Family.allowed` ANDs them per layer type, from the text config's
  ``layer_types`` / ``sliding_window``); a model with several layer types gets one mask per
  type, as a dict, which its text model must take (Gemma 3's and Qwen-VL's do);
  :func:`plan_shared_prefix` refuses any other layer type (chunked, linear attention);
- ``image_features``: the vision output the model takes back as ``mm_encoder_outputs`` (or set
  ``shares_vision = False``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

SEG_PAD, SEG_SHARED, SEG_FIRST, SEG_SECOND = -1, 0, 1, 2
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")  # take an arbitrary (B, 1, Q, K) mask


class VisionFeatures:
    """Precomputed vision output handed to the model as ``mm_encoder_outputs``.

    A plain object on purpose: DDP and FSDP walk dicts, tuples and dataclasses in a forward's
    arguments to move tensors; this holder passes through them untouched and
    ``backbone_hidden_states`` unwraps it."""

    __slots__ = ("outputs",)

    def __init__(self, outputs: dict[str, Any]) -> None:
        self.outputs = outputs


def layer_types(text_config: Any) -> tuple[tuple[str, ...], int | None]:
    """The attention types of a text model's layers (distinct, sorted) and its window, read as
    the model's own mask code reads them: ``layer_types`` when the config lists them (Gemma 3,
    Qwen-VL), else every layer windowed when ``sliding_window`` is set (Mistral)."""
    window = getattr(text_config, "sliding_window", None)
    if getattr(text_config, "use_sliding_window", True) is False:
        window = None
    kinds = getattr(text_config, "layer_types", None)
    if not kinds:
        kinds = ["sliding_attention" if window else "full_attention"]
    return tuple(sorted(set(kinds))), window


class Family:
    """How one model family is packed (see the module doc for how a new one plugs in)."""

    name = "base"
    image_keys: tuple[str, ...] = ("pixel_values",)
    shares_vision = True

    def __init__(self, config: Any = None, text_config: Any = None) -> None:
        self.config = config
        self.layer_types, self.window = layer_types(text_config)

    def split_images(self, batch: dict[str, Any], n: int) -> list[dict[str, Tensor]]:
        """The image tensors of each of the ``n`` sequences (one image each)."""
        raise NotImplementedError

    def join_images(self, images: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {k: torch.cat([im[k] for im in images], 0) for k in self.image_keys}

    def plain_positions(self, inner: nn.Module, batch: dict[str, Any]) -> Tensor:
        """Position ids of the plain batch, ``(S, L)`` or ``(K, S, L)``."""
        raise NotImplementedError

    def attend(self, packed: Packed) -> Tensor:
        """``(P, Lp, Lp)`` bool: which key each query of a packed row sees in a full-attention
        layer."""
        seg = packed.segments
        n = seg.shape[1]
        idx = torch.arange(n, device=seg.device)
        causal = idx[None, :] <= idx[:, None]  # (q, k)
        real_k = (seg >= 0)[:, None, :]
        same = (seg[:, None, :] == SEG_SHARED) | (seg[:, None, :] == seg[:, :, None])
        own = torch.eye(n, dtype=torch.bool, device=seg.device)[None]  # padding sees itself
        return (causal[None] & real_k & same) | own

    def allowed(self, packed: Packed) -> dict[str, Tensor]:
        """The pattern of each layer type: ``attend``, and for sliding-window layers only the
        keys less than ``window`` plain tokens back (the model's own rule, ``k > q - window``)."""
        full = self.attend(packed)
        out = {}
        for kind in self.layer_types:
            if kind == "full_attention":
                out[kind] = full
            elif kind == "sliding_attention" and self.window:
                t = packed.token_index
                out[kind] = full & (t[:, :, None] - t[:, None, :] < int(self.window))
            else:
                raise ValueError(f"{self.name}: layer type {kind!r} has no packed mask")
        return out

    def image_features(self, inner: nn.Module, images: dict[str, Tensor]) -> VisionFeatures:
        """The vision tower and projector on ``images``, as the model's ``mm_encoder_outputs``."""
        out = inner.get_image_features(**images, return_dict=True)
        return VisionFeatures({"image": out})


class LlavaFamily(Family):
    """LLaVA-style models: a fixed number of image tokens, 1-D positions ``0..L-1``."""

    name = "llava"

    def split_images(self, batch: dict[str, Any], n: int) -> list[dict[str, Tensor]]:
        pix = batch["pixel_values"]
        if pix.shape[0] != n:
            raise ValueError(f"batch has {pix.shape[0]} images (pixel_values) for {n} sequences")
        return [{"pixel_values": pix[s : s + 1]} for s in range(n)]

    def plain_positions(self, inner: nn.Module, batch: dict[str, Any]) -> Tensor:
        s, n = batch["input_ids"].shape
        return torch.arange(n).expand(s, n)  # the Llama-style default under right padding


class QwenFamily(Family):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``image_grid_thw`` images, 3-D M-RoPE positions."""

    name = "qwen-vl"
    image_keys = ("pixel_values", "image_grid_thw")

    def split_images(self, batch: dict[str, Any], n: int) -> list[dict[str, Tensor]]:
        grid = batch["image_grid_thw"]
        if grid.shape[0] != n:
            raise ValueError(f"batch has {grid.shape[0]} images (image_grid_thw) for {n} sequences")
        ends = grid.prod(-1).cumsum(0).tolist()
        starts = [0, *ends[:-1]]
        pix = batch["pixel_values"]
        return [
            {"pixel_values": pix[a:b], "image_grid_thw": grid[s : s + 1]}
            for s, (a, b) in enumerate(zip(starts, ends))
        ]

    def plain_positions(self, inner: nn.Module, batch: dict[str, Any]) -> Tensor:
        ids, att = batch["input_ids"], batch["attention_mask"]
        # The model's own rule (what it computes when no position ids are passed).
        pos, _ = inner.get_rope_index(
            ids.to(torch.long),
            mm_token_type_ids=(ids == inner.config.image_token_id).long(),
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=att,
        )
        return pos.cpu()


class Gemma3Family(LlavaFamily):
    """Gemma 3 (MedGemma): 1-D positions, and the soft tokens of one image see each other in
    both directions (the model's own ``token_type_ids`` rule), windows included."""

    name = "gemma3"

    def attend(self, packed: Packed) -> Tensor:
        img = packed.input_ids == _image_token_id(self.config)
        starts = img & ~torch.nn.functional.pad(img, (1, 0))[:, :-1]
        block = torch.where(img, starts.cumsum(-1), -1)  # one id per run of image tokens
        same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
        return super().attend(packed) | same


def _image_token_id(config: Any) -> int:
    tid = getattr(config, "image_token_id", None)
    return int(tid if tid is not None else config.image_token_index)


FAMILIES: dict[str, type[Family]] = {
    "gemma3": Gemma3Family,
    "llava": LlavaFamily,
    "qwen2_vl": QwenFamily,
    "qwen2_5_vl": QwenFamily,
    "qwen3_vl": QwenFamily,
}


# ----------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------
@dataclass
class Packed:
    """A micro-batch's packed rows and the map back to its plain rows.

    ``index[s, t]`` is the flat packed position (``row * width + col``) of plain token ``t`` of
    sequence ``s``; plain padding points at ``rows * width`` (a zero row appended on unpack)."""

    input_ids: Tensor  # (P, Lp) long, right-padded with the pad id
    segments: Tensor  # (P, Lp) long: SEG_PAD / SEG_SHARED / SEG_FIRST / SEG_SECOND
    positions: Tensor  # (P, Lp) or (K, P, Lp): each token's position in its plain sequence
    token_index: Tensor  # (P, Lp) long: each token's index in its plain sequence
    images: dict[str, Tensor]  # one image per packed row, in row order
    index: Tensor  # (S, L) long
    plain_tokens: int  # real tokens of the plain batch (what the plain path runs)

    @property
    def tokens(self) -> int:
        """Real tokens of the packed rows (what one packed pass runs)."""
        return int((self.segments >= 0).sum())

    def to(self, device: torch.device | str) -> Packed:
        return Packed(
            self.input_ids.to(device),
            self.segments.to(device),
            self.positions.to(device),
            self.token_index.to(device),
            {k: v.to(device) for k, v in self.images.items()},
            self.index.to(device),
            self.plain_tokens,
        )

    def unpack(self, hidden: Tensor) -> Tensor:
        """Packed hidden states ``(P, Lp, D)`` -> the plain layout ``(S, L, D)``."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])
        return flat[self.index]


def _common_prefix(a: Tensor, b: Tensor) -> int:
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


def pack(batch: dict[str, Any], family: Family, inner: nn.Module, pad_id: int) -> Packed:
    """Pack a collated preference micro-batch (:class:`fgpo.data.PreferenceCollator` layout:
    groups of ``B`` sequences, (v, y+), (v, y-)[, (v', y+), (v', y-)]) into shared-prefix rows.

    ``inner`` is the backbone (for the family's position rule). Pairs whose sequences and image
    equal an earlier pair's (examples without v' repeat v in the corrupted group) map to that
    pair's row instead of being run again."""
    ids = batch["input_ids"].cpu()
    att = batch["attention_mask"].cpu()
    n_seq, bsz = int(batch["n_seq"]), int(batch["batch_size"])
    s_total, width = ids.shape
    if n_seq % 2 or n_seq * bsz != s_total:
        raise ValueError(
            f"shared-prefix packing needs (chosen, rejected) groups: n_seq={n_seq}, "
            f"batch_size={bsz}, {s_total} sequences"
        )
    lengths = att.sum(-1).tolist()
    if any(att[s, n:].any() or not att[s, :n].all() for s, n in enumerate(lengths)):
        raise ValueError("shared-prefix packing needs right-padded sequences (attention_mask)")
    images = family.split_images({k: batch[k].cpu() for k in family.image_keys}, s_total)
    pos = family.plain_positions(inner, {**batch, "input_ids": ids, "attention_mask": att})
    lead = pos.shape[:-2]  # () for 1-D positions, (K,) for M-RoPE
    rows: list[tuple[int, int, int]] = []  # (chosen seq, rejected seq, shared length)
    where: dict[int, tuple[int, int]] = {}  # plain seq -> (packed row, offset of its tail)
    seen: dict[tuple, int] = {}
    for g in range(n_seq // 2):
        for i in range(bsz):
            a, r = 2 * g * bsz + i, (2 * g + 1) * bsz + i
            la, lr = lengths[a], lengths[r]
            img_a, img_r = images[a], images[r]
            if any(not torch.equal(img_a[k], img_r[k]) for k in family.image_keys):
                raise ValueError(f"sequences {a} and {r} of a pair have different images")
            key = (tuple(ids[a, :la].tolist()), tuple(ids[r, :lr].tolist()))
            twin = seen.get(key)
            if twin is not None and all(
                torch.equal(img_a[k], images[rows[twin][0]][k]) for k in family.image_keys
            ):
                where[a], where[r] = (twin, 0), where[rows[twin][1]]
                continue
            c = _common_prefix(ids[a, :la], ids[r, :lr])
            if not torch.equal(pos[..., a, :c], pos[..., r, :c]):
                raise ValueError(f"sequences {a} and {r} share {c} tokens but not their positions")
            seen[key] = len(rows)
            where[a], where[r] = (len(rows), 0), (len(rows), la - c)
            rows.append((a, r, c))
    lp = max(lengths[a] + lengths[r] - c for a, r, c in rows)
    n_rows = len(rows)
    out_ids = torch.full((n_rows, lp), int(pad_id), dtype=torch.long)
    seg = torch.full((n_rows, lp), SEG_PAD, dtype=torch.long)
    out_pos = torch.zeros((*lead, n_rows, lp), dtype=pos.dtype)
    token_index = torch.zeros((n_rows, lp), dtype=torch.long)
    for p, (a, r, c) in enumerate(rows):
        la, lr = lengths[a], lengths[r]
        n = la + lr - c
        out_ids[p, :la], out_ids[p, la:n] = ids[a, :la], ids[r, c:lr]
        seg[p, :c], seg[p, c:la], seg[p, la:n] = SEG_SHARED, SEG_FIRST, SEG_SECOND
        out_pos[..., p, :la], out_pos[..., p, la:n] = pos[..., a, :la], pos[..., r, c:lr]
        token_index[p, :la], token_index[p, la:n] = torch.arange(la), torch.arange(c, lr)
    index = torch.full((s_total, width), n_rows * lp, dtype=torch.long)  # padding: zero row
    for s in range(s_total):
        p, tail = where[s]
        c = rows[p][2]
        t = torch.arange(lengths[s])
        col = torch.where(t < c, t, t + tail)  # the second tail sits after the first
        index[s, : lengths[s]] = p * lp + col
    return Packed(
        out_ids,
        seg,
        out_pos,
        token_index,
        family.join_images([images[a] for a, _, _ in rows]),
        index,
        plain_tokens=int(sum(lengths)),
    )


def attention_mask(
    allowed: Tensor | dict[str, Tensor], implementation: str, dtype: torch.dtype
) -> Any:
    """A ``(P, Lp, Lp)`` pattern in the form ``implementation`` takes: bool ``(P, 1, Lp, Lp)``
    for sdpa, an additive float mask for eager, a ``BlockMask`` for flex_attention. A dict by
    layer type gives the one mask when there is one type, else a dict of masks (the form the
    text models with mixed layers take)."""
    if isinstance(allowed, dict):
        masks = {k: attention_mask(v, implementation, dtype) for k, v in allowed.items()}
        return next(iter(masks.values())) if len(masks) == 1 else masks
    if implementation == "sdpa":
        return allowed[:, None]
    if implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return allowed[b, q, k]

        p, n, _ = allowed.shape
        return create_block_mask(mask_mod, p, None, n, n, device=allowed.device)
    raise ValueError(
        f"attention implementation {implementation!r} takes no custom mask; shared-prefix "
        f"packing needs one of {MASKED_ATTENTION}"
    )


# ----------------------------------------------------------------------------------------------
# the plan: can this model be packed, and can the policy and reference share vision features
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefixPlan:
    """What the trainer does: packed (``family`` set) or plain, and whether vision is shared."""

    family: Family | None
    share_vision: bool
    attn_implementation: str | None
    notes: tuple[str, ...]

    @property
    def enabled(self) -> bool:
        return self.family is not None

    def model_inputs(
        self,
        batch: dict[str, Any],
        inner: nn.Module,
        processor: Any,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> tuple[dict[str, Any], Packed]:
        """Pack ``batch`` and build its rows' model inputs: ids, the packed mask and positions,
        the processor's extra inputs, and the images, or, when vision is shared, their features
        computed once here (no grad) for both models. ``inner`` is the policy's backbone."""
        pk = pack(batch, self.family, inner, processor.pad_token_id).to(device)
        mask = attention_mask(self.family.allowed(pk), self.attn_implementation, dtype)
        inputs: dict[str, Any] = {
            "input_ids": pk.input_ids,
            "attention_mask": mask,
            "position_ids": pk.positions,
            **processor.extra_model_inputs(pk.input_ids),
        }
        images = dict(pk.images, pixel_values=pk.images["pixel_values"].to(dtype))
        if self.share_vision:  # a frozen, adapter-free vision path: the same for both models
            with torch.no_grad():
                inputs["mm_encoder_outputs"] = self.family.image_features(inner, images)
        else:
            inputs.update(images)
        return inputs, pk

    def describe(self) -> str:
        if not self.enabled:
            return "shared prefix off, plain path: " + "; ".join(self.notes)
        vision = "vision features shared by policy and reference" if self.share_vision else (
            "per-pass vision (" + "; ".join(self.notes) + ")"
        )  # fmt: skip
        return f"shared prefix on ({self.family.name}, {self.attn_implementation}): {vision}"


def _plain(*why: str) -> PrefixPlan:
    return PrefixPlan(None, False, None, tuple(why))


def _vision_differs(inner: nn.Module, lm: nn.Module) -> str | None:
    """Why the vision features of the policy pass could differ from the reference pass's (None:
    they cannot, so computing them once serves both)."""
    in_lm = {id(p) for p in lm.parameters()}
    for name, p in inner.named_parameters():
        if id(p) not in in_lm and (p.requires_grad or "lora_" in name):
            what = "trainable" if p.requires_grad else "carries a LoRA adapter"
            return f"the vision path {what} ({name})"
    # Dropout draws a new mask per pass; one shared draw would not be the plain step's math.
    in_lm = {id(m) for m in lm.modules()}
    cfg = getattr(inner.config, "vision_config", None)
    rates = {k: v for k, v in vars(cfg).items() if "dropout" in k} if cfg is not None else {}
    rates.update(
        {
            n: m.p
            for n, m in inner.named_modules()
            if isinstance(m, nn.Dropout) and id(m) not in in_lm
        }
    )
    active = sorted(k for k, v in rates.items() if isinstance(v, float) and v > 0)
    if active and inner.training:
        return f"the vision path has dropout ({', '.join(active)})"
    return None


def plan_shared_prefix(
    inner: nn.Module, lm: nn.Module, *, requested: bool, reference: str
) -> PrefixPlan:
    """Decide the forward of a preference run.

    ``inner`` is the backbone, ``lm`` its language model; ``reference`` is ``"adapters"`` (LoRA:
    the same model with adapters off) or ``"copy"`` (a separate frozen model), or ``"none"``
    (no pairs: supervised fine-tuning)."""
    if not requested:
        return _plain("shared_prefix: false in the config")
    if reference == "none":
        return _plain("preset sft trains one sequence per example, nothing to share")
    kind = getattr(inner.config, "model_type", type(inner).__name__)
    if kind not in FAMILIES:
        return _plain(f"model type {kind!r} has no packing adapter (supported: {sorted(FAMILIES)})")
    impl = getattr(lm.config, "_attn_implementation", None)
    if impl not in MASKED_ATTENTION:
        return _plain(
            f"attention implementation {impl!r} takes no custom mask (needs one of "
            f"{MASKED_ATTENTION}; flash-attn varlen cannot express a shared prefix)"
        )
    kinds, window = layer_types(lm.config)
    other = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if other or ("sliding_attention" in kinds and not window):
        return _plain(f"{kind}: layers of type {other or kinds} have no packed mask")
    family = FAMILIES[kind](inner.config, lm.config)
    notes = []
    if reference == "copy":
        notes.append("full fine-tuning: the reference is its own model with its own vision tower")
    elif (why := _vision_differs(inner, lm)) is not None:
        notes.append(why)
    if not family.shares_vision:
        notes.append(f"{family.name} takes no precomputed vision features")
    elif not takes_vision_features(inner):
        notes.append(f"this transformers' {type(inner).__name__} takes no mm_encoder_outputs")
    return PrefixPlan(family, not notes, impl, tuple(notes))


def takes_vision_features(inner: nn.Module | type) -> bool:
    """Whether this transformers' backbone takes precomputed vision output back
    (``mm_encoder_outputs``; releases before it, e.g. 5.17, run the tower in every pass)."""
    return "mm_encoder_outputs" in inspect.signature(inner.forward).parameters
