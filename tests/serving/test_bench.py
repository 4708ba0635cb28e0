"""The load generator against the shared server: gRPC and HTTP targets, a two-rate sweep, JSON and plot."""

import asyncio
import json

import pytest

from distserve_jax.metrics import SLO
from distserve_jax.workloads import load_workload
from serving import bench
from tests.serving.conftest import wait_all_free


@pytest.mark.parametrize("target", ["grpc", "http"])
def test_sweep_records_every_token(server, target, tmp_path):
    base = load_workload("fixed", 4, max_model_len=64, vocab_size=512, seed=1, prompt_len=6, output_len=5)
    address = server.address if target == "grpc" else server.http
    result = asyncio.run(bench.run_sweep(base, [50.0, 100.0], target=target, address=address, model="tiny-llama",
                                         slo=SLO(1000.0, 1000.0), progress=False))
    assert [run["rate"] for run in result["runs"]] == [50.0, 100.0]
    for run in result["runs"]:
        s = run["summary"]
        assert s["num_requests"] == 4 and s["num_completed"] == 4 and s["output_tokens"] == 20
        assert s["slo"]["slo"]["attainment"] == 1.0 and s["ttft_s"]["p50"] > 0 and s["tpot_s"]["count"] == 4
        assert all(len(r["itl_s"]) == 4 and r["finish_reason"] == "length" for r in run["requests"])
    assert result["goodput_rate"] == 100.0
    result["label"] = target
    path = tmp_path / "results.json"
    path.write_text(json.dumps(result))
    png = tmp_path / "plot.png"
    bench.plot_attainment([json.loads(path.read_text())], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert target in bench.format_table([result])
    wait_all_free(server.address)


def test_failed_requests_count_against_attainment(server):
    from distserve_jax.workloads import WorkloadRequest
    bad = [WorkloadRequest(prompt=None, prompt_token_ids=[1, 99999], prompt_len=2, max_tokens=2)]
    records, _ = asyncio.run(bench.run_at_rate(bad, target="grpc", address=server.address, model="tiny-llama",
                                               progress=False))
    assert records[0].finish_reason == "error:INVALID_ARGUMENT" and not records[0].completed
    assert bench.sweep_goodput([(1.0, 0.95), (2.0, 0.5), (4.0, 0.0)], 0.9) == 1.0
