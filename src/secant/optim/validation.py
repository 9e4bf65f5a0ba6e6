"""Argument checks shared by the optimizers: bad input raises ``ValueError`` showing
``name=value`` and what was expected."""

from __future__ import annotations

from typing import Any


def check(ok: bool, name: str, value: Any, expect: str) -> None:
    """Raise ``ValueError`` showing ``name=value`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}={value!r}: expected {expect}")


def is_int(x: Any) -> bool:
    """A true integer (``bool`` excluded)."""
    return isinstance(x, int) and not isinstance(x, bool)
