"""Where a request goes (pure Python, no JAX): the controller's routing policies.

They read each worker's reported load (any object with the fields of the engine's `WorkerLoad`),
never a worker's scheduler, so the same policies route for threads, processes and the simulator.

- `pick_prefill`: the prefill worker (or colocated replica) with the fewest tokens queued.
- `pick_decode`: the least loaded decode worker that has room for a pull.
- `tokens_to_accept`: how much KV a decode worker must have room for before it accepts a pull.
"""

from __future__ import annotations

from typing import Any, Sequence


def tokens_to_accept(num_computed_tokens: int, max_num_tokens: int, block_size: int) -> int:
    """KV slots a decode worker needs free to accept a pull: the pulled KV plus one block of
    growth, but never more than the request can ever hold (`max_num_tokens`: prompt plus
    `max_tokens`), so a request that fits an empty cache is always accepted by one."""
    return max(num_computed_tokens, min(num_computed_tokens + block_size, max_num_tokens))


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def pick_prefill(queued_tokens: Sequence[int], alive: Sequence[bool]) -> int | None:
    """Index of the live worker with the fewest tokens queued (first on ties), or None if none is alive."""
    live = [i for i, ok in enumerate(alive) if ok]
    if not live:
        return None
    return min(live, key=lambda i: (queued_tokens[i], i))


def can_accept(load: Any, num_computed_tokens: int, max_num_tokens: int) -> bool:
    """A decode worker's report has a batch slot, a short pull queue and room for the request's KV."""
    need = blocks_for(tokens_to_accept(num_computed_tokens, max_num_tokens, load.block_size), load.block_size)
    return (load.alive and load.load < load.max_num_seqs and load.num_incoming < load.max_inflight_pulls
            and load.free_blocks >= need)


def pick_decode(loads: Sequence[Any], num_computed_tokens: int, max_num_tokens: int) -> int | None:
    """Index of the least loaded decode worker that can accept the request (most free blocks on
    ties, then the first), or None when none has room now."""
    ok = [i for i, ld in enumerate(loads) if can_accept(ld, num_computed_tokens, max_num_tokens)]
    if not ok:
        return None
    return min(ok, key=lambda i: (loads[i].load, -loads[i].free_blocks, i))
