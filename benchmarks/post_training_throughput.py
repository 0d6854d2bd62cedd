"""Post-training throughput: the DPO train step against the SFT step on the same tokens.

    python benchmarks/post_training_throughput.py --repeats=3
    python benchmarks/post_training_throughput.py --size=mini --batch_size=8 --seq_len=128 --json=/tmp/post.json

(Where an online-DPO iteration spends its time is benchmarks/online_dpo_timing.py.)

One row per step, each measured in a fresh child process (this script re-invoked with
`--_single_row=KIND`), on the same random pair batches (same seed), shaped as
`llm_jax/data/post_training.py` makes them: `tokens` / `mask` / `loss_mask` int32[B, 2, L] (a shared
prompt, then a chosen and a rejected response + EOS, right-padded; `loss_mask` on response tokens and
EOS), `valid` int32[B], `reference_logps` float32[B, 2]:

  sft         `steps.make_train_step(task='sft')` on the 2B sequences of those pairs as SFT rows
              (chosen and rejected flattened, [2B, L]): the same tokens through the same model
  dpo_cached  `steps.make_dpo_train_step` with `dpo.reference='cached'`: the batch carries the
              reference log-probs, computed beforehand by `recipes.jit_reference_logps` (the
              time of that forward pass per batch is reported too: DPO pays it once per dataset)
  dpo_online  the same step with `dpo.reference='online'`: the frozen reference parameters are the
              step's extra argument and the reference forward runs inside every step

Each row builds the experiment as the training loop does (`train.build_experiment`,
`train.state_shardings_and_init`) and jits its step through `train.compile_steps` with a
`recipes.Recipe` holding just that step, its batch keys and (online) the reference's shardings:
the same in/out shardings and donation `train.run` gives it. The reference is the initial policy
itself (a second `init_state()`, so the donated state never aliases it): at the first step policy
and reference agree and the DPO loss is log 2, a check recorded as `first_loss`. Steps are timed
after `--warmup` untimed ones, each ended by `jax.block_until_ready`; the median is reported, and
the ratio of each DPO row to the SFT row's median. `--repeats=N` runs N rounds of children, the
kinds taking turns, and adds a table of medians over the rounds (on a shared machine the load
drifts between children; taking turns spreads that over every kind).

XLA_FLAGS and JAX_PLATFORMS are taken from the environment untouched. See benchmarks/README.md.
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
from bench_util import (csv_list, error_text, format_header, machine_info, rss_peak_bytes,  # noqa: E402
                        run_child, write_json_record)

# Runnable from a checkout without `pip install -e .`.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

_ROW_MARKER = "@@BENCH_ROW "
KINDS = ("sft", "dpo_cached", "dpo_online")
_DESCRIPTIONS = {
    "sft": "SFT step, 2B sequences",
    "dpo_cached": "DPO step, cached reference",
    "dpo_online": "DPO step, reference each step",
}


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="tiny", help="a row of llm_jax.model.SIZES")
    p.add_argument("--style", default="gpt2", choices=("gpt2", "llama"), help="model.style")
    p.add_argument("--dtype", default="float32", help="model.dtype")
    p.add_argument("--batch_size", type=int, default=16,
                   help="pairs per DPO step (the SFT row gets 2x as many sequences)")
    p.add_argument("--seq_len", type=int, default=64, help="data.seq_len")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of child processes, kinds taking turns; the table shows medians over rounds")
    p.add_argument("--rows", type=csv_list, default=list(KINDS), help=f"step rows, from {KINDS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row_timeout", type=float, default=1800.0, help="seconds before a child process is given up")
    p.add_argument("--json", default="", help="also write the rows (and the setup) to this JSON file")
    # Internal: the child-process protocol.
    p.add_argument("--_single_row", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from llm_jax import model as model_lib
    if args.size not in model_lib.SIZES:
        p.error(f"unknown size {args.size!r}; known: {', '.join(model_lib.SIZES)}")
    for kind in args.rows:
        if kind not in KINDS:
            p.error(f"--rows: unknown row {kind!r}; known: {', '.join(KINDS)}")
    for name in ("batch_size", "seq_len", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.seq_len < 4:
        p.error("--seq_len must be >= 4 (a prompt token, a response token and EOS, for two responses)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


# ----------------------------------------------------------------------------------------------
# Table 1: one step, in this process
# ----------------------------------------------------------------------------------------------

def make_config(kind: str, *, size: str, batch_size: int, seq_len: int, style: str = "gpt2",
                dtype: str = "float32", seed: int = 0):
    """base_config() for one row: task 'sft' with 2 x batch_size sequences, or task 'dpo' with
    batch_size pairs and the reference cached or run online."""
    from llm_jax import config_lib

    if kind not in KINDS:
        raise ValueError(f"unknown row {kind!r}; known: {KINDS}")
    config = config_lib.base_config()
    config.seed = seed
    config.model.size = size
    config.model.style = style
    config.model.dtype = dtype
    config.data.tokenizer = "byte"
    config.data.seq_len = seq_len
    config.train.progress = False
    if kind == "sft":
        config.task = "sft"
        config.data.batch_size = 2 * batch_size
    else:
        config.task = "dpo"
        config.data.batch_size = batch_size
        config.dpo.reference = "cached" if kind == "dpo_cached" else "online"
        # validate() wants a reference model's workdir; the benchmark passes the initial parameters
        # themselves instead and never reads this path.
        config.dpo.reference_from = "<benchmark: the initial parameters>"
    return config


def random_pair_batch(rng, num_pairs: int, seq_len: int, *, vocab_size: int, num_special: int, pad_id: int,
                      eos_id: int) -> dict:
    """A host pair batch as post_training.preference_batches makes it (reference_logps left out):
    per pair a shared prompt, two responses of random lengths, each followed by EOS and padding."""
    import numpy as np

    tokens = np.full((num_pairs, 2, seq_len), pad_id, np.int32)
    mask = np.zeros((num_pairs, 2, seq_len), np.int32)
    loss_mask = np.zeros((num_pairs, 2, seq_len), np.int32)
    for b in range(num_pairs):
        prompt_len = int(rng.integers(max(1, seq_len // 8), max(2, seq_len // 2)))
        prompt = rng.integers(num_special, vocab_size, size=prompt_len)
        for k in range(2):
            response_len = int(rng.integers(1, seq_len - prompt_len))  # + EOS fits in seq_len
            length = prompt_len + response_len + 1
            tokens[b, k, :prompt_len] = prompt
            tokens[b, k, prompt_len:length - 1] = rng.integers(num_special, vocab_size, size=response_len)
            tokens[b, k, length - 1] = eos_id
            mask[b, k, :length] = 1
            loss_mask[b, k, prompt_len:length] = 1  # response tokens and EOS are targets
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "valid": np.ones(num_pairs, np.int32)}


def as_sft_batch(pair_batch: dict) -> dict:
    """The pairs' 2B sequences as SFT rows [2B, L] (chosen, rejected, chosen, ...)."""
    return {key: pair_batch[key].reshape(-1, pair_batch[key].shape[-1]) for key in ("tokens", "mask", "loss_mask")}




def _unused(*_):
    raise NotImplementedError("the benchmark feeds its own batches")


def _step_recipe(exp, kind: str, param_shardings):
    """A Recipe holding only what train.compile_steps reads: the step, its batch keys, the extras'
    shardings (DPO's online reference)."""
    from llm_jax import recipes, steps

    if kind == "sft":
        return recipes.Recipe(
            steps.make_train_step(exp.model, exp.tx, exp.schedule, task="sft", token_info=exp.token_info,
                                  z_loss_weight=exp.config.optimizer.z_loss,
                                  grad_accum_steps=exp.config.optimizer.grad_accum_steps),
            steps.make_eval_step(exp.model, task="sft", token_info=exp.token_info),
            recipes.summarize_cross_entropy, _unused, _unused, batch_keys=("tokens", "mask", "loss_mask"))
    settings = recipes.dpo_settings(exp.config)
    assert settings.cached_reference == (kind == "dpo_cached") and not settings.reference_free
    keys = ("tokens", "mask", "loss_mask", "valid") + (("reference_logps",) if settings.cached_reference else ())
    return recipes.Recipe(
        steps.make_dpo_train_step(exp.model, exp.tx, exp.schedule, settings),
        steps.make_dpo_eval_step(exp.model, settings),
        lambda sums: steps.summarize_preference_sums(sums, "eval"), _unused, _unused, batch_keys=keys,
        sequences_per_example=2, extras_shardings=() if settings.cached_reference else (param_shardings,))


def run_row(kind: str, *, size: str = "tiny", batch_size: int = 16, seq_len: int = 64, steps: int = 10,
            warmup: int = 2, style: str = "gpt2", dtype: str = "float32", seed: int = 0, devices=None) -> dict:
    """Benchmarks one step kind in this process and returns the row as a dict. `devices` (default:
    all) is the mesh's; peak RSS is meaningful only in a process that ran nothing else."""
    import jax
    import numpy as np

    from llm_jax import recipes, sharding, train
    from llm_jax import model as model_lib

    row = dict(kind=kind, size=size, style=style, dtype=dtype, pairs=batch_size, seq_len=seq_len, steps=steps,
               warmup=warmup)
    config = make_config(kind, size=size, batch_size=batch_size, seq_len=seq_len, style=style, dtype=dtype,
                         seed=seed)
    exp = train.build_experiment(config, devices=devices)
    devices = list(exp.mesh.devices.flat)
    row.update(platform=devices[0].platform, device_kind=devices[0].device_kind, num_devices=len(devices),
               mesh=dict(exp.mesh.shape), sequences_per_step=2 * batch_size, tokens_per_step=2 * batch_size * seq_len)

    _, state_shardings, init_state = train.state_shardings_and_init(exp, seed)
    recipe = _step_recipe(exp, kind, state_shardings.params)
    train_step, _, batch_sharding = train.compile_steps(exp, state_shardings, recipe)
    tok = exp.tokenizer
    rng = np.random.default_rng(seed)  # the same pairs in every row
    host_pairs = [random_pair_batch(rng, batch_size, seq_len, vocab_size=tok.vocab_size,
                                    num_special=tok.num_special, pad_id=tok.pad_id, eos_id=tok.eos_id)
                  for _ in range(min(4, warmup + steps))]
    row["response_tokens_per_step"] = int(sum(b["loss_mask"].sum() for b in host_pairs) / len(host_pairs))

    with sharding.mesh_context(exp.mesh):
        state = init_state()
        row["params_total"] = model_lib.parameter_counts(state.params)["total"]
        extras = ()
        if kind == "sft":
            batches = [sharding.shard_host_batch(as_sft_batch(b), batch_sharding) for b in host_pairs]
        else:
            # The frozen reference = the initial policy, in buffers of its own (the state is donated).
            reference = init_state().params
            if kind == "dpo_cached":
                # What recipes.cache_reference_logps does once per dataset, batch by batch.
                logps_fn = recipes.jit_reference_logps(exp.model, exp.mesh, state_shardings.params)
                inputs = [sharding.shard_host_batch({k: b[k] for k in ("tokens", "mask", "loss_mask")},
                                                    batch_sharding) for b in host_pairs]
                jax.block_until_ready(logps_fn(reference, inputs[0]))  # compile
                ref_times, tables = [], []
                for i in range(warmup + steps):
                    start = time.perf_counter()
                    table = jax.block_until_ready(logps_fn(reference, inputs[i % len(inputs)]))
                    ref_times.append(time.perf_counter() - start)
                    if i < len(inputs):
                        tables.append(np.asarray(table))
                row["reference_forward_ms"] = statistics.median(ref_times[warmup:]) * 1e3
                for b, table in zip(host_pairs, tables):
                    b["reference_logps"] = table.astype(np.float32)
                del reference
            else:
                extras = (reference,)
            batches = [sharding.shard_host_batch(b, batch_sharding) for b in host_pairs]

        start = time.perf_counter()
        compiled = train_step.lower(state, batches[0], *extras).compile()
        row["compile_s"] = time.perf_counter() - start

        times, first_loss = [], None
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, step_metrics = compiled(state, batches[i % len(batches)], *extras)
            jax.block_until_ready((state, step_metrics))
            if i >= warmup:
                times.append(time.perf_counter() - start)
            if first_loss is None:
                first_loss = float(jax.device_get(step_metrics["train/loss"]))
        loss = float(jax.device_get(step_metrics["train/loss"]))

    if not (math.isfinite(loss) and math.isfinite(first_loss)):
        raise FloatingPointError(f"non-finite loss {loss} (first step {first_loss})")
    step_time = statistics.median(times)
    row.update(step_time_ms=step_time * 1e3, step_time_ms_min=min(times) * 1e3, step_time_ms_max=max(times) * 1e3,
               step_time_ms_mean=statistics.fmean(times) * 1e3, step_times_ms=[t * 1e3 for t in times],
               tokens_per_sec=row["tokens_per_step"] / step_time, first_loss=first_loss, loss=loss,
               peak_rss_mib=rss_peak_bytes() / 2**20)
    return row


# ----------------------------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------------------------

def _common_flags(args) -> list[str]:
    return [f"--size={args.size}", f"--style={args.style}", f"--dtype={args.dtype}",
            f"--batch_size={args.batch_size}", f"--seq_len={args.seq_len}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--seed={args.seed}"]


def run_row_subprocess(args, kind: str, *, env=None) -> dict:
    """One step row in a fresh interpreter; a failure (exception, OOM kill, timeout) becomes `error`."""
    row = run_child(__file__, [f"--_single_row={kind}", *_common_flags(args)], _ROW_MARKER, timeout=args.row_timeout,
                     env=env)
    return {"kind": kind, **row}


def _child_main(args) -> None:
    kind = args._single_row
    try:
        row = run_row(kind, size=args.size, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                      warmup=args.warmup, style=args.style, dtype=args.dtype, seed=args.seed)
    except Exception as e:  # noqa: BLE001  (every failure becomes the row's error)
        traceback.print_exc()
        row = {"kind": kind, "error": error_text(e)}
    print(_ROW_MARKER + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------------
# The tables
# ----------------------------------------------------------------------------------------------

def add_ratios(rows: list[dict]) -> list[dict]:
    """`vs_sft`: each row's median step time over the SFT row's (when both succeeded)."""
    sft = next((r for r in rows if r["kind"] == "sft" and "error" not in r), None)
    for row in rows:
        if sft is not None and "error" not in row:
            row["vs_sft"] = row["step_time_ms"] / sft["step_time_ms"]
    return rows


# (header, width, formatter of a successful row)
_STEP_COLUMNS = (
    ("row", 10, lambda r: r["kind"]),
    ("step", 30, lambda r: _DESCRIPTIONS[r["kind"]]),
    ("tokens/step", 11, lambda r: f"{r['tokens_per_step']:,}"),
    ("step ms (med)", 13, lambda r: f"{r['step_time_ms']:,.1f}"),
    ("x SFT", 6, lambda r: f"{r['vs_sft']:.2f}" if "vs_sft" in r else "-"),
    ("tokens/s", 9, lambda r: f"{r['tokens_per_sec']:,.0f}"),
    ("compile s", 9, lambda r: f"{r['compile_s']:.2f}"),
    ("peak MiB", 8, lambda r: f"{r['peak_rss_mib']:,.0f}"),
)


def format_step_header() -> str:
    return format_header(_STEP_COLUMNS, 2)


def format_step_row(row: dict, max_error: int = 160) -> str:
    kind = f"{row['kind']:<{_STEP_COLUMNS[0][1]}}"
    if row.get("error"):
        error = row["error"] if len(row["error"]) <= max_error else row["error"][:max_error - 3] + "..."
        return f"{kind}  FAILED: {error}"
    cells = [f"{fmt(row):<{w}}" if i == 0 else f"{fmt(row):>{w}}" for i, (_, w, fmt) in enumerate(_STEP_COLUMNS[1:])]
    return kind + "  " + "  ".join(cells)


def format_step_table(rows) -> str:
    return "\n".join([format_step_header(), *(format_step_row(r) for r in add_ratios(list(rows)))])


def step_notes(rows) -> list[str]:
    notes = []
    cached = next((r for r in rows if r["kind"] == "dpo_cached" and "error" not in r), None)
    if cached is not None and "reference_forward_ms" in cached:
        notes.append(f"dpo_cached: caching the reference took {cached['reference_forward_ms']:,.1f} ms per batch "
                     f"(one forward, jit_reference_logps), paid once per dataset, not per step")
        if "vs_sft" in cached:
            verdict = "meets" if cached["vs_sft"] <= 1.3 else "misses"
            per_round = ", ".join(f"{x:.2f}" for x in cached.get("runs_vs_sft", []))
            notes.append(f"target cached DPO <= 1.3x SFT: {cached['vs_sft']:.2f}x ({verdict} it)"
                         + (f"; rounds: {per_round}" if per_round else ""))
    for row in rows:
        if row["kind"].startswith("dpo") and "error" not in row:
            notes.append(f"{row['kind']}: first-step loss {row['first_loss']:.6f} (log 2 = {math.log(2):.6f}: "
                         "policy = reference)")
    return notes


def aggregate_runs(runs: list[list[dict]]) -> list[dict]:
    """One row per kind from `--repeats` rounds: the median over the rounds of each round's median
    step time (and of compile / reference-forward times), the largest peak RSS; the rounds' own
    medians and SFT ratios stay in `runs_step_time_ms` / `runs_vs_sft`."""
    rows = []
    for kind in [row["kind"] for row in runs[0]]:
        done = [row for rnd in runs for row in rnd if row["kind"] == kind and "error" not in row]
        if not done:
            rows.append(next(row for rnd in runs for row in rnd if row["kind"] == kind))
            continue
        row = {k: v for k, v in done[0].items() if k not in ("vs_sft", "step_times_ms")}
        row.update(repeats=len(done), runs_step_time_ms=[r["step_time_ms"] for r in done],
                   runs_vs_sft=[r["vs_sft"] for r in done if "vs_sft" in r],
                   step_time_ms=statistics.median(r["step_time_ms"] for r in done),
                   step_time_ms_min=min(r["step_time_ms_min"] for r in done),
                   step_time_ms_max=max(r["step_time_ms_max"] for r in done),
                   compile_s=statistics.median(r["compile_s"] for r in done),
                   peak_rss_mib=max(r["peak_rss_mib"] for r in done))
        row["tokens_per_sec"] = row["tokens_per_step"] / (row["step_time_ms"] / 1e3)
        if "reference_forward_ms" in row:
            row["reference_forward_ms"] = statistics.median(r["reference_forward_ms"] for r in done)
        rows.append(row)
    return add_ratios(rows)


def run_step_rows(args, *, env=None, out=sys.stdout) -> list[dict]:
    """Table 1: every `--rows` kind in its own child process, printed as it comes; with
    `--repeats` > 1 the kinds take turns (sft, dpo_cached, dpo_online, sft, ...), so that a change
    in the machine's load hits every kind alike, and a table of medians over the rounds follows."""
    print(f"{args.size} ({args.style}, {args.dtype}), {args.batch_size} pairs x 2 x seq_len {args.seq_len}; "
          f"median of {args.steps} steps after {args.warmup} warm-up"
          + (f"; {args.repeats} rounds, kinds in turn" if args.repeats > 1 else ""), file=out)
    print(format_step_header(), file=out, flush=True)
    runs = []
    for repeat in range(args.repeats):
        rnd = []
        for kind in args.rows:
            rnd.append(run_row_subprocess(args, kind, env=env))
            add_ratios(rnd)  # against this round's SFT row
            suffix = f"  (round {repeat + 1}/{args.repeats})" if args.repeats > 1 else ""
            print(format_step_row(rnd[-1]) + suffix, file=out, flush=True)
        runs.append(rnd)
    rows = runs[0] if args.repeats == 1 else aggregate_runs(runs)
    if args.repeats > 1:
        print(f"median over {args.repeats} rounds:", file=out)
        print(format_step_header(), file=out)
        for row in rows:
            print(format_step_row(row), file=out)
    for note in step_notes(rows):
        print(note, file=out)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._single_row:
        _child_main(args)
        return 0

    command = "python benchmarks/post_training_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = machine_info()
    print(f"{machine['cpu_count']} CPUs ({machine['cpu']}), load average {machine['load_average']}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    rows = run_step_rows(args)
    if args.json:
        write_json_record(args.json, command, args, machine, rows=rows)
    return 2 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
