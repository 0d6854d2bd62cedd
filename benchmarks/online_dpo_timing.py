"""Where an online-DPO iteration spends its time: sampling (and scoring) vs training.

    python benchmarks/online_dpo_timing.py
    python benchmarks/online_dpo_timing.py --online_iterations=5 --online_prompts=64 --json=/tmp/online.json

In one child process (this script re-invoked with `--_child`): `llm_jax.train.run` fine-tunes a
small SFT policy for `--online_sft_steps` steps in a temporary directory, then
`llm_jax.online_dpo.run` runs `--online_iterations` iterations from it with the gold scorer, and
the table is read back from its `metrics.jsonl`: `online/sample_seconds` (sampling K answers per
prompt, scoring them, and the policy's and reference's log-probs of the samples for the KL),
`online/train_seconds` (the reference log-probs of the new pairs, batching them, and
`steps_per_iteration` DPO steps) and `online/pairs`. The first iteration includes the compilation
of every jitted function it calls. XLA_FLAGS and JAX_PLATFORMS are taken from the environment
untouched. See benchmarks/README.md ("Post-training").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_util, when loaded by path
from bench_util import error_text, format_header, machine_info, run_child, write_json_record  # noqa: E402

# Runnable from a checkout without `pip install -e .`.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

_MARKER = "@@BENCH_ONLINE "


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="tiny", help="the policy's size, a row of llm_jax.model.SIZES")
    p.add_argument("--style", default="gpt2", choices=("gpt2", "llama"), help="model.style")
    p.add_argument("--dtype", default="float32", help="model.dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--online_iterations", type=int, default=3, help="online-DPO iterations")
    p.add_argument("--online_size", default="", help="the online-DPO policy's size ('' = --size)")
    p.add_argument("--online_sft_steps", type=int, default=60,
                   help="SFT steps (learning rate 3e-3) that make the starting policy")
    p.add_argument("--online_tasks", default="add,sort,reverse,count", help="data.tasks of the SFT and online-DPO runs")
    p.add_argument("--online_seq_len", type=int, default=64, help="data.seq_len of the SFT and online-DPO runs")
    p.add_argument("--online_batch_size", type=int, default=16, help="pairs per online-DPO step (data.batch_size)")
    p.add_argument("--online_prompts", type=int, default=32, help="online_dpo.prompts_per_iteration")
    p.add_argument("--online_samples", type=int, default=4, help="online_dpo.samples_per_prompt")
    p.add_argument("--online_new_tokens", type=int, default=24, help="online_dpo.max_new_tokens")
    p.add_argument("--online_steps_per_iteration", type=int, default=8, help="online_dpo.steps_per_iteration")
    p.add_argument("--row_timeout", type=float, default=1800.0, help="seconds before the child process is given up")
    p.add_argument("--json", default="", help="also write the result (and the setup) to this JSON file")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from llm_jax import model as model_lib
    if (args.online_size or args.size) not in model_lib.SIZES:
        p.error(f"unknown size {args.online_size or args.size!r}; known: {', '.join(model_lib.SIZES)}")
    for name in ("online_iterations", "online_sft_steps", "online_seq_len", "online_batch_size", "online_prompts",
                 "online_samples", "online_new_tokens", "online_steps_per_iteration"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def online_configs(args, sft_dir: str):
    """(SFT config, online-DPO config): a short SFT run on the embedded tasks, then online DPO from it
    with the gold scorer."""
    from llm_jax import config_lib

    common = {"seed": args.seed, "model.size": args.online_size or args.size, "model.style": args.style,
              "model.dtype": args.dtype, "data.seq_len": args.online_seq_len,
              "data.batch_size": args.online_batch_size, "data.tasks": args.online_tasks, "data.num_examples": 512,
              "data.num_eval_examples": 16, "data.prefetch": 0, "train.log_every": 1, "train.eval_batches": 1,
              "train.progress": False, "train.keep_checkpoints": 1}
    sft = config_lib.set_fields(config_lib.base_config(), {**common, **{
        "task": "sft", "train.num_steps": args.online_sft_steps, "train.eval_every": args.online_sft_steps,
        "train.checkpoint_every": args.online_sft_steps, "optimizer.learning_rate": 3e-3,
        "optimizer.warmup_steps": min(10, args.online_sft_steps // 10)}})
    num_steps = args.online_iterations * args.online_steps_per_iteration
    online = config_lib.set_fields(config_lib.base_config(), {**common, **{
        "task": "online_dpo", "train.init_from": sft_dir, "train.num_steps": num_steps,
        "train.eval_every": num_steps, "train.checkpoint_every": num_steps, "optimizer.learning_rate": 1e-4,
        "optimizer.warmup_steps": 0, "online_dpo.scorer": "gold",
        "online_dpo.steps_per_iteration": args.online_steps_per_iteration,
        "online_dpo.prompts_per_iteration": args.online_prompts,
        "online_dpo.samples_per_prompt": args.online_samples,
        "online_dpo.max_new_tokens": args.online_new_tokens}})
    return sft, online


def run_online(args) -> dict:
    """Short SFT, then online DPO; the per-iteration split read back from its metrics.jsonl."""
    import jax

    from llm_jax import metrics, online_dpo, train

    with tempfile.TemporaryDirectory(prefix="online_dpo_timing_") as tmp:
        sft_dir, online_dir = os.path.join(tmp, "sft"), os.path.join(tmp, "online_dpo")
        sft_config, online_config = online_configs(args, sft_dir)
        start = time.perf_counter()
        train.run(sft_config, sft_dir)
        sft_s = time.perf_counter() - start
        start = time.perf_counter()
        online_dpo.run(online_config, online_dir)
        online_s = time.perf_counter() - start
        logged = metrics.read_metrics(os.path.join(online_dir, "metrics.jsonl"))
    iterations = [{"iteration": int(r["online/iteration"]), "sample_s": r["online/sample_seconds"],
                   "train_s": r["online/train_seconds"], "pairs": int(r["online/pairs"]),
                   "gold_reward": r.get("online/gold_reward"), "loss": r.get("train/loss")}
                  for r in logged if "online/sample_seconds" in r]
    device = jax.devices()[0]
    return {"size": online_config.model.size, "tasks": online_config.data.tasks, "seq_len": online_config.data.seq_len,
            "pairs_per_step": online_config.data.batch_size, "sft_steps": sft_config.train.num_steps,
            "prompts_per_iteration": online_config.online_dpo.prompts_per_iteration,
            "samples_per_prompt": online_config.online_dpo.samples_per_prompt,
            "max_new_tokens": online_config.online_dpo.max_new_tokens,
            "steps_per_iteration": online_config.online_dpo.steps_per_iteration,
            "platform": device.platform, "num_devices": jax.device_count(),
            "sft_run_s": sft_s, "online_run_s": online_s, "iterations": iterations}


def _flags(args) -> list[str]:
    return [f"--size={args.size}", f"--style={args.style}", f"--dtype={args.dtype}", f"--seed={args.seed}",
            f"--online_iterations={args.online_iterations}", f"--online_size={args.online_size}",
            f"--online_sft_steps={args.online_sft_steps}", f"--online_tasks={args.online_tasks}",
            f"--online_seq_len={args.online_seq_len}",
            f"--online_batch_size={args.online_batch_size}", f"--online_prompts={args.online_prompts}",
            f"--online_samples={args.online_samples}", f"--online_new_tokens={args.online_new_tokens}",
            f"--online_steps_per_iteration={args.online_steps_per_iteration}"]


def run_online_subprocess(args, *, env=None) -> dict:
    return run_child(__file__, ["--_child", *_flags(args)], _MARKER,
                      timeout=args.row_timeout, env=env)


_ONLINE_COLUMNS = (
    ("iteration", 9, lambda r: f"{r['iteration']}" + (" *" if r["iteration"] == 1 else "")),
    ("sampling s", 10, lambda r: f"{r['sample_s']:.2f}"),
    ("training s", 10, lambda r: f"{r['train_s']:.2f}"),
    ("sampling %", 10, lambda r: f"{100 * r['sample_s'] / max(r['sample_s'] + r['train_s'], 1e-12):.1f}"),
    ("pairs", 5, lambda r: f"{r['pairs']}"),
)


def format_online_table(result: dict) -> str:
    if result.get("error"):
        return f"online DPO FAILED: {result['error']}"
    lines = [format_header(_ONLINE_COLUMNS, 1)]
    for r in result["iterations"]:
        lines.append("  ".join(f"{fmt(r):<{w}}" if i == 0 else f"{fmt(r):>{w}}"
                               for i, (_, w, fmt) in enumerate(_ONLINE_COLUMNS)))
    later = result["iterations"][1:]
    if later:
        mean = {"iteration": 0, "sample_s": statistics.fmean(r["sample_s"] for r in later),
                "train_s": statistics.fmean(r["train_s"] for r in later),
                "pairs": round(statistics.fmean(r["pairs"] for r in later))}
        cells = ["2.. mean", *(fmt(mean) for _, _, fmt in _ONLINE_COLUMNS[1:])]
        lines.append("  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                               for i, (c, (_, w, _)) in enumerate(zip(cells, _ONLINE_COLUMNS))))
    lines.append("* includes the compilation of sampling, scoring, reference log-probs and the DPO step")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        try:
            result = run_online(args)
        except Exception as e:  # noqa: BLE001  (every failure becomes the table's error)
            traceback.print_exc()
            result = {"error": error_text(e)}
        print(_MARKER + json.dumps(result), flush=True)
        return 0

    command = "python benchmarks/online_dpo_timing.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = machine_info()
    print(f"{machine['cpu_count']} CPUs ({machine['cpu']}), load average {machine['load_average']}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    print(f"online DPO ({args.online_size or args.size}, gold scorer): {args.online_iterations} iterations of "
          f"{args.online_prompts} prompts x {args.online_samples} samples x {args.online_new_tokens} new tokens, "
          f"then {args.online_steps_per_iteration} DPO steps of {args.online_batch_size} pairs "
          f"(seq_len {args.online_seq_len}), from {args.online_sft_steps} SFT steps on {args.online_tasks}",
          flush=True)
    online = run_online_subprocess(args)
    print(format_online_table(online), flush=True)
    if args.json:
        write_json_record(args.json, command, args, machine, online=online)
    return 2 if "error" in online else 0


if __name__ == "__main__":
    sys.exit(main())
