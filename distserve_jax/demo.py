"""Offline demo: generate from the embedded demo model and print the text and throughput.

    python -m distserve_jax.demo [--prompts=...] [--max_tokens=64] [--tp=1]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import time  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.DEFINE_multi_string("prompt", ["Tell me about the history of the printing press.",
                                             "How do I make a good cup of coffee?",
                                             "Write a short poem about the sea."], "Prompts to complete.")
MAX_TOKENS = flags.DEFINE_integer("max_tokens", 48, "Tokens to generate per prompt.")
TP = flags.DEFINE_integer("tp", 1, "Tensor-parallel degree.")
MODEL = flags.DEFINE_string("model", "demo", "Model directory or named config.")


def main(argv):
    del argv
    from distserve_jax import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(MODEL.value, tp=TP.value, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=512)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=MAX_TOKENS.value, ignore_eos=True)
    llm.engine.warmup()  # compile every step bucket outside the timing
    t1 = time.perf_counter()
    outs = llm.generate(FLAGS.value, params, use_tqdm=False)
    t2 = time.perf_counter()
    for prompt, out in zip(FLAGS.value, outs):
        print(f"\n>>> {prompt}\n{out.text!r}  [{len(out.token_ids)} tokens, {out.finish_reason}]")
    n = sum(len(o.token_ids) for o in outs)
    print(f"\nstart-up + compile {t1 - t0:.1f} s; generated {n} tokens in {t2 - t1:.2f} s "
          f"= {n / (t2 - t1):.1f} tokens/s (demo model: random weights, so the text is noise)")


if __name__ == "__main__":
    app.run(main)
