"""Serving test fixtures: a tiny checkpoint with a chat template, and real server processes on free ports.

`ServerProcess` starts `python -m serving.server` as a subprocess on 127.0.0.1 (ports found by
binding to port 0), waits for health SERVING, and is always killed in teardown. The session
server (`server`) is shared by the gRPC and HTTP test modules; lifecycle tests start their own.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import grpc  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# Engine sizes shared by the session server and the offline reference `LLM`.
ENGINE_KW = dict(max_model_len=64, num_blocks=32, max_num_seqs=4, max_num_batched_tokens=64)
MAX_QUEUE = 4
MAX_REQUEST_BYTES = 65536


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `serving.server` subprocess; `address` is its gRPC host:port, `http` its base URL (if any)."""

    def __init__(self, model: str, *, http: bool = False, extra: list[str] = (), log_path: Path):
        self.port = free_port()
        self.http_port = free_port() if http else None
        self.address = f"127.0.0.1:{self.port}"
        self.http = f"http://127.0.0.1:{self.http_port}" if http else None
        args = [sys.executable, "-m", "serving.server", f"--model={model}", f"--port={self.port}",
                "--host=127.0.0.1", *extra]
        if http:
            args.append(f"--http_port={self.http_port}")
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def health(self) -> str:
        from serving.client import Client
        with Client(self.address) as c:
            return c.health(timeout=2.0)

    def wait_serving(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not SERVING after {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="session")
def tiny_model(hf_checkpoint, tmp_path_factory) -> str:
    """The llama3 test checkpoint plus a tokenizer_config.json with a chat template."""
    src = hf_checkpoint("llama3")
    dst = tmp_path_factory.mktemp("serving-model") / "tiny-llama"
    shutil.copytree(src, dst)
    (dst / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return str(dst)


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """The shared server: gRPC + HTTP, colocated, small queue and request limit, compiled lazily."""
    extra = ["--mode=colocated", f"--max_queue={MAX_QUEUE}", f"--max_request_bytes={MAX_REQUEST_BYTES}",
             "--nowarmup", "--drain_timeout_s=2", "--slo=tight:0.000001:0.000001", "--slo=loose:1000:1000"]
    extra += [f"--{k}={v}" for k, v in ENGINE_KW.items()]
    proc = ServerProcess(tiny_model, http=True, extra=extra,
                         log_path=tmp_path_factory.mktemp("server-log") / "server.log")
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


def post(server: ServerProcess, path: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    """POSTs raw `body` to the server's HTTP front; returns (status, response body)."""
    import http.client
    import urllib.parse
    url = urllib.parse.urlparse(server.http)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def oai(server):
    """The official `openai` client on the session server's HTTP front."""
    import openai

    with openai.OpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def wait_all_free(address: str, timeout: float = 15.0):
    """Polls GetServerInfo until no request is in flight and every KV block is free; returns the info."""
    from serving.client import Client
    deadline = time.monotonic() + timeout
    with Client(address) as c:
        while True:
            info = c.server_info()
            if info.num_in_flight == 0 and all(i.free_blocks == i.total_blocks and i.num_running == 0
                                               and i.num_waiting == 0 for i in info.instances):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"resources still held after {timeout} s: {info}")
            time.sleep(0.05)
