"""Cross-process KV pull (benchmark CLI): `kv_offer` between two processes vs a raw TCP loopback copy.

Two spawned processes, each pinned to its own core before JAX is imported (the sender to the first
core of the affinity, the receiver to the second), each with one CPU device. For every size in
`--sizes_mib`, the sender makes a KV-shaped float32 array `[2, layers, heads, blocks, 16, 64]` of
that size and offers it through its `KVOfferServer` under a fresh id per repeat; the receiver pulls
it as single-device arrays (`KVUnpacker.pull`'s path; cut into pieces of `--piece_mib` along the
blocks axis and over `--channels` transport sockets, as the engine offers KV) and waits for it with the watchdog. Then the
same bytes go over a plain TCP socket on 127.0.0.1 (sendall into recv_into a preallocated buffer):
the physical ceiling of a loopback copy on this machine. Sizes alternate between the two methods
repeat by repeat, so both see the same background load. It prints the median time and GB/s of each
and the ratio (target: pull >= 0.7x TCP for 64 MiB and more).

Example:
  python -m benchmarks.kv_transfer_processes --sizes_mib=1,16,64,256 --repeats=5
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import platform
import socket
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes_mib", ["1", "16", "64", "256"], "Payload sizes (MiB; fractions allowed).")
flags.DEFINE_integer("repeats", 5, "Timed repeats per size and method (after one warm-up).")
flags.DEFINE_integer("transfer_size_mib", 4, "The transfer servers' chunk size (KVOfferServer transfer_size).")
flags.DEFINE_integer("channels", 2, "Bulk transport sockets per transfer server (the engine's: kv_offer.CHANNELS).")
flags.DEFINE_integer("piece_mib", 16, "Cut each payload along its blocks axis into leaves of at most this size, as "
                     "KVPacker does (the engine's: kv_offer.PIECE_BYTES); 0: one leaf.")


def _pieces(shape: tuple[int, ...], piece_mib: int) -> list[tuple[int, int]]:
    """(start, stop) block ranges of the leaves a payload is offered as (`kv_offer.block_pieces`)."""
    from distserve_jax.runtime.kv_offer import block_pieces

    per_block = 4 * math.prod(shape) // shape[3]
    return block_pieces(shape[3], max(1, (piece_mib << 20) // per_block) if piece_mib > 0 else 0)


def _shape(mib: float) -> tuple[int, ...]:
    per_block = 2 * 16 * 64 * 4  # K and V, 16 tokens, head_dim 64, float32, per head and layer
    blocks = max(1, int(mib * 2**20) // (per_block * 8 * 4))  # 8 layers x 4 heads
    return (2, 8, 4, blocks, 16, 64)


def _pin(core: int) -> None:
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:
            pass


def _sender(core: int, conn, sizes: list[float], repeats: int, server_kw: dict) -> None:
    _pin(core)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax.numpy as jnp
    import numpy as np

    from distserve_jax.runtime.kv_offer import KVLayout, KVOfferServer

    srv = KVOfferServer("127.0.0.1", **{k: v for k, v in server_kw.items() if k != "piece_mib"})
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    conn.send((srv.address, lsock.getsockname()[1]))
    tcp, _ = lsock.accept()
    for mib in sizes:
        shape = _shape(mib)
        arr = jnp.asarray(np.random.default_rng(int(mib * 1024)).standard_normal(shape, np.float32))
        raw = np.asarray(arr).tobytes()
        pieces = _pieces(shape, server_kw["piece_mib"])
        layout = KVLayout(shape[3], 16, 64, "float32", shape[2], 1, ((shape[1], 1),),
                          pieces[0][1] if len(pieces) > 1 else 0)
        leaves = [arr[:, :, :, a:b] for a, b in pieces]
        for _ in range(repeats + 1):
            offer = srv.offer(leaves, layout, shape[3])
            conn.send(offer)
            conn.recv()  # pulled
            srv.release(offer.uuid)
            conn.recv()  # ready for the TCP copy
            tcp.sendall(raw)
            conn.recv()  # received
    tcp.close()
    srv.close()


def _receiver(core: int, conn, out, sizes: list[float], repeats: int, server_kw: dict) -> None:
    _pin(core)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import SingleDeviceSharding

    from distserve_jax.runtime.kv_offer import KVOfferServer, PendingPull

    piece_mib = server_kw.pop("piece_mib")
    srv = KVOfferServer("127.0.0.1", **server_kw)
    address, port = conn.recv()
    tcp = socket.create_connection(("127.0.0.1", port))
    pull_conn = srv.connect(address)
    results = {}
    for mib in sizes:
        shape = _shape(mib)
        nbytes = int(np.prod(shape)) * 4
        buf = bytearray(nbytes)
        view = memoryview(buf)
        pulls, copies, ok = [], [], True
        for i in range(repeats + 1):
            offer = conn.recv()
            specs = [jax.ShapeDtypeStruct(shape[:3] + (b - a,) + shape[4:], jnp.float32,
                                          sharding=SingleDeviceSharding(jax.devices()[0]))
                     for a, b in _pieces(shape, piece_mib)]
            t = time.perf_counter()
            pending = PendingPull(list(pull_conn.pull(offer.uuid, specs)), offer, time.monotonic())
            pending.wait(60.0)
            dt = time.perf_counter() - t
            if i == 0:
                expect = np.random.default_rng(int(mib * 1024)).standard_normal(shape, np.float32)
                got_all = np.concatenate([np.asarray(x) for x in pending.leaves], axis=3)
                ok = bool(np.array_equal(got_all, expect))
            conn.send("pulled")
            conn.send("ready")
            t = time.perf_counter()
            got = 0
            while got < nbytes:
                got += tcp.recv_into(view[got:], nbytes - got)
            dt_tcp = time.perf_counter() - t
            conn.send("received")
            if i:  # the first of each is a warm-up
                pulls.append(dt)
                copies.append(dt_tcp)
        results[mib] = (nbytes, statistics.median(pulls), statistics.median(copies), ok)
    out.send(results)
    tcp.close()
    srv.close()


def main(argv):
    del argv
    sizes = [float(x) for x in FLAGS.sizes_mib]
    cores = sorted(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")
    s_end, r_end = ctx.Pipe()  # sender <-> receiver
    res_parent, res_child = ctx.Pipe()
    kw = {"transfer_size": FLAGS.transfer_size_mib << 20, "channels": FLAGS.channels, "piece_mib": FLAGS.piece_mib}
    snd = ctx.Process(target=_sender, args=(cores[0], s_end, sizes, FLAGS.repeats, kw))
    rcv = ctx.Process(target=_receiver, args=(cores[-1], r_end, res_child, sizes, FLAGS.repeats, kw))
    snd.start()
    rcv.start()
    try:
        results = res_parent.recv()
    finally:
        snd.join(60)
        rcv.join(60)
        for p in (snd, rcv):
            if p.is_alive():
                p.kill()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, cores {cores}; sender pinned to core {cores[0]}, receiver to core {cores[-1]}; "
          f"median of {FLAGS.repeats} after one warm-up; transfer_size {FLAGS.transfer_size_mib} MiB, "
          f"{FLAGS.channels} transport socket(s), " + (f"pieces of <= {FLAGS.piece_mib} MiB" if FLAGS.piece_mib else "one leaf"))
    print(f"{'MiB':>6} {'pull ms':>9} {'pull GB/s':>10} {'TCP ms':>8} {'TCP GB/s':>9} {'pull/TCP':>9}  bitwise")
    for mib in sizes:
        nbytes, pull, tcp, ok = results[mib]
        print(f"{nbytes / 2**20:6.2f} {pull * 1e3:9.1f} {nbytes / pull / 1e9:10.2f} {tcp * 1e3:8.1f} "
              f"{nbytes / tcp / 1e9:9.2f} {tcp / pull:9.2f}  {'ok' if ok else 'WRONG'}")


if __name__ == "__main__":
    app.run(main)
