"""The one numeric check: a value is a number (or an integer) in an interval, else a ValueError naming it."""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np

_INTERVAL = re.compile(r"([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])")


def _bound(text: str) -> float:
    if text in ("inf", "-inf"):
        return float(text)
    base, _, exponent = text.partition("**")
    return int(base) ** int(exponent) if exponent else float(text)


@lru_cache(maxsize=256)
def _interval(text: str) -> tuple[str, str, float, float, str]:
    parsed = _INTERVAL.fullmatch(text)
    if parsed is None:
        raise ValueError(f"malformed interval {text!r}")
    left, low, high, right = parsed.groups()
    return left, low, _bound(low), _bound(high), right


def check_range(key: str, value: object, interval: str, *, integer: bool = False, note: str = "") -> None:
    """Raise ``ValueError("key=value is invalid; it must be ...")`` unless ``value`` lies in ``interval``.

    ``interval`` is written as in mathematics: ``"(0, 1]"``, ``"[1, inf)"``, ``"[0, 2**32)"``; an open ``inf)``
    also excludes infinity. ``note`` (e.g. ``"0: off"``) ends the message in brackets.
    """
    left, low_text, low, high, right = _interval(interval)
    number = isinstance(value, (int, np.integer) if integer else (int, float, np.integer, np.floating))
    number = number and not isinstance(value, (bool, np.bool_))
    inside = number and (low < value if left == "(" else low <= value)
    inside = inside and (value < high if right == ")" else value <= high)
    if inside:
        return
    if high != math.inf:
        rule = f"in {interval}"
    else:
        rule = f"{'>' if left == '(' else '>='} {low_text}"
        rule = rule if right == "]" or integer else f"finite and {rule}"
    if not number:
        kind = "an integer" if integer else "a finite number" if rule.startswith("finite") else "a number"
        rule = f"{kind} {rule.removeprefix('finite and ')}"
    raise ValueError(f"{key}={value!r} is invalid; it must be {rule}" + (f" ({note})" if note else ""))
