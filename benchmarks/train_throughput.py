"""Training throughput of llm_jax's own train step: tokens/s, step time, MFU, peak memory, compile time.

    python benchmarks/train_throughput.py --sizes=nano,tiny,mini --dtypes=float32
    python benchmarks/train_throughput.py --sizes=mini --dtypes=float32,bfloat16 --json=/tmp/bench.json

One row per size x dtype, each measured in a fresh child process (this script re-invoked with
`--_single_row=SIZE:DTYPE`), so peak RSS, caches and allocator state of one row never leak into
the next. A row builds the experiment exactly as the training loop does
(`train.build_experiment`, `train.state_shardings_and_init`, `train.compile_steps`), feeds random
byte-token batches placed with `sharding.shard_host_batch`, times `--warmup` + `--steps` steps with
`jax.block_until_ready` around each, and reports the median. MFU uses the loop's own formula,
`metrics.mfu(tokens/s, metrics.flops_per_token(model_cfg, seq_len), peak, device count)`, with one
peak for the whole table (measured once in its own process, or `--peak_flops`). XLA_FLAGS and
JAX_PLATFORMS are taken from the environment untouched. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_util, when loaded by path
import bench_util  # noqa: E402
from bench_util import csv_list, machine_info, rss_peak_bytes, run_child  # noqa: E402

# Runnable from a checkout without `pip install -e .`.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

_ROW_MARKER = "@@BENCH_ROW "
_PEAK_MARKER = "@@BENCH_PEAK "
DTYPES = ("float32", "bfloat16", "float16")
STYLES = ("gpt2", "llama", "bert")


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=csv_list, default=csv_list("nano,tiny,mini"),
                   help="comma-separated rows of llm_jax.model.SIZES")
    p.add_argument("--dtypes", type=csv_list, default=csv_list("float32"), help=f"compute dtypes, from {DTYPES}")
    p.add_argument("--batch_size", type=int, default=16, help="global batch (data.batch_size)")
    p.add_argument("--seq_len", type=int, default=256, help="data.seq_len")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--style", default="gpt2", choices=STYLES,
                   help="model.style; 'bert' benchmarks the encoder with the mlm task")
    p.add_argument("--remat", default="none", help="model.remat: none | full | dots")
    p.add_argument("--attention_impl", default="einsum", help="model.attention_impl: einsum | xla | cudnn")
    p.add_argument("--vocab_size", type=int, default=0,
                   help="embedding rows, random tokens drawn from all of them (0 = the byte tokenizer's, padded); "
                        "50304 for GPT-2's padded vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak_flops", type=float, default=0.0,
                   help="peak FLOP/s per device for MFU (like train.peak_flops_per_device); "
                        "0 = look up the device kind, or measure on CPU")
    p.add_argument("--row_timeout", type=float, default=3600.0, help="seconds before a row is given up")
    p.add_argument("--json", default="", help="also write the rows (and the setup) to this JSON file")
    # Internal: the child-process protocol.
    p.add_argument("--_single_row", default="", help=argparse.SUPPRESS)
    p.add_argument("--_peak_only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_peak_source", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from llm_jax import model as model_lib
    for size in args.sizes:
        if size not in model_lib.SIZES:
            p.error(f"--sizes: unknown size {size!r}; known: {', '.join(model_lib.SIZES)}")
    for dtype in args.dtypes:
        if dtype not in DTYPES:
            p.error(f"--dtypes: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if args.vocab_size < 0:
        p.error("--vocab_size must be >= 0")
    for name in ("batch_size", "seq_len", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


# ----------------------------------------------------------------------------------------------
# One row, in this process
# ----------------------------------------------------------------------------------------------

def make_config(size: str, dtype: str, *, batch_size: int, seq_len: int, style: str = "gpt2",
                remat: str = "none", attention_impl: str = "einsum", seed: int = 0,
                peak_flops: float = 0.0, model_fields: dict | None = None):
    """The training config a row benchmarks: base_config() with the model and data fields set
    (`model_fields`, e.g. {"d_model": 512}, set further `config.model` keys)."""
    from llm_jax import config_lib

    config = config_lib.base_config()
    config.seed = seed
    config.model.size = size
    config.model.style = style
    if style == "bert":
        config.model.kind, config.task = "encoder", "mlm"
    config.model.dtype = dtype
    config.model.remat = remat
    config.model.attention_impl = attention_impl
    config.data.tokenizer = "byte"
    config.data.seq_len = seq_len
    config.data.batch_size = batch_size
    config.train.peak_flops_per_device = peak_flops
    config.train.progress = False
    config_lib.set_fields(config, {f"model.{k}": v for k, v in (model_fields or {}).items()})
    return config




def _device_peak_bytes(devices) -> int | None:
    """Largest `peak_bytes_in_use` over the devices, or None where the backend does not report it
    (the CPU backend): then the caller falls back to the process' RSS."""
    peaks = []
    for device in devices:
        if device.platform == "cpu":
            return None
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001  (some backends raise instead of returning None)
            return None
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _random_batches(rng, count: int, local_rows: int, seq_len: int, vocab_size: int):
    import numpy as np

    for _ in range(count):
        yield {"tokens": rng.integers(0, vocab_size, size=(local_rows, seq_len), dtype=np.int32),
               "mask": np.ones((local_rows, seq_len), np.int32)}


def run_row(size: str, dtype: str, *, batch_size: int = 16, seq_len: int = 256, steps: int = 10,
            warmup: int = 2, style: str = "gpt2", remat: str = "none", attention_impl: str = "einsum",
            seed: int = 0, peak_flops: float = 0.0, peak_source: str = "", model_fields: dict | None = None,
            vocab_size: int = 0) -> dict:
    """Benchmarks one size x dtype in this process and returns the row as a dict.

    `vocab_size` > 0 gives the embedding exactly that many rows and draws the random tokens from
    all of them, whatever the byte tokenizer's size, so a row can match another implementation's
    shapes (compare_torch.py).

    `peak_flops` > 0 is used as is (reported with `peak_source`); otherwise the peak comes from
    `metrics.peak_flops_per_device`, exactly as the training loop gets it.
    Peak memory is meaningful only when this process ran nothing else (the CLI's child process).
    """
    import dataclasses

    import jax
    import numpy as np

    from llm_jax import metrics, sharding, train
    from llm_jax import model as model_lib

    row = dict(size=size, dtype=dtype, style=style, remat=remat, attention_impl=attention_impl,
               batch_size=batch_size, seq_len=seq_len, steps=steps, warmup=warmup)
    jax.devices()  # initialise the backend before the baseline memory reading
    row["baseline_rss_mib"] = rss_peak_bytes() / 2**20

    config = make_config(size, dtype, batch_size=batch_size, seq_len=seq_len, style=style, remat=remat,
                         attention_impl=attention_impl, seed=seed, peak_flops=peak_flops, model_fields=model_fields)
    exp = train.build_experiment(config)
    if vocab_size:
        model_cfg = dataclasses.replace(exp.model_cfg, vocab_size=vocab_size)
        exp = dataclasses.replace(exp, model_cfg=model_cfg, model=model_lib.Transformer(model_cfg))
    devices = list(exp.mesh.devices.flat)
    num_devices = len(devices)
    flops_per_token = metrics.flops_per_token(exp.model_cfg, seq_len)
    peak, source = metrics.peak_flops_per_device(devices[0], dtype=exp.model_cfg.dtype,
                                                 override=config.train.peak_flops_per_device)
    if peak_flops > 0 and peak_source:
        source = peak_source
    row.update(platform=devices[0].platform, device_kind=devices[0].device_kind, num_devices=num_devices,
               mesh=dict(exp.mesh.shape), flops_per_token=flops_per_token, peak_flops_per_device=peak,
               peak_source=source)

    _, state_shardings, init_state = train.state_shardings_and_init(exp, seed)
    train_step, _, batch_sharding = train.compile_steps(exp, state_shardings)
    local_rows = batch_size // jax.process_count()
    rng = np.random.default_rng(seed)
    with sharding.mesh_context(exp.mesh):
        state = init_state()
        counts = model_lib.parameter_counts(state.params)
        row.update(params_total=counts["total"], params_non_embedding=counts["non_embedding"])
        # A few distinct batches, on device before timing: the step is measured, not the host's
        # random number generator or the host-to-device copy (the loop overlaps those with compute).
        batches = [sharding.shard_host_batch(b, batch_sharding)
                   for b in _random_batches(rng, min(4, warmup + steps), local_rows, seq_len,
                                            vocab_size or exp.tokenizer.vocab_size)]

        start = time.perf_counter()
        lowered = train_step.lower(state, batches[0])
        row["lower_s"] = time.perf_counter() - start
        compiled = lowered.compile()
        row["compile_s"] = time.perf_counter() - start  # trace + lower + XLA compile

        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, step_metrics = compiled(state, batches[i % len(batches)])
            jax.block_until_ready((state, step_metrics))
            if i >= warmup:
                times.append(time.perf_counter() - start)
        loss = float(jax.device_get(step_metrics["train/loss"]))

    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} after {warmup + steps} steps")
    step_time = statistics.median(times)
    tokens_per_sec = batch_size * seq_len / step_time
    device_peak = _device_peak_bytes(devices)
    row.update(
        step_time_ms=step_time * 1e3, step_time_ms_min=min(times) * 1e3, step_time_ms_max=max(times) * 1e3,
        step_time_ms_mean=statistics.fmean(times) * 1e3, tokens_per_sec=tokens_per_sec,
        # The training loop's train/mfu, term for term.
        mfu=metrics.mfu(tokens_per_sec, flops_per_token, peak, num_devices),
        loss=loss,
        peak_memory_mib=(device_peak if device_peak is not None else rss_peak_bytes()) / 2**20,
        memory_kind="device peak_bytes_in_use (max over devices)" if device_peak is not None else "process peak RSS",
    )
    return row


def measure_peaks(dtypes, override: float = 0.0) -> dict:
    """Peak FLOP/s per device for each dtype, as the training loop would get it, and the setup."""
    import jax

    from llm_jax import metrics

    device = jax.devices()[0]
    peaks = {}
    for dtype in dtypes:
        peak, source = metrics.peak_flops_per_device(device, dtype=dtype, override=override)
        peaks[dtype] = {"peak_flops_per_device": peak, "peak_source": source}
    return dict(peaks=peaks, platform=device.platform, device_kind=device.device_kind,
                device_count=jax.device_count(), jax_version=jax.__version__)


# ----------------------------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------------------------

def _common_flags(args) -> list[str]:
    return [f"--batch_size={args.batch_size}", f"--seq_len={args.seq_len}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--style={args.style}", f"--remat={args.remat}",
            f"--attention_impl={args.attention_impl}", f"--seed={args.seed}", f"--vocab_size={args.vocab_size}"]








def run_row_subprocess(args, size: str, dtype: str, peak: dict | None = None, *, env=None) -> dict:
    """One row in a fresh interpreter; a failure (exception, OOM kill, timeout) becomes `error`."""
    argv = [f"--_single_row={size}:{dtype}", *_common_flags(args)]
    if peak:
        argv += [f"--peak_flops={peak['peak_flops_per_device']!r}", f"--_peak_source={peak['peak_source']}"]
    elif args.peak_flops > 0:
        argv += [f"--peak_flops={args.peak_flops!r}"]
    row = run_child(__file__, argv, _ROW_MARKER, timeout=args.row_timeout, env=env)
    return {"size": size, "dtype": dtype, **row}


def _child_main(args) -> None:
    if args._peak_only:
        try:
            result = measure_peaks(args.dtypes, args.peak_flops)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
        print(_PEAK_MARKER + json.dumps(result), flush=True)
        return
    size, _, dtype = args._single_row.partition(":")
    try:
        row = run_row(size, dtype, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                      warmup=args.warmup, style=args.style, remat=args.remat,
                      attention_impl=args.attention_impl, seed=args.seed, peak_flops=args.peak_flops,
                      peak_source=args._peak_source, vocab_size=args.vocab_size)
    except Exception as e:  # noqa: BLE001  (every failure becomes the row's error)
        traceback.print_exc()
        row = {"size": size, "dtype": dtype, "error": bench_util.error_text(e)}
    print(_ROW_MARKER + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

# (header, width, formatter of a successful row)
_COLUMNS = (
    ("size", 11, lambda r: r["size"]),
    ("dtype", 9, lambda r: r["dtype"]),
    ("params (total / non-emb)", 25,
     lambda r: f"{r['params_total']:,} / {r['params_non_embedding']:,}"),
    ("tokens/s", 10, lambda r: f"{r['tokens_per_sec']:,.0f}"),
    ("step ms (med)", 13, lambda r: f"{r['step_time_ms']:,.1f}"),
    ("MFU %", 7, lambda r: f"{100 * r['mfu']:.2f}"),
    ("peak MiB", 9, lambda r: f"{r['peak_memory_mib']:,.0f}"),
    ("compile s", 9, lambda r: f"{r['compile_s']:.2f}"),
)


def format_header() -> str:
    return bench_util.format_header(_COLUMNS, 2)


def format_row(row: dict, max_error: int = 160) -> str:
    size_dtype = f"{row['size']:<{_COLUMNS[0][1]}}  {row['dtype']:<{_COLUMNS[1][1]}}"
    if row.get("error"):
        error = row["error"] if len(row["error"]) <= max_error else row["error"][:max_error - 3] + "..."
        return f"{size_dtype}  FAILED: {error}"
    cells = [f"{fmt(row):>{w}}" for _, w, fmt in _COLUMNS[2:]]
    return size_dtype + "  " + "  ".join(cells)


def format_table(rows) -> str:
    return "\n".join([format_header(), *(format_row(r) for r in rows)])


def _peak_lines(peak_info: dict) -> list[str]:
    by_figure: dict[tuple, list[str]] = {}
    for dtype, p in peak_info["peaks"].items():
        by_figure.setdefault((p["peak_flops_per_device"], p["peak_source"]), []).append(dtype)
    return [f"peak: {peak / 1e9:,.1f} GFLOP/s per device ({source})"
            + (f" for {', '.join(dtypes)}" if len(by_figure) > 1 else "")
            for (peak, source), dtypes in by_figure.items()]




def main(argv=None) -> int:
    args = parse_args(argv)
    if args._single_row or args._peak_only:
        _child_main(args)
        return 0

    command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    peak_info = run_child(__file__, [f"--dtypes={','.join(args.dtypes)}", f"--peak_flops={args.peak_flops!r}",
                            "--_peak_only"], _PEAK_MARKER, timeout=args.row_timeout)
    if "error" in peak_info:
        print(f"could not get the peak FLOP/s: {peak_info['error']}", file=sys.stderr)
        return 1
    machine = machine_info()
    print(f"{peak_info['platform']} x{peak_info['device_count']} ({peak_info['device_kind']}), "
          f"jax {peak_info['jax_version']}, {machine['cpu_count']} CPUs; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"style={args.style} batch={args.batch_size} seq_len={args.seq_len} steps={args.steps} "
          f"(median, after {args.warmup} warm-up) remat={args.remat} attention={args.attention_impl}")
    for line in _peak_lines(peak_info):
        print(line)
    print(format_header(), flush=True)

    rows = []
    for size in args.sizes:
        for dtype in args.dtypes:
            row = run_row_subprocess(args, size, dtype, peak_info["peaks"][dtype])
            rows.append(row)
            print(format_row(row), flush=True)
    memory_kinds = sorted({r["memory_kind"] for r in rows if "memory_kind" in r})
    if memory_kinds:
        print(f"peak MiB: {'; '.join(memory_kinds)}")

    if args.json:
        bench_util.write_json_record(args.json, command, args, machine, **peak_info, rows=rows)
    return 0 if all("error" not in r for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
