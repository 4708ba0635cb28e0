"""Conversions between the wire formats (protobuf, OpenAI JSON) and the engine's types.

Owns how request fields become `SamplingParams` (every bad value raises `InvalidRequest`
naming the field), and how a finished request's metrics dict becomes the phase timing the
API reports (queueing, prefill, migration, decode).
"""

from __future__ import annotations

from typing import Any, Mapping

from distserve_jax.sampling_params import SamplingParams
from serving.proto import distserve_pb2 as pb

_PROTO_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "logprobs",
                          "prompt_logprobs")


class ServingError(Exception):
    """A request the server refuses. `kind`: "invalid", "overloaded", "unavailable" or "internal"."""

    kind = "invalid"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InvalidRequest(ServingError):
    """Bad input: maps to gRPC INVALID_ARGUMENT / HTTP 400."""

    kind = "invalid"


class Overloaded(ServingError):
    """The server holds --max_queue requests: gRPC RESOURCE_EXHAUSTED / HTTP 429."""

    kind = "overloaded"


class Unavailable(ServingError):
    """Warming up or shutting down: gRPC UNAVAILABLE / HTTP 503."""

    kind = "unavailable"


class InternalError(ServingError):
    """A fault of the server, not of the request (logged): gRPC INTERNAL / HTTP 500."""

    kind = "internal"


def make_sampling_params(**fields: Any) -> SamplingParams:
    """`SamplingParams(**fields)`; a bad value raises `InvalidRequest` with the SamplingParams message."""
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        raise InvalidRequest(str(e), param=str(e).split(" ", 1)[0]) from None
    except TypeError as e:
        raise InvalidRequest(f"bad sampling parameter: {e}") from None


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """The engine's `SamplingParams` for a protobuf `SamplingParams` (unset fields take the defaults)."""
    kw: dict[str, Any] = {name: getattr(msg, name) for name in _PROTO_SAMPLING_FIELDS if msg.HasField(name)}
    kw["stop"] = list(msg.stop) or None
    kw["stop_token_ids"] = [int(t) for t in msg.stop_token_ids]
    kw["ignore_eos"] = bool(msg.ignore_eos)
    return make_sampling_params(**kw)


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    """The protobuf form of `params` (the fields the gRPC API carries)."""
    msg = pb.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                            min_p=params.min_p, max_tokens=params.max_tokens, stop=list(params.stop),
                            stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos)
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    return msg


def _span(m: Mapping[str, Any], start: str, end: str) -> float:
    a, b = m.get(start), m.get(end)
    return float(b - a) if a is not None and b is not None else 0.0


def timing_from_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Phase durations (seconds) of a finished request from the engine's metrics dict; 0 for a phase that did not run."""
    m = metrics or {}
    return {
        "queueing_s": _span(m, "arrival_time", "prefill_start"),
        "prefill_s": _span(m, "prefill_start", "prefill_end"),
        "migration_s": _span(m, "migration_start", "migration_end"),
        "decode_s": _span(m, "decode_start", "finish_time"),
        "ttft_s": float(m.get("ttft") or 0.0),
        "tpot_s": float(m.get("tpot") or 0.0),
        "e2e_s": _span(m, "arrival_time", "finish_time"),
    }


def logprobs_to_proto(token_ids: list[int], logprobs: list[dict[int, float]] | None) -> list[pb.TokenLogprob]:
    """One `TokenLogprob` per token of `token_ids` (the last len(token_ids) entries of `logprobs`)."""
    if not logprobs or not token_ids:
        return []
    out = []
    for tok, entry in zip(token_ids, logprobs[len(logprobs) - len(token_ids):]):
        top = {int(k): float(v) for k, v in entry.items()}
        out.append(pb.TokenLogprob(token_id=int(tok), logprob=float(entry.get(tok, 0.0)), top_logprobs=top))
    return out


def prompt_logprobs_to_proto(prompt_ids: list[int], entries: list[dict[int, float] | None] | None
                             ) -> list[pb.TokenLogprob]:
    """One `TokenLogprob` per prompt token after the first (which has no logprob)."""
    if not entries:
        return []
    return [pb.TokenLogprob(token_id=int(t), logprob=float(e.get(t, 0.0)),
                            top_logprobs={int(k): float(v) for k, v in e.items()})
            for t, e in zip(prompt_ids[1:], entries[1:]) if e is not None]
