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
