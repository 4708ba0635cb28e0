"""Shape buckets: batch sizes, token counts and block-table widths round up to a small set, so each
step function compiles once per bucket and steady-state serving never recompiles."""

from __future__ import annotations

import bisect


def geometric_buckets(lo: int, hi: int, factor: int = 2) -> tuple[int, ...]:
    """`lo, lo*factor, ...` up to the first value >= hi, with `hi` itself as the last bucket."""
    if lo < 1 or hi < 1:
        raise ValueError(f"bucket bounds must be positive, got lo={lo}, hi={hi}")
    out = []
    v = lo
    while v < hi:
        out.append(v)
        v *= factor
    out.append(hi)
    return tuple(out)


def round_up(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]
