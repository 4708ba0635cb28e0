"""`--replan` settings are checked at start-up: each bad combination or value is refused by name."""

import pytest

from serving.startup import replan_settings

OK = dict(mode="disaggregated", placement="plan", plan_profile=None, interval_s=10.0, min_gain=0.1, window_s=30.0,
          dwell_s=120.0)


def test_off_builds_nothing_and_on_gives_the_settings():
    assert replan_settings("off", **{**OK, "mode": "colocated"}) is None
    s = replan_settings("on", **{**OK, "interval_s": 5.0, "min_gain": 0.25})
    assert (s.interval_s, s.min_gain, s.window_s, s.dwell_s) == (5.0, 0.25, 30.0, 120.0)
    assert replan_settings("on", **{**OK, "placement": "auto",
                                    "plan_profile": "configs/profiles/a100-opt-13b.distserve.json"}) is not None


@pytest.mark.parametrize("replan, kw, message", [
    ("maybe", {}, "--replan must be on or off"),
    ("on", {"mode": "colocated"}, "--replan=on needs --mode=disaggregated"),
    ("on", {"mode": "chunked"}, "--replan=on needs --mode=disaggregated"),
    ("on", {"placement": "auto"}, "needs a planner profile"),
    ("on", {"placement": "configs/placements/x.yaml"}, "needs a planner profile"),
    ("on", {"plan_profile": "/no/such/profile.json"}, "--plan_profile '/no/such/profile.json' is not a file"),
    ("on", {"interval_s": -1.0}, "replan_interval_s must be a positive"),
    ("on", {"window_s": 0.0}, "replan_window_s must be a positive"),
    ("on", {"dwell_s": -3.0}, "replan_dwell_s must be a non-negative"),
    ("on", {"min_gain": 0.0}, r"replan_min_gain must be in \(0, 10\)"),
    ("on", {"min_gain": 12.0}, r"replan_min_gain must be in \(0, 10\)"),
    ("on", {"window_s": 5.0}, "replan_window_s .* must be >= replan_interval_s"),
])
def test_bad_replan_settings_are_refused_by_name(replan, kw, message):
    with pytest.raises(ValueError, match=message):
        replan_settings(replan, **{**OK, **kw})


def test_server_core_with_the_replanner_reports_its_state():
    # The server's build with --replan=on: the controller wrapped with its replanner (demo model,
    # the committed demo CPU profile); a few requests later info() carries the window and the
    # replanner's state (no change: far too little evidence to act on).
    from distserve_jax.metrics import SLO
    from distserve_jax.sampling_params import SamplingParams
    from serving import startup

    settings = replan_settings("on", **{**OK, "placement": "auto", "plan_profile": "configs/profiles/demo-cpu.json"})
    plan = dict(slo=SLO(2.0, 0.2), rate=1.0, workload="sharegpt", profile_path="configs/profiles/demo-cpu.json")
    core, placement = startup.build_core("disaggregated", "demo", "auto", False,
                                        {"max_model_len": 256, "num_blocks": 40, "max_num_seqs": 2}, plan, settings)
    try:
        assert core.replanner is not None and core.replanner.planner.budget == 8
        for i in range(3):
            core.add_request(f"r{i}", prompt_token_ids=[5, 6, 7 + i],
                             params=SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        done = 0
        while done < 3:
            done += sum(o.finished for o in core.step())
        info = core.info()
        assert (info["workload"]["num_arrivals"], info["workload"]["prompt_len_mean"]) == (3, 3.0)
        assert info["replanner"]["num_changes"] == 0 and info["replanner"]["planned_rate"] == 1.0
        assert core.current_placement().describe() == placement.describe()
    finally:
        core.shutdown()
