"""A toy profile whose step times are constants, so simulated latencies can be computed by hand."""

from distserve_jax.planner.latency_model import Hardware, ModelShape, Profile, StepCoefficients

TOY_MODEL = ModelShape("toy", num_layers=4, hidden_size=8, num_heads=8, num_kv_heads=1, head_dim=8,
                       num_params=0, dtype_bytes=2, max_model_len=256)  # 128 KV bytes per token


def toy_profile(prefill_ms: float = 100.0, decode_ms: float = 10.0, *, per_token_ms: float = 0.0,
                kv_tokens: int = 16 * 64, transfer_s_per_block: float = 0.05, tps=(1, 2, 4, 8),
                pp_model: str = "analytic") -> Profile:
    """Prefill: `prefill_ms` + `per_token_ms` per prompt token; decode: `decode_ms` per step; a KV
    block (16 tokens, 2 KiB) moves in `transfer_s_per_block` on every link."""
    c = StepCoefficients(prefill=(prefill_ms, per_token_ms, 0.0), decode_small=(decode_ms, 0.0, 0.0),
                         decode_large=(decode_ms, 0.0, 0.0), max_num_tokens=kv_tokens)
    gbit = 16 * TOY_MODEL.kv_bytes_per_token * 8 / transfer_s_per_block / 1e9 if transfer_s_per_block else 1e12
    hw = Hardware("toy", gpus_per_node=8, memory_bytes=1, intra_node_gbit_s=gbit, inter_node_gbit_s=gbit)
    return Profile(TOY_MODEL, hw, {(tp, 1): c for tp in tps}, pp_model=pp_model, stage_overhead_ms=0.0,
                   name="toy")
