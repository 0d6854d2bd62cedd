"""Few-shot in-context evaluation of a causal LM, as lm-evaluation-harness does it.

    python -m llm_jax.fewshot --workdir=runs/quickstart --shots=0,1,4 \\
        --tasks=experiments/fewshot_tasks/antonyms_mc.jsonl,experiments/fewshot_tasks/first_letter_gen.jsonl

A task is a JSONL file, one example per line (other keys are ignored, blank lines skipped; a
malformed line fails with `<path>:<line>: <what is wrong>`):

    multiple choice  {"context": "The opposite of hot is", "choices": ["cold", "warm"], "answer": 0}
    generation       {"context": "Word: apple\\nFirst letter:", "target": "A"}

The kind follows from the first record ("choices" or "target") unless a `TaskSpec` names it.
`TaskSpec` (or a dict of its fields, or a bare path) also sets `example_separator` ("\\n\\n", the
harness' fewshot_delimiter), `target_delimiter` (" "), `num_fewshot`, a separate demonstration
pool (`fewshot_path`; by default the task's other examples) and generation's stop strings.

k-shot prompt: k demonstrations drawn without replacement (seeded per example, never the
evaluated example nor one with its context; the k-shot draws are a prefix of the (k+1)-shot
ones), each rendered `context + target_delimiter + answer`, joined by `example_separator`, then
the query's context. A prompt too long for the model loses its start (the continuation is always
whole); how many were cut is printed and kept in each row (`truncated`).

Multiple choice: the summed log-prob of `target_delimiter + choice` after the prompt (context and
continuation tokenised as the harness does: trailing spaces of the context move into the
continuation), one forward per (example, choice) in batches of fixed shapes (lengths bucketed to
powers of two, so one compile per bucket). `acc`: argmax of the log-likelihoods; `acc_norm`: argmax
of the log-likelihood divided by the choice's length in characters (the harness' acc_norm).
Generation: greedy decoding with the KV-cache sampler (llm_jax.sampling), cut at the first stop
string (`until`, and the example separator), stripped; `exact_match` compares with the target,
`exact_match_norm` after lower-casing and collapsing whitespace. Each row also gives the binomial
standard error sqrt(p (1 - p) / n). (Policy evaluation of post-trained models is evaluation.py.)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import random
import sys
from collections.abc import Sequence

import jax
import numpy as np

from llm_jax import evaluation, sampling, sharding, train
from llm_jax.data import jsonl

KINDS = ("multiple_choice", "generation")


@dataclasses.dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...] = ()  # multiple choice
    answer: int = -1  # multiple choice: the index of the right choice
    target: str = ""  # generation

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer] if self.choices else self.target


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    path: str
    kind: str = ""  # "" = from the first record
    example_separator: str = "\n\n"
    target_delimiter: str = " "
    num_fewshot: tuple[int, ...] = (0,)
    fewshot_path: str = ""  # demonstrations drawn from this file; "" = the task's other examples
    until: tuple[str, ...] = ("\n",)  # generation stops at these and at example_separator
    max_new_tokens: int = 0  # generation; 0 = the longest target's tokens + 8
    # lm-eval-harness never shows a demonstration with the query's own context (it would leak the
    # answer). In-context lookup tasks (llm_jax/data/icl.py) measure exactly that: set False there.
    skip_query_context: bool = True

    @classmethod
    def from_dict(cls, spec: dict) -> TaskSpec:
        unknown = set(spec) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"task spec: unknown fields {sorted(unknown)}")
        spec = {key: tuple(value) if isinstance(value, list) else value for key, value in spec.items()}
        if "path" not in spec:
            raise ValueError(f"task spec {spec}: missing field 'path'")
        for key, scalar in (("num_fewshot", int), ("until", str)):
            if isinstance(spec.get(key), scalar):
                spec[key] = (spec[key],)
        if "name" not in spec:
            spec["name"] = os.path.splitext(os.path.basename(spec["path"]))[0]
        return cls(**spec)


def as_task(task: TaskSpec | dict | str) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    return TaskSpec.from_dict(task if isinstance(task, dict) else {"path": os.fspath(task)})


# --------------------------------------------------------------------------------------------
# Task files
# --------------------------------------------------------------------------------------------

def _parse(record: dict, kind: str) -> Example:
    context = jsonl.string_field(record, "context")
    if kind == "generation":
        return Example(context, target=jsonl.string_field(record, "target"))
    choices = jsonl.list_field(record, "choices", str, "string")
    if len(choices) < 2:
        raise ValueError(f"field 'choices' has {len(choices)} choice(s); multiple choice needs at least 2")
    if not all(choices):
        raise ValueError(f"field 'choices': item {choices.index('')} is empty")
    answer = jsonl.required_field(record, "answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"field 'answer' must be an index into 'choices' (0..{len(choices) - 1}), got "
                         f"{json.dumps(answer)}")
    return Example(context, tuple(choices), answer)


def read_task(path: str, kind: str = "") -> tuple[str, list[Example]]:
    """(kind, examples) of a task file; the kind from its first record unless given."""
    if not kind:
        first = jsonl.first_record(path)
        if "choices" in first:
            kind = "multiple_choice"
        elif "target" in first:
            kind = "generation"
        else:
            raise ValueError(f"{path}: the first record has neither 'choices' (multiple choice) nor 'target' "
                             "(generation)")
    if kind not in KINDS:
        raise ValueError(f"task kind {kind!r} is not one of {KINDS}")
    return kind, jsonl.read_records(path, lambda record: _parse(record, kind))


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

def demonstration_indices(pool: Sequence[Example], query: Example, k: int, *, seed: int, index: int,
                          query_index: int = -1, skip_query_context: bool = True) -> list[int]:
    """k indices into `pool`, drawn without replacement from `random.Random(f"{seed}/{index}")` by a lazy
    Fisher-Yates shuffle (so fewer shots take a prefix of more shots' draws), skipping
    `query_index` and (unless `skip_query_context` is False) every example with the query's context."""
    rng = random.Random(f"{seed}/{index}")
    swaps: dict[int, int] = {}
    chosen: list[int] = []
    for j in range(len(pool)):
        if len(chosen) == k:
            break
        r = rng.randrange(j, len(pool))
        pick = swaps.get(r, r)
        swaps[r] = swaps.get(j, j)
        if pick != query_index and not (skip_query_context and pool[pick].context == query.context):
            chosen.append(pick)
    if len(chosen) < k:
        differ = " differ from the query" if skip_query_context else " besides the query"
        raise ValueError(f"{k}-shot: only {len(chosen)} demonstrations{differ} {query.context!r} "
                         f"in a pool of {len(pool)}")
    return chosen


def build_prompt(task: TaskSpec, query: Example, demonstrations: Sequence[Example]) -> str:
    shots = [demo.context + task.target_delimiter + demo.answer_text for demo in demonstrations]
    return task.example_separator.join(shots + [query.context])


def fewshot_prompts(task: TaskSpec, examples: Sequence[Example], pool: Sequence[Example], k: int, *,
                    seed: int, pool_is_examples: bool) -> list[str]:
    return [build_prompt(task, example, [pool[j] for j in demonstration_indices(
                pool, example, k, seed=seed, index=i, query_index=i if pool_is_examples else -1,
                skip_query_context=task.skip_query_context)])
            for i, example in enumerate(examples)]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness tokenises them: trailing spaces of the context
    join the continuation, the continuation is what encoding both adds to the context's ids, and an
    empty context is EOS (what the model saw before every document)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = tokenizer.encode(context)
    return context_ids or [tokenizer.eos_id], tokenizer.encode(context + continuation)[len(context_ids):]


def left_truncate(context_ids: Sequence[int], room: int) -> tuple[list[int], bool]:
    """The last `room` context tokens (at least one must fit) and whether any were dropped."""
    if room < 1:
        raise ValueError(f"the continuation leaves {room} tokens for the prompt in the model's context")
    return list(context_ids[-room:]), len(context_ids) > room


# --------------------------------------------------------------------------------------------
# Scoring (jitted, fixed shapes)
# --------------------------------------------------------------------------------------------

def _mesh_scope(mesh):
    return sharding.mesh_context(mesh) if mesh is not None else contextlib.nullcontext()


def _bucket(width: int, max_len: int) -> int:
    return min(max(16, 1 << (width - 1).bit_length()), max(max_len, width))


def continuation_logps(model, params, rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int = 0,
                       batch_size: int = 32, mesh=None) -> np.ndarray:
    """sum_t log p(continuation_t | context, continuation_<t) for each (context ids, continuation
    ids) row; rows run longest first in [batch_size, 1, L] batches, L a power of two (evaluation's
    jitted response log-probs: loss_mask marks the continuation)."""
    logps_fn = evaluation.jitted_logps_fn(model)
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
    out = np.zeros(len(rows), np.float64)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        L = _bucket(max(len(rows[i][0]) + len(rows[i][1]) for i in chunk), model.cfg.max_len)
        batch = {key: np.zeros((batch_size, 1, L), np.int32) for key in ("tokens", "mask", "loss_mask")}
        batch["tokens"][:] = pad_id
        for r, i in enumerate(chunk + [chunk[0]] * (batch_size - len(chunk))):  # padding rows: copies
            context, continuation = rows[i]
            n = len(context) + len(continuation)
            batch["tokens"][r, 0, :n] = list(context) + list(continuation)
            batch["mask"][r, 0, :n] = 1
            batch["loss_mask"][r, 0, len(context):n] = 1
        with _mesh_scope(mesh):
            out[chunk] = np.asarray(jax.device_get(logps_fn(params, batch)))[:len(chunk), 0]
    return out


def choose(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(acc's pick, acc_norm's pick): argmax of the log-likelihoods, and of them divided by each
    choice's length in characters (ties: the first)."""
    ll = np.asarray(loglikelihoods, np.float64)
    return int(np.argmax(ll)), int(np.argmax(ll / np.array([len(c) for c in choices], np.float64)))


def greedy_generate(model, params, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    batch_size: int = 32, mesh=None) -> list[str]:
    """Greedy completions (text, EOS removed) of token prompts, in fixed-size batches."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        with _mesh_scope(mesh):
            out = sampling.generate(model, params, chunk + [chunk[-1]] * (batch_size - len(chunk)),
                                    max_new_tokens=max_new_tokens, rng=0, greedy=True, eos_id=tokenizer.eos_id,
                                    pad_id=tokenizer.pad_id)
        tokens_BxN, lengths_B = jax.device_get((out.tokens_BxN, out.lengths_B))
        texts += [tokenizer.decode([t for t in row[:n] if t != tokenizer.eos_id])
                  for row, n in zip(tokens_BxN[:len(chunk)], lengths_B)]
    return texts


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest stop string."""
    return text[:min([text.find(s) for s in stops if s and s in text], default=len(text))]


def exact_match(generation: str, target: str) -> tuple[int, int]:
    """(exact, normalised): stripped strings equal; equal after lower-casing and collapsing whitespace."""
    def norm(s):
        return " ".join(s.lower().split())
    return int(generation.strip() == target.strip()), int(norm(generation) == norm(target))


# --------------------------------------------------------------------------------------------
# Tasks -> rows
# --------------------------------------------------------------------------------------------

def _multiple_choice(model, params, tokenizer, task, examples, prompts, *, max_len, batch_size, mesh):
    rows, cut = [], 0
    for example, prompt in zip(examples, prompts):
        any_cut = False
        for choice in example.choices:
            context, continuation = encode_pair(tokenizer, prompt, task.target_delimiter + choice)
            context, was_cut = left_truncate(context, max_len - len(continuation))
            rows.append((context, continuation))
            any_cut |= was_cut
        cut += any_cut
    logps = continuation_logps(model, params, rows, pad_id=tokenizer.pad_id, batch_size=batch_size, mesh=mesh)
    scores = {"acc": [], "acc_norm": []}
    offset = 0
    for example in examples:
        pick, pick_norm = choose(logps[offset:offset + len(example.choices)], example.choices)
        offset += len(example.choices)
        scores["acc"].append(int(pick == example.answer))
        scores["acc_norm"].append(int(pick_norm == example.answer))
    return scores, cut


def _generation(model, params, tokenizer, task, examples, prompts, *, max_len, batch_size, mesh):
    new_tokens = task.max_new_tokens or 8 + max(len(tokenizer.encode(task.target_delimiter + e.target))
                                                for e in examples)
    encoded = [left_truncate(tokenizer.encode(p) or [tokenizer.eos_id], max_len - new_tokens) for p in prompts]
    texts = greedy_generate(model, params, tokenizer, [ids for ids, _ in encoded], max_new_tokens=new_tokens,
                            batch_size=batch_size, mesh=mesh)
    matches = [exact_match(cut_at_stops(text, task.until + (task.example_separator,)), example.target)
               for text, example in zip(texts, examples)]
    return ({"exact_match": [m[0] for m in matches], "exact_match_norm": [m[1] for m in matches]},
            sum(was_cut for _, was_cut in encoded))


def evaluate_tasks(model, params, tokenizer, tasks: Sequence[TaskSpec | dict | str],
                   shots: Sequence[int] | None = None, *, limit: int = 0, seed: int = 1234, batch_size: int = 32,
                   max_len: int = 0, mesh=None) -> list[dict]:
    """One row {task, shots, metric, value, stderr, n, truncated} per task, shot count and metric.

    `shots` overrides each task's `num_fewshot`; `limit` > 0 evaluates the first `limit` examples
    (demonstrations still come from the whole pool); `max_len` defaults to the model's; with a
    `mesh` (sharded params) the batch is rounded up to a multiple of its data-parallel size."""
    if model.cfg.kind != "decoder" or model.cfg.head != "lm":
        raise ValueError("few-shot evaluation needs a causal decoder with an LM head")
    max_len = max_len or model.cfg.max_len
    if model.cfg.positions == "learned" and max_len > model.cfg.max_len:
        raise ValueError(f"max_len {max_len} exceeds the model's learned positions ({model.cfg.max_len})")
    if mesh is not None:
        batch_size = -(-batch_size // sharding.data_parallel_size(mesh)) * sharding.data_parallel_size(mesh)
    rows = []
    for task in map(as_task, tasks):
        kind, examples = read_task(task.path, task.kind)
        pool = read_task(task.fewshot_path, kind)[1] if task.fewshot_path else examples
        evaluated = examples[:limit] if limit > 0 else examples
        score = _multiple_choice if kind == "multiple_choice" else _generation
        for k in (task.num_fewshot if shots is None else shots):
            prompts = fewshot_prompts(task, evaluated, pool, k, seed=seed, pool_is_examples=not task.fewshot_path)
            try:
                scores, cut = score(model, params, tokenizer, task, evaluated, prompts, max_len=max_len,
                                    batch_size=batch_size, mesh=mesh)
            except ValueError as e:
                raise ValueError(f"{task.path}, {k}-shot: {e}") from None
            if cut:
                print(f"note: {task.name}, {k}-shot: {cut} of {len(evaluated)} prompts lost their start to fit "
                      f"{max_len} tokens", file=sys.stderr)
            for metric, values in scores.items():
                p, n = float(np.mean(values)), len(values)
                rows.append({"task": task.name, "shots": k, "metric": metric, "value": p,
                             "stderr": math.sqrt(p * (1 - p) / n), "n": n, "truncated": cut})
    return rows


def pooled(rows: Sequence[dict], name: str = "all") -> list[dict]:
    """One row per (shots, metric) over all tasks: the mean over every evaluated example (tasks
    weighted by their examples) with its binomial standard error, e.g. over the held-out mappings
    of the in-context-learning study, one task file each."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["shots"], row["metric"]), []).append(row)
    out = []
    for (k, metric), group in groups.items():
        n = sum(r["n"] for r in group)
        p = sum(r["value"] * r["n"] for r in group) / n
        out.append({"task": name, "shots": k, "metric": metric, "value": p, "stderr": math.sqrt(p * (1 - p) / n),
                    "n": n, "truncated": sum(r["truncated"] for r in group), "tasks": len(group)})
    return out


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table: task, shots, metric, value, stderr, n."""
    header = ["task", "shots", "metric", "value", "stderr", "n"]
    cells = [[r["task"], str(r["shots"]), r["metric"], f"{r['value']:.4f}", f"{r['stderr']:.4f}", str(r["n"])]
             for r in rows]
    widths = [max(len(line[i]) for line in [header] + cells) for i in range(len(header))]
    right = {1, 3, 4, 5}

    def line(values):
        return "| " + " | ".join(v.rjust(w) if i in right else v.ljust(w)
                                 for i, (v, w) in enumerate(zip(values, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(c) for c in cells])


def task_paths(spec: str) -> list[str]:
    paths = []
    for item in filter(None, spec.split(",")):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise FileNotFoundError(f"--tasks: no file matches {item!r}")
        paths += matches
    return paths


def _rendering(args) -> dict:
    """The TaskSpec fields the command line sets, escapes decoded (`--example_separator=' '`)."""
    fields = {"example_separator": args.example_separator, "target_delimiter": args.target_delimiter}
    rendering = {k: v.encode().decode("unicode_escape") for k, v in fields.items() if v is not None}
    return {**rendering, **({"skip_query_context": False} if args.keep_query_context else {})}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llm_jax.fewshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a training run's workdir (config.json + checkpoints)")
    p.add_argument("--tasks", required=True, help="comma-separated task JSONL files or globs")
    p.add_argument("--example_separator", default=None,
                   help="between demonstrations, with escapes (default the task spec's, '\\n\\n')")
    p.add_argument("--target_delimiter", default=None, help="between context and target (default ' ')")
    p.add_argument("--keep_query_context", action="store_true",
                   help="let demonstrations share the query's context (in-context lookup tasks)")
    p.add_argument("--pool", action="store_true", help="print one row per shots and metric over all tasks")
    p.add_argument("--shots", default="0", help="comma-separated numbers of demonstrations")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N examples of each task (0 = all)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the demonstration draws")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--out", default="", help="also write the rows to this JSON file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parse_args(argv)
    try:
        shots = [int(s) for s in args.shots.split(",") if s.strip().isdigit()]
        if not shots or len(shots) != len(args.shots.split(",")):
            raise ValueError(f"--shots: expected numbers >= 0, got {args.shots!r}")
        tasks = [{"path": path, **_rendering(args)} for path in task_paths(args.tasks)]
        exp, params = train.load_run(args.workdir)
        rows = evaluate_tasks(exp.model, params, exp.tokenizer, tasks, shots,
                              limit=args.limit, seed=args.seed, batch_size=args.batch_size, mesh=exp.mesh)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(format_table(pooled(rows) if args.pool else rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"workdir": args.workdir, "seed": args.seed, "limit": args.limit, "rows": rows,
                       "pooled": pooled(rows)}, f, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
