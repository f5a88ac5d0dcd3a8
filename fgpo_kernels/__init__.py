"""fgpo_kernels: fused kernels for fine-grained preference optimization (FiRe-MPO).

Public API (see docs/design.md §3): ``token_kl``, ``token_logprobs``, ``backend_status``,
``resolve_impl`` (which impl a call would run),
``TokenKLOutput``, ``IGNORE_INDEX`` (the target id meaning "no target", -100); the full
objective lives in ``FiReMPOLoss`` / ``SequenceStates``, its presets in ``LOSS_PRESETS``
(name -> coefficient overrides; ``FiReMPOLoss.preset(name)``), its pairwise loss names in
``LOSS_TYPES`` (``FiReMPOLoss(loss_type=...)``), its metric names in ``METRIC_KEYS`` and
``VISUAL_METRIC_KEYS``.
"""

from ._pair_losses import LOSS_TYPES
from ._registry import backend_status, resolve_impl
from .loss import (
    LOSS_PRESETS,
    METRIC_KEYS,
    VISUAL_METRIC_KEYS,
    FiReMPOLoss,
    FiReMPOOutput,
    SequenceStates,
)
from .token_kl import IGNORE_INDEX, TokenKLOutput, token_kl, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "LOSS_PRESETS",
    "LOSS_TYPES",
    "METRIC_KEYS",
    "VISUAL_METRIC_KEYS",
    "FiReMPOLoss",
    "FiReMPOOutput",
    "SequenceStates",
    "TokenKLOutput",
    "__version__",
    "backend_status",
    "resolve_impl",
    "token_kl",
    "token_logprobs",
]
