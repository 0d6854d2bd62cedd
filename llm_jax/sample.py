"""Samples from a trained run:

    python -m llm_jax.sample --workdir=runs/quickstart --prompt="def fib(" --prompt="import "
    python -m llm_jax.sample --workdir=runs/quickstart --prompt="class " --greedy --max_new_tokens=64
    python -m llm_jax.sample --workdir=runs/quickstart --prompt="" --num_samples=4 --seed=1

Rebuilds the run's experiment from `workdir/config.json` (model, tokenizer, mesh), restores the
newest checkpoint's parameters with the training shardings, encodes each `--prompt` with the
run's tokenizer and prints prompt + completion for every sample (llm_jax.sampling: KV cache, one
jitted loop). An empty prompt starts from EOS, the separator the model saw between documents.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax

from llm_jax import sampling, sharding, train


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llm_jax.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a training run's workdir (config.json + checkpoints)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max_new_tokens", type=int, default=128,
                   help="tokens per sample (cut to what fits the model's max_len after the longest prompt)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-k/top-p)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    return p.parse_args(argv)


def sample_texts(exp, params, prompts: Sequence[str], *, num_samples: int, max_new_tokens: int, seed: int,
                 temperature: float, top_k: int, top_p: float, greedy: bool) -> list[list[str]]:
    """Completions (text after each prompt, EOS removed): one list of `num_samples` per prompt."""
    tok = exp.tokenizer
    encoded = [tok.encode(p) or [tok.eos_id] for p in prompts]
    room = exp.model_cfg.max_len - max(map(len, encoded))
    if room < 1:
        raise ValueError(f"the longest prompt has {max(map(len, encoded))} tokens; the model's context is "
                         f"{exp.model_cfg.max_len}")
    if max_new_tokens > room:
        print(f"note: max_new_tokens cut from {max_new_tokens} to {room} (model max_len "
              f"{exp.model_cfg.max_len})", file=sys.stderr)
        max_new_tokens = room
    batch = [ids for ids in encoded for _ in range(num_samples)]
    with sharding.mesh_context(exp.mesh):
        out = sampling.generate(exp.model, params, batch, max_new_tokens=max_new_tokens, rng=seed,
                                temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                                eos_id=tok.eos_id, pad_id=tok.pad_id)
    tokens_BxN, lengths_B = jax.device_get((out.tokens_BxN, out.lengths_B))
    texts = [tok.decode([t for t in row[:n] if t != tok.eos_id]) for row, n in zip(tokens_BxN, lengths_B)]
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        exp, params = train.load_run(args.workdir)
        completions = sample_texts(exp, params, args.prompt, num_samples=args.num_samples,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   greedy=args.greedy)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for i, (prompt, samples) in enumerate(zip(args.prompt, completions)):
        for j, completion in enumerate(samples):
            print(f"=== prompt {i + 1}/{len(args.prompt)}, sample {j + 1}/{args.num_samples} ===")
            print(prompt + completion)


if __name__ == "__main__":
    main()
