"""Prometheus metrics of the server (`prometheus-client`, one registry per server).

Owns: TTFT, TPOT, end-to-end, queueing and migration-time histograms; migrated bytes;
requests by finish reason and rejections by kind; queue length, running requests, KV
utilisation, busy fraction, liveness and a step-time histogram per instance (refreshed from
`AsyncEngine.info()`, whose workers keep cumulative step-time bucket counts); SLO attainment over a
sliding window for each configured SLO; the placement served (`distserve_placement_info`), a
placement-change counter by outcome and whether one is in progress (instances a placement change
removed drop out of the per-instance metrics); the workload monitor's window (arrival rate, prompt
and output length statistics) and the replanner's drift, predicted gain and placement changes.
Attainment uses `distserve_jax.metrics.meets_slo`, so it means what the load generator and the
simulator report. Requests the client aborted are left
out of the window (they say nothing about the server's latency).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Mapping

import prometheus_client as prom

from distserve_jax.metrics import SLO, RequestRecord, meets_slo

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


def parse_slo(spec: str) -> tuple[str, SLO]:
    """`"name:ttft_s:tpot_s"` -> (name, SLO); raises ValueError naming the problem."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"--slo must look like name:ttft_s:tpot_s, got {spec!r}")
    try:
        return parts[0], SLO(float(parts[1]), float(parts[2]))
    except ValueError as e:
        raise ValueError(f"--slo {spec!r}: {e}") from None


def record_from_metrics(request_id: str, prompt_len: int, output_len: int, metrics: Mapping[str, Any],
                        finish_reason: str | None) -> RequestRecord:
    """A `RequestRecord` of a finished request from the engine's metrics dict."""
    times = list(metrics.get("token_times") or [])
    return RequestRecord(request_id=request_id, prompt_len=prompt_len,
                         output_len=len(times) if times else output_len,
                         arrival_time=float(metrics.get("arrival_time") or 0.0),
                         first_token_time=metrics.get("first_token_time"), finish_time=metrics.get("finish_time"),
                         token_times=times, finish_reason=finish_reason)


class ServingMetrics:
    """The server's Prometheus metrics.

    Args:
      slos: name -> SLO whose attainment is tracked.
      window_s: length of the sliding window of finished requests, seconds.
    """

    def __init__(self, slos: Mapping[str, SLO] | None = None, window_s: float = 60.0):
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.slos = dict(slos or {})
        self.window_s = window_s
        self.ttft = prom.Histogram("distserve_ttft_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS,
                                   registry=r)
        self.tpot = prom.Histogram("distserve_tpot_seconds", "Time per output token after the first.",
                                   buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = prom.Histogram("distserve_e2e_seconds", "End-to-end request latency.", buckets=_LATENCY_BUCKETS,
                                  registry=r)
        self.queueing = prom.Histogram("distserve_queueing_seconds", "Arrival to prefill start.",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.migration = prom.Histogram("distserve_migration_seconds", "KV cache migration time per request.",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.migration_bytes = prom.Counter("distserve_migration_bytes", "KV cache bytes migrated.", registry=r)
        self.finished = prom.Counter("distserve_requests_finished", "Finished requests by finish reason.",
                                     ["finish_reason"], registry=r)
        self.rejected = prom.Counter("distserve_requests_rejected", "Refused requests by kind.", ["kind"],
                                     registry=r)
        self.in_flight = prom.Gauge("distserve_requests_in_flight", "Requests accepted and not finished.",
                                    registry=r)
        self.queue_len = prom.Gauge("distserve_queue_length", "Requests waiting per instance.",
                                    ["instance", "role"], registry=r)
        self.running = prom.Gauge("distserve_running_requests", "Requests running per instance.",
                                  ["instance", "role"], registry=r)
        self.kv_util = prom.Gauge("distserve_kv_cache_utilisation", "Share of KV blocks in use per instance.",
                                  ["instance", "role"], registry=r)
        self.free_blocks = prom.Gauge("distserve_kv_free_blocks", "Free KV blocks per instance.",
                                      ["instance", "role"], registry=r)
        self.attainment = prom.Gauge("distserve_slo_attainment",
                                     "Share of requests in the sliding window meeting both SLO targets.",
                                     ["slo"], registry=r)
        self.window_requests = prom.Gauge("distserve_slo_window_requests", "Requests in the SLO window.",
                                          registry=r)
        self.busy = prom.Gauge("distserve_instance_busy_fraction", "Share of its uptime an instance spent in steps.",
                               ["instance", "role"], registry=r)
        self.alive = prom.Gauge("distserve_instance_alive", "1 while an instance serves, 0 after it failed.",
                                ["instance", "role"], registry=r)
        self.restarts = prom.Gauge("distserve_instance_restarts", "Times an instance's process was replaced "
                                   "after it died (--executor=ray).", ["instance", "role"], registry=r)
        self.workload_rate = prom.Gauge("distserve_workload_arrival_rate", "Requests arriving per second over the "
                                        "workload monitor's window.", registry=r)
        self.workload_requests = prom.Gauge("distserve_workload_window_requests", "Requests in the workload "
                                            "monitor's window.", ["kind"], registry=r)
        self.workload_lens = prom.Gauge("distserve_workload_tokens", "Prompt (arrivals) and output (completions) "
                                        "lengths over the workload monitor's window.", ["length", "stat"],
                                        registry=r)
        self.replan_rate_ratio = prom.Gauge("distserve_replan_rate_ratio", "Window arrival rate vs the rate the "
                                            "placement was planned for (max of the two ratios).", registry=r)
        self.replan_distance = prom.Gauge("distserve_replan_length_distance", "KS distance of the window's lengths "
                                          "from those the placement was planned for.", ["length"], registry=r)
        self.replan_drifted = prom.Gauge("distserve_replan_drifted", "1 while the last check saw drift.", registry=r)
        self.replan_gain = prom.Gauge("distserve_replan_predicted_gain", "Predicted goodput gain of the last "
                                      "proposal over the current placement.", registry=r)
        self.replan_changes = prom.Gauge("distserve_replan_placement_changes", "Placement changes the replanner "
                                         "started.", registry=r)
        self._step_hist: dict[tuple[str, str], tuple[list[int], float]] = {}
        r.register(_StepTimeCollector(self))
        self._instances: set[tuple[str, str]] = set()
        self._placement: tuple[str, dict[str, int], str | None] = ("", {}, None)  # served, changes, in progress
        r.register(_PlacementCollector(self))
        self._window: collections.deque[tuple[float, RequestRecord]] = collections.deque()
        self._lock = threading.Lock()
        for name in self.slos:
            self.attainment.labels(slo=name).set(1.0)

    def observe_finished(self, record: RequestRecord, metrics: Mapping[str, Any]) -> None:
        """Records one finished request (its metrics dict from the engine's final output)."""
        reason = record.finish_reason or "unknown"
        self.finished.labels(finish_reason=reason).inc()
        if reason == "abort":
            return
        if record.ttft is not None:
            self.ttft.observe(max(record.ttft, 0.0))
        if record.tpot is not None:
            self.tpot.observe(max(record.tpot, 0.0))
        if record.e2e_latency is not None:
            self.e2e.observe(max(record.e2e_latency, 0.0))
        if metrics.get("prefill_start") is not None:
            self.queueing.observe(max(metrics["prefill_start"] - record.arrival_time, 0.0))
        if metrics.get("migration_start") is not None and metrics.get("migration_end") is not None:
            self.migration.observe(max(metrics["migration_end"] - metrics["migration_start"], 0.0))
        if metrics.get("migration_bytes"):
            self.migration_bytes.inc(float(metrics["migration_bytes"]))
        with self._lock:
            self._window.append((time.monotonic(), record))
        self.refresh_attainment()

    def refresh_attainment(self) -> None:
        """Drops requests older than the window and recomputes attainment per SLO."""
        now = time.monotonic()
        with self._lock:
            while self._window and now - self._window[0][0] > self.window_s:
                self._window.popleft()
            records = [rec for _, rec in self._window]
        self.window_requests.set(len(records))
        for name, slo in self.slos.items():
            value = sum(meets_slo(r, slo) for r in records) / len(records) if records else 1.0
            self.attainment.labels(slo=name).set(value)

    def update_instances(self, info: Mapping[str, Any]) -> None:
        """Sets the per-instance gauges, the placement metrics and the workload / replanner ones from
        `AsyncEngine.info()`."""
        self.update_workload(info)
        change = info.get("placement_change") or {}
        running = change.get("state") if change.get("state") in ("starting", "draining") else None
        self._placement = (str(info.get("placement") or ""),
                           {str(k): int(v) for k, v in (info.get("placement_changes") or {}).items()}, running)
        now = {(str(i["name"]), str(i.get("role", ""))) for i in info.get("instances", [])}
        for gone in self._instances - now:  # removed by a placement change
            for g in (self.queue_len, self.running, self.free_blocks, self.kv_util, self.busy, self.alive,
                      self.restarts):
                try:
                    g.remove(*gone)
                except KeyError:
                    pass
            self._step_hist.pop(gone, None)
        self._instances = now
        for inst in info.get("instances", []):
            labels = {"instance": str(inst["name"]), "role": str(inst.get("role", ""))}
            total = int(inst.get("total_blocks") or 0)
            free = int(inst.get("free_blocks") or 0)
            self.queue_len.labels(**labels).set(int(inst.get("num_waiting") or 0))
            self.running.labels(**labels).set(int(inst.get("num_running") or 0))
            self.free_blocks.labels(**labels).set(free)
            self.kv_util.labels(**labels).set((total - free) / total if total else 0.0)
            self.busy.labels(**labels).set(float(inst.get("busy_fraction") or 0.0))
            self.alive.labels(**labels).set(1.0 if inst.get("alive", True) else 0.0)
            self.restarts.labels(**labels).set(int(inst.get("restarts") or 0))
            if inst.get("step_time_buckets"):
                self._step_hist[(labels["instance"], labels["role"])] = (
                    [int(c) for c in inst["step_time_buckets"]], float(inst.get("step_time_sum") or 0.0))

    def update_workload(self, info: Mapping[str, Any]) -> None:
        """Sets the workload and replanner gauges from `info()`'s `workload` and `replanner` entries."""
        w = info.get("workload")
        if w:
            self.workload_rate.set(float(w.get("arrival_rate") or 0.0))
            self.workload_requests.labels(kind="arrivals").set(int(w.get("num_arrivals") or 0))
            self.workload_requests.labels(kind="completions").set(int(w.get("num_completions") or 0))
            for length in ("prompt_len", "output_len"):
                for stat in ("mean", "p50", "p90", "p99"):
                    v = w.get(f"{length}_{stat}")
                    if v is not None:
                        self.workload_lens.labels(length=length.split("_")[0], stat=stat).set(float(v))
        rp = info.get("replanner")
        if rp:
            self.replan_changes.set(int(rp.get("num_changes") or 0))
            d = rp.get("drift")
            if d:
                self.replan_rate_ratio.set(float(d["rate_ratio"]))
                self.replan_distance.labels(length="prompt").set(float(d["prompt_distance"]))
                if d.get("output_distance") is not None:
                    self.replan_distance.labels(length="output").set(float(d["output_distance"]))
                self.replan_drifted.set(1.0 if d["drifted"] else 0.0)
            p = rp.get("last_proposal")
            if p and p.get("gain") is not None:
                self.replan_gain.set(float(p["gain"]))

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in the Prometheus text format, and its content type."""
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST


class _StepTimeCollector:
    """Exposes `distserve_instance_step_seconds`, a histogram per instance, from the workers'
    cumulative bucket counts (the last count is every step: the +Inf bucket)."""

    def __init__(self, metrics: ServingMetrics):
        self._metrics = metrics

    def collect(self):
        from prometheus_client.core import HistogramMetricFamily

        from distserve_jax.engine.messages import STEP_TIME_BUCKETS

        fam = HistogramMetricFamily("distserve_instance_step_seconds", "Step time per instance.",
                                    labels=["instance", "role"])
        for (inst, role), (counts, total) in sorted(self._metrics._step_hist.items()):
            bounds = [str(b) for b in STEP_TIME_BUCKETS] + ["+Inf"]
            fam.add_metric([inst, role], list(zip(bounds, counts)), total)
        yield fam


class _PlacementCollector:
    """Exposes `distserve_placement_info{placement}` (1 for the placement served),
    `distserve_placement_changes_total{state}` (finished changes: done, failed) and
    `distserve_placement_change_in_progress` (1 while one is starting or draining)."""

    def __init__(self, metrics: ServingMetrics):
        self._metrics = metrics

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        placement, changes, running = self._metrics._placement
        info = GaugeMetricFamily("distserve_placement_info", "The placement served now (value 1).",
                                 labels=["placement"])
        if placement:
            info.add_metric([placement], 1.0)
        yield info
        counter = CounterMetricFamily("distserve_placement_changes", "Live placement changes finished, by outcome.",
                                      labels=["state"])
        for state in ("done", "failed"):
            counter.add_metric([state], float(changes.get(state, 0)))
        yield counter
        yield GaugeMetricFamily("distserve_placement_change_in_progress",
                                "1 while a placement change is starting or draining.", value=1.0 if running else 0.0)
