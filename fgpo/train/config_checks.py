"""Type and range checks of ``TrainConfig`` fields; every error message starts with the field.

A config value is never reinterpreted: a quoted ``"false"`` is a string, not a boolean (it
used to switch LoRA *on*), ``1.5`` is not a seed, ``.inf`` is not a learning rate. The one
conversion kept is YAML 1.1's: it reads ``1e-6`` (no dot) as a string, so a numeric string in
a number field is read as that number.
"""

from __future__ import annotations

import math
from typing import Any

_WHAT = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a finite number",
    "str": "a string",
    "dict": "a mapping",
}


def _kind(annotation: str) -> tuple[str, bool]:
    """``"int | None"`` -> ``("int", True)``; ``"dict[str, Any]"`` -> ``("dict", False)``."""
    base, _, rest = annotation.partition(" |")
    return base.split("[")[0].strip(), rest.strip() == "None"


def check_type(name: str, annotation: str, value: Any) -> Any:
    """``value`` checked against the field's annotation; returns it (a number field's numeric
    string as the number, an int in a float field as a float)."""
    kind, optional = _kind(annotation)
    if kind not in _WHAT:
        raise TypeError(f"TrainConfig.{name} has type {annotation!r}, which check_type lacks")
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be {_WHAT[kind]}, got null")
    want = _WHAT[kind] + (" or null" if optional else "")
    got = f"{value!r} ({type(value).__name__})"
    if kind == "bool":
        if not isinstance(value, bool):
            hint = "; write it without quotes" if isinstance(value, str) else ""
            raise ValueError(f"{name} must be {want}, got {got}{hint}")
        return value
    if kind in ("int", "float") and isinstance(value, str):
        try:
            value = int(value) if kind == "int" else float(value)
        except ValueError:
            raise ValueError(f"{name} must be {want}, got {got}") from None
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be {want}, got {got}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be {want}, got {got}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be {want}, got {value}")
        return float(value)
    if not isinstance(value, str if kind == "str" else dict):
        raise ValueError(f"{name} must be {want}, got {got}")
    return value


def at_least(cfg: Any, name: str, low: float, *, strict: bool = False) -> None:
    """``cfg.<name>`` >= ``low`` (> with ``strict``); None passes (an optional field unset)."""
    v = getattr(cfg, name)
    if v is not None and (v <= low if strict else v < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {v}")


def fraction(cfg: Any, name: str, *, upper_open: bool = False) -> None:
    """``cfg.<name>`` in [0, 1] (or [0, 1) with ``upper_open``)."""
    v = getattr(cfg, name)
    if v < 0 or v > 1 or (upper_open and v == 1):
        raise ValueError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {v}")


def one_of(cfg: Any, name: str, choices: tuple) -> None:
    v = getattr(cfg, name)
    if v not in choices:
        shown = ", ".join("null" if c is None else repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {shown}; got {v!r}")
