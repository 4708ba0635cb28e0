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
