"""The server binary: `python -m serving.server --model=... [--mode=...] [--placement=...]`.

Start-up order: the gRPC server (health NOT_SERVING, reflection on) and the optional HTTP and
metrics ports come up first; then the engine core is built and its step buckets compiled
(`core.warmup()`), off the event loop; only then does health report SERVING and requests get
in (before that they get UNAVAILABLE / 503). SIGTERM (or SIGINT): health NOT_SERVING, new
requests refused, in-flight ones get up to --drain_timeout_s to finish, the rest are aborted
(each stream ends with finish_reason "abort"), the ports close and the process exits 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any

import grpc
from absl import app, flags, logging
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.frontend import Frontend, ServedModel
from serving.grpc_service import SERVICE_NAME, DistServeServicer, add_to_server, receive_limit_bytes
from serving.startup import build_core, replan_settings
from serving.prometheus_metrics import ServingMetrics, parse_slo

MODES = ("disaggregated", "colocated", "chunked")

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "demo", "A Hugging Face model directory, or a named config in configs/models/.")
flags.DEFINE_string("served_model_name", None, "Name clients use as `model` (default: the --model basename).")
flags.DEFINE_string("placement", "auto", "Placement YAML file, `auto`: the default placement for the visible "
                    "devices, or `plan`: profile the devices (cached) and plan for --plan_rate under the first --slo "
                    "(disaggregated mode only).")
flags.DEFINE_float("plan_rate", 1.0, "--placement=plan: request rate (req/s) to plan for.")
flags.DEFINE_string("plan_profile", None, "--placement=plan: a latency profile (default: the cached local one).")
flags.DEFINE_string("plan_workload", "sharegpt", "--placement=plan: workload whose lengths the plan simulates.")
flags.DEFINE_enum("replan", "off", ["on", "off"], "on: watch the workload and move to the placement the planner "
                  "picks when it drifts from the one planned for (--plan_rate / --plan_workload; needs a planner "
                  "profile: --placement=plan or --plan_profile).")
flags.DEFINE_float("replan_interval_s", 10.0, "--replan=on: seconds between drift checks.")
flags.DEFINE_float("replan_min_gain", 0.1, "--replan=on: switch only for a predicted goodput gain above this "
                   "(0.1 = +10% per device), in (0, 10).")
flags.DEFINE_float("replan_window_s", 30.0, "--replan=on: sliding window of the workload monitor, seconds.")
flags.DEFINE_float("replan_dwell_s", 120.0, "--replan=on: least time between the end of a placement change and "
                   "the start of the next, seconds.")
flags.DEFINE_enum("mode", "disaggregated", MODES, "Serving mode.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 50051, "gRPC port.")
flags.DEFINE_integer("http_port", None, "OpenAI-compatible HTTP port (off when unset).")
flags.DEFINE_integer("metrics_port", None, "Prometheus metrics port (off when unset; /metrics on the HTTP "
                     "port serves the same metrics).")
flags.DEFINE_integer("max_queue", 256, "Most requests in flight at once; more get RESOURCE_EXHAUSTED / 429. "
                     "0: unbounded.", lower_bound=0)
flags.DEFINE_integer("max_model_len", None, "Context length (default: the model's, capped at 2048).")
flags.DEFINE_string("dtype", "float32", "Weights and KV cache dtype: float32, bfloat16 or float16.")
flags.DEFINE_float("kv_cache_memory_fraction", 0.9, "Share of free device memory for the KV cache.")
flags.DEFINE_integer("num_blocks", None, "KV blocks per instance (default: from kv_cache_memory_fraction).")
flags.DEFINE_integer("block_size", 16, "Tokens per KV block.")
flags.DEFINE_integer("max_num_seqs", 64, "Most sequences in one step batch.")
flags.DEFINE_integer("max_num_batched_tokens", 2048, "Token budget of one step.")
flags.DEFINE_integer("tp", 1, "Tensor-parallel degree of each replica (colocated and chunked modes).")
flags.DEFINE_enum("executor", "threads", ["threads", "ray"], "Where workers run: threads of this process, or "
                  "one Ray actor process per instance.")
flags.DEFINE_string("ray_address", None, "With --executor=ray: a Ray cluster to join (instances may land on other "
                    "nodes); unset: start a local Ray on loopback and stop it on exit.")
flags.DEFINE_integer("replicas", 1, "Colocated or chunked replicas, each its own worker on its own tp devices.")
flags.DEFINE_integer("seed", 0, "Engine seed (for requests without a seed).")
flags.DEFINE_integer("max_request_bytes", 4 << 20, "Largest request message or body; larger ones get "
                     "INVALID_ARGUMENT / 400 (gRPC's core stops reading messages over max(64 MiB, "
                     "4 x this) with RESOURCE_EXHAUSTED).", lower_bound=1)
flags.DEFINE_multi_string("slo", ["default:2.0:0.2"], "SLO tracked by the attainment gauge, name:ttft_s:tpot_s "
                          "(repeatable).")
flags.DEFINE_float("slo_window_s", 60.0, "Sliding window of the SLO attainment gauge, seconds.")
flags.DEFINE_float("drain_timeout_s", 10.0, "On SIGTERM, how long in-flight requests may run before abort.")
flags.DEFINE_float("shutdown_grace_s", 3.0, "On SIGTERM, how long streams get to deliver their final message.")
flags.DEFINE_bool("warmup", True, "Compile the step buckets before reporting healthy.")
flags.DEFINE_string("compilation_cache_dir", None, "JAX's persistent compilation cache: a restart loads the compiled "
                    "steps from here instead of compiling them again. Default: $JAX_COMPILATION_CACHE_DIR, else "
                    "~/.cache/distserve_jax/xla ($DISTSERVE_CACHE/xla); `none` turns it off.")


def _engine_kwargs() -> dict[str, Any]:
    kw = {"max_model_len": FLAGS.max_model_len, "dtype": FLAGS.dtype,
          "kv_cache_memory_fraction": FLAGS.kv_cache_memory_fraction, "num_blocks": FLAGS.num_blocks,
          "block_size": FLAGS.block_size, "max_num_seqs": FLAGS.max_num_seqs,
          "max_num_batched_tokens": FLAGS.max_num_batched_tokens, "seed": FLAGS.seed}
    return {k: v for k, v in kw.items() if v is not None}


def placement_text(placement: Any) -> str:
    if placement is None:
        return ""
    if dataclasses.is_dataclass(placement):
        return json.dumps(dataclasses.asdict(placement), default=str, sort_keys=True)
    return str(placement)


class Server:
    """The running server: ports, health, engine and shutdown."""

    def __init__(self):
        name = FLAGS.served_model_name or Path(FLAGS.model.rstrip("/")).name
        slos = dict(parse_slo(s) for s in FLAGS.slo)
        self.metrics = ServingMetrics(slos, window_s=FLAGS.slo_window_s)
        self.served = ServedModel(name=name, path=FLAGS.model, mode=FLAGS.mode, max_queue=FLAGS.max_queue or None,
                                  max_request_bytes=FLAGS.max_request_bytes)
        self.frontend = Frontend(self.served, self.metrics)
        self.health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.http_runner = None
        self.stop = asyncio.Event()

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def start_ports(self) -> None:
        limit = receive_limit_bytes(FLAGS.max_request_bytes)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                          ("grpc.so_reuseport", 0)])
        add_to_server(DistServeServicer(self.frontend), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        await self._set_health(False)
        address = f"{FLAGS.host}:{FLAGS.port}"
        if server.add_insecure_port(address) == 0:
            raise RuntimeError(f"cannot listen on {address}")
        await server.start()
        self.grpc_server = server
        logging.info("gRPC listening on %s", address)
        if FLAGS.http_port is not None:
            from aiohttp import web

            from serving.http_api import make_app
            runner = web.AppRunner(make_app(self.frontend), handler_cancellation=True, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, FLAGS.host, FLAGS.http_port).start()
            self.http_runner = runner
            logging.info("HTTP (OpenAI API) listening on %s:%d", FLAGS.host, FLAGS.http_port)
        if FLAGS.metrics_port is not None:
            import prometheus_client
            prometheus_client.start_http_server(FLAGS.metrics_port, addr=FLAGS.host, registry=self.metrics.registry)
            logging.info("Prometheus metrics on %s:%d", FLAGS.host, FLAGS.metrics_port)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        await self.start_ports()
        kwargs = _engine_kwargs()
        kwargs["executor"] = FLAGS.executor
        if FLAGS.ray_address:
            kwargs["ray_address"] = FLAGS.ray_address
        if FLAGS.mode != "disaggregated":
            kwargs.update(tp=FLAGS.tp, replicas=FLAGS.replicas)
        plan = None
        replan = replan_from_flags()
        if FLAGS.placement == "plan" or replan is not None:
            plan = dict(slo=parse_slo(FLAGS.slo[0])[1], rate=FLAGS.plan_rate, workload=FLAGS.plan_workload,
                        profile_path=FLAGS.plan_profile)
        build = asyncio.ensure_future(asyncio.to_thread(
            build_core, FLAGS.mode, FLAGS.model, FLAGS.placement, FLAGS.warmup, kwargs, plan, replan))
        stopper = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait([build, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not build.done():
            logging.info("stopped during start-up")
            await self._close_ports()
            os._exit(0)  # the build thread cannot be interrupted
        try:
            core, placement = build.result()
        except Exception:  # noqa: BLE001 - reported, then the process exits non-zero
            logging.exception("could not build the engine")
            await self._close_ports()
            return 1
        from distserve_jax.engine.async_engine import AsyncEngine
        from distserve_jax.engine.model_source import resolve_model

        for sig in (signal.SIGTERM, signal.SIGINT):  # again: a library (Ray) may have replaced them
            loop.add_signal_handler(sig, self.stop.set)
        engine = AsyncEngine(core, max_queue=self.served.max_queue)
        spec = getattr(core, "spec", None) or resolve_model(FLAGS.model)
        self.served.tokenizer = spec.tokenizer
        self.served.vocab_size = int(spec.config.vocab_size)
        self.served.placement = placement_text(placement)
        self.frontend.set_engine(engine, await engine.info())
        await self._set_health(True)
        logging.info("serving %s (%s mode, max_model_len=%d)", self.served.name, FLAGS.mode,
                     self.served.max_model_len)
        poller = asyncio.ensure_future(self._poll_gauges())
        await stopper
        poller.cancel()
        await self._shutdown(engine)
        return 0

    async def _poll_gauges(self) -> None:
        while True:
            try:
                await self.frontend.info()
                self.metrics.refresh_attainment()
            except Exception as e:  # noqa: BLE001 - gauges must not stop the server
                logging.warning("could not refresh gauges: %s", e)
            await asyncio.sleep(1.0)

    async def _shutdown(self, engine: Any) -> None:
        logging.info("shutting down: %d requests in flight", self.frontend.num_in_flight())
        self.frontend.draining = True
        await self.health.enter_graceful_shutdown()
        if not await self.frontend.wait_idle(FLAGS.drain_timeout_s):
            logging.info("aborting %d requests still in flight", self.frontend.num_in_flight())
        await asyncio.to_thread(engine.shutdown)
        await self.frontend.wait_idle(FLAGS.shutdown_grace_s)
        await self._close_ports()
        logging.info("stopped")

    async def _close_ports(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(FLAGS.shutdown_grace_s)
        if self.http_runner is not None:
            await self.http_runner.cleanup()


def enable_compilation_cache(flag: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache (see --compilation_cache_dir); returns its directory."""
    if flag is not None and flag.lower() == "none":
        return None
    from distserve_jax.models.demo_tokenizer import default_cache_dir

    path = flag or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(default_cache_dir() / "xla")
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def replan_from_flags() -> Any:
    """`ReplanSettings` from the --replan* flags (None when off); ValueError names a bad one."""
    return replan_settings(FLAGS.replan, mode=FLAGS.mode, placement=FLAGS.placement, plan_profile=FLAGS.plan_profile,
                           interval_s=FLAGS.replan_interval_s, min_gain=FLAGS.replan_min_gain,
                           window_s=FLAGS.replan_window_s, dwell_s=FLAGS.replan_dwell_s)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for spec in FLAGS.slo:
        parse_slo(spec)
    try:
        replan_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    cache = enable_compilation_cache(FLAGS.compilation_cache_dir)
    logging.info("persistent compilation cache: %s", cache or "off")
    code = asyncio.run(Server().run())
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    app.run(main)
