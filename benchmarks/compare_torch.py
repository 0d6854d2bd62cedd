"""llm_jax against its PyTorch peers on the same machine, side by side: training and sampling.

    pip install -e ".[bench]"          # torch (CPU) and transformers
    python benchmarks/compare_torch.py
    python benchmarks/compare_torch.py --configs=small --train_impls=llm_jax,hf --steps=5

Training, for each shape of `CONFIGS` (issue 4's two), with fp32 AdamW + clipping on random tokens:
`llm_jax` is the training loop's own step (benchmarks/train_throughput.py's `run_row`: the
experiment built from the config as `train.run` builds it, mesh, shardings, donation), `hf` is
transformers' GPT2LMHeadModel, `nanogpt` / `nanogpt_compile` a nanoGPT-style torch GPT-2 eager /
under `torch.compile` (benchmarks/torch_peers.py). Sampling: llm_jax's KV-cache decoder
(`sampling.generate_padded`, one jit) against HF `generate` with its KV cache, on the small
shape, batch 8, 32-token prompts, 128 new tokens at temperature 1. A last table times the jit
compilation of the quickstart's train step (configs/quickstart.py).

Every measurement runs in a fresh child process (peak RSS is the child's own, caches and thread
pools never shared), one after the other. MFU uses llm_jax's `metrics.flops_per_token` for the
shape (the same architecture, so the same count for every implementation) against one peak for
the table: a measured float32 matmul (or `--peak_flops`). Ratios are llm_jax / the peer: higher
is better for tokens/s, lower for memory. See benchmarks/README.md for results and levers.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling benchmark modules
from bench_util import csv_list, error_text, machine_info, rss_peak_bytes, run_child, write_json_record  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

_MARKER = "@@COMPARE_ROW "
CONFIGS = {
    "small": dict(d_model=256, n_layers=4, n_heads=4, vocab_size=256, seq_len=256, batch_size=16),
    "medium": dict(d_model=512, n_layers=8, n_heads=8, vocab_size=8192, seq_len=512, batch_size=8),
}
TRAIN_IMPLS = ("llm_jax", "hf", "nanogpt", "nanogpt_compile")
SAMPLE_IMPLS = ("llm_jax", "hf")
SAMPLING = dict(batch_size=8, prompt_len=32, new_tokens=128)
TARGETS = {"train": 1.0, "sample": 2.0, "mfu": 0.60, "compile_s": 10.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", type=csv_list, default=csv_list("small,medium"), help=f"from {list(CONFIGS)}")
    p.add_argument("--train_impls", type=csv_list, default=csv_list(",".join(TRAIN_IMPLS)),
                   help=f"from {TRAIN_IMPLS}; empty = no training table")
    p.add_argument("--sample_impls", type=csv_list, default=csv_list(",".join(SAMPLE_IMPLS)),
                   help=f"from {SAMPLE_IMPLS}; empty = no sampling table")
    p.add_argument("--compile_check", type=int, default=1, help="1 = time the quickstart train step's compilation")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (torch.compile compiles in the first)")
    p.add_argument("--repeats", type=int, default=3, help="timed sampling calls per row")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per CPU, as XLA uses)")
    p.add_argument("--peak_flops", type=float, default=0.0, help="peak FLOP/s per device for MFU; 0 = measure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row_timeout", type=float, default=1800.0)
    p.add_argument("--json", default="", help="also write every row and the setup to this file")
    p.add_argument("--_row", default="", help=argparse.SUPPRESS)  # child: kind:impl[:config]
    args = p.parse_args(argv)
    for name, allowed in (("configs", CONFIGS), ("train_impls", TRAIN_IMPLS), ("sample_impls", SAMPLE_IMPLS)):
        bad = [x for x in getattr(args, name) if x not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; known: {', '.join(allowed)}")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first step compiles)")
    return args


# ----------------------------------------------------------------------------------------------
# Rows (each in its own child process)
# ----------------------------------------------------------------------------------------------

def _model_fields(shape: dict) -> dict:
    return {k: shape[k] for k in ("d_model", "n_layers", "n_heads")}


def llm_jax_train_row(shape: dict, args) -> dict:
    import train_throughput

    row = train_throughput.run_row("mini", "float32", batch_size=shape["batch_size"], seq_len=shape["seq_len"],
                                   steps=args.steps, warmup=args.warmup, seed=args.seed,
                                   # MFU is computed by the parent against one peak for all rows: any
                                   # positive value here just spares the child a peak measurement.
                                   peak_flops=args.peak_flops or 1.0, model_fields=_model_fields(shape),
                                   vocab_size=shape["vocab_size"])
    return {k: row[k] for k in ("params_total", "step_time_ms", "step_time_ms_min", "step_time_ms_max",
                                "tokens_per_sec", "compile_s", "loss", "flops_per_token")}


def llm_jax_sample_row(shape: dict, args) -> dict:
    import sampling_throughput

    fields = _model_fields(shape)
    if fields != {"d_model": 256, "n_layers": 4, "n_heads": 4}:
        raise ValueError("the sampling comparison uses the small shape (llm_jax's 'mini' size)")
    result = sampling_throughput.measure(argparse.Namespace(
        size="mini", style="gpt2", vocab=shape["vocab_size"], dtype="float32", repeats=args.repeats,
        seed=args.seed, decoders="cache", **SAMPLING))
    row = result["rows"][0]
    return dict(tokens_per_sec=row["tokens_per_sec"], call_s=row["call_s"], compile_s=row["compile_s"])


def quickstart_compile_row(args) -> dict:
    """Seconds to trace, lower and compile configs/quickstart.py's train step, as `train.run` does."""
    import jax
    import numpy as np

    from llm_jax import sharding, train

    config = runpy.run_path(os.path.join(_REPO_ROOT, "configs", "quickstart.py"))["get_config"]()
    config.train.peak_flops_per_device = 1.0
    exp = train.build_experiment(config)
    _, state_shardings, init_state = train.state_shardings_and_init(exp, config.seed)
    train_step, _, batch_sharding = train.compile_steps(exp, state_shardings)
    rows, length = config.data.batch_size // jax.process_count(), config.data.seq_len
    with sharding.mesh_context(exp.mesh):
        state = init_state()
        batch = sharding.shard_host_batch({"tokens": np.zeros((rows, length), np.int32),
                                           "mask": np.ones((rows, length), np.int32)}, batch_sharding)
        start = time.perf_counter()
        train_step.lower(state, batch).compile()
        return dict(compile_s=time.perf_counter() - start, size=config.model.size)


def run_row_here(kind: str, impl: str, config_name: str, args) -> dict:
    import torch_peers

    shape = CONFIGS.get(config_name, CONFIGS["small"])
    if kind == "train":
        row = (llm_jax_train_row(shape, args) if impl == "llm_jax" else
               torch_peers.train_row(impl, shape, steps=args.steps, warmup=args.warmup, seed=args.seed,
                                     threads=args.threads))
    elif kind == "sample":
        row = (llm_jax_sample_row(shape, args) if impl == "llm_jax" else
               torch_peers.sample_row(shape, repeats=args.repeats, seed=args.seed, threads=args.threads, **SAMPLING))
    elif kind == "compile":
        row = quickstart_compile_row(args)
    elif kind == "peak":
        import jax

        from llm_jax import metrics

        peak, source = metrics.peak_flops_per_device(jax.devices()[0], dtype="float32", override=args.peak_flops)
        row = dict(peak_flops=peak, peak_source=source, jax_version=jax.__version__)
    else:
        raise ValueError(f"unknown row kind {kind!r}")
    row["peak_rss_mib"] = rss_peak_bytes() / 2**20
    return row


def run_row(kind: str, impl: str, config_name: str, args) -> dict:
    argv = [f"--_row={kind}:{impl}:{config_name}", f"--steps={args.steps}", f"--warmup={args.warmup}",
            f"--repeats={args.repeats}", f"--threads={args.threads}", f"--peak_flops={args.peak_flops!r}",
            f"--seed={args.seed}"]
    row = run_child(__file__, argv, _MARKER, timeout=args.row_timeout)
    return {"kind": kind, "impl": impl, "config": config_name, **row}


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def train_table(config_name: str, rows: list[dict], flops_per_token: float, peak: float) -> list[str]:
    shape = CONFIGS[config_name]
    lines = [f"Training, {config_name}: d_model {shape['d_model']}, {shape['n_layers']} layers, {shape['n_heads']} "
             f"heads, vocab {shape['vocab_size']}, seq {shape['seq_len']}, batch {shape['batch_size']} "
             f"({flops_per_token / 1e6:.1f} MFLOP/token)",
             "| implementation | params | tokens/s | step ms (med) | MFU % | peak RSS MiB | compile s | llm_jax / this |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ours = next((r for r in rows if r["impl"] == "llm_jax" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | FAILED: {r['error'][:150]} |")
            continue
        mfu = r["tokens_per_sec"] * flops_per_token / peak
        lines.append(f"| {r['impl']} | {r['params_total']:,} | {r['tokens_per_sec']:,.0f} | {r['step_time_ms']:,.1f} | "
                     f"{100 * mfu:.1f} | {r['peak_rss_mib']:,.0f} | {r['compile_s']:.1f} | "
                     f"{_ratio(ours and ours['tokens_per_sec'], r['tokens_per_sec'])} |")
    peers = [r for r in rows if r["impl"] != "llm_jax" and "error" not in r]
    if ours and peers:
        best = max(peers, key=lambda r: r["tokens_per_sec"])
        mfu = ours["tokens_per_sec"] * flops_per_token / peak
        lines.append(f"\nllm_jax / fastest torch peer ({best['impl']}): {ours['tokens_per_sec'] / best['tokens_per_sec']:.2f}x "
                     f"tokens/s (target >= {TARGETS['train']:.1f}x); peak RSS {ours['peak_rss_mib'] / best['peak_rss_mib']:.2f}x "
                     f"its (target <= 1.0x); llm_jax MFU {100 * mfu:.1f}% (target >= {100 * TARGETS['mfu']:.0f}%)")
    return lines


def sample_table(rows: list[dict]) -> list[str]:
    s = CONFIGS["small"]
    lines = [f"Sampling, small shape (d_model {s['d_model']}, {s['n_layers']} layers, vocab {s['vocab_size']}): batch "
             f"{SAMPLING['batch_size']}, {SAMPLING['prompt_len']}-token prompts, {SAMPLING['new_tokens']} new tokens, "
             "temperature 1, KV cache",
             "| implementation | tokens/s | call ms (med) | compile / first call s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | FAILED: {r['error'][:150]} |")
            continue
        first = r.get("compile_s", r.get("first_call_s", 0.0))
        name = "llm_jax (sampling.generate_padded)" if r["impl"] == "llm_jax" else "hf (transformers generate)"
        lines.append(f"| {name} | {r['tokens_per_sec']:,.0f} | {1e3 * r['call_s']:,.1f} | {first:.2f} | "
                     f"{r['peak_rss_mib']:,.0f} |")
    ours = next((r for r in rows if r["impl"] == "llm_jax" and "error" not in r), None)
    hf = next((r for r in rows if r["impl"] == "hf" and "error" not in r), None)
    if ours and hf:
        lines.append(f"\nllm_jax / HF generate: {ours['tokens_per_sec'] / hf['tokens_per_sec']:.2f}x tokens/s "
                     f"(target >= {TARGETS['sample']:.1f}x)")
    return lines


def flops_per_token(config_name: str) -> float:
    from llm_jax import config_lib, metrics
    from llm_jax import model as model_lib

    shape = CONFIGS[config_name]
    config = config_lib.base_config()
    config.model.size = "mini"
    config_lib.set_fields(config, {f"model.{k}": v for k, v in _model_fields(shape).items()})
    model_cfg = model_lib.TransformerConfig.from_config(config.model, shape["vocab_size"], shape["seq_len"])
    return metrics.flops_per_token(model_cfg, shape["seq_len"])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._row:
        kind, impl, config_name = (args._row.split(":") + ["", ""])[:3]
        try:
            row = run_row_here(kind, impl, config_name, args)
        except Exception as e:  # noqa: BLE001  (any failure becomes the row's error)
            traceback.print_exc()
            row = {"error": error_text(e)}
        print(_MARKER + json.dumps(row), flush=True)
        return 0

    machine = machine_info()
    peak_row = run_row("peak", "", "", args)
    if "error" in peak_row:
        print(f"could not get the peak FLOP/s: {peak_row['error']}", file=sys.stderr)
        return 1
    peak = peak_row["peak_flops"]
    print(f"{machine['cpu']}, {machine['cpu_count']} CPUs, jax {peak_row['jax_version']}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {machine['load_average']}")
    print(f"peak for MFU: {peak / 1e9:,.1f} GFLOP/s ({peak_row['peak_source']}); medians of {args.steps} steps "
          f"after {args.warmup} warm-up\n", flush=True)

    rows, met = [], []
    for config_name in args.configs if args.train_impls else []:
        config_rows = [run_row("train", impl, config_name, args) for impl in args.train_impls]
        rows += config_rows
        fpt = flops_per_token(config_name)
        print("\n".join(train_table(config_name, config_rows, fpt, peak)) + "\n", flush=True)
        ours = next((r for r in config_rows if r["impl"] == "llm_jax" and "error" not in r), None)
        peers = [r["tokens_per_sec"] for r in config_rows if r["impl"] != "llm_jax" and "error" not in r]
        if ours and peers:
            met.append((f"train {config_name} >= {TARGETS['train']}x fastest peer",
                        ours["tokens_per_sec"] / max(peers) >= TARGETS["train"]))
            met.append((f"MFU {config_name} >= {100 * TARGETS['mfu']:.0f}%",
                        ours["tokens_per_sec"] * fpt / peak >= TARGETS["mfu"]))
    if args.sample_impls:
        sample_rows = [run_row("sample", impl, "small", args) for impl in args.sample_impls]
        rows += sample_rows
        print("\n".join(sample_table(sample_rows)) + "\n", flush=True)
        by_impl = {r["impl"]: r for r in sample_rows if "error" not in r}
        if {"llm_jax", "hf"} <= set(by_impl):
            met.append((f"sampling >= {TARGETS['sample']}x generate",
                        by_impl["llm_jax"]["tokens_per_sec"] / by_impl["hf"]["tokens_per_sec"] >= TARGETS["sample"]))
    if args.compile_check:
        row = run_row("compile", "", "", args)
        rows.append(row)
        if "error" in row:
            print(f"quickstart compile: FAILED: {row['error'][:200]}")
        else:
            print(f"quickstart train step ({row['size']}) compiles in {row['compile_s']:.1f} s "
                  f"(target < {TARGETS['compile_s']:.0f} s)")
            met.append((f"quickstart compile < {TARGETS['compile_s']:.0f} s", row["compile_s"] < TARGETS["compile_s"]))
    if met:
        print("targets: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in met))

    if args.json:
        command = "python benchmarks/compare_torch.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_json_record(args.json, command, args, machine, peak=peak_row,
                          configs={c: CONFIGS[c] for c in args.configs}, rows=rows, targets=dict(met))
    return 0 if all("error" not in r for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
