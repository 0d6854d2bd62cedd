"""Sampling throughput: llm_jax's KV-cache generation vs recomputing the whole forward per token.

    python benchmarks/sampling_throughput.py
    python benchmarks/sampling_throughput.py --size=tiny --style=llama --batch_size=32 --new_tokens=256

Defaults are REFERENCE-FIGURES' sampling setup: a GPT-2-style d256 L4 H4 model ("mini") with a
256-token vocabulary, batch 8, 32-token prompts, 128 new tokens, fp32, temperature-1 sampling (no
top-k / top-p, no EOS, so every row generates every token). Both decoders are one `jax.jit`, with
fixed shapes, compiled ahead of time (`.lower().compile()`, reported as "compile s") and then
timed over `--repeats` calls after one warm-up call, each ended by `jax.block_until_ready`:

- KV cache: `llm_jax.sampling.generate_padded` (prefill once, then one token per loop step).
- no cache: `generate_without_cache` below: every step runs the ordinary forward over a fixed
  [B, prompt + new] buffer (tokens so far, masked after each row's end) and samples from the
  logits at the row's last token; same model, same sampling function, same per-step keys.

tokens/s counts generated tokens (batch x new tokens) per second of a whole call, prefill included.
Both decoders draw with the same keys from (nearly) the same logits, so they should agree on the
tokens: the script prints the fraction that do, a cross-check of the cache.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

# Runnable from a checkout without `pip install -e .`.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import jax  # noqa: E402  (after the path set-up on purpose)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from llm_jax import config_lib, sampling  # noqa: E402
from llm_jax import model as model_lib  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="mini", help="a row of llm_jax.model.SIZES")
    p.add_argument("--style", default="gpt2", choices=("gpt2", "llama"))
    p.add_argument("--vocab", type=int, default=256, help="vocabulary size (padded to model.vocab_multiple=64)")
    p.add_argument("--dtype", default="float32", help="model.dtype")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per decoder (after one warm-up call)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoders", default="cache,no_cache", help="which decoders to time: cache, no_cache")
    return p.parse_args(argv)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def generate_without_cache(model: model_lib.Transformer, params, tokens_BxP, lengths_B, rng, *,
                           max_new_tokens: int, temperature=1.0, top_k=0, top_p=1.0):
    """The baseline: the full forward over a fixed [B, P + N] buffer at every step, so it
    compiles once (a buffer growing per token would compile once per length)."""
    B, P = tokens_BxP.shape
    S = P + max_new_tokens
    rows_B = jnp.arange(B)

    def step(t, buffer_BxS):
        length_B = lengths_B + t  # tokens so far in each row (right-padded)
        mask_BxS = jnp.arange(S)[None, :] < length_B[:, None]
        logits_BxSxV = model.apply({"params": params}, buffer_BxS, mask_BxL=mask_BxS)
        token_B = sampling.sample_token(logits_BxSxV[rows_B, length_B - 1], jax.random.fold_in(rng, t),
                                        temperature=temperature, top_k=top_k, top_p=top_p, greedy=False)
        return buffer_BxS.at[rows_B, length_B].set(token_B)

    buffer_BxS = jnp.zeros((B, S), jnp.int32).at[:, :P].set(tokens_BxP)
    buffer_BxS = jax.lax.fori_loop(0, max_new_tokens, step, buffer_BxS)
    return buffer_BxS[rows_B[:, None], lengths_B[:, None] + jnp.arange(max_new_tokens)[None, :]]


def _time_calls(fn, repeats: int) -> list[float]:
    jax.block_until_ready(fn())  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def measure(args: argparse.Namespace) -> dict:
    config = config_lib.base_config()
    config.model.size, config.model.style, config.model.dtype = args.size, args.style, args.dtype
    model_cfg = model_lib.TransformerConfig.from_config(config.model, vocab_size=args.vocab,
                                                        seq_len=args.prompt_len + args.new_tokens)
    model = model_lib.Transformer(model_cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(args.seed), jnp.zeros((1, 8), jnp.int32))["params"])
    B, P, N = args.batch_size, args.prompt_len, args.new_tokens
    tokens_BxP = jax.random.randint(jax.random.key(args.seed + 1), (B, P), 3, model_cfg.vocab_size, jnp.int32)
    lengths_B = jnp.full((B,), P, jnp.int32)
    rng = jax.random.key(args.seed + 2)
    # Traced sampling settings, as `sampling.generate` passes them (no EOS: -1).
    settings = dict(temperature=np.float32(1.0), top_k=np.int32(0), top_p=np.float32(1.0))
    all_decoders = {
        "KV cache (sampling.generate_padded)": (
            sampling.generate_padded, dict(settings, greedy=False, eos_id=np.int32(-1), pad_id=np.int32(0)),
            lambda out: out.tokens_BxN),
        "no cache (full forward per token)": (generate_without_cache, settings, lambda out: out),
    }
    wanted = [d.strip() for d in getattr(args, "decoders", "cache,no_cache").split(",")]
    unknown = set(wanted) - {"cache", "no_cache"}
    if unknown:
        raise ValueError(f"--decoders: unknown {sorted(unknown)}; known: cache, no_cache")
    decoders = {name: spec for (key, (name, spec)) in zip(("cache", "no_cache"), all_decoders.items()) if key in wanted}
    rows, tokens = [], []
    for name, (decoder, kwargs, get_tokens) in decoders.items():
        start = time.perf_counter()
        compiled = decoder.lower(model, params, tokens_BxP, lengths_B, rng, max_new_tokens=N, **kwargs).compile()
        compile_s = time.perf_counter() - start
        dynamic_kwargs = {k: v for k, v in kwargs.items() if k != "greedy"}  # static args are compiled in
        call = functools.partial(compiled, params, tokens_BxP, lengths_B, rng, **dynamic_kwargs)
        times = _time_calls(call, args.repeats)
        tokens.append(np.asarray(get_tokens(call())))
        median = statistics.median(times)
        rows.append({"decoder": name, "tokens_per_sec": B * N / median, "call_s": median,
                     "step_ms": 1e3 * median / N, "compile_s": compile_s})
    counts = model_lib.parameter_counts(params)
    both = len(rows) == 2
    return {"rows": rows, "ratio": rows[0]["tokens_per_sec"] / rows[1]["tokens_per_sec"] if both else None,
            "tokens_agree": float(np.mean(tokens[0] == tokens[1])) if both else None, "params": counts["total"],
            "model": model_cfg, "devices": f"{jax.devices()[0].device_kind} x{jax.device_count()}"}


def format_table(result: dict) -> str:
    lines = ["| decoder | tokens/s | call ms (med) | ms / token step | compile s |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['decoder']} | {r['tokens_per_sec']:,.0f} | {1e3 * r['call_s']:,.1f} | "
                     f"{r['step_ms']:.2f} | {r['compile_s']:.2f} |")
    if result["ratio"] is not None:
        lines.append(f"\nKV cache / no cache: {result['ratio']:.1f}x tokens/s (issue target >= 5x); "
                     f"the two decoders agree on {100 * result['tokens_agree']:.1f}% of the tokens")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = measure(args)
    cfg = result["model"]
    print(f"{args.style} {args.size}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, vocab "
          f"{cfg.vocab_size}, {result['params']:,} parameters, {cfg.dtype}; batch {args.batch_size}, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens; median of {args.repeats} calls; {result['devices']}\n")
    print(format_table(result))


if __name__ == "__main__":
    main()
