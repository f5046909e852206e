"""The one numeric check: accepted intervals, and messages that name the key, the value and the rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedprge.checks import check_range


@pytest.mark.parametrize(
    ("value", "interval", "integer"),
    [(1, "[1, inf)", True), (np.int64(3), "[1, inf)", True), (0.5, "(0, 1)", False), (math.inf, "(0, inf]", False)],
)
def test_values_inside_pass(value, interval, integer):
    check_range("k", value, interval, integer=integer)


@pytest.mark.parametrize(
    ("value", "interval", "integer", "message"),
    [
        (0, "[1, inf)", True, "k=0 is invalid; it must be >= 1$"),
        (2.0, "[1, inf)", True, "k=2.0 is invalid; it must be an integer >= 1$"),
        (True, "[0, inf)", True, "k=True is invalid; it must be an integer >= 0$"),
        (math.inf, "(0, inf)", False, "k=inf is invalid; it must be finite and > 0$"),
        (math.nan, "[0, 1]", False, r"k=nan is invalid; it must be in \[0, 1\]$"),
        ("x", "(0, 1)", False, r"k='x' is invalid; it must be a number in \(0, 1\)$"),
        (2**32, "[0, 2**32)", True, r"it must be in \[0, 2\*\*32\)$"),
    ],
)
def test_values_outside_are_named_with_the_rule(value, interval, integer, message):
    with pytest.raises(ValueError, match=message):
        check_range("k", value, interval, integer=integer)


def test_a_note_ends_the_message():
    with pytest.raises(ValueError, match=r"clip=-1.0 is invalid; it must be finite and >= 0 \(0: off\)$"):
        check_range("clip", -1.0, "[0, inf)", note="0: off")
