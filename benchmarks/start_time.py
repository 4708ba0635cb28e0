"""Start-up time of the server (benchmark CLI): cold (empty compilation cache) and warm (a restart).

For each mode it starts `serving.server` exactly as the demo does (`serving/demo.py`: model,
sizes, `--placement=auto`, 8 virtual CPU devices) with a fresh, empty `--compilation_cache_dir`,
and times process start -> gRPC health SERVING (every step bucket compiled); then it stops the
server and starts it again on the same cache `--warm_runs` times (a restart). After each start it
runs `--requests` greedy requests one at a time (`--max_tokens` tokens each) and reports their
median TPOT; then, after `--settle_s` seconds (the workers' idle turns run each short step
shape once after SERVING, and sampler variants compile in the background), the same again, so a
faster start can be checked not to cost steady-state speed. The model
conversion cache (`~/.cache/distserve_jax/gguf`) is left as it is unless `--fresh_conversion`,
which points `$DISTSERVE_CACHE` at a new directory for the first start (the conversion is then
part of the cold start).

Example:
  python -m benchmarks.start_time --model=smollm2-135m --modes=disaggregated,colocated --warm_runs=2
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags, logging

from serving import demo

FLAGS = flags.FLAGS
flags.DEFINE_integer("warm_runs", 2, "Restarts on the filled compilation cache, per mode.")
flags.DEFINE_integer("requests", 4, "Greedy requests run one at a time after each start (TPOT).")
flags.DEFINE_integer("max_tokens", 32, "Tokens per request.")
flags.DEFINE_float("settle_s", 15.0, "Seconds after the first TPOT requests before the second ones (0: none).")
flags.DEFINE_bool("fresh_conversion", False, "Convert the model again on the cold start (new $DISTSERVE_CACHE).")
flags.DEFINE_string("results_json", None, "Where to write the results (default: only printed).")


def _tpot(address: str) -> float:
    from serving.client import Client

    tpots = []
    with Client(address) as c:
        for i in range(FLAGS.requests):
            res = c.generate(prompt_token_ids=[1 + (i * 7 + j) % 500 for j in range(40)],
                             sampling={"temperature": 0.0, "max_tokens": FLAGS.max_tokens, "ignore_eos": True})
            times = res.token_times
            tpots.append((times[-1] - times[0]) / (len(times) - 1))
    return statistics.median(tpots)


def one_start(mode: str, cache: Path, log: Path, env: dict[str, str]) -> dict[str, float]:
    t0 = time.monotonic()
    proc, address = demo.start_server(mode, log, cache_dir=str(cache), env_extra=env)
    try:
        demo.wait_serving(proc, address, log)
        ready = time.monotonic() - t0
        tpot = _tpot(address)
        settled = float("nan")
        if FLAGS.settle_s > 0:
            time.sleep(FLAGS.settle_s)
            settled = _tpot(address)
    finally:
        code = demo.stop_server(proc)
    if code != 0:
        raise RuntimeError(f"server exited with {code}; see {log}")
    return {"start_s": ready, "tpot_s": tpot, "settled_tpot_s": settled}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = Path(tempfile.mkdtemp(prefix="distserve-start-"))
    results = []
    for mode in FLAGS.modes:
        cache = out / f"xla-{mode}"
        env = {"DISTSERVE_CACHE": str(out / "convert")} if FLAGS.fresh_conversion else {}
        row = {"mode": mode, "cold": one_start(mode, cache, out / f"{mode}-cold.log", env), "warm": []}
        logging.info("%s cold start: %.1f s", mode, row["cold"]["start_s"])
        for i in range(FLAGS.warm_runs):
            row["warm"].append(one_start(mode, cache, out / f"{mode}-warm{i}.log", {}))
            logging.info("%s warm start %d: %.1f s", mode, i, row["warm"][-1]["start_s"])
        results.append(row)
    lines = [f"model {FLAGS.model}, max_model_len {FLAGS.max_model_len}, max_num_seqs {FLAGS.max_num_seqs}, "
             f"{FLAGS.devices} virtual CPU devices; logs in {out}\n",
             f"{'mode':<16}{'cold start':>12}{'warm starts':>22}{'TPOT cold':>11}{'TPOT warm':>11}"
             f"{'settled: cold':>15}{'warm':>9}   (TPOT right after SERVING, and {FLAGS.settle_s:g} s later)\n"]
    for r in results:
        warm = ", ".join(f"{w['start_s']:.1f}" for w in r["warm"])

        def med(key):
            return statistics.median([w[key] for w in r["warm"]]) if r["warm"] else float("nan")

        lines.append(f"{r['mode']:<16}{r['cold']['start_s']:>11.1f}s{warm + ' s':>22}"
                     f"{1e3 * r['cold']['tpot_s']:>9.1f}ms{1e3 * med('tpot_s'):>9.1f}ms"
                     f"{1e3 * r['cold']['settled_tpot_s']:>13.1f}ms{1e3 * med('settled_tpot_s'):>7.1f}ms\n")
    text = "".join(lines)
    if FLAGS.results_json:
        Path(FLAGS.results_json).write_text(json.dumps(results, indent=1))
    sys.stdout.write(text)


if __name__ == "__main__":
    for _name, _value in demo._BENCH_DEFAULTS.items():
        FLAGS.set_default(_name, _value)
    app.run(main)
