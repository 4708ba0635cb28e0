"""A decode worker lands KV pulls as they finish: its running batch keeps decoding while a pull is
in flight, it waits for a pull only when it has nothing else to run, and with
`land_ready_pulls=False` every step waits for all the pulls started before it."""

import queue

from distserve_jax import SamplingParams
from distserve_jax.engine import messages as m
from distserve_jax.engine.worker import InstanceWorker
from distserve_jax.planner.sim_runner import InstantModel, SimRunner, VirtualClock
from distserve_jax.scheduler.block_manager import BlockManager
from distserve_jax.scheduler.factory import make_scheduler
from distserve_jax.scheduler.policies import SchedulerConfig


class _Transfer:
    def __init__(self):
        self.done, self.waited, self.num_bytes = False, False, 64

    def ready(self):
        return self.done

    def wait(self):
        self.waited = self.done = True


def _decode_worker(land_ready_pulls=True):
    blocks = BlockManager(32, 16)
    transfers, events = {}, []

    def kv_pull(cmd, dst_blocks):
        transfers[cmd.request.request_id] = t = _Transfer()
        return t

    clock = VirtualClock()
    w = InstanceWorker("decode-0", "decode", runner=SimRunner(InstantModel(), clock), blocks=blocks,
                       scheduler=make_scheduler("decode", "prefill_first", SchedulerConfig(4, 64), blocks),
                       emit=events.append, clock=clock, kv_pull=kv_pull, land_ready_pulls=land_ready_pulls)
    return w, transfers, events


def _pull(rid):
    st = m.RequestState(rid, (5,) * 20, (7,), SamplingParams(temperature=0.0), 0, 50, 0.0,
                        num_computed_tokens=20)
    return m.Pull(st, "prefill-0", tuple(range(1, 3)))


def _tokens(events, rid):
    return sum(isinstance(e, m.Token) and e.request_id == rid for e in events)


def test_running_batch_decodes_while_a_pull_is_in_flight():
    w, transfers, events = _decode_worker()
    inbox = queue.Queue()
    inbox.put(_pull("a"))
    w.turn(inbox)  # nothing else to run: waits for a's pull
    assert transfers["a"].waited and any(isinstance(e, m.Pulled) and e.request_id == "a" for e in events)
    inbox.put(_pull("b"))
    for _ in range(5):
        w.turn(inbox)
    assert not transfers["b"].waited, "b's pull was waited for while a could decode"
    assert _tokens(events, "a") >= 4 and _tokens(events, "b") == 0
    assert [r.request_id for r in w.scheduler.incoming] == ["b"]
    transfers["b"].done = True
    w.turn(inbox)
    w.turn(inbox)
    assert not w.scheduler.incoming and any(isinstance(e, m.Pulled) and e.request_id == "b" for e in events)
    assert _tokens(events, "b") >= 1


def test_without_ready_landing_each_step_waits_for_its_pulls():
    w, transfers, events = _decode_worker(land_ready_pulls=False)
    inbox = queue.Queue()
    inbox.put(_pull("a"))
    w.turn(inbox)
    inbox.put(_pull("b"))
    w.turn(inbox)
    assert transfers["b"].waited and not w.scheduler.incoming
