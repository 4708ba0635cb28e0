"""Converts the DistServe authors' published A100 coefficients into profiles of this planner.

Owns the one mapping from the artifact's layout (LLMServe/DistServe
`simdistserve/estimators/profile_data/`, copied verbatim to `configs/profiles/published/`:
`{model: {tp: {"prefill", "decoding_smallbs", "decoding_largebs", threshold}}}` in ms, and a
`model,tp,pp,max_num_tokens` KV-capacity CSV) to `Profile`: tp entries at pp = 1, pp > 1
analytic (T/pp plus 1 ms per stage, as the authors' simulator), the OPT shapes, and the paper's
testbed (8 x A100-80GB SXM per node, NVLink, 25 Gbit/s between nodes). Regenerate with
`python -m distserve_jax.planner.published`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from distserve_jax.planner.latency_model import Hardware, ModelShape, Profile, StepCoefficients

ROOT = Path(__file__).resolve().parents[2] / "configs" / "profiles"
PUBLISHED = ROOT / "published"

OPT_SHAPES = {
    "facebook/opt-13b": ModelShape("facebook/opt-13b", num_layers=40, hidden_size=5120, num_heads=40,
                                   num_kv_heads=40, head_dim=128, num_params=12_850_000_000),
    "facebook/opt-66b": ModelShape("facebook/opt-66b", num_layers=64, hidden_size=9216, num_heads=72,
                                   num_kv_heads=72, head_dim=128, num_params=65_700_000_000),
    "facebook/opt-175b": ModelShape("facebook/opt-175b", num_layers=96, hidden_size=12288, num_heads=96,
                                    num_kv_heads=96, head_dim=128, num_params=175_000_000_000),
}
A100_TESTBED = Hardware("8x A100-80GB SXM per node, NVLink, 25 Gbit/s between nodes (DistServe OSDI'24 testbed)",
                        gpus_per_node=8, memory_bytes=80 * 10**9, memory_fraction=0.95,
                        intra_node_gbit_s=2400.0, inter_node_gbit_s=25.0)
SOURCE = ("DistServe OSDI'24 artifact, LLMServe/DistServe simdistserve/estimators/profile_data/ "
          "({file}, fitted on A100-80GB SXM, FP16; KV capacity from a100-80g-opt-kv-capacity.csv); "
          "converted by distserve_jax/planner/published.py")


def convert(latency_json: Path, capacity_csv: Path, model: str, engine: str) -> Profile:
    data = json.loads(latency_json.read_text())
    if model not in data:
        raise KeyError(f"{latency_json} has no model {model!r} (has {sorted(data)})")
    configs = {}
    for tp, e in data[model].items():
        configs[(int(tp), 1)] = StepCoefficients(
            prefill=tuple(e["prefill"]), decode_small=tuple(e["decoding_smallbs"]),
            decode_large=tuple(e["decoding_largebs"]), decode_threshold=int(e["decoding_large_small_bs_threshold"]))
    cap = {}
    with capacity_csv.open() as f:
        for row in csv.DictReader(f):
            if row["model"] == model:
                cap[(int(row["tp"]), int(row["pp"]))] = int(row["max_num_tokens"])
    short = model.split("/")[-1]
    return Profile(OPT_SHAPES[model], A100_TESTBED, configs, pp_model="analytic", stage_overhead_ms=1.0,
                   kv_capacity=cap, source=SOURCE.format(file=latency_json.name), name=f"a100-{short}.{engine}")


def main() -> None:
    cap = PUBLISHED / "a100-80g-opt-kv-capacity.csv"
    for engine in ("distserve", "vllm"):
        for model in ("facebook/opt-13b", "facebook/opt-66b"):
            p = convert(PUBLISHED / f"a100-80g-opt-latency.{engine}.json", cap, model, engine)
            p.save(ROOT / f"{p.name}.json")


if __name__ == "__main__":
    main()
