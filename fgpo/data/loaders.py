"""Loaders for medical VQA / report datasets from local folders in their official layouts.

Every loader returns ``(examples, report)``: a list of :class:`VQAExample` and a
:class:`LoadReport` that counts what was skipped and why. Nothing is downloaded. A missing
annotation file (or an unreadable one) is an error naming the path; a missing or corrupt image
is a *counted* skip (``strict=True`` turns it into an error), never a silent drop.

Layouts (relative to ``root``):

- SLAKE (``Slake1.0``): ``train.json`` / ``validate.json`` / ``test.json`` (records with
  ``img_id``, ``img_name`` = ``xmlab<N>/source.jpg``, ``question``, ``answer``, ``answer_type``
  OPEN/CLOSED, ``q_lang``, ``qid``, ``modality``, ``location``, ``content_type``) and
  ``imgs/xmlab<N>/{source.jpg, mask.png, detection.json}``; ``detection.json`` is a list of
  ``{label: [x, y, w, h]}``. Lesion region: the boxes whose label the question or answer
  names, else boxes of abnormal findings, else ``mask.png``.
- VQA-RAD: ``VQA_RAD Dataset Public.json`` (``qid``, ``image_name``, ``question``, ``answer``,
  ``answer_type``, ``phrase_type``, ``image_organ``) and ``VQA_RAD Image Folder/``. The test
  split is the records whose ``phrase_type`` starts with ``test``.
- PathVQA (``pvqa``): ``qas/<split>/<split>_qa.pkl`` (a list of ``{image, question, answer}``;
  ``<split>_qa.json`` with the same content is accepted too) and ``images/<split>/<image>.jpg``.
- IU-Xray: the common ``annotation.json`` (``{"train": [{id, report, image_path: [...]}], ...}``)
  with ``images/``; or the original OpenI layout: ``ecgen-radiology/*.xml`` reports and the PNGs
  (``NLMCXR_png/`` or ``images/``), every report split deterministically by id.

Images may be DICOM files (read with windowing by :mod:`fgpo.data.dicom`).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

from .errors import DatasetError
from .examples import LoadReport, VQAExample
from .iu_xray import REPORT_QUESTION, load_iu_xray
from .loader_common import (
    ImageChecker,
    accept,
    closed_or_open,
    finish,
    options_from_question,
    read_json,
)

__all__ = ["LOADERS", "REPORT_QUESTION", "examples_from_json", "load_dataset"]

# Labels of SLAKE detection boxes that are findings rather than normal anatomy.
_ABNORMAL_WORDS = (
    "cancer",
    "tumor",
    "tumour",
    "nodule",
    "mass",
    "lesion",
    "effusion",
    "pneumonia",
    "pneumothorax",
    "cardiomegaly",
    "edema",
    "atelectasis",
    "infiltration",
    "consolidation",
    "fibrosis",
    "emphysema",
    "enlarged",
    "abnormal",
)


# ----------------------------------------------------------------------------- SLAKE

_SLAKE_SPLITS = {"train": "train.json", "validate": "validate.json", "val": "validate.json"}


def _slake_boxes(
    det_path: Path, report: LoadReport, strict: bool, box_format: str = "xywh"
) -> list[tuple[str, tuple]]:
    if not det_path.is_file():
        return []
    try:
        with open(det_path, encoding="utf-8") as f:
            raw = json.load(f)
        out = []
        for entry in raw if isinstance(raw, list) else [raw]:
            for label, b in entry.items():
                x, y, c, d = (float(v) for v in b)
                out.append(
                    (str(label), (x, y, x + c, y + d) if box_format == "xywh" else (x, y, c, d))
                )
        return out
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
        if strict:
            raise DatasetError(f"corrupt detection file {det_path}: {e}") from e
        report.skip("corrupt_detection_file(boxes_ignored)", str(det_path))
        return []


def _select_slake_regions(boxes: list[tuple[str, tuple]], question: str, answer: str) -> list:
    text = f" {question} {answer} ".lower()
    named = [b for label, b in boxes if re.search(rf"\b{re.escape(label.lower())}\b", text)]
    if named:
        return named
    return [b for label, b in boxes if any(w in label.lower() for w in _ABNORMAL_WORDS)]


def load_slake(
    root: str | Path,
    split: str = "train",
    *,
    lang: str | None = "en",
    strict: bool = False,
    verify_images: bool = True,
    box_format: str = "xywh",
) -> tuple[list[VQAExample], LoadReport]:
    """SLAKE 1.0 from its official folder (``train.json``, ``imgs/xmlab*/...``).

    ``lang`` keeps only questions in that language (``q_lang``; None keeps all).
    ``box_format``: how ``detection.json`` stores boxes, ``"xywh"`` (the release) or ``"xyxy"``.
    """
    if box_format not in ("xywh", "xyxy"):
        raise ValueError(f"box_format must be 'xywh' or 'xyxy', got {box_format!r}")
    root = Path(root)
    name = _SLAKE_SPLITS.get(split, f"{split}.json")
    rows = read_json(root / name)
    if not isinstance(rows, list):
        raise DatasetError(f"{root / name}: expected a JSON list of questions")
    report = LoadReport("slake", split)
    checker = ImageChecker(verify_images)
    box_cache: dict[Path, list] = {}
    examples = []
    for i, r in enumerate(rows):
        try:
            if lang is not None and r.get("q_lang", "en") != lang:
                continue
            img = root / "imgs" / r["img_name"]
            q, a = str(r["question"]), str(r["answer"])
        except (KeyError, AttributeError, TypeError) as e:
            if strict:
                raise DatasetError(f"{root / name} record {i}: missing field {e}") from e
            report.skip("malformed_record", f"{root / name} record {i}: missing field {e}")
            continue
        if not accept(report, checker, img, f"qid {r.get('qid', i)}", strict):
            continue
        folder = img.parent
        if folder not in box_cache:
            box_cache[folder] = _slake_boxes(folder / "detection.json", report, strict, box_format)
        boxes = _select_slake_regions(box_cache[folder], q, a)
        mask = folder / "mask.png"
        mask_path = str(mask) if not boxes and mask.is_file() else None
        atype = closed_or_open(r.get("answer_type"), a)
        examples.append(
            VQAExample(
                id=str(r.get("img_id", folder.name)),
                qid=str(r.get("qid", i)),
                image_path=str(img),
                question=q,
                answer=a,
                answer_type=atype,
                modality=r.get("modality"),
                dataset="slake",
                lesion_mask_path=mask_path,
                lesion_boxes=list(boxes),
                options=options_from_question(q) if atype == "closed" else [],
                meta={
                    k: r[k] for k in ("location", "content_type", "base_type", "q_lang") if k in r
                },
            )
        )
    return finish(examples, report)


# ----------------------------------------------------------------------------- VQA-RAD

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"


def load_vqa_rad(
    root: str | Path,
    split: str | None = None,
    *,
    strict: bool = False,
    verify_images: bool = True,
) -> tuple[list[VQAExample], LoadReport]:
    """VQA-RAD (OSF release). ``split``: ``"train"``, ``"test"`` (``phrase_type`` test_*) or
    None for all records."""
    if split not in (None, "train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    root = Path(root)
    rows = read_json(root / VQA_RAD_JSON)
    if not isinstance(rows, list):
        raise DatasetError(f"{root / VQA_RAD_JSON}: expected a JSON list of questions")
    img_dir = root / VQA_RAD_IMAGES
    if not img_dir.is_dir():
        img_dir = root / "images" if (root / "images").is_dir() else img_dir
    report = LoadReport("vqa_rad", split or "all")
    checker = ImageChecker(verify_images)
    examples = []
    for i, r in enumerate(rows):
        try:
            is_test = str(r.get("phrase_type", "")).lower().startswith("test")
            if (split == "train" and is_test) or (split == "test" and not is_test):
                continue
            img = img_dir / r["image_name"]
            q, a = str(r["question"]).strip(), str(r["answer"]).strip()
        except (KeyError, AttributeError, TypeError) as e:
            if strict:
                raise DatasetError(f"{root / VQA_RAD_JSON} record {i}: missing field {e}") from e
            report.skip("malformed_record", f"record {i}: missing field {e}")
            continue
        if not accept(report, checker, img, f"qid {r.get('qid', i)}", strict):
            continue
        atype = closed_or_open(r.get("answer_type"), a)
        organ = r.get("image_organ")
        examples.append(
            VQAExample(
                id=Path(r["image_name"]).stem,
                qid=str(r.get("qid", i)),
                image_path=str(img),
                question=q,
                answer=a,
                answer_type=atype,
                modality=_rad_modality(organ),
                dataset="vqa_rad",
                options=options_from_question(q) if atype == "closed" else [],
                meta={k: r[k] for k in ("image_organ", "question_type", "phrase_type") if k in r},
            )
        )
    return finish(examples, report)


def _rad_modality(organ: Any) -> str | None:
    o = str(organ or "").upper()
    return {"CHEST": "X-Ray", "HEAD": "MRI/CT", "ABD": "CT"}.get(o.strip()) if o else None


# ----------------------------------------------------------------------------- PathVQA


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers only: the official QA pickles are lists of dicts of str."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only plain lists/dicts/strings are accepted "
            "(convert the file to <split>_qa.json instead)"
        )


def _from_lxmert(r: Any) -> Any:
    """``{img_id, sent, label: {answer: score}}`` -> ``{image, question, answer}``."""
    if isinstance(r, dict) and "sent" in r and "image" not in r:
        label = r.get("label") or {}
        if isinstance(label, dict):
            best = max(label.items(), key=lambda kv: kv[1])[0] if label else None
        else:
            best = label
        out = {"image": r.get("img_id"), "question": r["sent"]}
        if best not in (None, {}, ""):
            out["answer"] = best
        if "question_id" in r:
            out["qid"] = r["question_id"]
        return out
    return r


def load_pathvqa(
    root: str | Path,
    split: str = "train",
    *,
    strict: bool = False,
    verify_images: bool = True,
) -> tuple[list[VQAExample], LoadReport]:
    """PathVQA (``pvqa``): ``qas/<split>/<split>_qa.pkl`` (or ``.json``; or the LXMERT-style
    ``<split>_vqa.pkl`` with ``img_id``/``sent``/``label``) + ``images/<split>/``."""
    root = Path(root)
    split = {"validation": "val", "valid": "val"}.get(split, split)
    qa_dir = root / "qas" / split
    candidates = [qa_dir / f"{split}_qa.json", qa_dir / f"{split}_qa.pkl"]
    candidates.append(qa_dir / f"{split}_vqa.pkl")
    src = next((c for c in candidates if c.is_file()), None)
    if src is None:
        names = ", ".join(c.name for c in candidates[1:])
        raise FileNotFoundError(f"annotation file not found: {candidates[0]} (nor {names})")
    if src.suffix == ".json":
        rows = read_json(src)
    else:
        try:
            with open(src, "rb") as f:
                rows = _PlainUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise DatasetError(f"cannot read {src}: {e}") from e
    if isinstance(rows, list):
        rows = [_from_lxmert(r) for r in rows]
    if not isinstance(rows, list):
        raise DatasetError(f"{src}: expected a list of {{image, question, answer}} records")
    report = LoadReport("pathvqa", split)
    checker = ImageChecker(verify_images)
    img_dir = root / "images" / split
    examples = []
    for i, r in enumerate(rows):
        try:
            name = str(r["image"])
            q, a = str(r["question"]).strip(), str(r["answer"]).strip()
        except (KeyError, TypeError) as e:
            if strict:
                raise DatasetError(f"{src} record {i}: missing field {e}") from e
            report.skip("malformed_record", f"{src} record {i}: missing field {e}")
            continue
        img = img_dir / name
        if not img.suffix:
            for ext in (".jpg", ".png", ".jpeg"):
                if (img_dir / (name + ext)).is_file():
                    img = img_dir / (name + ext)
                    break
            else:
                img = img_dir / (name + ".jpg")
        if not accept(report, checker, img, f"record {i}", strict):
            continue
        atype = "closed" if a.lower() in ("yes", "no") else "open"
        examples.append(
            VQAExample(
                id=Path(name).stem,
                qid=str(r.get("qid", i)),
                image_path=str(img),
                question=q,
                answer=a,
                answer_type=atype,
                modality="pathology",
                dataset="pathvqa",
            )
        )
    return finish(examples, report)


LOADERS = {
    "slake": load_slake,
    "vqa_rad": load_vqa_rad,
    "pathvqa": load_pathvqa,
    "iu_xray": load_iu_xray,
}


def load_dataset(name: str, root: str | Path, split: str | None = None, **kw):
    """Dispatch by name: ``slake``, ``vqa_rad``, ``pathvqa``, ``iu_xray``."""
    if name not in LOADERS:
        raise ValueError(f"dataset must be one of {sorted(LOADERS)}, got {name!r}")
    if split is None and name in ("slake", "pathvqa"):
        split = "train"
    return LOADERS[name](root, split, **kw)


def examples_from_json(path: str | Path) -> list[VQAExample]:
    """Examples saved with :meth:`VQAExample.to_dict` (a JSON list)."""
    rows = read_json(Path(path))
    out = []
    for r in rows:
        r = dict(r)
        r["lesion_boxes"] = [tuple(b) for b in r.get("lesion_boxes", [])]
        r["lesion_polygons"] = [[tuple(p) for p in poly] for poly in r.get("lesion_polygons", [])]
        out.append(VQAExample(**r))
    return out
