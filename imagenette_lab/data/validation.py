"""The data config's allowed values and the checks that name a bad ``data.*`` key before any data is touched."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ON_CORRUPT = ("error", "skip")
PIPELINES = ("cached", "pil")
VAL_CROPS = ("center", "random")
NORMALIZE = ("imagenet", "dataset")  # imagenet: data.mean/std as configured | dataset: the training split's


def choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"data.{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def pair(key: str, values: Sequence[float], low: float, high: float) -> tuple[float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 2 or not (low < vals[0] <= vals[1] <= high):
        raise ValueError(f"data.{key}={list(values)} must be [min, max] with {low} < min <= max <= {high}")
    return vals  # type: ignore[return-value]


def int_at_least(key: str, value: Any, low: int, *, low_name: str = "", allow_none: bool = False) -> None:
    """``data.<key>`` must be an integer >= ``low`` (named ``low_name`` in the message), or None if ``allow_none``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        bound = f"{low_name}={low}" if low_name else str(low)
        raise ValueError(f"data.{key}={value!r} must be {'null (auto) or ' if allow_none else ''}an integer >= {bound}")
