"""Fixed-size blocks of a row range: the chunk grid of prediction (and its cache) and the block grid of the dataset's
similarity passes, defined once."""

from __future__ import annotations


def blocks(n: int, size: int) -> list[range]:
    """`range(0, n)` cut into consecutive ranges of `size` rows (the last one shorter)."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]
