"""Training: the documented config, the trainer with named steps, exact checkpoints.

- :mod:`.config`: :class:`TrainConfig` (YAML keys = field names; ``--set key=value``).
- :mod:`.trainer`: :class:`Trainer` (load -> data -> encode -> forward -> loss -> step -> log),
  one loss path (``fgpo_kernels.FiReMPOLoss`` on hidden states), DDP / FSDP2 under torchrun.
- :mod:`.checkpoint`: atomic checkpoints that resume bit for bit.
- :mod:`.command`: the ``fgpo train`` command.
"""

from .config import TrainConfig
from .trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]
