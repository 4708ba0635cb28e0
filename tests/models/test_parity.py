"""Prefill logits of every architecture variant match transformers (float32) at tp = 1, 2, 4."""

import numpy as np
import pytest

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.models import orbax_io
from distserve_jax.runtime.sharding import make_mesh
from tests.hf_checkpoints import VARIANTS, hf_prefill_logits
from tests.models.model_logits import runtime_logits
from tests.tolerances import LOGIT_PARITY_ATOL, assert_close_reordered, decoder_reduction_len

import jax

PROMPT_LEN = 45  # longer than Mistral's window (16), not a multiple of the 16-token block


def _prompt(seed: int, vocab: int = 256) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(3, vocab, PROMPT_LEN)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_logits_match_transformers_at_every_tp(variant, hf_checkpoint):
    d = hf_checkpoint(variant)
    ids = _prompt(1)
    ref = hf_prefill_logits(d, ids)
    assert np.abs(ref).max() > 0.05, "reference logits are degenerate; the test would prove nothing"
    by_tp = {}
    for tp in (1, 2, 4):
        got = runtime_logits(d, ids, tp=tp)
        err = np.abs(got - ref).max()
        # The project's parity bound (logits ~8 here; observed <= 1.3e-5; a wrong head is O(1)).
        assert err <= LOGIT_PARITY_ATOL, f"{variant} tp={tp}: max abs error {err}"
        by_tp[tp] = got
    n = decoder_reduction_len(resolve_model(d).config, PROMPT_LEN)
    for tp in (2, 4):
        # tp sums the sharded partial products in another order: float32 rounding only.
        assert_close_reordered(by_tp[tp], by_tp[1], reduction_len=n, what=f"{variant} tp={tp} vs tp=1")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load_and_stay_close(dtype, hf_checkpoint):
    d = hf_checkpoint("llama3", dtype=dtype)
    ids = _prompt(2)
    ref = hf_prefill_logits(d, ids)  # the reference upcasts the rounded weights to float32
    got32 = runtime_logits(d, ids, tp=2, dtype="float32")
    assert np.abs(got32 - ref).max() <= LOGIT_PARITY_ATOL  # float32 parity (observed ~9e-6)
    got_half = runtime_logits(d, ids, tp=2, dtype=dtype)
    # Activations rounded to 8 (bf16) or 11 (fp16) significant bits at every layer, not a
    # reordering: 10% of the scale is ~13 bf16 ulps (observed 1.2e-2 bf16, 1.4e-3 fp16 of it).
    assert np.abs(got_half - ref).max() <= 0.1 * np.abs(ref).max()


def test_sharded_checkpoint_with_index(hf_checkpoint):
    d = hf_checkpoint("qwen2", sharded=True)
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("*.safetensors"))) > 1
    ids = _prompt(3)
    assert np.abs(runtime_logits(d, ids, tp=4) - hf_prefill_logits(d, ids)).max() <= LOGIT_PARITY_ATOL  # parity


def test_orbax_round_trip_across_tp(hf_checkpoint, tmp_path):
    d = hf_checkpoint("llama3")  # 2 kv heads: tp=4 replicates them, the save must undo it
    spec = resolve_model(d)
    cfg4 = spec.config.for_tp(4)
    mesh4 = make_mesh(jax.devices()[:4])
    params = spec.weights.load(cfg4, mesh4, layer_start=0, layer_end=cfg4.num_layers, dtype="float32")
    orbax_io.save_params(params, cfg4, tmp_path / "ckpt", hf_config=spec.hf_config)
    restored = resolve_model(tmp_path / "ckpt")
    assert type(restored.weights).__name__ == "OrbaxDirectory"
    ids = _prompt(4)
    ref = hf_prefill_logits(d, ids)
    for tp in (1, 2):
        assert np.abs(runtime_logits(tmp_path / "ckpt", ids, tp=tp) - ref).max() <= LOGIT_PARITY_ATOL  # parity
