"""The data errors every part of ``fgpo`` shares (one class each).

- :class:`DatasetError`: an annotation file or image that cannot be used; the message names it.
- :class:`SkipExample`: one example cannot be used (unreadable image, empty mask, too long, an
  editor that cannot make a pair, ...); ``reason`` is a short key that callers count, so
  nothing is dropped silently.
- :class:`ImageError`: a missing or unreadable image; both of the above, so a dataset loader
  reports it as a bad file and the trainer or ``fgpo prepare`` counts it as a skip.
- :class:`MaskTagError`: unbalanced or nested ``<mask>`` tags in a preference record.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """An annotation file or image that cannot be used (the message names the path)."""


class SkipExample(Exception):
    """An example that cannot be used; ``reason`` is a short key for the skip counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ImageError(DatasetError, SkipExample):
    """A missing (``reason="missing_image"``), unreadable (``"unreadable_image"``) or oversized
    (``"image_too_large"``) image."""

    def __init__(self, reason: str, message: str) -> None:
        SkipExample.__init__(self, reason, message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]


class MaskTagError(ValueError):
    """Unbalanced or nested ``<mask>`` tags."""
