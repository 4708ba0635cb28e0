"""`python -m distserve_jax.planner plan|simulate` end to end on a toy profile and a JSONL trace."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.planner.test_search import profile

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--max_model_len=256", "--max_num_seqs=8", "--max_num_batched_tokens=64", "--ttft_slo=0.05",
          "--tpot_slo=0.02", "--gpus_per_node=4"]


def planner(*args):
    return subprocess.run([sys.executable, "-m", "distserve_jax.planner", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    profile().save(d / "toy.json")
    (d / "trace.jsonl").write_text("".join(json.dumps({"arrival_time": i * 0.01, "prompt_len": 16, "output_len": 8})
                                           + "\n" for i in range(60)))
    return d


def test_plan_then_simulate(files):
    r = planner("plan", f"--profile={files / 'toy.json'}", f"--workload={files / 'trace.jsonl'}", "--num_requests=40",
                "--verify_requests=40", "--num_nodes=2", "--rate=50", "--affinity=low", f"--out={files / 'p.yaml'}",
                f"--json_out={files / 'plan.json'}", *COMMON)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Alg. 2 segment groups" in r.stdout and "P(tp2)+D(tp1)" in r.stdout and "chosen:" in r.stdout
    assert "disaggregation buys" in r.stdout
    plan = json.loads((files / "plan.json").read_text())
    assert plan["plan"]["ranked"][0]["unit"] == "P(tp2)+D(tp1)" and plan["plan"]["attainment_at_rate"] >= 0.9
    r = planner("simulate", f"--profile={files / 'toy.json'}", f"--placement={files / 'p.yaml'}",
                f"--workload={files / 'trace.jsonl'}", "--num_requests=40", "--rates=20,400", "--slo_scales=0.5,2",
                f"--plot_png={files / 'a.png'}", *COMMON)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.strip().startswith(("20.000", "400.000"))]
    assert float(rows[0][1]) >= 0.9 > float(rows[1][1])  # attainment falls with the rate
    assert (files / "a.png").stat().st_size > 1000


def test_bad_inputs_fail_with_named_errors(files):
    r = planner("plan", f"--profile={files / 'toy.json'}", "--workload=no-such", *COMMON)
    assert r.returncode != 0 and "UnknownWorkloadError" in r.stderr
    r = planner("plan", f"--profile={files / 'missing.json'}", *COMMON)
    assert r.returncode != 0 and "ProfileError" in r.stderr
    r = planner("plan", f"--profile={files / 'toy.json'}", f"--workload={files / 'trace.jsonl'}", "--num_requests=40",
                "--ttft_slo=0.0001", *COMMON[:3], "--tpot_slo=0.02", "--gpus_per_node=4")
    assert r.returncode != 0 and "ImpossibleSLOError" in r.stderr
