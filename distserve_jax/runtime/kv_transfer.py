"""Pull-based KV migration between two instances' paged caches (in one process).

A pull gathers the request's blocks on every source pipeline stage (`dispatch.gather_pages`, per
kv-head shard), converts kv heads between
the two instances' tp layouts (each checkpoint kv head is replicated `tp / kv_heads` times when
tp exceeds the kv heads, so the replication factor can differ between instances), moves the
layers with one batched `jax.device_put` per destination stage (resharding over the destination's
`tp` axis), and scatters it into the destination pages (`dispatch.scatter_pages`,
donated: in place). On CPU in float32 both ends are the native kernels' one memcpy per page.
All of it is dispatched asynchronously; `Transfer.wait()` blocks until it has landed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from distserve_jax.runtime.buckets import geometric_buckets, round_up
from distserve_jax.runtime.model_runner import ModelRunner
from distserve_jax.runtime.sharding import TP, replicated
from pallas_kernels import dispatch


@dataclasses.dataclass
class Transfer:
    """An in-flight migration: completion markers (one per destination stage) and the bytes it moved."""

    arrays: list[Any]
    num_bytes: int

    def wait(self) -> None:
        jax.block_until_ready(self.arrays)

    def ready(self) -> bool:
        """Whether `wait` would return at once."""
        return all(a.is_ready() for a in self.arrays)


class KVMigrator:
    """Moves blocks from `src`'s cache into `dst`'s cache, layer by layer."""

    def __init__(self, src: ModelRunner, dst: ModelRunner):
        if src.config.block_size != dst.config.block_size:
            raise ValueError("KV migration needs the same block size on both instances")
        if src.cfg.num_layers != dst.cfg.num_layers or src.cfg.head_dim != dst.cfg.head_dim:
            raise ValueError("KV migration between different models")
        self.src, self.dst = src, dst
        # Destination kv head j holds checkpoint head j // r_dst = source head (j // r_dst) * r_src.
        r_src, r_dst = src.cfg.kv_replication, dst.cfg.kv_replication
        self.head_index = np.array([(j // r_dst) * r_src for j in range(dst.cfg.num_kv_heads)], np.int32)
        self.identity_heads = bool(np.array_equal(self.head_index, np.arange(src.cfg.num_kv_heads)))
        self.layer_src = self._layer_map(src)
        self.layer_dst = self._layer_map(dst)
        self.buckets = geometric_buckets(1, max(src.config.max_blocks_per_seq, dst.config.max_blocks_per_seq))
        self._gathers = [self._make_gather(i) for i in range(len(src.stages))]
        self._scatters = [self._make_scatter(st.mesh) for st in dst.stages]
        # Compiled by `warmup`, by (stage, block-count bucket); a pull of a bucket not compiled goes through jit.
        self._gather_exes: dict[tuple[int, int], Any] = {}
        self._scatter_exes: dict[tuple[int, int], Any] = {}
        itemsize = jnp.dtype(dst.config.dtype).itemsize
        self.block_bytes = (2 * dst.cfg.num_kv_heads * dst.config.block_size * dst.cfg.head_dim * itemsize)

    @staticmethod
    def _layer_map(runner: ModelRunner) -> list[tuple[int, int]]:
        out = []
        for s, st in enumerate(runner.stages):
            out += [(s, i) for i in range(len(st.pages))]
        return out

    def _make_gather(self, stage: int):
        mesh = self.src.stages[stage].mesh
        heads = len(self.head_index)
        spec = P(TP) if heads % mesh.shape[TP] == 0 else P()
        out_sharding = NamedSharding(mesh, spec)
        head_index = None if self.identity_heads else jnp.asarray(self.head_index)
        take = jax.shard_map(functools.partial(dispatch.gather_pages, backend=self.src.config.attention_backend),
                             mesh=mesh, in_specs=(P(TP), P()), out_specs=P(TP), check_vma=False)

        def gather(pages, block_ids):
            out = []
            for k, v in pages:
                k, v = take(k, block_ids), take(v, block_ids)
                if head_index is not None:
                    k, v = k[head_index], v[head_index]
                out.append((k, v))
            return tuple(out)

        n_layers = len(self.src.stages[stage].pages)
        return jax.jit(gather, out_shardings=tuple((out_sharding, out_sharding) for _ in range(n_layers)))

    def _make_scatter(self, mesh):
        put = jax.shard_map(functools.partial(dispatch.scatter_pages, backend=self.dst.config.attention_backend),
                            mesh=mesh, in_specs=(P(TP), P(TP), P()), out_specs=P(TP), check_vma=False)

        def scatter(pages, kvs, block_ids):
            """Writes gathered K/V into `block_ids`; the scalar second output is ready when the write is done."""
            new = tuple((put(k, nk.astype(k.dtype), block_ids), put(v, nv.astype(v.dtype), block_ids))
                        for (k, v), (nk, nv) in zip(pages, kvs))
            return new, jnp.sum(block_ids)

        return jax.jit(scatter, donate_argnums=(0,))

    def warmup(self) -> int:
        """Compiles the pull's gathers and scatters for every block-count bucket, without running
        them or touching either cache (so it needs neither instance's pages lock, and can compile
        while the instances compile their steps). A pull of a compiled bucket then calls these
        executables (no tracing, no jit dispatch). Returns the number of buckets."""
        for n in self.buckets:
            out_specs: list[Any] = []
            for i, st in enumerate(self.src.stages):
                pages = st.page_specs  # (never the pages themselves: a step may be swapping them)
                ids = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=replicated(st.mesh))
                self._gather_exes[i, n] = self._gathers[i].lower(pages, ids).compile()
                out_specs += list(jax.eval_shape(self._gathers[i], pages, ids))
            per_dst: list[list[Any]] = [[] for _ in self.dst.stages]
            for layer, kv in enumerate(out_specs):
                per_dst[self.layer_dst[layer][0]].append(kv)
            for s, st in enumerate(self.dst.stages):
                into = NamedSharding(st.mesh, P(TP))  # what `pull`'s batched device_put hands the scatter
                kvs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=into), tuple(per_dst[s]))
                ids = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=replicated(st.mesh))
                self._scatter_exes[s, n] = self._scatters[s].lower(st.page_specs, kvs, ids).compile()
        return len(self.buckets)

    def pull(self, src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> Transfer:
        """Copies blocks `src_blocks` of the source cache into `dst_blocks` of the destination cache."""
        if len(src_blocks) != len(dst_blocks):
            raise ValueError(f"pull of {len(src_blocks)} source blocks into {len(dst_blocks)} destination blocks")
        n = round_up(len(src_blocks), self.buckets)
        src_ids = np.zeros(n, np.int32)
        dst_ids = np.zeros(n, np.int32)  # padding reads and writes the null page 0
        src_ids[:len(src_blocks)] = src_blocks
        dst_ids[:len(dst_blocks)] = dst_blocks
        gathered: list[Any] = []
        for i, st in enumerate(self.src.stages):
            gather = self._gather_exes.get((i, n), self._gathers[i])
            gathered += list(gather(st.pages, jax.device_put(src_ids, replicated(st.mesh))))
        per_dst: list[list[Any]] = [[] for _ in self.dst.stages]
        for layer, kv in enumerate(gathered):
            per_dst[self.layer_dst[layer][0]].append(kv)
        markers = []
        for s, st in enumerate(self.dst.stages):
            # One batched device_put per destination stage (not one per array: at a few MiB the
            # per-call cost is most of a pull).
            kvs = jax.device_put(tuple(per_dst[s]), NamedSharding(st.mesh, P(TP)))
            ids = jax.device_put(dst_ids, replicated(st.mesh))
            st.pages, marker = self._scatter_exes.get((s, n), self._scatters[s])(st.pages, kvs, ids)
            markers.append(marker)
        return Transfer(markers, len(src_blocks) * self.block_bytes * len(gathered))

