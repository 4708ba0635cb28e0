"""Tests for distserve_jax.sampling_params: validation, normalisation, properties."""

import dataclasses
import math

import numpy as np
import pytest

from distserve_jax.sampling_params import SamplingParams

BAD_VALUES = [
    ("temperature", -0.1), ("temperature", "1.0"), ("temperature", math.nan),
    ("temperature", math.inf), ("temperature", True), ("temperature", None),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", math.nan), ("top_p", "0.5"),
    ("top_k", 0), ("top_k", -2), ("top_k", 2.0), ("top_k", True), ("top_k", "5"),
    ("min_p", -0.1), ("min_p", 1.1), ("min_p", math.nan), ("min_p", [0.1]),
    ("seed", -1), ("seed", 2**32), ("seed", 1.5), ("seed", True), ("seed", "1"),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.0), ("max_tokens", True),
    ("max_tokens", None),
    ("stop", [""]), ("stop", ""), ("stop", [1]), ("stop", 5), ("stop", ["a", None]),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", [True]),
    ("stop_token_ids", "12"), ("stop_token_ids", 5),
    ("ignore_eos", 1), ("ignore_eos", "true"), ("ignore_eos", None),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.0), ("logprobs", True),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1), ("presence_penalty", math.nan),
    ("presence_penalty", "0"),
    ("frequency_penalty", 2.01), ("frequency_penalty", -3.0), ("frequency_penalty", math.inf),
    ("frequency_penalty", None),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("repetition_penalty", "1"),
    ("include_stop_str_in_output", 0), ("include_stop_str_in_output", "no"),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", 2.0), ("prompt_logprobs", False),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_bad_value_raises_naming_the_field(field, value):
    # Every message starts with the field's name; \b keeps "stop" from matching
    # "stop_token_ids".
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**{field: value})


def test_every_field_has_bad_value_cases():
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert fields == {field for field, _ in BAD_VALUES}


def test_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, -1, 0.0)
    assert p.seed is None and p.max_tokens == 16 and p.logprobs is None
    assert p.stop == () and p.stop_token_ids == () and not p.ignore_eos
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert not p.include_stop_str_in_output
    assert not p.is_greedy and not p.uses_penalties


def test_boundary_values_accepted():
    p = SamplingParams(temperature=0.0, top_p=1.0, top_k=1, min_p=1.0, seed=2**32 - 1,
                       max_tokens=1, logprobs=20, presence_penalty=-2.0,
                       frequency_penalty=2.0, repetition_penalty=1e-3)
    assert p.top_k == 1 and p.seed == 2**32 - 1 and p.logprobs == 20
    assert SamplingParams(logprobs=0, min_p=0.0, seed=0).logprobs == 0


def test_stop_normalised_to_tuple():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=[3, 0, 7]).stop_token_ids == (3, 0, 7)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()


def test_numeric_types_normalised():
    p = SamplingParams(temperature=1, top_k=np.int64(5), top_p=np.float32(0.5), seed=np.uint32(9),
                       stop_token_ids=[np.int32(4)])
    assert type(p.temperature) is float and p.temperature == 1.0
    assert type(p.top_k) is int and p.top_k == 5
    assert type(p.top_p) is float and p.top_p == 0.5
    assert type(p.seed) is int and p.seed == 9
    assert type(p.stop_token_ids[0]) is int


def test_is_greedy_and_uses_penalties():
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy
    assert SamplingParams(presence_penalty=0.5).uses_penalties
    assert SamplingParams(frequency_penalty=-0.1).uses_penalties
    assert SamplingParams(repetition_penalty=1.2).uses_penalties


def test_frozen_hashable_and_replace_revalidates():
    p = SamplingParams(stop=["x"], stop_token_ids=[1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop="x", stop_token_ids=(1,)))
    assert dataclasses.replace(p, seed=42).seed == 42
    with pytest.raises(ValueError, match="^temperature"):
        dataclasses.replace(p, temperature=-1.0)
