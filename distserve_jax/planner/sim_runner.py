"""The simulated runner and KV pulls: what a real `InstanceWorker` drives in place of devices.

Owns the device side of a simulated instance:
  - `VirtualClock`: a worker's own time (seconds); the simulator sets it when the worker takes a
    turn, and `collect` / a pull's `wait` move it forward, as a real worker's clock moves while
    it waits for its devices.
  - `SimRunner`: `launch(works, prev)` books the step on each of the instance's pp stages in turn
    (a stage starts when the previous stage has finished this step and itself is free, so steps
    launched ahead and pp micro-batches overlap as on devices) and returns a pending step that
    completes at the last stage's end; `collect` advances the clock to it and returns one sample
    per sampled row (token 0: lengths come from `max_tokens`, as with `ignore_eos`).
    `stage_time(works)` comes from a `StepModel`, or from `ReplayTimes` (recorded step times).
  - `SimLink`: KV pulls into one decode instance, serialised on its ingress; a pull lands at
    start + bytes / bandwidth (intra- vs inter-node per layer, from the stages' nodes).
The runner never sleeps and reads no wall clock.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from distserve_jax.step_types import SampleResult

SAMPLE_TOKEN = 0  # every simulated sample (lengths come from max_tokens)
_SAMPLE = SampleResult(SAMPLE_TOKEN, 0.0, {})


class VirtualClock:
    __slots__ = ("t",)

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class _Pending:
    __slots__ = ("works", "done")

    def __init__(self, works: Sequence[Any], done: float):
        self.works, self.done = works, done


class ReplayTimes:
    """Stage times replayed in order (e.g. a real run's step times, per instance); then `fallback`."""

    def __init__(self, times: Sequence[float], fallback: Any = None):
        self.times, self.i, self.fallback = list(times), 0, fallback

    def stage_time(self, works: Sequence[Any]) -> float:
        if self.i < len(self.times):
            self.i += 1
            return self.times[self.i - 1]
        if self.fallback is None:
            raise IndexError(f"replay ran out of recorded step times after {len(self.times)} steps")
        return self.fallback.stage_time(works)


class InstantModel:
    """Zero-time steps (a phase taken out of a simulation: Alg. 1 simulates each phase alone)."""

    estimated = ""

    @staticmethod
    def stage_time(works: Sequence[Any]) -> float:
        return 0.0

    @staticmethod
    def decode_time(num_rows: int, sum_ctx: int) -> float:
        return 0.0


class SimRunner:
    """A runner whose steps take the model's time on a virtual clock (see the module docstring).

    `log`, when a list, receives `(launch time, done time, ((num tokens, context, sample), ...))`
    per launched step: the step's batch composition, for replay comparisons.
    """

    def __init__(self, model: Any, clock: VirtualClock, pp: int = 1, log: list | None = None):
        self.model, self.clock, self.pp = model, clock, pp
        self.stage_free = [0.0] * pp
        self.log = log
        self.num_steps = 0

    def launch(self, works: Sequence[Any], prev: Any = None) -> _Pending:
        dt = self.model.stage_time(works)
        t = now = self.clock.t
        free = self.stage_free
        for s in range(self.pp):
            if free[s] > t:
                t = free[s]
            t += dt
            free[s] = t
        self.num_steps += 1
        if self.log is not None:
            self.log.append((now, t, tuple((len(w.token_ids), w.context_len, w.sample) for w in works)))
        return _Pending(works, t)

    def collect(self, pending: _Pending) -> list[SampleResult | None]:
        if pending.done > self.clock.t:
            self.clock.t = pending.done
        return [_SAMPLE if w.sample else None for w in pending.works]

    def execute(self, works: Sequence[Any]) -> list[SampleResult | None]:
        return self.collect(self.launch(works))

    def warmup(self, modes: Sequence[str] = ()) -> int:
        return 0


class _Transfer:
    __slots__ = ("clock", "done", "num_bytes")

    def __init__(self, clock: VirtualClock, done: float, num_bytes: int):
        self.clock, self.done, self.num_bytes = clock, done, num_bytes

    def ready(self) -> bool:
        return self.clock.t >= self.done

    def wait(self) -> None:
        if self.done > self.clock.t:
            self.clock.t = self.done


class SimLink:
    """KV pulls into one decode instance: `pull(source, src_blocks, dst_blocks)` is its `kv_pull`.

    `seconds(source, num_bytes)` gives a transfer's duration; pulls into this instance queue on
    its ingress.
    """

    def __init__(self, clock: VirtualClock, seconds: Callable[[str, int], float], bytes_per_block: int):
        self.clock, self.seconds, self.bytes_per_block = clock, seconds, bytes_per_block
        self.free = 0.0

    def pull(self, source: str, src_blocks: list[int], dst_blocks: list[int]) -> _Transfer:
        n = len(src_blocks) * self.bytes_per_block
        start = max(self.clock.t, self.free)
        self.free = start + self.seconds(source, n)
        return _Transfer(self.clock, self.free, n)
