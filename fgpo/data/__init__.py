"""Data: what goes into the pipeline (``data -> pairs -> train -> eval``).

- :mod:`.loaders` (+ :mod:`.iu_xray`, :mod:`.loader_common`): SLAKE, VQA-RAD, PathVQA and
  IU-Xray from their official local layouts,
  returning :class:`VQAExample` records and a :class:`LoadReport` of what was skipped and why.
- :mod:`.images`: the one :func:`open_image` (PNG/JPEG, 16-bit, DICOM via :mod:`.dicom`).
- :mod:`.records`: the preference-record JSON format and its ``<mask>`` span tags.
- :mod:`.batches`: records -> token ids, shifted targets, span/response masks, padded batches
  (the trainer's input).
- :mod:`.synthetic`: generated lesion scans with questions (the demo's and the tiny runs' data).
- :mod:`.errors`: ``DatasetError``, ``SkipExample``, ``ImageError``, ``MaskTagError``.
- :mod:`.files`: atomic writes, append-only JSON lines that survive a kill, disk-full errors
  that say where (used by ``fgpo prepare`` and the trainer).
"""

from .batches import (
    IGNORE_INDEX,
    EncodedPair,
    PreferenceCollator,
    PreferenceDataset,
    encode_example,
    encode_response,
    pad_sequences,
)
from .errors import DatasetError, ImageError, MaskTagError, SkipExample
from .examples import ANSWER_TYPES, LoadReport, VQAExample
from .images import is_dicom, open_image
from .loaders import (
    LOADERS,
    examples_from_json,
    load_dataset,
    load_iu_xray,
    load_pathvqa,
    load_slake,
    load_vqa_rad,
)
from .records import (
    CLOSE_TAG,
    OPEN_TAG,
    has_tags,
    load_records,
    parse_mask_tags,
    strip_tags,
    write_records,
)

__all__ = [
    "ANSWER_TYPES",
    "CLOSE_TAG",
    "IGNORE_INDEX",
    "LOADERS",
    "OPEN_TAG",
    "DatasetError",
    "EncodedPair",
    "ImageError",
    "LoadReport",
    "MaskTagError",
    "PreferenceCollator",
    "PreferenceDataset",
    "SkipExample",
    "VQAExample",
    "encode_example",
    "encode_response",
    "examples_from_json",
    "has_tags",
    "is_dicom",
    "load_dataset",
    "load_iu_xray",
    "load_pathvqa",
    "load_records",
    "load_slake",
    "load_vqa_rad",
    "open_image",
    "pad_sequences",
    "parse_mask_tags",
    "strip_tags",
    "write_records",
]
