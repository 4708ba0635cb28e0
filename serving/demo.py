"""The demo: `python -m serving.demo`.

For each mode (disaggregated, then colocated) it starts the server as a subprocess on the
embedded demo model over 8 virtual CPU devices (the default placement for disaggregated mode),
drives a short ShareGPT workload through gRPC with the load generator, shuts the server down
with SIGTERM, and finally prints a TTFT / TPOT / SLO-attainment table of the modes. When the
disaggregated engine is not available in this checkout, that row falls back to colocated mode
with a warning. Sizes are kept small so the whole demo takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from distserve_jax.metrics import SLO
from serving import bench

ROOT = Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_list("modes", ["disaggregated", "colocated"], "Modes to compare, one server each.")
flags.DEFINE_integer("max_num_seqs", 4, "Batch size of the demo server.")
# The load generator's flags (num_requests, rates, max_output_len, max_model_len, slo_ttft_s, slo_tpot_s)
# apply too; these are the demo's defaults for them.
_BENCH_DEFAULTS = {"num_requests": 24, "rates": ["2"], "max_output_len": 32, "max_model_len": 128,
                   "slo_ttft_s": 2.0, "slo_tpot_s": 0.2}
flags.DEFINE_integer("devices", 8, "Virtual CPU devices of the server.")
flags.DEFINE_string("output_dir", None, "Where to write results JSON (and the plot); default: a temp dir.")
flags.DEFINE_float("startup_timeout_s", 300.0, "Longest wait for a server to become healthy.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def disaggregated_available() -> bool:
    return importlib.util.find_spec("distserve_jax.engine.controller") is not None and \
        importlib.util.find_spec("distserve_jax.engine.placement") is not None


def start_server(mode: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={FLAGS.devices}").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    # A persistent compilation cache makes warm-up of later demo runs much shorter.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "distserve_jax" / "xla"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, "-m", "serving.server", "--model=demo", f"--mode={mode}", "--placement=auto",
            "--host=127.0.0.1", f"--port={port}", f"--max_model_len={FLAGS.max_model_len}",
            f"--max_num_seqs={FLAGS.max_num_seqs}", f"--max_num_batched_tokens={FLAGS.max_model_len}",
            "--num_blocks=128", "--max_queue=64", "--drain_timeout_s=5",
            f"--slo=demo:{FLAGS.slo_ttft_s}:{FLAGS.slo_tpot_s}"]
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"127.0.0.1:{port}"


def wait_serving(proc: subprocess.Popen, address: str, log_path: Path) -> None:
    from serving.client import Client
    deadline = time.monotonic() + FLAGS.startup_timeout_s
    with Client(address) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode}; log tail:\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            try:
                if c.health(timeout=2.0) == "SERVING":
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server not healthy after {FLAGS.startup_timeout_s} s")


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            logging.warning("server did not stop within 30 s; killing it")
            proc.kill()
            return proc.wait(10)
    return proc.returncode


def run_mode(mode: str, label: str, out_dir: Path, base: list) -> dict[str, Any]:
    log_path = out_dir / f"server-{label.split()[0]}.log"
    t0 = time.monotonic()
    proc, address = start_server(mode, log_path)
    try:
        wait_serving(proc, address, log_path)
        logging.info("%s server ready in %.1f s", label, time.monotonic() - t0)
        info = bench._server_info(address)
        result = asyncio.run(bench.run_sweep(base, [float(r) for r in FLAGS.rates], target="grpc", address=address,
                                             model=info["model"], slo=SLO(FLAGS.slo_ttft_s, FLAGS.slo_tpot_s),
                                             progress=True))
    finally:
        code = stop_server(proc)
    logging.info("%s server exited with code %s", label, code)
    result.update(label=label, server=info, workload="sharegpt", num_requests=len(base), exit_code=code)
    (out_dir / f"results-{label.split()[0]}.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out_dir = Path(FLAGS.output_dir or tempfile.mkdtemp(prefix="distserve-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    base = bench.build_workload("sharegpt", FLAGS.num_requests, model="demo", max_model_len=FLAGS.max_model_len,
                                vocab_size=None, seed=0, max_conversations=3000,
                                max_output_len=FLAGS.max_output_len)
    runs = []
    done_modes = set()
    for mode in FLAGS.modes:
        label = mode
        if mode == "disaggregated" and not disaggregated_available():
            logging.warning("disaggregated mode is not available in this checkout; running colocated instead")
            mode, label = "colocated", "colocated (disagg unavailable)"
        if mode in done_modes:
            logging.info("skipping a second %s run", mode)
            continue
        done_modes.add(mode)
        runs.append(run_mode(mode, label, out_dir, base))
    sys.stdout.write("\n" + bench.format_table(runs))
    sys.stdout.write(f"SLO: TTFT <= {FLAGS.slo_ttft_s} s and TPOT <= {FLAGS.slo_tpot_s} s; "
                     f"results in {out_dir}\n")
    if len(FLAGS.rates) > 1:
        bench.plot_attainment(runs, out_dir / "attainment.png")
    bad = [r["label"] for r in runs if r["exit_code"] != 0]
    if bad:
        raise SystemExit(f"servers did not exit cleanly: {bad}")


if __name__ == "__main__":
    for _name, _value in _BENCH_DEFAULTS.items():
        FLAGS.set_default(_name, _value)
    app.run(main)
