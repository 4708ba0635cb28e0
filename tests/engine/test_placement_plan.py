"""`plan_change`: what a placement change keeps, adds and removes, and on which devices (pure Python)."""

import pytest

from distserve_jax.engine.placement import InstanceSpec, Placement
from distserve_jax.engine.placement_change import LiveInstance, plan_change

NOW = [LiveInstance("prefill-0", "prefill", 1, 1, (0,)), LiveInstance("decode-0", "decode", 1, 1, (1,))]


def _plan(target, current=NOW, fixed=True, n=4, taken=("prefill-0", "decode-0")):
    return plan_change(current, target, num_devices=n, fixed_devices=fixed, taken_names=taken)


def test_same_instances_are_kept_new_ones_take_free_devices_and_fresh_names():
    plan = _plan(Placement((InstanceSpec(),), (InstanceSpec(), InstanceSpec())),
                 taken=("prefill-0", "decode-0", "decode-1"))  # decode-1 existed once: never reused
    assert plan.kept == ("prefill-0", "decode-0") and plan.removed == ()
    (new,) = plan.added
    assert (new.name, new.role, new.devices, new.waits_for) == ("decode-2", "decode", (2,), frozenset())


def test_a_new_instance_needing_a_leaving_instances_devices_waits_for_it():
    plan = _plan(Placement((InstanceSpec(),), (InstanceSpec(tp=2),)), n=3)
    assert plan.kept == ("prefill-0",) and plan.removed == ("decode-0",)
    (new,) = plan.added
    assert new.devices == (2, 1) and new.waits_for == frozenset({"decode-0"})  # free device first


def test_explicit_devices_decide_what_is_kept_when_devices_are_fixed():
    target = Placement((InstanceSpec(devices=(0,)),), (InstanceSpec(devices=(3,)),))
    plan = _plan(target)
    assert plan.kept == ("prefill-0",) and plan.removed == ("decode-0",)
    assert plan.added[0].devices == (3,) and not plan.added[0].waits_for
    # Where the executor gives each instance its own devices (Ray), device ids do not matter.
    ray = _plan(target, current=[LiveInstance(i.name, i.role, 1, 1, None) for i in NOW], fixed=False, n=8)
    assert ray.kept == ("prefill-0", "decode-0") and ray.added == ()


@pytest.mark.parametrize("target,msg", [
    (Placement((InstanceSpec(),) * 4, (InstanceSpec(),)), "needs 5 devices, the executor has 4"),
    (Placement((InstanceSpec(),), (InstanceSpec(), InstanceSpec(devices=(0,)))), "device 0 belongs to prefill-0"),
    (Placement((InstanceSpec(),), (InstanceSpec(), InstanceSpec(devices=(2,)), InstanceSpec(devices=(2,)))),
     "overlap on device 2"),
    (Placement((InstanceSpec(),), (InstanceSpec(devices=(4,)),)), "device id 4 does not exist"),
])
def test_impossible_targets_name_the_problem(target, msg):
    with pytest.raises(ValueError, match=msg):
        _plan(target)
