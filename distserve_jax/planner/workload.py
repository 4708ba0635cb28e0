"""The planner's workloads: request lengths from `distserve_jax.workloads` or a replayed trace,
and arrivals at a rate with common random numbers.

Owns the bridge from workloads to simulated requests:
  - `lengths(name, n, ...)`: (prompt_len, output_len) of n requests of a named workload
    (ShareGPT / HumanEval tokenised with a tokenizer, LongBench-like, fixed, uniform), cached on
    disk per (workload, tokenizer, n, seed, max_model_len) because tokenising ShareGPT is slow;
  - `read_trace(path)`: a JSONL trace, one request a line: `arrival_time` (s) or `timestamp`
    (ms, Mooncake), and `prompt_len` / `input_length`, `output_len` / `output_length`;
  - `at_rate(lengths, rate, ...)`: the same requests with arrival times of one seeded unit-rate
    process divided by `rate`, so a goodput bisection compares rates on identical requests.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from distserve_jax.planner.simulator import SimRequest
from distserve_jax.workloads import WORKLOAD_NAMES, inter_arrival_gaps, load_workload

CACHE_DIR = Path(os.environ.get("DISTSERVE_CACHE", Path.home() / ".cache" / "distserve_jax")) / "planner"


class UnknownWorkloadError(ValueError):
    """The workload name is none of the known ones (and no trace file of that name exists)."""


def _tokenizer(name: str):
    """A model directory's tokenizer, or "demo" / a named config's demo tokenizer (no JAX)."""
    from distserve_jax.models.tokenizer import Tokenizer, load_tokenizer

    path = Path(name)
    if path.is_dir():
        tok = load_tokenizer(path)
        if tok is None:
            raise ValueError(f"model directory {name} has no tokenizer.json")
        return tok
    config = Path(__file__).resolve().parents[2] / "configs" / "models" / f"{'demo' if name == 'demo' else name}.json"
    if not config.is_file() or json.loads(config.read_text()).get("distserve", {}).get("tokenizer") != "demo":
        raise ValueError(f"tokenizer {name!r}: not a model directory and not a named config with a tokenizer")
    from distserve_jax.models.demo_tokenizer import build_demo_tokenizer

    return Tokenizer(build_demo_tokenizer(vocab_size=int(json.loads(config.read_text())["vocab_size"])))


def lengths(name: str, n: int, *, seed: int = 0, max_model_len: int = 2048, tokenizer: str = "demo",
            use_cache: bool = True) -> list[tuple[int, int]]:
    """(prompt_len, output_len) of `n` requests of workload `name` (see the module docstring)."""
    if name not in WORKLOAD_NAMES:
        raise UnknownWorkloadError(f"unknown workload {name!r}; expected one of {WORKLOAD_NAMES} or a .jsonl trace")
    key = hashlib.sha1(json.dumps([name, n, seed, max_model_len, tokenizer]).encode()).hexdigest()[:16]
    cache = CACHE_DIR / f"{name}-{key}.json"
    if use_cache and cache.is_file():
        return [tuple(x) for x in json.loads(cache.read_text())]
    kw: dict = {}
    if name in ("sharegpt", "humaneval"):
        kw["tokenizer"] = _tokenizer(tokenizer)
    else:
        kw.update(vocab_size=2, with_token_ids=False)
    reqs = load_workload(name, n, seed=seed, max_model_len=max_model_len, **kw)
    out = [(r.prompt_len, r.max_tokens) for r in reqs]
    if use_cache:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out))
    return out


def read_trace(path: str | Path) -> list[SimRequest]:
    """Requests of a JSONL trace (see the module docstring), arrivals shifted to start at 0."""
    path = Path(path)
    if not path.is_file():
        raise UnknownWorkloadError(f"no trace file at {path}")
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            t = float(d["arrival_time"]) if "arrival_time" in d else float(d["timestamp"]) / 1000.0
            p = int(d.get("prompt_len", d.get("input_length")))
            o = int(d.get("output_len", d.get("output_length")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{i + 1}: a trace line needs arrival_time (or timestamp) and prompt/output "
                             f"lengths: {e}") from None
        if p < 1 or o < 1:
            raise ValueError(f"{path}:{i + 1}: lengths must be >= 1, got prompt {p}, output {o}")
        out.append(SimRequest(t, p, o))
    if not out:
        raise ValueError(f"trace {path} has no requests")
    t0 = min(r.arrival_time for r in out)
    return [SimRequest(r.arrival_time - t0, r.prompt_len, r.output_len) for r in out]


def unit_arrivals(n: int, *, cv: float = 1.0, seed: int = 0) -> np.ndarray:
    """Arrival times of a rate-1 process (Poisson for cv = 1); divide by a rate to scale it."""
    gaps = inter_arrival_gaps(n, 1.0, cv=cv, seed=seed)
    times = np.zeros(n)
    times[1:] = np.cumsum(gaps[:-1])
    return times


def at_rate(lens: Sequence[tuple[int, int]], rate: float, *, cv: float = 1.0, seed: int = 0,
            unit: np.ndarray | None = None) -> list[SimRequest]:
    """The requests of `lens` arriving at `rate` requests/s (common random numbers over rates)."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate!r}")
    unit = unit_arrivals(len(lens), cv=cv, seed=seed) if unit is None else unit
    return [SimRequest(float(t) / rate, p, o) for t, (p, o) in zip(unit, lens)]


def scale_trace(reqs: Sequence[SimRequest], rate: float) -> list[SimRequest]:
    """A trace's requests with arrivals compressed or stretched to an average of `rate`/s."""
    span = max(r.arrival_time for r in reqs)
    if span <= 0 or len(reqs) < 2:
        return [SimRequest(0.0, r.prompt_len, r.output_len) for r in reqs]
    f = (len(reqs) - 1) / span / rate
    return [SimRequest(r.arrival_time * f, r.prompt_len, r.output_len) for r in reqs]
