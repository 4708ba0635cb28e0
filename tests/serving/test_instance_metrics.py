"""Per-instance Prometheus metrics come from the workers' own reports: step-time histogram, busy
fraction and liveness, for every worker of a disaggregated engine."""

from distserve_jax import LLM, SamplingParams
from distserve_jax.engine.placement import InstanceSpec, Placement
from distserve_jax.planner.online import MonitoredCore
from serving.prometheus_metrics import ServingMetrics


def _sample(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") and line.split("{", 1)[1].split("}", 1)[0] == want:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{want}}} in the exposition")


def test_step_time_histograms_per_instance(hf_checkpoint):
    llm = LLM(str(hf_checkpoint("llama3")), placement=Placement((InstanceSpec(),), (InstanceSpec(),)),
              max_model_len=64, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=64)
    llm.generate(prompt_token_ids=[[5, 6, 7], [8, 9]], sampling_params=SamplingParams(max_tokens=6, ignore_eos=True),
                 use_tqdm=False)
    llm.engine.quiesce()
    info = llm.engine.info()
    metrics = ServingMetrics()
    metrics.update_instances(info)
    text = metrics.exposition()[0].decode()
    for inst in info["instances"]:
        labels = {"instance": inst["name"], "role": inst["role"]}
        assert inst["num_steps"] > 0
        assert _sample(text, "distserve_instance_step_seconds_count", **labels) == inst["num_steps"]
        assert _sample(text, "distserve_instance_step_seconds_bucket", le="+Inf", **labels) == inst["num_steps"]
        assert abs(_sample(text, "distserve_instance_step_seconds_sum", **labels) - inst["step_time_sum"]) < 1e-9
        assert 0 < _sample(text, "distserve_instance_busy_fraction", **labels) <= 1
        assert _sample(text, "distserve_instance_alive", **labels) == 1
    # The controller's workload monitor, as the server's core reports it: 2 arrivals, prompts of 3
    # and 2 tokens, 6 output tokens each.
    w = MonitoredCore(llm.engine).info()["workload"]
    assert (w["num_arrivals"], w["num_completions"], w["prompt_len_mean"], w["output_len_mean"]) == (2, 2, 2.5, 6.0)
    metrics.update_instances({**info, "workload": w})
    text = metrics.exposition()[0].decode()
    assert _sample(text, "distserve_workload_tokens", length="prompt", stat="mean") == 2.5
    assert _sample(text, "distserve_workload_tokens", length="output", stat="p50") == 6.0
    assert _sample(text, "distserve_workload_window_requests", kind="arrivals") == 2
    llm.engine.shutdown()


def test_placement_change_in_server_info_and_prometheus(hf_checkpoint):
    """A live change 2P+1D -> 1P+1D through AsyncEngine: GetServerInfo and Prometheus show the
    change, the placement served and only the instances left."""
    import asyncio
    import json
    import time

    from distserve_jax.engine.async_engine import AsyncEngine
    from distserve_jax.engine.factory import build_core
    from serving.frontend import Frontend, ServedModel
    from serving.grpc_service import DistServeServicer
    from serving.proto import distserve_pb2 as pb

    core = build_core(str(hf_checkpoint("llama3")), placement=Placement((InstanceSpec(), InstanceSpec()),
                                                                        (InstanceSpec(),)),
                      max_model_len=64, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=64)
    engine = AsyncEngine(core)
    metrics = ServingMetrics()
    fe = Frontend(ServedModel("m", "m", "disaggregated", placement="startup"), metrics)
    fe.set_engine(engine, core.info())
    servicer = DistServeServicer(fe)

    async def scenario():
        before = await servicer.GetServerInfo(pb.ServerInfoRequest(), None)
        text = metrics.exposition()[0].decode()
        assert _sample(text, "distserve_placement_info", placement="2xP(tp1)+D(tp1)") == 1
        assert not before.HasField("placement_change") and before.placement == "startup"
        change = await engine.apply_placement(Placement((InstanceSpec(),), (InstanceSpec(),)))
        assert change.removed == ("prefill-1",)
        deadline = time.monotonic() + 60
        while (await fe.info())["placement_change"]["state"] != "done":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        return await servicer.GetServerInfo(pb.ServerInfoRequest(), None)

    try:
        after = asyncio.run(scenario())
        c = after.placement_change
        assert (c.state, list(c.removed), list(c.added), c.target) == ("done", ["prefill-1"], [], "P(tp1)+D(tp1)")
        assert c.finished_at >= c.started_at > 0 and after.num_placement_changes == 1
        assert [i.name for i in after.instances] == ["prefill-0", "decode-0"]
        assert json.loads(after.placement) == {"prefill": [{"tp": 1, "pp": 1, "devices": [0]}],
                                               "decode": [{"tp": 1, "pp": 1, "devices": [2]}]}
        text = metrics.exposition()[0].decode()
        assert _sample(text, "distserve_placement_info", placement="P(tp1)+D(tp1)") == 1
        assert 'placement="2xP(tp1)+D(tp1)"' not in text
        assert _sample(text, "distserve_placement_changes_total", state="done") == 1
        assert _sample(text, "distserve_placement_changes_total", state="failed") == 0
        assert "distserve_placement_change_in_progress 0.0" in text
        assert 'instance="prefill-1"' not in text  # its per-instance metrics went with it
        assert _sample(text, "distserve_instance_alive", instance="prefill-0", role="prefill") == 1
    finally:
        engine.shutdown()
