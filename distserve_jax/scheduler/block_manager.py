"""KV block accounting: which paged-KV-cache blocks each request owns.

This module owns the bookkeeping half of the paged KV cache: a pool of fixed-size blocks
(pages), the block table of every live request, and the number of tokens accounted to each
request. It never touches a device; the runtime's paged cache is indexed with the block
tables and slot mappings produced here (``slot = block * block_size + offset``).

Block layout:
  * Blocks ``[0, reserved_blocks)`` are never handed out. Block 0 is the null page that
    padded tokens write to (their slot is ``0 * block_size + offset``), so it must never hold
    a real request's KV.
  * Blocks ``[reserved_blocks, num_blocks)`` are the ``num_total`` usable blocks; at every
    moment each of them is either free or owned by exactly one request.

Reuse order is **FIFO**: a freed block goes to the back of the free queue and allocation
takes from the front, so the most recently freed blocks are handed out last (this is vLLM
v1's ``FreeKVCacheBlockQueue`` order). Reasons:
  * KV migration frees a request's blocks on the prefill instance once the decode instance
    has pulled them. Handing those pages out last keeps them untouched for as long as
    possible, so a late reader (a bug, or an asynchronous copy that has not finished) is far
    less likely to see another request's KV than under LIFO reuse, which would overwrite
    them at the very next allocation.
  * It is the order a future prefix cache wants: recently freed blocks are the most likely
    to be hit again, so they should be evicted last.
  * LIFO's usual advantage (cache locality of hot pages) does not apply to HBM pages.
Within one request, blocks are returned tail first (as vLLM does), so a request's last
blocks, the least likely to be a shared prefix, are reused before its first ones.

All operations are all-or-nothing: a call that raises leaves the manager unchanged. Every
per-block operation is O(1) (a deque pop/append or a list append). The manager is not
thread-safe; the engine drives each instance's manager from one thread.
"""

from __future__ import annotations

import collections
import dataclasses
import numbers


class KVCacheFullError(RuntimeError):
    """Not enough free blocks right now (the request may fit after others are freed)."""


class RequestTooLargeError(ValueError):
    """The request needs more blocks than the whole cache holds; it can never fit."""


def _check_size(name: str, value: object, *, allow_zero: bool = False) -> int:
    """Returns ``value`` as an ``int``; raises ValueError naming ``name`` if it is not a
    positive integer (non-negative if ``allow_zero``). ``bool`` is rejected."""
    if type(value) is int and value > 0:  # the common case, without the slow abc check below
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


@dataclasses.dataclass
class _Allocation:
    """One request's blocks, in token order, and the number of tokens accounted to it."""

    blocks: list[int]
    num_tokens: int


class BlockManager:
    """Allocates fixed-size KV blocks to requests and tracks their block tables.

    Args:
      num_blocks: Number of blocks in the device cache, reserved ones included.
      block_size: Tokens per block.
      reserved_blocks: Blocks ``[0, reserved_blocks)`` are never handed out (block 0 is the
        null page). Must leave at least one usable block.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, *, reserved_blocks: int = 1):
        self.num_blocks: int = _check_size("num_blocks", num_blocks)
        self.block_size: int = _check_size("block_size", block_size)
        self.reserved_blocks: int = _check_size(
            "reserved_blocks", reserved_blocks, allow_zero=True
        )
        if self.reserved_blocks >= self.num_blocks:
            raise ValueError(
                f"reserved_blocks ({self.reserved_blocks}) must be less than num_blocks "
                f"({self.num_blocks}) so that at least one block is usable"
            )
        self._free: collections.deque[int] = collections.deque(
            range(self.reserved_blocks, self.num_blocks)
        )
        self._allocs: dict[str, _Allocation] = {}

    def __repr__(self) -> str:
        return (
            f"BlockManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"reserved_blocks={self.reserved_blocks}, free={self.num_free}, "
            f"requests={len(self._allocs)})"
        )

    # ----------------------------------------------------------------------------- sizes
    @property
    def num_total(self) -> int:
        """Usable blocks: ``num_blocks - reserved_blocks``."""
        return self.num_blocks - self.reserved_blocks

    @property
    def num_free(self) -> int:
        """Blocks not owned by any request."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks owned by some request (``num_total - num_free``)."""
        return self.num_total - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks in use, in ``[0, 1]`` (a load signal for dispatch)."""
        return self.num_used / self.num_total

    def max_tokens_per_request(self) -> int:
        """The most tokens one request can ever hold: ``num_total * block_size``."""
        return self.num_total * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens: ``ceil(num_tokens / block_size)``
        (0 for 0 tokens)."""
        num_tokens = _check_size("num_tokens", num_tokens, allow_zero=True)
        return -(-num_tokens // self.block_size)

    def _extra_blocks(self, alloc: _Allocation, num_new_tokens: int) -> int:
        """Blocks ``alloc`` must add to hold ``num_new_tokens`` more tokens."""
        return self.blocks_needed(alloc.num_tokens + num_new_tokens) - len(alloc.blocks)

    # ------------------------------------------------------------------------ queries
    def has(self, request_id: object) -> bool:
        """Whether ``request_id`` currently holds blocks."""
        return request_id in self._allocs

    def request_ids(self) -> list[str]:
        """Ids of requests holding blocks, in allocation order."""
        return list(self._allocs)

    def _get(self, request_id: str) -> _Allocation:
        try:
            return self._allocs[request_id]
        except (KeyError, TypeError):
            raise KeyError(
                f"request {request_id!r} holds no KV blocks (unknown id, or already freed)"
            ) from None

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block ids, in token order. KeyError if unknown."""
        return list(self._get(request_id).blocks)

    def num_tokens(self, request_id: str) -> int:
        """Tokens accounted to the request. KeyError if unknown."""
        return self._get(request_id).num_tokens

    def can_fit(self, num_tokens: int, request_id: str | None = None) -> bool:
        """Whether ``num_tokens`` more tokens fit right now.

        Without ``request_id``: whether ``allocate(new_id, num_tokens)`` would succeed.
        With ``request_id``: whether ``append_slots(request_id, num_tokens)`` would succeed,
        using the room left in the request's last block first (KeyError if unknown).
        Returns False (never raises) for requests too large to ever fit.
        """
        num_tokens = _check_size("num_tokens", num_tokens)
        if request_id is None:
            return self.blocks_needed(num_tokens) <= len(self._free)
        return self._extra_blocks(self._get(request_id), num_tokens) <= len(self._free)

    def slot_mapping(self, request_id: str, start: int, end: int) -> list[int]:
        """Flat cache slots of the request's token positions ``[start, end)``.

        Returns ``[end - start]`` ints, ``block_table[p // block_size] * block_size +
        p % block_size`` for each position ``p``. Requires
        ``0 <= start <= end <= num_tokens(request_id)``.
        """
        alloc = self._get(request_id)
        start = _check_size("start", start, allow_zero=True)
        end = _check_size("end", end, allow_zero=True)
        if start > end or end > alloc.num_tokens:
            raise ValueError(
                f"slot_mapping range [start={start}, end={end}) is not within the "
                f"{alloc.num_tokens} tokens of request {request_id!r}"
            )
        bs, blocks = self.block_size, alloc.blocks
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    # ---------------------------------------------------------------------- mutations
    def _take(self, n: int) -> list[int]:
        """Pops ``n`` blocks off the front of the free queue (caller checked there are)."""
        popleft = self._free.popleft
        return [popleft() for _ in range(n)]

    def _raise_if_cannot_grow(
        self, request_id: str, have_blocks: int, need_blocks: int, total_tokens: int
    ) -> None:
        if need_blocks > self.num_total:
            raise RequestTooLargeError(
                f"request {request_id!r} needs {need_blocks} blocks for {total_tokens} tokens "
                f"but the cache has only {self.num_total} usable blocks "
                f"(max {self.max_tokens_per_request()} tokens per request)"
            )
        extra = need_blocks - have_blocks
        if extra > len(self._free):
            raise KVCacheFullError(
                f"request {request_id!r} needs {extra} more blocks for {total_tokens} tokens "
                f"but only {len(self._free)} of {self.num_total} are free"
            )

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Gives a new request the blocks for its first ``num_tokens`` tokens.

        Returns a copy of its block table. Raises ValueError if ``request_id`` already holds
        blocks, RequestTooLargeError if the request could never fit, and KVCacheFullError if
        there are not enough free blocks now (then nothing is allocated).
        """
        if not isinstance(request_id, str):
            raise TypeError(
                f"request_id must be a str, got {type(request_id).__name__} {request_id!r}"
            )
        num_tokens = _check_size("num_tokens", num_tokens)
        if request_id in self._allocs:
            raise ValueError(
                f"request {request_id!r} already holds "
                f"{len(self._allocs[request_id].blocks)} KV blocks; use append_slots to grow it"
            )
        need = self.blocks_needed(num_tokens)
        self._raise_if_cannot_grow(request_id, 0, need, num_tokens)
        blocks = self._take(need)
        self._allocs[request_id] = _Allocation(blocks=blocks, num_tokens=num_tokens)
        return list(blocks)

    def append_slots(self, request_id: str, num_new_tokens: int) -> list[int]:
        """Grows a request by ``num_new_tokens`` tokens.

        Fills the room left in the request's last block first, then adds blocks. Returns the
        newly added block ids (``[]`` if none were needed). KeyError if unknown;
        RequestTooLargeError / KVCacheFullError as in ``allocate``, leaving the request
        unchanged.
        """
        alloc = self._get(request_id)
        num_new_tokens = _check_size("num_new_tokens", num_new_tokens)
        total = alloc.num_tokens + num_new_tokens
        need = self.blocks_needed(total)
        self._raise_if_cannot_grow(request_id, len(alloc.blocks), need, total)
        new_blocks = self._take(need - len(alloc.blocks))
        alloc.blocks.extend(new_blocks)
        alloc.num_tokens = total
        return new_blocks

    def free(self, request_id: str) -> int:
        """Returns all of the request's blocks to the pool; returns how many were freed.

        KeyError if the request holds no blocks (an unknown id, or a double free).
        """
        alloc = self._allocs.pop(request_id, None) if isinstance(request_id, str) else None
        if alloc is None:
            raise KeyError(
                f"cannot free request {request_id!r}: it holds no KV blocks "
                f"(unknown id, or double free)"
            )
        # Tail first: a request's last blocks are the least likely shared prefix.
        self._free.extend(reversed(alloc.blocks))
        return len(alloc.blocks)

    # ---------------------------------------------------------------------- checking
    def check_invariants(self) -> None:
        """Raises AssertionError on any inconsistency in the pool (O(num_blocks); for tests)."""
        usable = range(self.reserved_blocks, self.num_blocks)
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            dups = sorted(b for b, c in collections.Counter(self._free).items() if c > 1)
            raise AssertionError(f"free list holds duplicate blocks {dups}")
        bad_free = sorted(b for b in free_set if b not in usable)
        if bad_free:
            raise AssertionError(f"free list holds reserved or out-of-range blocks {bad_free}")
        owner: dict[int, str] = {}
        for rid, alloc in self._allocs.items():
            if alloc.num_tokens <= 0:
                raise AssertionError(f"request {rid!r} has {alloc.num_tokens} tokens")
            if len(alloc.blocks) != self.blocks_needed(alloc.num_tokens):
                raise AssertionError(
                    f"request {rid!r} holds {len(alloc.blocks)} blocks for "
                    f"{alloc.num_tokens} tokens, expected {self.blocks_needed(alloc.num_tokens)}"
                )
            for b in alloc.blocks:
                if b not in usable:
                    raise AssertionError(
                        f"request {rid!r} holds reserved or out-of-range block {b}"
                    )
                if b in owner:
                    raise AssertionError(
                        f"block {b} is owned by both {owner[b]!r} and {rid!r}"
                    )
                if b in free_set:
                    raise AssertionError(f"block {b} is both free and owned by {rid!r}")
                owner[b] = rid
        if len(free_set) + len(owner) != self.num_total:
            raise AssertionError(
                f"free ({len(free_set)}) + used ({len(owner)}) != total ({self.num_total}): "
                f"blocks leaked"
            )


def assert_all_free(manager: BlockManager) -> None:
    """Asserts that no request holds blocks and every usable block is free.

    Engine tests call this after every test to prove no KV block leaked. Raises
    AssertionError naming the request ids still holding blocks.
    """
    manager.check_invariants()
    held = manager.request_ids()
    if held:
        detail = ", ".join(f"{rid!r} ({len(manager.block_table(rid))} blocks)" for rid in held)
        raise AssertionError(f"{len(held)} request(s) still hold KV blocks: {detail}")
    if manager.num_free != manager.num_total:
        raise AssertionError(
            f"only {manager.num_free} of {manager.num_total} KV blocks are free with no "
            f"request holding any"
        )
