"""The offline API for research code: `LLM(model, ...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from typing import Sequence

import jax
from tqdm import tqdm

from distserve_jax.engine.factory import build_core
from distserve_jax.engine.validation import validate_prompt
from distserve_jax.engine.output_processor import RequestOutput
from distserve_jax.sampling_params import SamplingParams


class LLM:
    """Generates from a model on local devices.

    Args:
      model: a Hugging Face model directory, or a named config in `configs/models/` (e.g. "demo").
      dtype: float32, bfloat16 or float16.
      tp: tensor-parallel degree (devices of one mesh).
      devices: devices to use (default: all).
      placement: a `Placement`, a placement YAML file, or "auto": serve disaggregated (prefill and
        decode on disjoint meshes). Without it one mesh runs both phases.
      mode: "disaggregated", "colocated" or "chunked" (default: disaggregated with a placement,
        else colocated).
      **engine_kwargs: `EngineConfig` fields (max_model_len, num_blocks, max_num_seqs, ...).
    """

    def __init__(self, model: str, *, dtype: str = "float32", tp: int = 1,
                 devices: Sequence[jax.Device] | None = None, placement=None, mode: str | None = None,
                 **engine_kwargs):
        mode = mode or ("disaggregated" if placement is not None else "colocated")
        self.engine = build_core(model, mode=mode, placement=placement, tp=tp, devices=devices, dtype=dtype,
                                 **engine_kwargs)
        self.spec = self.engine.spec
        self._counter = 0

    @property
    def tokenizer(self):
        return self.spec.tokenizer

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt (any number) and returns their final outputs in order.

        Every prompt is validated first; on a bad one a ValueError names it and nothing runs.
        """
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        items = list(prompts) if prompts is not None else list(prompt_token_ids)
        n = len(items)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != n:
                raise ValueError(f"got {len(sampling_params)} sampling_params for {n} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * n
        eng = self.engine
        for i, item in enumerate(items):  # validate everything before queueing anything
            try:
                validate_prompt(self.spec, eng.max_model_len, item if prompts is not None else None,
                                item if prompts is None else None)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        ids = []
        try:
            for item, p in zip(items, params):
                rid = f"llm-{self._counter}"
                self._counter += 1
                if prompts is not None:
                    eng.add_request(rid, prompt=item, params=p)
                else:
                    eng.add_request(rid, prompt_token_ids=item, params=p)
                ids.append(rid)
            finals: dict[str, RequestOutput] = {}
            bar = tqdm(total=n, desc="generate", disable=not use_tqdm)
            while len(finals) < n:
                for out in eng.step():
                    if out.finished:
                        finals[out.request_id] = out
                        bar.update(1)
            bar.close()
        except BaseException:
            for rid in ids:
                eng.abort_request(rid)
            raise
        return [finals[r] for r in ids]
