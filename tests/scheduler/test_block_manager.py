"""Tests for the KV block manager: unit tests for every error, and a hypothesis state machine
that drives random allocate / append / free / can_fit sequences against a model and proves
that no block leaks, is double-freed, or is handed out twice."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from distserve_jax.scheduler.block_manager import (
    BlockManager,
    KVCacheFullError,
    RequestTooLargeError,
    assert_all_free,
)


def _snapshot(m: BlockManager) -> tuple:
    """Everything observable about a manager's state, including the free-queue order."""
    return (
        list(m._free),
        {rid: (m.block_table(rid), m.num_tokens(rid)) for rid in m.request_ids()},
        m.num_free,
        m.num_used,
    )


# ------------------------------------------------------------------------- construction
def test_sizes_and_reserved_blocks():
    m = BlockManager(10, 4, reserved_blocks=2)
    assert (m.num_blocks, m.block_size, m.reserved_blocks) == (10, 4, 2)
    assert (m.num_total, m.num_free, m.num_used) == (8, 8, 0)
    assert m.max_tokens_per_request() == 32
    assert m.usage == 0.0
    # Takes every usable block; none is reserved.
    assert m.allocate("a", 32) == list(range(2, 10))
    assert (m.num_free, m.num_used, m.usage) == (0, 8, 1.0)
    m.check_invariants()


def test_default_reserves_only_the_null_block():
    m = BlockManager(3)
    assert m.block_size == 16 and m.num_total == 2
    assert m.allocate("a", 17) == [1, 2]
    m = BlockManager(3, 4, reserved_blocks=0)
    assert m.allocate("a", 12) == [0, 1, 2]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_blocks": 0}, "num_blocks"),
        ({"num_blocks": -3}, "num_blocks"),
        ({"num_blocks": 4.0}, "num_blocks"),
        ({"num_blocks": "8"}, "num_blocks"),
        ({"num_blocks": True}, "num_blocks"),
        ({"num_blocks": 8, "block_size": 0}, "block_size"),
        ({"num_blocks": 8, "block_size": -16}, "block_size"),
        ({"num_blocks": 8, "block_size": 16.0}, "block_size"),
        ({"num_blocks": 8, "block_size": None}, "block_size"),
        ({"num_blocks": 8, "reserved_blocks": -1}, "reserved_blocks"),
        ({"num_blocks": 8, "reserved_blocks": 0.5}, "reserved_blocks"),
        ({"num_blocks": 8, "reserved_blocks": 8}, "reserved_blocks"),
        ({"num_blocks": 1}, "reserved_blocks"),
    ],
)
def test_constructor_rejects_bad_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockManager(**kwargs)


# ----------------------------------------------------------------------- size arguments
@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, "3", None, True])
def test_token_counts_must_be_positive_ints(bad):
    m = BlockManager(8, 4)
    m.allocate("a", 3)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="num_tokens"):
        m.allocate("b", bad)
    with pytest.raises(ValueError, match="num_new_tokens"):
        m.append_slots("a", bad)
    with pytest.raises(ValueError, match="num_tokens"):
        m.can_fit(bad)
    with pytest.raises(ValueError, match="num_tokens"):
        m.can_fit(bad, "a")
    assert _snapshot(m) == before
    assert not m.has("b")


def test_blocks_needed():
    m = BlockManager(8, 4)
    assert [m.blocks_needed(n) for n in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    with pytest.raises(ValueError, match="num_tokens"):
        m.blocks_needed(-1)
    with pytest.raises(ValueError, match="num_tokens"):
        m.blocks_needed(1.0)


# ----------------------------------------------------------------------- allocate / grow
def test_append_uses_room_in_last_block_first():
    m = BlockManager(8, 4)
    assert m.allocate("a", 3) == [1]
    assert m.can_fit(1, "a") and m.append_slots("a", 1) == []
    assert m.num_tokens("a") == 4 and m.block_table("a") == [1]
    assert m.append_slots("a", 1) == [2]
    assert m.append_slots("a", 3) == []
    assert m.append_slots("a", 9) == [3, 4, 5]
    assert m.num_tokens("a") == 17 and m.block_table("a") == [1, 2, 3, 4, 5]
    m.check_invariants()


def test_block_table_is_a_copy():
    m = BlockManager(8, 4)
    table = m.allocate("a", 5)
    table.append(7)
    m.block_table("a").append(6)
    assert m.block_table("a") == [1, 2]
    m.check_invariants()


def test_allocate_twice_is_an_error_and_changes_nothing():
    m = BlockManager(8, 4)
    m.allocate("a", 5)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="'a' already holds 2 KV blocks"):
        m.allocate("a", 1)
    assert _snapshot(m) == before


def test_request_id_must_be_a_string():
    m = BlockManager(8, 4)
    with pytest.raises(TypeError, match="request_id must be a str"):
        m.allocate(3, 4)
    assert m.num_free == m.num_total


def test_cache_full_is_all_or_nothing():
    m = BlockManager(8, 4)  # 7 usable blocks
    assert m.allocate("a", 12) == [1, 2, 3]
    assert m.allocate("c", 8) == [4, 5]
    assert not m.can_fit(9) and m.can_fit(8)
    before = _snapshot(m)
    with pytest.raises(KVCacheFullError, match=r"'b' needs 3 more blocks .* only 2 of 7 are free"):
        m.allocate("b", 9)
    assert _snapshot(m) == before and not m.has("b")
    assert not m.can_fit(9, "a") and m.can_fit(8, "a")
    with pytest.raises(KVCacheFullError, match="'a' needs 3 more blocks"):
        m.append_slots("a", 9)
    assert _snapshot(m) == before
    assert m.append_slots("a", 8) == [6, 7]
    assert m.num_free == 0 and not m.can_fit(1) and not m.can_fit(1, "a")
    m.check_invariants()


def test_too_large_is_distinguished_from_full():
    m = BlockManager(5, 4)  # 4 usable blocks: 16 tokens max
    assert not m.can_fit(17)
    with pytest.raises(RequestTooLargeError, match=r"needs 5 blocks .* only 4 usable .*max 16"):
        m.allocate("a", 17)
    assert isinstance(RequestTooLargeError("x"), ValueError)
    assert isinstance(KVCacheFullError("x"), RuntimeError)
    m.allocate("a", 10)
    before = _snapshot(m)
    assert not m.can_fit(7, "a")
    with pytest.raises(RequestTooLargeError, match="'a' needs 5 blocks for 17 tokens"):
        m.append_slots("a", 7)
    assert _snapshot(m) == before
    # Fits in the whole cache but not now: that is KVCacheFullError.
    m.allocate("b", 4)
    with pytest.raises(KVCacheFullError):
        m.append_slots("a", 6)
    m.free("b")
    assert m.append_slots("a", 6) == [4]
    m.check_invariants()


# ------------------------------------------------------------------------------ free
def test_free_returns_count_and_double_free_raises():
    m = BlockManager(8, 4)
    m.allocate("a", 9)
    assert m.free("a") == 3
    assert m.num_free == m.num_total and not m.has("a")
    with pytest.raises(KeyError, match="double free"):
        m.free("a")
    with pytest.raises(KeyError, match="'nope'"):
        m.free("nope")
    with pytest.raises(KeyError):
        m.free(["unhashable"])
    assert_all_free(m)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.block_table("x"),
        lambda m: m.num_tokens("x"),
        lambda m: m.append_slots("x", 1),
        lambda m: m.can_fit(1, "x"),
        lambda m: m.slot_mapping("x", 0, 0),
    ],
)
def test_unknown_request_raises_key_error(call):
    m = BlockManager(8, 4)
    with pytest.raises(KeyError, match="'x' holds no KV blocks"):
        call(m)


def test_reuse_order_is_fifo_recently_freed_last():
    m = BlockManager(7, 2)  # free queue: 1 2 3 4 5 6
    assert m.allocate("a", 4) == [1, 2]
    assert m.allocate("b", 2) == [3]
    assert m.free("a") == 2  # queue: 4 5 6 2 1 (tail block first)
    assert list(m._free) == [4, 5, 6, 2, 1]
    assert m.allocate("c", 6) == [4, 5, 6]  # never-used blocks before recently freed ones
    assert m.allocate("d", 4) == [2, 1]
    m.free("b")
    assert m.append_slots("c", 1) == [3]
    m.check_invariants()


# ----------------------------------------------------------------------- slot mapping
def test_slot_mapping():
    m = BlockManager(8, 4)
    m.allocate("a", 2)
    m.allocate("b", 5)  # blocks 2, 3
    m.append_slots("a", 4)  # a: blocks 1, 4; 6 tokens
    assert m.block_table("a") == [1, 4]
    assert m.slot_mapping("a", 0, 6) == [4, 5, 6, 7, 16, 17]
    assert m.slot_mapping("a", 3, 5) == [7, 16]
    assert m.slot_mapping("a", 6, 6) == []
    assert m.slot_mapping("b", 0, 5) == [8, 9, 10, 11, 12]
    for start, end in [(0, 7), (4, 3), (-1, 2), (0, 1.0)]:
        with pytest.raises(ValueError, match="start|end"):
            m.slot_mapping("a", start, end)


# ------------------------------------------------------------------ invariants / helper
def test_check_invariants_catches_corruption():
    def fresh():
        m = BlockManager(8, 4)
        m.allocate("a", 5)  # blocks 1, 2
        m.allocate("b", 4)  # block 3
        return m

    m = fresh()
    m._free.append(4)
    with pytest.raises(AssertionError, match="duplicate blocks \\[4\\]"):
        m.check_invariants()
    m = fresh()
    m._free.append(0)
    with pytest.raises(AssertionError, match="reserved or out-of-range blocks \\[0\\]"):
        m.check_invariants()
    m = fresh()
    m._free.append(1)
    with pytest.raises(AssertionError, match="block 1 is both free and owned by 'a'"):
        m.check_invariants()
    m = fresh()
    m._allocs["b"].blocks[0] = 2
    with pytest.raises(AssertionError, match="block 2 is owned by both 'a' and 'b'"):
        m.check_invariants()
    m = fresh()
    m._allocs["b"].blocks[0] = 0
    with pytest.raises(AssertionError, match="'b' holds reserved or out-of-range block 0"):
        m.check_invariants()
    m = fresh()
    m._allocs["a"].num_tokens = 9
    with pytest.raises(AssertionError, match="'a' holds 2 blocks for 9 tokens, expected 3"):
        m.check_invariants()
    m = fresh()
    m._free.popleft()
    with pytest.raises(AssertionError, match="leaked"):
        m.check_invariants()
    fresh().check_invariants()


def test_assert_all_free_names_held_requests():
    m = BlockManager(8, 4)
    assert_all_free(m)
    m.allocate("req-1", 5)
    m.allocate("req-2", 1)
    with pytest.raises(AssertionError, match=r"2 request\(s\).*'req-1' \(2 blocks\), 'req-2'"):
        assert_all_free(m)
    m.free("req-1")
    with pytest.raises(AssertionError, match="'req-2'"):
        assert_all_free(m)
    m.free("req-2")
    assert_all_free(m)
    m._free.popleft()  # a leak with no owner is caught too
    with pytest.raises(AssertionError, match="leaked"):
        assert_all_free(m)


def test_block_manager_imports_no_jax():
    code = (
        "import sys, distserve_jax.scheduler.block_manager; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'numpy')); "
        "assert not bad, bad"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


# ----------------------------------------------------------------------- state machine
class BlockManagerMachine(RuleBasedStateMachine):
    """Random operation sequences checked against a model ``{request_id: num_tokens}``."""

    def __init__(self):
        super().__init__()
        self.m: BlockManager | None = None
        self.model: dict[str, int] = {}
        self.freed: set[str] = set()
        self.next_id = 0

    @initialize(
        num_blocks=st.integers(2, 12),
        block_size=st.sampled_from([1, 2, 3, 4, 16]),
        reserved=st.integers(0, 2),
    )
    def setup(self, num_blocks, block_size, reserved):
        reserved = min(reserved, num_blocks - 1)
        self.m = BlockManager(num_blocks, block_size, reserved_blocks=reserved)

    def _tokens(self):
        # Up to a bit over the whole cache, so "too large" is exercised as well.
        return st.integers(1, (self.m.num_total + 2) * self.m.block_size)

    def _expected_used(self) -> int:
        return sum(self.m.blocks_needed(n) for n in self.model.values())

    def _check_unchanged_after(self, exc_type, fn, before):
        with pytest.raises(exc_type):
            fn()
        assert _snapshot(self.m) == before

    @rule(data=st.data())
    def allocate(self, data):
        n = data.draw(self._tokens(), label="num_tokens")
        rid = f"r{self.next_id}"
        self.next_id += 1
        need = self.m.blocks_needed(n)
        fits = self.m.can_fit(n)
        assert fits == (need <= self.m.num_total - self._expected_used())
        if fits:
            free_before = set(self.m._free)
            blocks = self.m.allocate(rid, n)
            assert len(blocks) == need and set(blocks) <= free_before
            self.model[rid] = n
        else:
            exc = RequestTooLargeError if need > self.m.num_total else KVCacheFullError
            self._check_unchanged_after(exc, lambda: self.m.allocate(rid, n), _snapshot(self.m))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def allocate_existing(self, data):
        rid = data.draw(st.sampled_from(sorted(self.model)), label="request_id")
        self._check_unchanged_after(
            ValueError, lambda: self.m.allocate(rid, 1), _snapshot(self.m)
        )

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def append(self, data):
        rid = data.draw(st.sampled_from(sorted(self.model)), label="request_id")
        n = data.draw(st.integers(1, self.m.block_size * 3), label="num_new_tokens")
        old_table = self.m.block_table(rid)
        need = self.m.blocks_needed(self.model[rid] + n)
        extra = need - len(old_table)
        fits = self.m.can_fit(n, rid)
        assert fits == (extra <= self.m.num_total - self._expected_used())
        if fits:
            free_before = set(self.m._free)
            new = self.m.append_slots(rid, n)
            assert len(new) == extra and set(new) <= free_before
            assert self.m.block_table(rid) == old_table + new
            self.model[rid] += n
        else:
            exc = RequestTooLargeError if need > self.m.num_total else KVCacheFullError
            self._check_unchanged_after(exc, lambda: self.m.append_slots(rid, n), _snapshot(self.m))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.model)), label="request_id")
        table = self.m.block_table(rid)
        free_before = self.m.num_free
        assert self.m.free(rid) == len(table) == self.m.blocks_needed(self.model.pop(rid))
        assert self.m.num_free == free_before + len(table)
        assert set(table) <= set(self.m._free)
        self.freed.add(rid)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def double_free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.freed)), label="request_id")
        self._check_unchanged_after(KeyError, lambda: self.m.free(rid), _snapshot(self.m))

    @rule()
    def free_all(self):
        for rid in list(self.model):
            self.m.free(rid)
            self.freed.add(rid)
        self.model.clear()
        assert_all_free(self.m)

    @invariant()
    def consistent(self):
        if self.m is None:
            return
        m = self.m
        m.check_invariants()
        assert m.num_free + m.num_used == m.num_total
        assert m.num_used == self._expected_used()
        assert 0 <= m.num_free <= m.num_total
        assert sorted(m.request_ids()) == sorted(self.model)
        for rid in self.freed - set(self.model):
            assert not m.has(rid)
        seen: set[int] = set()
        bs = m.block_size
        for rid, n in self.model.items():
            assert m.has(rid) and m.num_tokens(rid) == n
            table = m.block_table(rid)
            slots = m.slot_mapping(rid, 0, n)
            assert len(slots) == n
            assert slots == [table[p // bs] * bs + p % bs for p in range(n)]
            # No slot lands in a reserved block, and no two requests share a slot.
            assert all(s // bs >= m.reserved_blocks for s in slots)
            assert seen.isdisjoint(slots)
            seen.update(slots)
            if n > 1:  # a sub-range is the matching slice of the full mapping
                assert m.slot_mapping(rid, 1, n - 1) == slots[1 : n - 1]


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
