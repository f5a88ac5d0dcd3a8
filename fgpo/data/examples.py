"""What a dataset loader returns: :class:`VQAExample` records and a :class:`LoadReport`.

A ``VQAExample`` is one question (or report) about one image with its ground truth and, where
the dataset has it, the lesion geometry (mask image, boxes, polygons) that the corruption
(``fgpo.pairs.corrupt``) and the grounding score (``fgpo.eval``) use.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

ANSWER_TYPES = ("closed", "open", "report")


@dataclass
class VQAExample:
    """One question (or report) about one image; lesion geometry is in image pixels.

    ``lesion_boxes`` are ``(x0, y0, x1, y1)``; ``lesion_polygons`` lists of ``(x, y)``;
    ``lesion_mask_path`` an image whose nonzero pixels are the lesion. Any combination may be
    given; their union is the region the corruption uses.
    """

    id: str
    qid: str
    image_path: str
    question: str
    answer: str
    answer_type: str = "open"
    modality: str | None = None
    dataset: str = ""
    lesion_mask_path: str | None = None
    lesion_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    lesion_polygons: list[list[tuple[float, float]]] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {self.answer_type!r}")
        self.id, self.qid = str(self.id), str(self.qid)

    @property
    def has_lesion(self) -> bool:
        return bool(self.lesion_mask_path or self.lesion_boxes or self.lesion_polygons)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadReport:
    """What a loader read and what it skipped (counts per reason plus the first few details)."""

    dataset: str
    split: str
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    max_details: int = 20

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.details) < self.max_details:
            self.details.append(f"{reason}: {detail}")

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        s = f"{self.dataset}/{self.split}: loaded {self.loaded}"
        if self.skipped:
            s += ", skipped " + ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        return s

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "loaded": self.loaded,
            "skipped": dict(self.skipped),
            "details": list(self.details),
        }
