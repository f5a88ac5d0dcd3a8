"""What keeps a run's work when it is interrupted or goes wrong.

- The **step boundary**: the step count and the RNG states right after an optimizer update.
  Weights, optimizer, schedule and the boundary change together in :func:`hold_sigint`'s block
  (Ctrl-C is held until all are done), so at any moment the trainer holds one consistent state
  to checkpoint: the boundary's.
- **On failure** (Ctrl-C in the forward, backward, evaluation, logging or a save; a bad file
  met mid-run; a NaN loss) the completed steps are checkpointed with the boundary's RNG, so
  ``--resume`` continues bit for bit.
- A **non-finite loss or gradient** stops the run before the update is applied: the last good
  state is kept and the error says which metrics were NaN.
- A step's **metrics row** is part of its boundary until it is written (:func:`finish_row`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

log = logging.getLogger(__name__)


class Boundary(NamedTuple):
    """The state between two steps: ``step`` updates done, the RNG states at that point, and
    the step's metrics row while it is not yet logged (``eval_due``: its evaluation is still
    to run; ``log_due``: it is to be written). A checkpoint taken before the row is written
    carries it, and ``--resume`` completes and writes it: no step's record is lost."""

    step: int
    rng: dict[str, Any]
    row: dict[str, Any] | None = None
    eval_due: bool = False
    log_due: bool = False

    def pending(self) -> dict[str, Any] | None:
        """What a checkpoint of this boundary must carry of the unlogged row, or None."""
        if self.row is None or not (self.log_due or self.eval_due):
            return None
        return {"row": self.row, "eval_due": self.eval_due}


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm of a step is NaN or infinite; the update was not applied."""


@contextlib.contextmanager
def hold_sigint() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) during the block and deliver it right after, so the block runs to
    its end. Only the main thread receives signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread() or not callable(
        signal.getsignal(signal.SIGINT)
    ):  # not the main thread, or a handler set outside Python (or ignored): leave it alone
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)  # to the handler it was meant for


def check_finite(step: int, row: dict[str, Any]) -> None:
    """Raise :class:`NonFiniteLossError` when the step's loss or gradient norm is not finite;
    the message lists the step's metrics, NaN ones included."""
    loss, gnorm = row.get("loss"), row.get("grad_norm")
    if math.isfinite(loss) and math.isfinite(gnorm):
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {gnorm}"
    shown = ", ".join(
        f"{k}={v:.6g}" for k, v in row.items() if isinstance(v, float) and k not in ("epoch", "lr")
    )
    raise NonFiniteLossError(
        f"step {step + 1}: {what}; stopped before applying its update (the last good state is "
        f"kept). Metrics of the step: {shown}. Lower lr, check the data, or resume from the "
        "checkpoint with another config."
    )


def save_on_failure(trainer: Any, last_saved: int) -> None:
    """After a failure, checkpoint the boundary's state unless it is saved already.

    Single process only: with several, the others may not reach the collective save. Not when
    the failure came from inside the update itself (the weights may be half-updated); then the
    previous checkpoint is the one to resume from.
    """
    if trainer.world != 1:
        return
    if trainer.updating:
        log.error("the failure came during the optimizer update: the state is not checkpointed")
        return
    boundary: Boundary = trainer.boundary
    if boundary.step <= max(last_saved, 0):
        return
    try:
        trainer.save(boundary.step)
        log.warning("checkpointed the %d completed steps before stopping", boundary.step)
    except Exception as e:  # the original failure is the one to report
        log.error("could not checkpoint step %d after the failure: %s", boundary.step, e)


def finish_row(trainer: Any, log: Any, row: dict[str, Any], evaluate: bool) -> None:
    """Evaluate (when due) and write the row of the step just completed, then mark it written
    in the boundary. A row already in the log (written just before an interruption) is not
    written twice."""
    b: Boundary = trainer.boundary
    if evaluate and trainer.eval_fn is not None:
        row.update(trainer.evaluate())
        trainer.boundary = b = b._replace(eval_due=False)
    if b.log_due and not log.has_step(row["step"]):
        log.write(row)
    trainer.boundary = b._replace(row=None)
