"""KV pulls between processes (and hosts) with `jax.experimental.transfer`.

The prefill process packs a request's KV into one array per pipeline stage, `[2, layers, kv_heads,
n, block_size, head_dim]` (K and V stacked, `n` the block count rounded up to a bucket), gathered
from its pages in its own layout, and offers each array's per-device shards (single-device
arrays), cut along the block axis into pieces of about `PIECE_BYTES`, to its transfer server under
a fresh id. Several pieces over two transport sockets pull about 1.5-2x faster than one big leaf
over one socket on loopback (`benchmarks/kv_transfer_processes.py`). The decode process pulls those shards as
single-device arrays onto its first device, reassembles the heads and layers, converts kv heads
between the two tp layouts, and scatters the blocks into its own pages (donated: in place).

Pulling single-device shards, never into a sharded spec, avoids the transfer library's silent
trap: a pull into another PartitionSpec whose shard sizes match returns permuted data with no
error. Every offer is a fresh gather (never the donated pages themselves), each attempt a fresh
id, transport addresses are always given, and a pull is awaited with a watchdog (a pull from a
dead peer can hang), raising `KVPullError`. A tick thread touches the server four times a second
so the transfer library's lazy offer timeouts fire.

    KVOfferServer(client, ip)  # one per process
    packer = KVPacker(runner); leaves, layout = packer.pack(block_ids); offer = server.offer(leaves, layout)
    unpacker = KVUnpacker(runner); pending = unpacker.pull(server.connect(offer.address), offer)
    pending.wait(deadline_s); marker = unpacker.scatter(pending.leaves, offer.layout, dst_blocks)
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import math
import os
import threading
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from distserve_jax.runtime.buckets import geometric_buckets, round_up
from distserve_jax.runtime.model_runner import ModelRunner
from distserve_jax.runtime.sharding import TP, replicated
from pallas_kernels import dispatch

_TICK_UUID = 2**64 - 2
PIECE_BYTES = 16 << 20  # target size of one offered leaf
CHANNELS = 2  # bulk transport sockets per transfer server


def block_pieces(num_blocks: int, piece_blocks: int) -> list[tuple[int, int]]:
    """The `[start, stop)` block ranges a leaf of `num_blocks` blocks is cut into (one if `piece_blocks`
    is 0 or covers them all)."""
    if piece_blocks <= 0 or piece_blocks >= num_blocks:
        return [(0, num_blocks)]
    return [(a, min(a + piece_blocks, num_blocks)) for a in range(0, num_blocks, piece_blocks)]


class KVPullError(RuntimeError):
    """A pull failed or did not finish in time (the offering process died or is unreachable)."""


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """What a receiver needs to name and reassemble an offer's leaves (picklable, no arrays).

    Leaves come stage by stage, within a stage shard by shard in mesh order, and within a shard piece
    by piece (`block_pieces(num_blocks, piece_blocks)`); a piece is
    `[2, layers, kv_heads // tp, stop - start, block_size, head_dim]`.
    """

    num_blocks: int
    block_size: int
    head_dim: int
    dtype: str
    kv_heads: int  # kv heads the sender's cache holds (replicated when its tp exceeds the model's)
    kv_replication: int
    stages: tuple[tuple[int, int], ...]  # (layers, tp) per sender stage
    piece_blocks: int = 0  # blocks per offered piece (0: one piece per shard)

    @property
    def pieces(self) -> list[tuple[int, int]]:
        return block_pieces(self.num_blocks, self.piece_blocks)

    @property
    def leaf_shapes(self) -> list[tuple[int, ...]]:
        return [(2, layers, self.kv_heads // tp, b - a, self.block_size, self.head_dim)
                for layers, tp in self.stages for _ in range(tp) for a, b in self.pieces]

    @property
    def num_bytes(self) -> int:
        return sum(math.prod(s) for s in self.leaf_shapes) * jnp.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class KVOffer:
    address: str  # the offering process's transfer server
    uuid: int
    layout: KVLayout
    num_blocks: int  # the request's blocks (the rest of each leaf is padding)


class KVOfferServer:
    """This process's transfer server: offers, connections and the tick thread."""

    def __init__(self, ip: str = "127.0.0.1", *, transfer_size: int = 4 << 20, channels: int = CHANNELS):
        from jax.experimental import transfer

        if channels < 1:
            raise ValueError(f"a transfer server needs at least one transport socket, got channels={channels}")
        client = jax.devices()[0].client
        self._server = transfer.start_transfer_server(client, f"{ip}:0", [f"{ip}:0"] * channels,
                                                      transfer_size=transfer_size, use_raw_buffers=False)
        self.address = self._server.address()
        self._ids = itertools.count(int.from_bytes(os.urandom(6), "little") << 8)
        self._held: dict[int, list[jax.Array]] = {}
        self._conns: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._tiny = jnp.zeros((1,), jnp.float32)
        self._stop = threading.Event()
        self._tick = threading.Thread(target=self._ticker, name="kv-offer-tick", daemon=True)
        self._tick.start()

    def _ticker(self) -> None:
        while not self._stop.wait(0.25):
            self._server.await_pull(_TICK_UUID, self._tiny)  # each call drops expired offers and pulls

    def offer(self, leaves: list[jax.Array], layout: KVLayout, num_blocks: int, *, timeout_s: float = 120.0
              ) -> KVOffer:
        """Offers `leaves` under a fresh id; they stay held until `release` (the puller's ack)."""
        uuid = next(self._ids)
        deadline = datetime.datetime.fromtimestamp(math.ceil(time.time() + timeout_s))
        with self._lock:
            self._held[uuid] = leaves
        self._server.await_pull(uuid, leaves, timeout=deadline)
        return KVOffer(self.address, uuid, layout, num_blocks)

    def release(self, uuid: int) -> None:
        with self._lock:
            self._held.pop(uuid, None)

    @property
    def num_held(self) -> int:
        return len(self._held)

    def connect(self, address: str) -> Any:
        with self._lock:
            if address not in self._conns:
                self._conns[address] = self._server.connect(address)
            return self._conns[address]

    def forget(self, address: str) -> None:
        """Drops a cached connection (its peer died: new pulls on it would fail or hang)."""
        with self._lock:
            self._conns.pop(address, None)

    def close(self) -> None:
        self._stop.set()


class KVPacker:
    """Sender side: gathers a request's blocks into one stacked array per stage, in this layout."""

    def __init__(self, runner: ModelRunner, *, piece_bytes: int = PIECE_BYTES):
        self.runner = runner
        self.buckets = geometric_buckets(1, runner.config.max_blocks_per_seq)
        cfg, rc = runner.cfg, runner.config
        # Bytes of one block in the largest shard leaf: its pieces stay within `piece_bytes`.
        block_bytes = max(2 * len(st.pages) * (cfg.num_kv_heads // st.mesh.shape[TP]) for st in runner.stages) \
            * rc.block_size * cfg.head_dim * jnp.dtype(rc.dtype).itemsize
        self.piece_blocks = max(1, piece_bytes // block_bytes)
        self._gathers = [self._make_gather(st) for st in runner.stages]

    def _make_gather(self, st):
        mesh = st.mesh
        take = jax.shard_map(functools.partial(dispatch.gather_pages, backend=self.runner.config.attention_backend),
                             mesh=mesh, in_specs=(P(TP), P()), out_specs=P(TP), check_vma=False)

        def gather(pages, block_ids, pieces):
            out = []
            for a, b in pieces:  # each piece gathered straight from the pages: no copy of a whole leaf
                ks = [take(k, block_ids[a:b]) for k, _ in pages]
                vs = [take(v, block_ids[a:b]) for _, v in pages]
                out.append(jnp.stack([jnp.stack(ks), jnp.stack(vs)]))  # [2, L, H, b - a, PS, D]
            return tuple(out)

        return jax.jit(gather, static_argnums=(2,), out_shardings=NamedSharding(mesh, P(None, None, TP)))

    def pack(self, block_ids: Sequence[int]) -> tuple[list[jax.Array], KVLayout]:
        """Single-device leaves (stage by stage, shard by shard in mesh order, piece by piece) and
        their layout. Dispatches the gathers; call while no step swaps this runner's pages."""
        n = round_up(len(block_ids), self.buckets)
        ids = np.zeros(n, np.int32)  # padding reads the null page 0
        ids[:len(block_ids)] = block_ids
        pieces = tuple(block_pieces(n, self.piece_blocks))
        leaves = []
        stages = []
        for st, gather in zip(self.runner.stages, self._gathers):
            packed = gather(st.pages, jax.device_put(ids, replicated(st.mesh)), pieces)
            by_device = [{s.device: s.data for s in piece.addressable_shards} for piece in packed]
            leaves += [piece[d] for d in st.mesh.devices.flat for piece in by_device]
            stages.append((len(st.pages), st.mesh.shape[TP]))
        cfg, rc = self.runner.cfg, self.runner.config
        layout = KVLayout(n, rc.block_size, cfg.head_dim, str(jnp.dtype(rc.dtype)), cfg.num_kv_heads,
                          cfg.kv_replication, tuple(stages), self.piece_blocks if len(pieces) > 1 else 0)
        return leaves, layout


@dataclasses.dataclass
class PendingPull:
    leaves: list[jax.Array]
    offer: KVOffer
    started: float

    def ready(self, timeout_s: float) -> bool:
        """Whether `wait(timeout_s)` would return or raise at once (every leaf landed, or past the
        watchdog's deadline)."""
        return self._landed() or time.monotonic() > self.started + timeout_s

    def _landed(self) -> bool:
        return all(x.is_ready() for x in self.leaves)

    def wait(self, timeout_s: float) -> None:
        """Waits for every leaf with a watchdog; raises `KVPullError` on a transfer error or timeout."""
        deadline = self.started + timeout_s
        while not self._landed():
            if time.monotonic() > deadline:
                raise KVPullError(f"KV pull from {self.offer.address} did not finish within {timeout_s:.0f}s")
            time.sleep(0.001)
        try:
            jax.block_until_ready(self.leaves)
        except Exception as e:  # noqa: BLE001 - the transfer library raises JaxRuntimeError
            raise KVPullError(f"KV pull from {self.offer.address} failed: {e}") from e


class KVUnpacker:
    """Receiver side: pulls an offer's leaves and scatters them into this runner's pages."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.device = runner.stages[0].mesh.devices.flat[0]
        self._scatters = [self._make_scatter(st.mesh) for st in runner.stages]
        self._assemble = jax.jit(self._assemble_fn, static_argnums=(1, 2, 3, 4))
        self.layers = [len(st.pages) for st in runner.stages]

    def pull(self, conn: Any, offer: KVOffer) -> PendingPull:
        specs = [jax.ShapeDtypeStruct(shape, jnp.dtype(offer.layout.dtype), sharding=SingleDeviceSharding(self.device))
                 for shape in offer.layout.leaf_shapes]
        return PendingPull(list(conn.pull(offer.uuid, specs)), offer, time.monotonic())

    def head_index(self, layout: KVLayout) -> tuple[int, ...]:
        """Receiver kv head j holds checkpoint head j // r_dst = sender head (j // r_dst) * r_src."""
        r_dst = self.runner.cfg.kv_replication
        return tuple((j // r_dst) * layout.kv_replication for j in range(self.runner.cfg.num_kv_heads))

    @staticmethod
    def _assemble_fn(leaves, tps, head_index, splits, num_pieces=1):
        if num_pieces > 1:  # each shard's pieces back into one leaf along the block axis
            leaves = [jnp.concatenate(leaves[i:i + num_pieces], axis=3) for i in range(0, len(leaves), num_pieces)]
        stages, i = [], 0
        for tp in tps:
            stages.append(jnp.concatenate(leaves[i:i + tp], axis=2) if tp > 1 else leaves[i])
            i += tp
        kv = jnp.concatenate(stages, axis=1) if len(stages) > 1 else stages[0]  # [2, L, H_src, n, PS, D]
        if head_index != tuple(range(kv.shape[2])):
            kv = kv[:, :, jnp.asarray(head_index)]
        out, start = [], 0
        for n in splits:
            out.append(kv[:, start:start + n])
            start += n
        return tuple(out)

    def _make_scatter(self, mesh):
        put = jax.shard_map(functools.partial(dispatch.scatter_pages, backend=self.runner.config.attention_backend),
                            mesh=mesh, in_specs=(P(TP), P(TP), P()), out_specs=P(TP), check_vma=False)

        def scatter(pages, kv, block_ids):
            new = tuple((put(k, kv[0, i].astype(k.dtype), block_ids), put(v, kv[1, i].astype(v.dtype), block_ids))
                        for i, (k, v) in enumerate(pages))
            return new, jnp.sum(block_ids)

        return jax.jit(scatter, donate_argnums=(0,))

    def scatter(self, leaves: list[jax.Array], layout: KVLayout, dst_blocks: Sequence[int]) -> list[Any]:
        """Writes the pulled KV into `dst_blocks` of this runner's pages; returns completion markers.
        Call on the thread that owns the pages (it swaps in the donated ones)."""
        if len(dst_blocks) > layout.num_blocks:
            raise ValueError(f"{len(dst_blocks)} destination blocks for an offer of {layout.num_blocks}")
        if sum(layers for layers, _ in layout.stages) != sum(self.layers):
            raise ValueError("KV offer from a model with a different number of layers")
        if len(leaves) != len(layout.leaf_shapes):
            raise ValueError(f"{len(leaves)} pulled leaves for an offer of {len(layout.leaf_shapes)}")
        parts = self._assemble(tuple(leaves), tuple(tp for _, tp in layout.stages), self.head_index(layout),
                               tuple(self.layers), len(layout.pieces))
        ids = np.zeros(layout.num_blocks, np.int32)  # padding writes the null page 0
        ids[:len(dst_blocks)] = dst_blocks
        markers = []
        for st, scatter, kv in zip(self.runner.stages, self._scatters, parts):
            kv = jax.device_put(kv, NamedSharding(st.mesh, P(None, None, TP)))
            st.pages, marker = scatter(st.pages, kv, jax.device_put(ids, replicated(st.mesh)))
            markers.append(marker)
        return markers
