"""IU-Xray (Indiana University chest X-rays) reports as ``answer_type="report"`` examples.

``annotation.json`` (R2Gen layout: ``{"train": [{id, report, image_path: [...]}], ...}`` with
``images/``) wins when present; otherwise the original OpenI layout: ``ecgen-radiology/*.xml``
reports and the PNGs (``NLMCXR_png/`` or ``images/``), every report split deterministically by
a hash of its id.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .errors import DatasetError
from .examples import LoadReport, VQAExample
from .loader_common import ImageChecker, accept, finish, read_json

REPORT_QUESTION = "Describe the findings of this chest X-ray."


def _split_of(key: str, val_frac: float = 0.1, test_frac: float = 0.2) -> str:
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2**64
    return "test" if h < test_frac else ("val" if h < test_frac + val_frac else "train")


def load_iu_xray(
    root: str | Path,
    split: str | None = "train",
    *,
    strict: bool = False,
    verify_images: bool = True,
    question: str = REPORT_QUESTION,
) -> tuple[list[VQAExample], LoadReport]:
    """IU-Xray reports as ``answer_type="report"`` examples (the first listed view is the image).

    ``annotation.json`` (R2Gen layout) wins when present; otherwise the OpenI XML reports in
    ``ecgen-radiology/`` are read (FINDINGS, else IMPRESSION) and split 70/10/20 by a hash of the
    report id. ``split=None`` keeps every split.
    """
    root = Path(root)
    report = LoadReport("iu_xray", split or "all")
    checker = ImageChecker(verify_images)
    examples: list[VQAExample] = []
    ann = root / "annotation.json"
    if ann.is_file():
        data = read_json(ann)
        if not isinstance(data, dict):
            raise DatasetError(f"{ann}: expected {{split: [records]}}")
        keys = [split] if split is not None else list(data)
        if split is not None and split not in data:
            raise DatasetError(f"{ann}: no split {split!r} (has {sorted(data)})")
        img_root = root / "images"
        for sp in keys:
            for i, r in enumerate(data[sp]):
                try:
                    paths = r["image_path"]
                    paths = [paths] if isinstance(paths, str) else list(paths)
                    text, rid = str(r["report"]).strip(), str(r["id"])
                    img = img_root / paths[0]
                except (KeyError, IndexError, TypeError) as e:
                    if strict:
                        raise DatasetError(f"{ann} {sp} record {i}: bad field {e}") from e
                    report.skip("malformed_record", f"{ann} {sp} record {i}: bad field {e}")
                    continue
                if not text:
                    report.skip("empty_report", rid)
                    continue
                if not accept(report, checker, img, rid, strict):
                    continue
                examples.append(_iu_example(rid, img, text, question, paths, sp))
        return finish(examples, report)
    xml_dir = root / "ecgen-radiology"
    if not xml_dir.is_dir():
        raise FileNotFoundError(f"IU-Xray: neither {ann} nor {xml_dir}/ exists")
    img_dir = next(
        (root / d for d in ("NLMCXR_png", "images") if (root / d).is_dir()), root / "NLMCXR_png"
    )
    for xml_path in sorted(xml_dir.glob("*.xml")):
        try:
            tree = ET.parse(xml_path)
        except ET.ParseError as e:
            if strict:
                raise DatasetError(f"corrupt report XML {xml_path}: {e}") from e
            report.skip("corrupt_report", f"{xml_path}: {e}")
            continue
        sections = {
            (el.get("Label") or "").upper(): (el.text or "").strip()
            for el in tree.iter("AbstractText")
        }
        text = sections.get("FINDINGS") or sections.get("IMPRESSION") or ""
        images = [el.get("id") for el in tree.iter("parentImage") if el.get("id")]
        rid = xml_path.stem
        if split is not None and _split_of(rid) != split:
            continue
        if not text:
            report.skip("empty_report", str(xml_path))
            continue
        if not images:
            report.skip("no_image_in_report", str(xml_path))
            continue
        img = img_dir / f"{images[0]}.png"
        if not accept(report, checker, img, rid, strict):
            continue
        examples.append(_iu_example(rid, img, text, question, images, split or _split_of(rid)))
    return finish(examples, report)


def _iu_example(rid, img, text, question, views, split) -> VQAExample:
    text = re.sub(r"\s+", " ", text.replace("XXXX", "")).strip()
    return VQAExample(
        id=rid,
        qid="0",
        image_path=str(img),
        question=question,
        answer=text,
        answer_type="report",
        modality="X-Ray",
        dataset="iu_xray",
        meta={"views": [str(v) for v in views], "split": split},
    )
