"""The step-latency model of an instance and the profiles (JSON) it is read from.

Owns the paper's forms (DistServe OSDI'24 and its simulator), all coefficients in milliseconds:
  - prefill batch of prompts l_i:            T = a + b*X + c*Y, X = sum(l_i) (padded to the
    runner's token bucket when the profile lists buckets), Y = sum(l_i^2) ("sum" square) or X^2
    ("total" square: attention over the packed, padded batch, as on CPU);
  - decode batch of B rows, contexts ctx_i:  T = a + b*sum(ctx_i + 1) + c*B' (B' = B padded to
    the runner's batch bucket when listed), "small" coefficients when B < threshold, else "large";
  - mixed step (chunked prefill: chunks l_i over ctx_i, plus decode rows):
        T = a + b*X + c*Q + d*sum(ctx_dec + 1), X = sum(l_i) + decode rows (padded as above),
        Q = sum((ctx_i + l_i)^2 - ctx_i^2) ("sum" square) or X^2 ("total"), fitted when profiled,
        else estimated from the prefill and decode forms (flagged);
  - pipeline stages: a (tp, pp) entry is the time of the whole pipeline; each stage takes T/pp.
    A profile whose `pp_model` is "analytic" derives pp > 1 from its pp = 1 entry as T/pp plus
    `stage_overhead_ms` per stage (what the authors' simulator does), flagged as an estimate;
  - KV transfer: bytes / link bandwidth + latency, intra-node vs inter-node links;
  - KV capacity: tokens of KV cache an instance holds (profiled, tabulated, or estimated from
    memory minus weights, flagged).
Unprofiled tp (and pp, unless analytic) raise `UnprofiledConfigError`.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

FORMAT = "distserve-jax-profile/1"
REGIMES = ("prefill", "decode_small", "decode_large", "mixed")


class ProfileError(ValueError):
    """A profile file is missing, malformed, or does not describe what was asked."""


class UnprofiledConfigError(ProfileError):
    """No latency coefficients for this tp/pp degree (profile it, or pick a profiled degree)."""


def _round_up(n: int, buckets: tuple[int, ...]) -> int:
    if not buckets:
        return n
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else n


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model: sizes for KV bytes, weights and valid tp/pp."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_params: int
    dtype_bytes: int = 2
    max_model_len: int = 2048

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    def valid_tp(self, tp: int) -> bool:
        return tp >= 1 and self.num_heads % tp == 0

    def valid_pp(self, pp: int) -> bool:
        return pp >= 1 and self.num_layers % pp == 0


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One node type: devices per node, memory per device, links (Gbit/s) and their latency."""

    name: str
    gpus_per_node: int = 8
    memory_bytes: int = 80 * 10**9
    memory_fraction: float = 0.95
    intra_node_gbit_s: float = 2400.0  # NVLink A100: ~300 GB/s per direction
    inter_node_gbit_s: float = 25.0
    link_latency_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class StepCoefficients:
    """One (tp, pp) entry of a profile (ms); see the module docstring for the forms."""

    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    decode_threshold: int = 95
    mixed: tuple[float, float, float, float] | None = None
    prefill_square: str = "sum"  # "sum": sum(l_i^2); "total": (padded sum(l_i))^2
    mixed_square: str = "sum"  # "sum": sum((ctx + l)^2 - ctx^2) over chunks; "total": X^2
    token_buckets: tuple[int, ...] = ()  # the runner's padding (empty: none)
    seq_buckets: tuple[int, ...] = ()
    max_num_tokens: int | None = None  # KV capacity measured with this entry
    fit_error: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("prefill_square", "mixed_square"):
            if getattr(self, name) not in ("sum", "total"):
                raise ProfileError(f"{name} must be 'sum' or 'total', got {getattr(self, name)!r}")
        for name in ("prefill", "decode_small", "decode_large"):
            if len(getattr(self, name)) != 3:
                raise ProfileError(f"{name} needs 3 coefficients [a, b, c], got {getattr(self, name)!r}")
        if self.mixed is not None and len(self.mixed) != 4:
            raise ProfileError(f"mixed needs 4 coefficients [a, b, c, d], got {self.mixed!r}")

    # --------------------------------------------------------------- times (ms, whole pipeline)
    def prefill_ms(self, lengths: Sequence[int]) -> float:
        a, b, c = self.prefill
        x = _round_up(sum(lengths), self.token_buckets)
        y = x * x if self.prefill_square == "total" else sum(n * n for n in lengths)
        return a + b * x + c * y

    def decode_ms(self, num_rows: int, sum_ctx: int) -> float:
        """`sum_ctx` is sum(ctx_i + 1): the keys each row attends to."""
        a, b, c = self.decode_small if num_rows < self.decode_threshold else self.decode_large
        return a + b * sum_ctx + c * _round_up(num_rows, self.seq_buckets)

    def mixed_ms(self, chunks: Sequence[tuple[int, int]], num_dec: int, sum_ctx_dec: int) -> float:
        """`chunks`: (new tokens, context) per prefill chunk; decode rows: count and sum(ctx + 1)."""
        q = sum((c + n) ** 2 - c * c for n, c in chunks)
        if self.mixed is not None:
            a, b, c, d = self.mixed
            x = _round_up(sum(n for n, _ in chunks) + num_dec, self.token_buckets)
            if self.mixed_square == "total":
                q = x * x
            return a + b * x + c * q + d * sum_ctx_dec
        # Estimate: the prefill form on the chunks (its square term over the new keys), plus the
        # decode rows' attention and per-row cost (their constant is already in the prefill's).
        a, b, c = self.prefill
        x = _round_up(sum(n for n, _ in chunks), self.token_buckets)
        _, bd, cd = self.decode_small if num_dec < self.decode_threshold else self.decode_large
        return a + b * x + c * q + bd * sum_ctx_dec + cd * num_dec

    def to_dict(self) -> dict[str, Any]:
        d = {"prefill": list(self.prefill), "decode_small": list(self.decode_small),
             "decode_large": list(self.decode_large), "decode_threshold": self.decode_threshold,
             "prefill_square": self.prefill_square}
        if self.mixed_square != "sum":
            d["mixed_square"] = self.mixed_square
        for k in ("mixed", "max_num_tokens"):
            if getattr(self, k) is not None:
                d[k] = list(self.mixed) if k == "mixed" else self.max_num_tokens
        if self.token_buckets:
            d["token_buckets"] = list(self.token_buckets)
        if self.seq_buckets:
            d["seq_buckets"] = list(self.seq_buckets)
        if self.fit_error:
            d["fit_error"] = self.fit_error
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepCoefficients":
        try:
            return cls(prefill=tuple(d["prefill"]), decode_small=tuple(d["decode_small"]),
                       decode_large=tuple(d["decode_large"]), decode_threshold=int(d.get("decode_threshold", 95)),
                       mixed=tuple(d["mixed"]) if d.get("mixed") is not None else None,
                       prefill_square=d.get("prefill_square", "sum"), mixed_square=d.get("mixed_square", "sum"),
                       token_buckets=tuple(d.get("token_buckets", ())), seq_buckets=tuple(d.get("seq_buckets", ())),
                       max_num_tokens=d.get("max_num_tokens"), fit_error=dict(d.get("fit_error", {})))
        except (KeyError, TypeError) as e:
            raise ProfileError(f"bad profile entry {d!r}: {e}") from None


class StepModel:
    """The time one pipeline stage of an instance spends on a step (seconds), from its works.

    Works are classified as the real runner does: every context 0 -> prefill; every item one
    token -> decode; else mixed. `estimated` names what is not measured ("" when all is).
    """

    def __init__(self, coeffs: StepCoefficients, pp: int, stage_overhead_ms: float = 0.0, estimated: str = ""):
        self.coeffs, self.pp = coeffs, pp
        self._div = 1000.0 * pp  # ms of the pipeline -> s per stage
        self._overhead = stage_overhead_ms / 1000.0
        self.estimated = estimated

    def stage_time(self, works: Sequence[Any]) -> float:
        prefill = decode = True
        for w in works:
            if w.context_len:
                prefill = False
            if len(w.token_ids) != 1:
                decode = False
        c = self.coeffs
        if prefill:
            ms = c.prefill_ms([len(w.token_ids) for w in works])
        elif decode:
            return self.decode_time(len(works), sum(w.context_len for w in works) + len(works))
        else:
            chunks, nd, sd = [], 0, 0
            for w in works:
                n = len(w.token_ids)
                if n == 1 and w.context_len:
                    nd += 1
                    sd += w.context_len + 1
                else:
                    chunks.append((n, w.context_len))
            ms = c.mixed_ms(chunks, nd, sd)
        return max(ms, 0.0) / self._div + self._overhead

    def decode_time(self, num_rows: int, sum_ctx: int) -> float:
        """`stage_time` of a decode batch of `num_rows` rows whose contexts sum(ctx_i + 1) = `sum_ctx`
        (the same arithmetic, without the works)."""
        return max(self.coeffs.decode_ms(num_rows, sum_ctx), 0.0) / self._div + self._overhead


@dataclasses.dataclass
class Profile:
    """A model's latency coefficients on one kind of hardware, per profiled (tp, pp)."""

    model: ModelShape
    hardware: Hardware
    configs: dict[tuple[int, int], StepCoefficients]
    pp_model: str = "measured"  # or "analytic": pp > 1 derived from the pp = 1 entry
    stage_overhead_ms: float = 0.0
    kv_capacity: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)  # tokens
    source: str = ""
    name: str = ""

    def __post_init__(self):
        if self.pp_model not in ("measured", "analytic"):
            raise ProfileError(f"pp_model must be 'measured' or 'analytic', got {self.pp_model!r}")
        if not self.configs:
            raise ProfileError("a profile needs at least one (tp, pp) entry")

    @property
    def profiled(self) -> list[tuple[int, int]]:
        return sorted(self.configs)

    def supports(self, tp: int, pp: int) -> bool:
        try:
            self.step_model(tp, pp)
            return True
        except UnprofiledConfigError:
            return False

    def step_model(self, tp: int, pp: int) -> StepModel:
        """The stage-time model of an instance of this tp/pp; `UnprofiledConfigError` if none."""
        if not self.model.valid_tp(tp):
            raise UnprofiledConfigError(f"tp={tp} does not divide the {self.model.num_heads} heads of {self.model.name}")
        if not self.model.valid_pp(pp):
            raise UnprofiledConfigError(f"pp={pp} does not divide the {self.model.num_layers} layers of "
                                        f"{self.model.name}")
        if (tp, pp) in self.configs:
            return StepModel(self.configs[(tp, pp)], pp)
        if self.pp_model == "analytic" and (tp, 1) in self.configs:
            return StepModel(self.configs[(tp, 1)], pp, self.stage_overhead_ms,
                             estimated=f"pp={pp} derived from pp=1 (T/pp + {self.stage_overhead_ms} ms per stage)")
        raise UnprofiledConfigError(
            f"{self.name or self.model.name}: no latency profile for tp={tp}, pp={pp} (profiled: "
            f"{', '.join(f'tp{t}pp{p}' for t, p in self.profiled)}; pp model {self.pp_model}); profile it with "
            f"`python -m distserve_jax.planner profile --tp={tp} --pp={pp}` or choose a profiled degree")

    def kv_capacity_tokens(self, tp: int, pp: int) -> tuple[int, bool]:
        """(KV tokens an instance of tp x pp devices holds, whether that is an estimate)."""
        c = self.configs.get((tp, pp))
        if c is not None and c.max_num_tokens is not None:
            return c.max_num_tokens, False
        if (tp, pp) in self.kv_capacity:
            return self.kv_capacity[(tp, pp)], False
        hw = self.hardware
        free = tp * pp * hw.memory_bytes * hw.memory_fraction - self.model.weight_bytes
        return max(0, int(free // self.model.kv_bytes_per_token)), True

    def transfer_seconds(self, num_bytes: int, *, intra_bytes: int | None = None) -> float:
        """Time to move `num_bytes` of KV, of which `intra_bytes` (default all) over intra-node links."""
        hw = self.hardware
        intra = num_bytes if intra_bytes is None else intra_bytes
        return (hw.link_latency_s + intra * 8 / (hw.intra_node_gbit_s * 1e9)
                + (num_bytes - intra) * 8 / (hw.inter_node_gbit_s * 1e9))

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "source": self.source, "time_unit": "ms",
                "model": dataclasses.asdict(self.model), "hardware": dataclasses.asdict(self.hardware),
                "pp_model": self.pp_model, "stage_overhead_ms": self.stage_overhead_ms,
                "kv_capacity": [[t, p, n] for (t, p), n in sorted(self.kv_capacity.items())],
                "configs": [{"tp": t, "pp": p, **c.to_dict()} for (t, p), c in sorted(self.configs.items())]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ProfileError(f"not a {FORMAT} profile (format={d.get('format') if isinstance(d, dict) else d!r})")
        if d.get("time_unit", "ms") != "ms":
            raise ProfileError(f"profile time_unit must be 'ms', got {d.get('time_unit')!r}")
        try:
            model = ModelShape(**d["model"])
            hw = Hardware(**d.get("hardware", {"name": "unknown"}))
            configs = {(int(e["tp"]), int(e["pp"])): StepCoefficients.from_dict(e) for e in d["configs"]}
            cap = {(int(t), int(p)): int(n) for t, p, n in d.get("kv_capacity", [])}
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"malformed profile: {e}") from None
        return cls(model, hw, configs, d.get("pp_model", "measured"), float(d.get("stage_overhead_ms", 0.0)),
                   cap, d.get("source", ""), d.get("name", ""))

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"no profile file at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path} is not valid JSON: {e}") from None
        p = cls.from_dict(d)
        p.name = p.name or path.stem
        return p

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def kv_blocks(num_tokens: int, block_size: int) -> int:
    """BlockManager size (null page included) for a cache of `num_tokens` tokens."""
    return 1 + num_tokens // block_size


def round_up(n: int, buckets: tuple[int, ...]) -> int:
    """The runner's padding (`n` itself when there are no buckets or it exceeds them)."""
    return _round_up(n, buckets)


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b - 1e-12))
