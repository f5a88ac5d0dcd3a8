"""A generated medical-style lesion VQA set for the embedded demo (no files, no network).

Each example is a small grayscale "scan": a dark field holding an elliptical organ with a
smooth, low-frequency tissue texture and pixel noise, and zero or one round lesion (slightly
brighter than the tissue around it) in the left or the right half of the image. The lesion's
pixel mask is known, so the lesion can be removed from the image (``fgpo.pairs.corrupt``) and the
model's grounding measured. Questions are closed:

    presence  "is there a lesion in the image ?"  ->  "lesion present ."  (label yes)
                                                      "lesion absent ."   (label no)
    side      "which side is the lesion on ?"     ->  "lesion on the left ."
                                                      "lesion on the right ."

``left``/``right`` are image sides. In every answer the one word that decides it comes after a
context shared by the right and the wrong answer, so a minimal edit changes exactly one token
(``fgpo.pairs.ReferenceEditor`` flips present/absent and swaps left/right). Everything is
deterministic given ``seed``; ``contrast`` (lesion brightness above the tissue, 0-255 scale)
sets how hard the task is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .examples import VQAExample

QUESTIONS = {
    "presence": "is there a lesion in the image ?",
    "side": "which side is the lesion on ?",
}
ANSWERS = {
    ("presence", "yes"): "lesion present .",
    ("presence", "no"): "lesion absent .",
    ("side", "left"): "lesion on the left .",
    ("side", "right"): "lesion on the right .",
}
# the label set of each question type, and the answer word that states each label
CLOSED_LABELS = {"presence": ("yes", "no"), "side": ("left", "right")}
_LABEL_WORDS = {"yes": "present", "no": "absent", "left": "left", "right": "right"}


@dataclass
class LesionExample:
    """One generated VQA example; ``image`` is uint8 (H, W), ``mask`` bool (H, W)."""

    id: str
    image: np.ndarray
    mask: np.ndarray
    has_lesion: bool
    side: str | None
    qtype: str
    question: str
    answer: str
    label: str


def closed_label(qtype: str, text: str) -> str | None:
    """The closed label an answer text states (``None`` when it states none or both)."""
    words = set(text.split())
    found = [lab for lab in CLOSED_LABELS[qtype] if _LABEL_WORDS[lab] in words]
    return found[0] if len(found) == 1 else None


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency texture in [-1, 1]: a random coarse grid, bilinearly upsampled."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    x = np.linspace(0, cells, size)
    i0 = np.minimum(x.astype(int), cells - 1)
    f = x - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def make_scan(
    rng: np.random.Generator,
    size: int = 32,
    has_lesion: bool = True,
    contrast: float | tuple[float, float] = 40.0,
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """One scan: (image uint8 (size, size), lesion mask bool, side or None).

    ``contrast`` is the lesion's peak brightness above the tissue, or a (low, high) range to
    draw it from uniformly (a mix of faint and clear lesions)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2
    cy, cx = c + rng.uniform(-1.5, 1.5, 2)
    ry, rx = size * rng.uniform(0.36, 0.44), size * rng.uniform(0.38, 0.46)
    organ = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    tissue = 95 + rng.uniform(-10, 10) + 18 * _smooth_field(rng, size, 4)
    img = np.where(organ, tissue, 18.0) + rng.normal(0.0, 6.0, (size, size))
    mask = np.zeros((size, size), dtype=bool)
    side = None
    if has_lesion:
        side = "left" if rng.random() < 0.5 else "right"
        r = rng.uniform(0.07, 0.11) * size
        for _ in range(100):  # a centre inside the organ, clearly on one side of the midline
            ly = rng.uniform(cy - 0.6 * ry, cy + 0.6 * ry)
            off = rng.uniform(r + 1.0, 0.75 * rx)
            lx = cx - off if side == "left" else cx + off
            if ((ly - cy) / ry) ** 2 + ((lx - cx) / rx) ** 2 <= 0.55:
                break
        d2 = (yy - ly) ** 2 + (xx - lx) ** 2
        if isinstance(contrast, tuple):
            contrast = rng.uniform(*contrast)
        img = img + contrast * np.exp(-d2 / (2 * (0.6 * r) ** 2)) * (d2 <= (1.5 * r) ** 2)
        mask = d2 <= (1.5 * r) ** 2  # the mask covers the whole visible blob
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask, side


def make_dataset(
    n: int,
    seed: int,
    *,
    size: int = 32,
    contrast: float | tuple[float, float] = 40.0,
    p_lesion: float = 0.6,
    prefix: str = "ex",
) -> list[LesionExample]:
    """``n`` examples, one question per image; deterministic in ``seed``.

    Images with a lesion get a presence or a side question (half each); images without one
    get a presence question, so "yes"/"no" and "left"/"right" are both roughly balanced.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lesion = bool(rng.random() < p_lesion)
        img, mask, side = make_scan(rng, size, lesion, contrast)
        qtype = "side" if lesion and rng.random() < 0.5 else "presence"
        label = side if qtype == "side" else ("yes" if lesion else "no")
        out.append(
            LesionExample(
                id=f"{prefix}{seed}-{i}",
                image=img,
                mask=mask,
                has_lesion=lesion,
                side=side,
                qtype=qtype,
                question=QUESTIONS[qtype],
                answer=ANSWERS[(qtype, label)],
                label=label,
            )
        )
    return out


def vocabulary() -> list[str]:
    """Every word the questions and answers use (the tokenizer adds its special tokens)."""
    words: list[str] = []
    for text in (*QUESTIONS.values(), *ANSWERS.values()):
        for w in text.split():
            if w not in words:
                words.append(w)
    return words


def wrong_label(qtype: str, label: str) -> str:
    """The other closed label of a question type (``yes`` <-> ``no``, ``left`` <-> ``right``)."""
    a, b = CLOSED_LABELS[qtype]
    return b if label == a else a


def write_examples(examples: list[LesionExample], root: str | Path) -> list[VQAExample]:
    """Write each scan (and its lesion mask) as PNG under ``root``; return the matching
    :class:`VQAExample` records (closed questions; the label as the answer, the answer sentence
    in ``meta["template"]``; side questions list their options)."""
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for e in examples:
        img_path = root / f"{e.id}.png"
        Image.fromarray(e.image).save(img_path)
        mask_path = None
        if e.has_lesion:
            mask_path = root / f"{e.id}_mask.png"
            Image.fromarray(e.mask.astype(np.uint8) * 255).save(mask_path)
        out.append(
            VQAExample(
                id=e.id,
                qid=e.qtype,
                image_path=str(img_path),
                question=e.question,
                answer=e.label,
                answer_type="closed",
                dataset="synthetic-lesion",
                lesion_mask_path=str(mask_path) if mask_path else None,
                options=list(CLOSED_LABELS["side"]) if e.qtype == "side" else [],
                meta={"template": e.answer},
            )
        )
    return out
