"""What every dataset loader shares: the per-image check (exists, decodes), the counted skip,
the report at the end, annotation JSON reading, and closed/open answer-type parsing."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from .errors import DatasetError
from .examples import LoadReport, VQAExample
from .images import is_dicom

log = logging.getLogger("fgpo.data.loaders")


class ImageChecker:
    """Checks each image once (many questions share one image): exists and decodes."""

    def __init__(self, verify: bool):
        self.verify = verify
        self._cache: dict[str, str | None] = {}

    def problem(self, path: Path) -> str | None:
        key = str(path)
        if key not in self._cache:
            self._cache[key] = self._check(path)
        return self._cache[key]

    def _check(self, path: Path) -> str | None:
        if not path.is_file():
            return "missing_image"
        if not self.verify:
            return None
        if is_dicom(path):
            try:
                import pydicom

                ds = pydicom.dcmread(path)
                if "PixelData" not in ds:
                    return "corrupt_image"
            except Exception:
                return "corrupt_image"
            return None
        from PIL import Image

        try:  # a full decode: verify() alone passes truncated JPEGs
            with Image.open(path) as im:
                im.load()
        except Image.DecompressionBombError:  # PIL's guard against images that fill memory
            return "image_too_large"
        except Exception:
            return "corrupt_image"
        return None


def accept(report: LoadReport, checker: ImageChecker, path: Path, what: str, strict: bool):
    problem = checker.problem(path)
    if problem is None:
        return True
    if strict:
        raise DatasetError(f"{problem.replace('_', ' ')}: {path} ({what})")
    report.skip(problem, f"{path} ({what})")
    return False


def finish(examples: list[VQAExample], report: LoadReport) -> tuple[list[VQAExample], LoadReport]:
    report.loaded = len(examples)
    if report.n_skipped:
        log.warning("%s; first: %s", report.summary(), "; ".join(report.details[:3]))
    else:
        log.info(report.summary())
    return examples, report


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"annotation file {path} is not valid JSON: {e}") from e


def closed_or_open(value: Any, answer: str) -> str:
    v = str(value or "").strip().lower()
    if v in ("closed", "close", "yes/no", "yesno"):
        return "closed"
    if v in ("open", "other"):
        return "open"
    return "closed" if answer.strip().lower() in ("yes", "no") else "open"


def options_from_question(question: str) -> list[str]:
    """``"Which is larger, the liver or the spleen?"`` -> ``["liver", "spleen"]``."""
    q = question.strip().rstrip("?").strip()
    m = re.search(r"(?:,|:)\s*([^,:]+?)\s+or\s+([^,:]+)$", q)
    if not m:
        m = re.search(r"\b(?:is it|is this|are they|is the \w+)\s+(.+?)\s+or\s+(.+)$", q, re.I)
    if not m:
        return []
    strip = lambda s: re.sub(r"^(?:the|a|an|in the|on the)\s+", "", s.strip(), flags=re.I)
    return [strip(m.group(1)), strip(m.group(2))]
