"""Sizes and integer arithmetic shared by the planner's modules."""

from __future__ import annotations

F32, F64 = 4, 8
GiB = 2**30


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
