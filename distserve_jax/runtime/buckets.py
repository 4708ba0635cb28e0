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


def fine_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two and the midpoints between them (`lo, 1.5*lo, 2*lo, 3*lo, 4*lo, ...`) up to `hi`.

    At most 1.5x padding, for shapes whose padding costs real work (block-table widths).
    """
    if lo < 1 or hi < 1:
        raise ValueError(f"bucket bounds must be positive, got lo={lo}, hi={hi}")
    out = set()
    v = lo
    while v < hi:
        out.add(v)
        if v % 2 == 0 and v * 3 // 2 < hi:
            out.add(v * 3 // 2)
        v *= 2
    out.add(hi)
    return tuple(sorted(out))


def rows_for_tokens(row_buckets: tuple[int, ...], tokens: int, ratio: int = 16) -> tuple[int, ...]:
    """The row (sequence) buckets a step of `tokens` tokens needs: a bucket is dropped when rounding
    its rows up to the next bucket adds at most `tokens / ratio` rows (a padded row costs at most
    what one token does, so at most 1/ratio of the step), so a long step has fewer shapes."""
    if tokens < 1 or ratio < 1:
        raise ValueError(f"tokens and ratio must be positive, got tokens={tokens}, ratio={ratio}")
    # Rows up to the first bucket that holds `tokens` rows (a step has at most one row per token).
    fit = [b for b in row_buckets if b < tokens] + [b for b in row_buckets if b >= tokens][:1]
    return tuple(b for b, nxt in zip(fit, fit[1:] + [None]) if nxt is None or nxt * ratio > tokens)


def round_up(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]
