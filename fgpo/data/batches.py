"""Preference records → token ids, shifted targets, span/response masks, padded batches.

Alignment is done once, here: for a sequence of ids ``x`` (prompt then response),
``targets[t] = x[t+1]`` where ``x[t+1]`` is a response token (else -100), and the masks are
shifted the same way, so the hidden state at row ``t`` predicts ``targets[t]`` — the layout the
loss takes. Two masks per sequence: ``span_mask`` (the tagged tokens) and ``response_mask``
(every response token, eos included) so that the loss preset chooses (DPO uses the latter).

Bad data never crashes a run mid-way: a record that is not in the format (a missing field, a
field of the wrong type) is a ``DatasetError`` naming the file, record and field before
training; malformed tags and image tokens inside the text raise naming the record (or are
skipped and counted, by policy); and examples that cannot be encoded (missing, unreadable or
oversized image, empty masks, over-long) are skipped and counted by reason
(``PreferenceDataset.skipped``).
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from fgpo_kernels import IGNORE_INDEX

from .errors import DatasetError, MaskTagError, SkipExample
from .images import open_image
from .records import check_records, load_records, parse_mask_tags


def _image_markers(processor: Any) -> tuple[str, ...]:
    """The strings the processor turns into image tokens (or around them): text that holds one
    would get image positions that no image fills."""
    names = ("image_token", "vision_start", "vision_end")
    found = (getattr(processor, n, None) for n in names)
    return tuple(m for m in found if isinstance(m, str) and m)


def _tokenize_response(tokenizer: Any, text: str, spans: list[tuple[int, int]]):
    """Token ids of the response and a 0/1 flag per token: 1 when it overlaps a span."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        flags = [
            float(any(s < e_tok and s_tok < e for s, e in spans if e > s))
            for s_tok, e_tok in offsets
        ]
        return ids, flags
    except (NotImplementedError, KeyError, TypeError):
        # Slow tokenizers: tokenize the pieces between span boundaries separately.
        cuts = sorted({0, len(text), *[c for s in spans for c in s]})
        ids, flags = [], []
        for a, b in itertools.pairwise(cuts):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            inside = any(s <= a and b <= e for s, e in spans)
            ids += piece
            flags += [float(inside)] * len(piece)
        return ids, flags


def encode_response(
    processor: Any, prompt_ids: list[int], response: str, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Append a tagged response (+ eos) to prompt ids; return ids and the shifted targets/masks.

    Keys: ``input_ids``, ``attention_mask`` (L,), ``targets`` (L,) with -100 outside the
    response, ``span_mask`` and ``response_mask`` (L,) float, aligned to ``targets``.
    """
    tok = getattr(processor, "tokenizer", processor)
    clean, spans = parse_mask_tags(response)
    r_ids, r_flags = _tokenize_response(tok, clean, spans)
    if tok.eos_token_id is not None:
        r_ids.append(int(tok.eos_token_id))
        r_flags.append(0.0)
    ids = list(prompt_ids) + r_ids
    if max_length is not None and len(ids) > max_length:
        raise SkipExample("too_long", f"{len(ids)} tokens > max_length {max_length}")
    n, p = len(ids), len(prompt_ids)
    targets = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
    span = torch.zeros(n)
    resp = torch.zeros(n)
    # Row t predicts token t+1: response tokens p..n-1 are predicted by rows p-1..n-2.
    targets[p - 1 : n - 1] = torch.tensor(r_ids, dtype=torch.long)
    span[p - 1 : n - 1] = torch.tensor(r_flags)
    resp[p - 1 : n - 1] = 1.0
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.ones(n, dtype=torch.long),
        "targets": targets,
        "span_mask": span,
        "response_mask": resp,
    }


def encode_example(
    processor: Any, image: Any, prompt: str, response: str, max_length: int | None = None
) -> dict[str, Any]:
    """Encode one (image, prompt, tagged response) sequence.

    ``processor`` is a ``fgpo.models.VLProcessor``; ``image`` a PIL image or a path. Returns the
    keys of ``encode_response`` plus the image tensors (``pixel_values``, and
    ``image_grid_thw`` for Qwen-VL models).
    """
    if isinstance(image, (str, os.PathLike)):
        image = open_image(os.fspath(image))
    prompt_ids, img = processor.encode_prompt(image, prompt)
    out = encode_response(processor, prompt_ids, response, max_length)
    out["image"] = img
    return out


# ----------------------------------------------------------------------------------------------
# Dataset and collator
# ----------------------------------------------------------------------------------------------


@dataclass
class EncodedPair:
    """One preference example: up to four sequences and their images."""

    index: int
    id: str
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    chosen_corrupt: dict[str, Any] | None
    rejected_corrupt: dict[str, Any] | None
    image: dict[str, torch.Tensor]
    corrupt_image: dict[str, torch.Tensor] | None


class PreferenceDataset:
    """Preference records → ``EncodedPair`` (or ``None`` for a skipped example).

    Args:
        records: a path to the JSON file or the list of records.
        processor: the ``VLProcessor``.
        image_root: directory that relative image paths are resolved against (default: the
            JSON file's directory, else the working directory).
        max_length: sequences longer than this (prompt + image tokens + response) are skipped.
        with_corrupt: encode (v', y+) and (v', y-) when ``rejected_image_path`` exists.
        on_bad_tags: what to do with malformed ``<mask>`` tags in ``chosen``/``rejected`` and
            with the processor's image token inside ``prompt``/``chosen``/``rejected``:
            ``"error"`` (default: an error naming the record and field, raised when the
            dataset is built, before any training) or ``"skip"`` (counted). Records of the
            wrong shape are an error under both (:func:`~fgpo.data.records.check_records`).
        cache: keep encoded examples in memory (fast repeated epochs on small sets).

    ``skipped`` counts skipped examples by reason (``bad_tags``, ``image_token_in_text``,
    ``missing_image``, ``unreadable_image``, ``image_too_large``, ``empty_mask``,
    ``too_long``); ``checked_skips`` holds the part found when the dataset was built.
    """

    def __init__(
        self,
        records: str | list[dict[str, Any]],
        processor: Any,
        *,
        image_root: str | None = None,
        max_length: int | None = None,
        with_corrupt: bool = True,
        mask: str = "span",
        on_bad_tags: str = "error",
        cache: bool = False,
    ) -> None:
        if on_bad_tags not in ("error", "skip"):
            raise ValueError(f"on_bad_tags must be 'error' or 'skip', got {on_bad_tags!r}")
        if mask not in ("span", "response"):
            raise ValueError(f"mask must be 'span' or 'response', got {mask!r}")
        source = "records"
        if isinstance(records, (str, os.PathLike)):
            path = source = os.fspath(records)
            image_root = image_root or os.path.dirname(os.path.abspath(path))
            records = load_records(path)
        self.records = check_records(list(records), source)
        self.processor = processor
        self.image_root = image_root or os.getcwd()
        self.max_length = max_length
        self.with_corrupt = with_corrupt
        self.mask = mask
        self._cache: dict[int, EncodedPair | None] | None = {} if cache else None
        # Validate the text up front: malformed data fails before training, not mid-run.
        self._bad: dict[int, str] = {}  # record -> skip reason
        markers = _image_markers(processor)
        for k, r in enumerate(self.records):
            where = f"{source}: record {k} (id={r.get('id')!r})"
            for key in ("prompt", "chosen", "rejected"):
                found = [m for m in markers if m in r[key]]
                if found:  # the processor would expand it into image tokens no image fills
                    if on_bad_tags == "error":
                        raise DatasetError(
                            f"{where} field {key!r} contains the image token {found[0]!r}; the "
                            "image is added by the processor (on_bad_tags: skip counts these)"
                        )
                    self._bad.setdefault(k, "image_token_in_text")
            for key in ("chosen", "rejected"):
                try:
                    parse_mask_tags(r[key])
                except MaskTagError as e:
                    if on_bad_tags == "error":
                        raise MaskTagError(f"{where} field {key!r}: {e}") from None
                    self._bad.setdefault(k, "bad_tags")
        # Found when the dataset is built (by every process under torchrun), unlike the skips
        # found while encoding; the trainer counts these once.
        self.checked_skips: Counter[str] = Counter(self._bad.values())
        self.skipped: Counter[str] = Counter(self.checked_skips)

    def __len__(self) -> int:
        return len(self.records)

    def _path(self, p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(self.image_root, p)

    def __getitem__(self, k: int) -> EncodedPair | None:
        if self._cache is not None and k in self._cache:
            return self._cache[k]
        item: EncodedPair | None = None
        if k not in self._bad:
            try:
                item = self._encode(k)
            except SkipExample as e:
                self.skipped[e.reason] += 1
        if self._cache is not None:
            self._cache[k] = item
        return item

    def _encode(self, k: int) -> EncodedPair:
        r = self.records[k]
        proc, ml = self.processor, self.max_length
        image = open_image(self._path(r["image_path"]))
        prompt_ids, img = proc.encode_prompt(image, r["prompt"])
        chosen = encode_response(proc, prompt_ids, r["chosen"], ml)
        rejected = encode_response(proc, prompt_ids, r["rejected"], ml)
        key = "span_mask" if self.mask == "span" else "response_mask"
        if chosen[key].sum() == 0 and rejected[key].sum() == 0:
            raise SkipExample("empty_mask", f"record {k} (id={r.get('id')!r})")
        cc = rc = cimg = None
        if self.with_corrupt and r.get("rejected_image_path"):
            cimage = open_image(self._path(r["rejected_image_path"]))
            c_prompt_ids, cimg = proc.encode_prompt(cimage, r["prompt"])
            cc = encode_response(proc, c_prompt_ids, r["chosen"], ml)
            rc = encode_response(proc, c_prompt_ids, r["rejected"], ml)
        return EncodedPair(k, str(r.get("id", k)), chosen, rejected, cc, rc, img, cimg)


_SEQ_KEYS = ("input_ids", "attention_mask", "targets", "span_mask", "response_mask")


def pad_sequences(seqs: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded sequences (:func:`encode_response` outputs) into ``(S, L)`` tensors:
    the pad id, attention 0, targets -100 and masks 0 after each sequence's end."""
    width = max(s["input_ids"].numel() for s in seqs)
    n = len(seqs)
    out = {
        "input_ids": torch.full((n, width), int(pad_token_id), dtype=torch.long),
        "attention_mask": torch.zeros((n, width), dtype=torch.long),
        "targets": torch.full((n, width), IGNORE_INDEX, dtype=torch.long),
        "span_mask": torch.zeros((n, width)),
        "response_mask": torch.zeros((n, width)),
    }
    for i, s in enumerate(seqs):
        m = s["input_ids"].numel()
        for key in _SEQ_KEYS:
            out[key][i, :m] = s[key]
    return out


def _cat_images(images: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # LLaVA: (1, C, H, W) per image; Qwen-VL: (patches, dim) + (1, 3) grid; both concat on dim 0.
    return {k: torch.cat([im[k] for im in images], 0) for k in images[0]}


class PreferenceCollator:
    """Pads a list of ``EncodedPair`` into one batch of ``n_seq * B`` sequences.

    Sequence order is ``[chosen (B), rejected (B), chosen_corrupt (B), rejected_corrupt (B)]``;
    the corrupt groups are present when ``with_corrupt`` and at least one example has v'
    (examples without it reuse v and get ``has_corrupt = 0``, so their visual terms vanish).
    Right padding with the pad id, targets -100 and masks 0. ``None`` items (skipped) are
    dropped. Output keys: ``input_ids``, ``attention_mask`` (S, L), image tensors in sequence
    order, ``targets``, ``span_mask``, ``response_mask`` (S, L), ``has_corrupt`` (B,),
    ``n_seq``, ``batch_size``, ``ids``, ``indices``. ``with_rejected=False`` (supervised
    fine-tuning) keeps only the chosen sequences (``n_seq = 1``, no corrupt groups).
    """

    def __init__(
        self, pad_token_id: int, with_corrupt: bool = True, *, with_rejected: bool = True
    ) -> None:
        self.pad_token_id = int(pad_token_id)
        self.with_corrupt = with_corrupt and with_rejected
        self.with_rejected = with_rejected

    def __call__(self, items: list[EncodedPair | None]) -> dict[str, Any] | None:
        items = [it for it in items if it is not None]
        if not items:
            return None
        has = torch.tensor([float(it.chosen_corrupt is not None) for it in items])
        four = self.with_corrupt and bool(has.any())
        seqs = [it.chosen for it in items]
        images = [it.image for it in items]
        if self.with_rejected:
            seqs += [it.rejected for it in items]
            images += [it.image for it in items]
        if four:
            for key in ("chosen", "rejected"):
                for it in items:
                    c = getattr(it, f"{key}_corrupt")
                    seqs.append(c if c is not None else getattr(it, key))
                    images.append(it.corrupt_image if c is not None else it.image)
        out: dict[str, Any] = pad_sequences(seqs, self.pad_token_id)
        out.update(_cat_images(images))
        out["has_corrupt"] = has if four else torch.zeros(len(items))
        out["n_seq"] = 4 if four else (2 if self.with_rejected else 1)
        out["batch_size"] = len(items)
        out["ids"] = [it.id for it in items]
        out["indices"] = [it.index for it in items]
        return out
