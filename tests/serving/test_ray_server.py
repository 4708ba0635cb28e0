"""The server with `--executor=ray`: joining a Ray cluster of several nodes (`--ray_address`), the
prefill and decode instances land on different nodes and serve the offline engine's tokens with the
KV crossing between node processes; SIGTERM stops every actor it started."""

import os
import time

import pytest

from distserve_jax import LLM, SamplingParams
from serving.client import Client
from tests.conftest import _ray_processes
from tests.serving.conftest import ServerProcess

KW = dict(max_model_len=64, num_blocks=32, max_num_seqs=4, max_num_batched_tokens=64)


def _actor_processes() -> set[int]:
    pids = set()
    for pid in _ray_processes():
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"WorkerProcess" in cmd:
            pids.add(pid)
    return pids


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on loopback
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def test_server_on_a_ray_cluster_spreads_instances_over_nodes(cluster, tiny_model, tmp_path):
    placement = tmp_path / "p1d1.yaml"
    placement.write_text("prefill:\n  - {tp: 1}\ndecode:\n  - {tp: 1}\n")
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 50))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ref = LLM(tiny_model, **KW)
    expected = ref.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    ref.engine.shutdown()
    extra = ["--executor=ray", f"--ray_address={cluster.address}", f"--placement={placement}", "--nowarmup",
             "--drain_timeout_s=2"] + [f"--{k}={v}" for k, v in KW.items()]
    server = ServerProcess(tiny_model, extra=extra, log_path=tmp_path / "server.log")
    try:
        server.wait_serving(timeout=300)
        with Client(server.address) as c:
            info = c.server_info()
            nodes = {i.role: i.node for i in info.instances}
            assert set(nodes) == {"prefill", "decode"} and nodes["prefill"] != nodes["decode"], info
            assert all(i.pid and i.pid != server.proc.pid for i in info.instances)
            for p, e in zip(prompts, expected):
                got = c.generate(prompt_token_ids=p, sampling={"temperature": 0.0, "max_tokens": 8,
                                                               "ignore_eos": True})
                assert list(got.token_ids) == e.token_ids
        assert _actor_processes(), "no actor process was running"
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log()
    deadline = time.monotonic() + 20
    while _actor_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _actor_processes(), "the server left actor processes on the cluster"


def test_server_with_its_own_ray_stops_it_on_sigterm(tiny_model, tmp_path):
    """No --ray_address: the server starts a local Ray on loopback, pins one core per instance, and
    SIGTERM leaves no Ray process behind."""
    before = _ray_processes()
    extra = ["--executor=ray", "--mode=colocated", "--replicas=2", "--nowarmup", "--drain_timeout_s=2"]
    extra += [f"--{k}={v}" for k, v in KW.items()]
    server = ServerProcess(tiny_model, extra=extra, log_path=tmp_path / "server.log")
    try:
        server.wait_serving(timeout=300)
        with Client(server.address) as c:
            info = c.server_info()
            assert sorted(tuple(i.cores) for i in info.instances) == [(0,), (1,)], info
            got = c.generate(prompt_token_ids=[5, 6, 7], sampling={"temperature": 0.0, "max_tokens": 4,
                                                                   "ignore_eos": True})
            assert len(got.token_ids) == 4
        assert _ray_processes() - before, "the server started no Ray process"
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log()
    deadline = time.monotonic() + 20
    while (_ray_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not (_ray_processes() - before), f"left behind: {sorted(_ray_processes() - before)}"
