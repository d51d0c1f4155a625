"""Command-line argument types: numbers within bounds, refused by argparse in one line naming the bound."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def whole_number(low: int, high: int = UINT64_MAX) -> Callable[[str], int]:
    """An int in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}; got {value}")
        return value

    return parse


def real_number(low: float, high: float = math.inf, *, open_low: bool = False) -> Callable[[str], float]:
    """A float in [low, high], or (low, high] with `open_low`; never NaN."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        above_low = value > low if open_low else value >= low
        if not (above_low and value <= high):
            bound = f"> {low:g}" if open_low else f">= {low:g}"
            upper = f" and <= {high:g}" if high != math.inf else ""
            raise argparse.ArgumentTypeError(f"must be {bound}{upper}; got {text}")
        return value

    return parse
