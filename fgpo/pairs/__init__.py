"""Pairs: on-policy preference pairs, step by step (``data -> pairs -> train -> eval``).

Per example: **answer** (the model's greedy answer is y-) -> **edit** (an editor makes the
minimal edit y+, tagging the differing words with ``<mask>``) -> **corrupt** (the lesion-corrupted
image v') -> **record** (the JSON the trainer reads).

- :mod:`.prepare`: :func:`prepare_pairs` and the ``fgpo prepare`` command.
- :mod:`.editors`: :class:`ReferenceEditor` (ground truth + rules; no model) and the
  :class:`Editor` protocol; :mod:`.llm`: :class:`LLMEditor` (an OpenAI-compatible endpoint).
- :mod:`.text`: word tokens, minimal diffs and ``<mask>`` tagging, answer normalisation.
- :mod:`.corrupt`: lesion corruption (``noise`` as in the paper, ``inpaint``, ``blur``).
- :mod:`.synthetic`: a small generated preference set for offline runs.
"""

from .corrupt import MODES, CorruptConfig, CorruptResult, corrupt_example, corrupt_image
from .editors import Edit, Editor, ReferenceEditor
from .llm import LLMEditor, LLMEditorError
from .prepare import prepare_pairs
from .text import tag_diff

__all__ = [
    "MODES",
    "CorruptConfig",
    "CorruptResult",
    "Edit",
    "Editor",
    "LLMEditor",
    "LLMEditorError",
    "ReferenceEditor",
    "corrupt_example",
    "corrupt_image",
    "prepare_pairs",
    "tag_diff",
]
