"""Load generator: `python -m serving.bench --address=... --workload=sharegpt --rates=1,2,4`.

Sends a workload (`distserve_jax.workloads`: ShareGPT, HumanEval, LongBench-like, fixed,
uniform) to a server over gRPC or the OpenAI HTTP API, at each request rate of a sweep, with
Poisson (cv 1) or gamma (other cv) arrivals. Each request is timed on the client: arrival =
when it is sent, one timestamp per received token. Per rate it reports per-request TTFT, TPOT,
ITL and end-to-end latency, their percentiles, SLO attainment and request goodput
(`distserve_jax.metrics.summarize`: the vLLM definitions), and over the sweep the highest rate
whose attainment reaches the target. Results go to a JSON file; `--plot_png` draws attainment vs
rate for this run and any earlier result files given in `--plot_inputs` (one line per label).
Requests ask for exactly their workload's output length (ignore_eos), as vLLM's and
DistServe's benchmarks do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from absl import app, flags, logging
from tqdm import tqdm

from distserve_jax.metrics import SLO, RequestRecord, summarize
from distserve_jax.workloads import WORKLOAD_NAMES, WorkloadRequest, load_workload, with_arrivals


def load_model_tokenizer(model: str) -> Any:
    """The tokenizer of `model` (a model directory, or a named config in configs/models/), without JAX."""
    from distserve_jax.models.tokenizer import Tokenizer, load_tokenizer

    from distserve_jax.models import gguf_io

    path = Path(model)
    config = Path(__file__).resolve().parents[1] / "configs" / "models" / f"{model}.json"
    hf = json.loads(config.read_text()) if not path.exists() and config.is_file() else {}
    packaged = gguf_io.named_gguf(hf.get("distserve", {}))
    if path.suffix == ".gguf" or packaged is not None:  # the cached conversion's tokenizer
        path = gguf_io.cached_conversion(packaged or path)
    if path.is_dir():
        tok = load_tokenizer(path)
        if tok is None:
            raise ValueError(f"model {model} has no tokenizer")
        return tok
    if not config.is_file():
        raise ValueError(f"unknown model {model!r}: not a directory and not a config in configs/models/")
    if hf.get("distserve", {}).get("tokenizer") != "demo":
        raise ValueError(f"named model {model!r} has no tokenizer; use a synthetic workload")
    from distserve_jax.models.demo_tokenizer import build_demo_tokenizer
    return Tokenizer(build_demo_tokenizer(vocab_size=int(hf["vocab_size"])))


# ------------------------------------------------------------------------------------ senders
async def _send_grpc(client: Any, req: WorkloadRequest, rec: RequestRecord, model: str) -> None:
    import grpc

    call = client.stream(prompt_token_ids=req.prompt_token_ids, prompt=None if req.prompt_token_ids else req.prompt,
                         sampling={"temperature": 0.0, "max_tokens": req.max_tokens, "ignore_eos": True},
                         model=model)
    try:
        async for msg in call:
            now = time.perf_counter()
            for _ in msg.token_ids:
                rec.record_token(now)
            if msg.finished:
                rec.finish(now, msg.finish_reason)
    except grpc.aio.AioRpcError as e:
        rec.finish_reason = f"error:{e.code().name}"
        logging.log_first_n(logging.WARNING, "request %s failed: %s %s", 5, rec.request_id, e.code().name,
                            e.details())


async def _send_http(session: Any, base_url: str, req: WorkloadRequest, rec: RequestRecord, model: str) -> None:
    body = {"model": model, "prompt": req.prompt_token_ids or req.prompt, "max_tokens": req.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "logprobs": 0}
    async with session.post(base_url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            rec.finish_reason = f"error:{resp.status}"
            logging.log_first_n(logging.WARNING, "request %s failed: %s %s", 5, rec.request_id, resp.status,
                                await resp.text())
            return
        async for line in resp.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                for _ in (choice.get("logprobs") or {}).get("tokens", []):
                    rec.record_token(now)
                if choice.get("finish_reason"):
                    rec.finish(now, choice["finish_reason"])


async def run_at_rate(requests: Sequence[WorkloadRequest], *, target: str, address: str, model: str,
                      progress: bool = True, desc: str = "") -> tuple[list[RequestRecord], float]:
    """Sends `requests` at their arrival times; returns their records and the run's duration."""
    records = [RequestRecord(request_id=f"bench-{i}", prompt_len=r.prompt_len) for i, r in enumerate(requests)]
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, file=sys.stderr)
    if target == "grpc":
        from serving.client import AsyncClient
        conn: Any = AsyncClient(address)
    elif target == "http":
        import aiohttp
        conn = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    else:
        raise ValueError(f"target must be grpc or http, got {target!r}")
    start = time.perf_counter()

    async def one(req: WorkloadRequest, rec: RequestRecord) -> None:
        await asyncio.sleep(max(0.0, start + req.arrival_time - time.perf_counter()))
        rec.arrival_time = time.perf_counter()
        try:
            if target == "grpc":
                await _send_grpc(conn, req, rec, model)
            else:
                await _send_http(conn, address.rstrip("/"), req, rec, model)
        finally:
            bar.update(1)

    try:
        await asyncio.gather(*[one(q, r) for q, r in zip(requests, records)])
    finally:
        await conn.close()
        bar.close()
    return records, time.perf_counter() - start


def request_rows(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """Per-request latencies for the JSON results."""
    return [{"request_id": r.request_id, "prompt_len": r.prompt_len, "output_len": r.output_len,
             "finish_reason": r.finish_reason, "ttft_s": r.ttft, "tpot_s": r.tpot, "e2e_s": r.e2e_latency,
             "itl_s": r.itl} for r in records]


def sweep_goodput(points: Sequence[tuple[float, float]], target: float) -> float:
    """Highest swept rate whose attainment reaches `target` (0 if none)."""
    passing = [rate for rate, att in points if att >= target]
    return max(passing) if passing else 0.0


async def run_sweep(base: Sequence[WorkloadRequest], rates: Sequence[float], *, target: str, address: str,
                    model: str, slo: SLO, cv: float = 1.0, seed: int = 0, attainment_target: float = 0.9,
                    progress: bool = True) -> dict[str, Any]:
    """Runs `base` at each rate (fresh arrivals per rate) and summarises each run."""
    runs = []
    for rate in rates:
        reqs = with_arrivals(base, rate, cv=cv, seed=seed)
        records, duration = await run_at_rate(reqs, target=target, address=address, model=model,
                                              progress=progress, desc=f"rate {rate:g}/s")
        summary = summarize(records, slos={"slo": slo}, duration_s=duration, target=attainment_target)
        logging.info("rate %g: attainment %.3f, TTFT p90 %s, TPOT p90 %s", rate, summary["slo"]["slo"]["attainment"],
                     summary["ttft_s"]["p90"], summary["tpot_s"]["p90"])
        runs.append({"rate": rate, "summary": summary, "requests": request_rows(records)})
    points = [(r["rate"], r["summary"]["slo"]["slo"]["attainment"]) for r in runs]
    return {"slo": dataclasses.asdict(slo), "attainment_target": attainment_target, "cv": cv, "runs": runs,
            "goodput_rate": sweep_goodput(points, attainment_target)}


def plot_attainment(results: Sequence[dict[str, Any]], path: str | Path) -> None:
    """PNG of SLO attainment vs request rate, one line per result's label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for res in results:
        rates = [r["rate"] for r in res["runs"]]
        att = [100.0 * r["summary"]["slo"]["slo"]["attainment"] for r in res["runs"]]
        ax.plot(rates, att, marker="o", label=res.get("label", "run"))
    target = results[0].get("attainment_target", 0.9) if results else 0.9
    ax.axhline(100.0 * target, color="grey", linestyle="--", linewidth=1)
    slo = results[0]["slo"] if results else {}
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"TTFT <= {slo.get('ttft_s')} s and TPOT <= {slo.get('tpot_s')} s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


FLAGS = flags.FLAGS
flags.DEFINE_enum("target", "grpc", ["grpc", "http"], "Protocol to load.")
flags.DEFINE_string("address", "127.0.0.1:50051", "gRPC host:port, or the HTTP base URL (http://host:port).")
flags.DEFINE_string("grpc_info_address", None, "gRPC address for the server info when --target=http "
                    "(default: none; then --model and --max_model_len are needed).")
flags.DEFINE_string("model", None, "Model whose tokenizer builds the prompts (default: the server's --model).")
flags.DEFINE_string("served_model_name", None, "`model` sent with requests (default: the server's name).")
flags.DEFINE_integer("max_model_len", None, "Workload length limit (default: the server's).")
flags.DEFINE_enum("workload", "sharegpt", list(WORKLOAD_NAMES), "Workload.")
flags.DEFINE_integer("num_requests", 100, "Requests per rate.")
flags.DEFINE_integer("max_conversations", 5000, "ShareGPT records read (bounds start-up time).")
flags.DEFINE_integer("max_output_len", None, "Cap each request's output length.")
flags.DEFINE_list("rates", ["1", "2", "4"], "Request rates (req/s) to sweep.")
flags.DEFINE_float("cv", 1.0, "Coefficient of variation of inter-arrival gaps (1: Poisson).")
flags.DEFINE_float("slo_ttft_s", 1.0, "TTFT target, seconds.")
flags.DEFINE_float("slo_tpot_s", 0.1, "TPOT target, seconds.")
flags.DEFINE_float("attainment_target", 0.9, "Attainment target for goodput.")
flags.DEFINE_integer("seed", 0, "Workload and arrival seed.")
flags.DEFINE_string("label", None, "Label of this run in results and plots (default: the server's mode).")
flags.DEFINE_string("output_json", "bench_results.json", "Where to write the results.")
flags.DEFINE_string("plot_png", None, "Where to draw attainment vs rate (off when unset).")
flags.DEFINE_list("plot_inputs", [], "Earlier result JSON files to draw beside this run.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def _server_info(address: str) -> dict[str, Any]:
    from serving.client import Client
    with Client(address) as c:
        info = c.server_info()
    return {"model": info.model, "model_path": info.model_path, "mode": info.mode, "placement": info.placement, "max_model_len": info.max_model_len,
            "vocab_size": info.vocab_size, "max_queue": info.max_queue}


def build_workload(name: str, n: int, *, model: str | None, max_model_len: int, vocab_size: int | None, seed: int,
                   max_conversations: int, max_output_len: int | None) -> list[WorkloadRequest]:
    kw: dict[str, Any] = {}
    tokenizer = None
    if name in ("sharegpt", "humaneval"):
        if model is None:
            raise ValueError(f"workload {name!r} needs the model's tokenizer: pass --model")
        tokenizer = load_model_tokenizer(model)
    if name == "sharegpt":
        kw["max_conversations"] = max_conversations
    reqs = load_workload(name, n, tokenizer=tokenizer, seed=seed, max_model_len=max_model_len,
                         vocab_size=vocab_size, **kw)
    if max_output_len is not None:
        reqs = [dataclasses.replace(r, max_tokens=min(r.max_tokens, max_output_len)) for r in reqs]
    return reqs


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    rates = [float(r) for r in FLAGS.rates]
    if not rates or any(not r > 0 for r in rates):
        raise app.UsageError(f"--rates must be positive numbers, got {FLAGS.rates}")
    info_address = FLAGS.address if FLAGS.target == "grpc" else FLAGS.grpc_info_address
    info = _server_info(info_address) if info_address else {}
    model_path = FLAGS.model or info.get("model_path")
    max_len = FLAGS.max_model_len or info.get("max_model_len")
    if not max_len:
        raise app.UsageError("--max_model_len is needed (no server info)")
    name = FLAGS.served_model_name or info.get("model")
    if not name:
        raise app.UsageError("--served_model_name is needed (no server info)")
    base = build_workload(FLAGS.workload, FLAGS.num_requests, model=model_path or name, max_model_len=max_len,
                          vocab_size=info.get("vocab_size"), seed=FLAGS.seed,
                          max_conversations=FLAGS.max_conversations, max_output_len=FLAGS.max_output_len)
    slo = SLO(FLAGS.slo_ttft_s, FLAGS.slo_tpot_s)
    result = asyncio.run(run_sweep(base, rates, target=FLAGS.target, address=FLAGS.address, model=name, slo=slo,
                                   cv=FLAGS.cv, seed=FLAGS.seed, attainment_target=FLAGS.attainment_target,
                                   progress=FLAGS.progress))
    result.update(label=FLAGS.label or info.get("mode") or FLAGS.target, workload=FLAGS.workload,
                  num_requests=FLAGS.num_requests, target=FLAGS.target, server=info)
    Path(FLAGS.output_json).write_text(json.dumps(result, indent=1))
    sys.stdout.write(format_table([result]))
    if FLAGS.plot_png:
        earlier = [json.loads(Path(p).read_text()) for p in FLAGS.plot_inputs]
        plot_attainment(earlier + [result], FLAGS.plot_png)


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A text table: label, rate, TTFT/TPOT p50/p90, attainment, request goodput."""
    head = f"{'label':<28}{'rate':>7}{'TTFT p50':>10}{'TTFT p90':>10}{'TPOT p50':>10}{'TPOT p90':>10}" \
           f"{'attain':>8}{'goodput':>9}\n"

    def f(x: float | None, scale: float = 1.0) -> str:
        return "-" if x is None else f"{x * scale:.3f}"

    lines = [head]
    for res in results:
        for run in res["runs"]:
            s = run["summary"]
            slo = s["slo"]["slo"]
            lines.append(f"{res.get('label', ''):<28}{run['rate']:>7g}{f(s['ttft_s']['p50']):>10}"
                         f"{f(s['ttft_s']['p90']):>10}{f(s['tpot_s']['p50']):>10}{f(s['tpot_s']['p90']):>10}"
                         f"{100 * slo['attainment']:>7.1f}%{f(slo['request_goodput']):>9}\n")
    return "".join(lines) + "(latencies in seconds; goodput in requests/s meeting the SLO)\n"


if __name__ == "__main__":
    app.run(main)
