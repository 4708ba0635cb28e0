"""An engine that started its own Ray stops it on shutdown, and nothing it ran touches Ray after:
its event readers have ended, and a Ray call made after it fails instead of starting a new Ray
from whatever thread made it (Ray's auto-connect is off)."""

import pytest

from distserve_jax.engine.factory import build_core
from distserve_jax.engine.placement import InstanceSpec, Placement
from distserve_jax.sampling_params import SamplingParams


def test_shutdown_stops_its_ray_and_every_reader(hf_checkpoint):
    import ray

    if ray.is_initialized():
        pytest.fail("a Ray from another test is still running in this process")
    core = build_core(str(hf_checkpoint("llama3")), placement=Placement((InstanceSpec(),), (InstanceSpec(),)),
                      executor="ray", max_model_len=64, num_blocks=16, max_num_seqs=2, max_num_batched_tokens=64)
    try:
        assert core.executor.owns_ray and ray.is_initialized()
        core.add_request("a", prompt_token_ids=[5, 6, 7], params=SamplingParams(temperature=0.0, max_tokens=3,
                                                                                   ignore_eos=True))
        outs = []
        while core.has_unfinished_requests():
            outs += [o for o in core.step() if o.finished]
        assert [len(o.token_ids) for o in outs] == [3]
        readers = list(core.executor._readers)
        assert readers and all(t.is_alive() for t in readers)
    finally:
        core.shutdown()
    assert not ray.is_initialized()
    assert not any(t.is_alive() for t in readers), "an event reader outlived the executor"
    with pytest.raises(Exception):  # no auto-connect: a late call fails rather than starting a Ray
        ray.put(1)
    assert not ray.is_initialized()
