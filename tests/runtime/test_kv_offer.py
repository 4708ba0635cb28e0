"""KV packing for cross-process pulls: pieces along the block axis, reassembled across tp/pp layouts.

The transfer itself needs two processes (tests/engine/test_ray_executor.py covers it end to end);
here the packed single-device leaves are handed to the receiver directly, as a pull delivers them,
so the cut into pieces, the reassembly and the scatter are checked bitwise in one process.
"""

import jax
import numpy as np
import pytest

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.runtime.kv_offer import KVPacker, KVUnpacker, block_pieces
from distserve_jax.runtime.model_runner import ModelRunner, RunnerConfig
from distserve_jax.runtime.sharding import make_mesh


def _runner(stage_devices, num_blocks=24):
    spec = resolve_model("demo")  # 4 layers, 4 kv heads
    return ModelRunner(spec.config, [make_mesh(list(d)) for d in stage_devices], spec.weights,
                       RunnerConfig(max_model_len=256, num_blocks=num_blocks, max_num_seqs=4))


def _fill_random(runner, seed):
    rng = np.random.default_rng(seed)
    for st in runner.stages:
        st.pages = [tuple(jax.device_put(rng.standard_normal(x.shape).astype(np.float32), x.sharding) for x in kv)
                    for kv in st.pages]


def _layers(runner):
    """[(k, v)] per layer as numpy `[H, P, PS, D]`, over every stage."""
    return [tuple(np.asarray(x) for x in kv) for st in runner.stages for kv in st.pages]


def test_block_pieces():
    assert block_pieces(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert block_pieces(8, 0) == [(0, 8)] == block_pieces(8, 8) == block_pieces(8, 20)
    assert block_pieces(1, 1) == [(0, 1)]


@pytest.fixture(scope="module")
def sender_receiver():
    devs = jax.devices()
    sender = _runner([devs[0:2]])  # tp=2
    receiver = _runner([devs[2:3], devs[3:4]])  # pp=2
    _fill_random(sender, 1)
    _fill_random(receiver, 2)
    return sender, receiver


@pytest.mark.parametrize("piece_blocks", [3, 0], ids=["3-block pieces", "one piece"])
def test_pieces_land_bitwise_across_layouts(sender_receiver, piece_blocks):
    sender, receiver = sender_receiver
    block_bytes = 2 * 4 * 2 * 16 * sender.cfg.head_dim * 4  # K+V, 4 layers, 2 heads per shard, float32
    packer = KVPacker(sender, piece_bytes=block_bytes * piece_blocks if piece_blocks else 1 << 40)
    src, dst = [5, 3, 9, 11, 2], [7, 1, 4, 12, 6]
    leaves, layout = packer.pack(src)
    assert layout.num_blocks == 8  # 5 blocks round up to the next bucket
    pieces = 3 if piece_blocks else 1
    assert len(layout.pieces) == pieces and len(leaves) == 2 * pieces == len(layout.leaf_shapes)
    assert [tuple(x.shape) for x in leaves] == layout.leaf_shapes
    unpacker = KVUnpacker(receiver)
    before = _layers(receiver)
    pulled = [jax.device_put(x, unpacker.device) for x in leaves]  # what a pull delivers
    jax.block_until_ready(unpacker.scatter(pulled, layout, dst))
    after, want = _layers(receiver), _layers(sender)
    untouched = [b for b in range(receiver.num_blocks) if b not in dst and b != 0]  # padding writes page 0
    for layer, ((k, v), (k0, v0), (ks, vs)) in enumerate(zip(after, before, want)):
        for got, old, ref in ((k, k0, ks), (v, v0, vs)):
            np.testing.assert_array_equal(got[:, dst], ref[:, src], err_msg=f"layer {layer}")  # copies: exact
            np.testing.assert_array_equal(got[:, untouched], old[:, untouched], err_msg=f"layer {layer}")
    with pytest.raises(ValueError, match="pulled leaves"):
        unpacker.scatter(pulled[:-1], layout, dst)
