"""Evaluation: how good is a model, and does its answer rest on the image?

- :mod:`.metrics`: closed accuracy, open exact match and recall, report token F1.
- :mod:`.evaluate`: :func:`evaluate` (any answer / log-prob callables), :func:`grounding_score`
  (the drop of the answer's log-prob when the lesion is corrupted) and the ``fgpo eval`` command.
"""

from .evaluate import ModelFns, evaluate, grounding_score
from .metrics import answer_recall, closed_correct, exact_match, score_answers, token_f1

__all__ = [
    "ModelFns",
    "answer_recall",
    "closed_correct",
    "evaluate",
    "exact_match",
    "grounding_score",
    "score_answers",
    "token_f1",
]
