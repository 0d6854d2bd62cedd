"""What context buys: a word2vec, a BERT and a GPT trained on the same data, probed on held-out text.

    python -m llm_jax.probe --word2vec=RUN --bert=RUN --gpt=RUN --out=probe.json

The runs (workdirs of tasks 'skipgram', 'mlm' and 'lm') must share their corpus and tokenizer;
the held-out text is the validation split of that corpus. Its documents are shuffled (`--seed`)
and dealt alternately to a probe-training and a test half, so nothing is tested on a file it was
fitted on; each half is packed into rows of the runs' `data.seq_len` tokens as training packed
them (documents followed by EOS).

1. Linear probe of a property that depends on context. Python's own `tokenize` labels each
   character of a source file: code (NAME, NUMBER, OP tokens; `--classes=fine` keeps the three
   apart), string literal (STRING) or comment (COMMENT); whitespace, newlines and indentation
   are unlabelled. A model token gets the class of its labelled characters when they share one;
   tokens with none (indentation) or with several (`("` opening a string) are left out, as are
   files `tokenize` rejects. The same token (`return`) occurs in code, docstrings and comments,
   so its identity alone cannot decide. Features: word2vec the token's input vector; BERT the
   final hidden state of the unmasked row; GPT the final hidden state (left context only).
   Multinomial logistic regression on standardised features (L2, Adam, a fixed number of
   full-batch steps) fitted on `--train_tokens` tokens of the training half, tested on up to
   `--test_tokens` of the test half, each sample spread evenly over its half's documents.
   Baselines: the majority class; token identity (each id's most frequent class in the probe's
   training tokens, the majority class for ids it never saw), what a context-free lookup learns
   from the same data; and token identity fitted on the test tokens themselves, the ceiling of
   any function of the token id on this test set.

2. Fill in the blank: `--blanks` positions of the test rows (real tokens, not EOS, not a row's
   first; spread over the documents), the same for all three; each is predicted over the
   tokenizer's ordinary ids (top-1 and top-5). BERT: its MLM head at the position replaced by [MASK] (both sides' context). GPT: the
   next-token logits one position earlier (left context only). word2vec, by Bayes' rule with the
   skip-gram model: log p(w) + sum of log p(c | w) over the contexts c it trained with (up to
   word2vec.window tokens each side, same document, no EOS); p(w) is the unigram distribution of
   up to `--prior_tokens` tokens of the training split (add-one smoothed), and alone it is the
   no-context baseline.

A Markdown table goes to stdout; `--out` writes it all as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import math
import tokenize
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax import checkpoint, sharding, train, word2vec
from llm_jax.data import corpora, pipeline
from llm_jax.data import tokenizer as tokenizer_lib

CLASSES = {"coarse": ("code", "string", "comment"), "fine": ("name", "number", "op", "string", "comment")}
_TOKEN_CLASS = {  # tokenize's token type -> class name, per class set; other types are unlabelled
    "coarse": {tokenize.NAME: "code", tokenize.NUMBER: "code", tokenize.OP: "code", tokenize.STRING: "string",
               tokenize.COMMENT: "comment"},
    "fine": {tokenize.NAME: "name", tokenize.NUMBER: "number", tokenize.OP: "op", tokenize.STRING: "string",
             tokenize.COMMENT: "comment"},
}
# The run each flag must name: (config.task, config.model.kind).
EXPECTED = {"word2vec": ("skipgram", "word2vec"), "bert": ("mlm", "encoder"), "gpt": ("lm", "decoder")}
# Fields the three runs must share for the comparison to be on the same data.
SHARED_DATA = ("dataset", "files", "validation_fraction", "max_documents", "eval_split", "text_key", "seq_len")
UNLABELLED = -1


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------

def char_classes(source: str, classes: str = "coarse") -> np.ndarray | None:
    """The class index of each character of a Python source (UNLABELLED for whitespace, newlines,
    indentation), or None if `tokenize` rejects the file."""
    names, kinds = CLASSES[classes], _TOKEN_CLASS[classes]
    lines = io.StringIO(source).readlines()  # tokenize's lines: split at "\n" only
    line_starts = np.concatenate([[0], np.cumsum([len(line) for line in lines])])
    labels = np.full(len(source), UNLABELLED, np.int8)
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type in kinds:
                (start_row, start_col), (end_row, end_col) = token.start, token.end
                start, end = line_starts[start_row - 1] + start_col, line_starts[end_row - 1] + end_col
                labels[start:end] = names.index(kinds[token.type])
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
        return None
    return labels


def token_spans(tokenizer, text: str, ids: Sequence[int]) -> np.ndarray:
    """[N, 2] character spans of `text`'s tokens `ids` (tokenizers here round-trip exactly). A
    token that decodes to part of a character (a byte) shares that character's span with the
    tokens that complete it."""
    spans = np.zeros((len(ids), 2), np.int64)
    position, first = 0, 0  # first: the oldest token not yet matched to text
    for k in range(len(ids)):
        piece = tokenizer.decode(ids[first:k + 1])
        if text.startswith(piece, position):
            spans[first:k + 1] = position, position + len(piece)
            position, first = position + len(piece), k + 1
        elif k - first >= 4:  # a character is at most 4 bytes: this text does not round-trip
            break
    if first != len(ids) or position != len(text):
        raise ValueError(f"the tokenizer does not round-trip this text (at character {position})")
    return spans


def token_labels(char_labels: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Each token's class: the one class of its labelled characters, else UNLABELLED."""
    out = np.full(len(spans), UNLABELLED, np.int8)
    for k, (start, end) in enumerate(spans):
        present = np.unique(char_labels[start:end])
        present = present[present != UNLABELLED]
        if len(present) == 1:
            out[k] = present[0]
    return out


@dataclasses.dataclass
class Rows:
    """Packed rows of held-out documents: tokens, mask (1 = real), labels and which document
    each token is from (-1: padding), each [N, L]."""

    tokens: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    document: np.ndarray

    @property
    def documents(self) -> int:
        return len(np.unique(self.document[self.document >= 0]))


def pack_documents(tokenizer, texts: Sequence[str], seq_len: int, classes: str) -> Rows:
    """The documents `tokenize` accepts (and the tokenizer round-trips), each followed by EOS
    (unlabelled), cut into rows of `seq_len`; the last row padded (mask 0), as
    pipeline.make_eval_batches packs."""
    tokens, labels, document = [], [], []
    for text in texts:
        chars = char_classes(text, classes)
        ids = pipeline.encode_document(tokenizer, text)
        try:
            spans = token_spans(tokenizer, text, ids[:-1].tolist()) if chars is not None else None
        except ValueError:
            spans = None
        if spans is None:
            continue
        tokens.append(ids)
        labels.append(np.append(token_labels(chars, spans), UNLABELLED))
        document.append(np.full(len(ids), len(document), np.int32))
    tokens_T = np.concatenate(tokens or [np.zeros(0, np.int32)])
    rows = max(1, math.ceil(len(tokens_T) / seq_len))
    pad = rows * seq_len - len(tokens_T)

    def shaped(values, fill):
        return np.concatenate([values, np.full(pad, fill, values.dtype)]).reshape(rows, seq_len)

    return Rows(shaped(tokens_T, tokenizer.pad_id), shaped(np.ones(len(tokens_T), np.int32), 0),
                shaped(np.concatenate(labels or [np.zeros(0, np.int8)]), UNLABELLED),
                shaped(np.concatenate(document or [np.zeros(0, np.int32)]), -1))


# --------------------------------------------------------------------------------------------
# Runs and forward passes
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    flag: str  # "word2vec" | "bert" | "gpt"
    workdir: str
    config: object
    exp: train.Experiment
    params: object


def load_run(flag: str, workdir: str) -> Run:
    """The newest checkpoint of `workdir`, which must be a run of the kind `flag` names."""
    where = f"--{flag}={workdir}"
    try:
        config = train.load_config(workdir)
    except FileNotFoundError:
        raise ValueError(f"{where}: no config.json there; not a training run's workdir") from None
    task, kind = EXPECTED[flag]
    if (config.task, config.model.kind) != (task, kind):
        raise ValueError(f"{where} is a run of task {config.task!r} (model.kind {config.model.kind!r}); "
                         f"--{flag} needs task {task!r} (model.kind {kind!r})")
    exp = train.build_experiment(config)
    abstract_params = train.state_shardings_and_init(exp, config.seed)[0].params
    return Run(flag, workdir, config, exp, checkpoint.restore_params(workdir, abstract_params, field=f"--{flag}"))


def check_same_data(runs: Sequence[Run]) -> None:
    """The runs share their corpus, row length and vocabulary, or the comparison means nothing."""
    first = runs[0]
    vocabulary = tokenizer_lib.fingerprint(first.config.data.tokenizer, first.config.data.tokenizer_path,
                                           first.exp.tokenizer)
    for run in runs[1:]:
        for field in SHARED_DATA:
            if run.config.data[field] != first.config.data[field]:
                raise ValueError(f"--{run.flag}={run.workdir}: data.{field} is {run.config.data[field]!r} but "
                                 f"{first.config.data[field]!r} in --{first.flag}; the runs must share their data")
        other = tokenizer_lib.fingerprint(run.config.data.tokenizer, run.config.data.tokenizer_path, run.exp.tokenizer)
        if other != vocabulary:
            raise ValueError(f"--{run.flag}={run.workdir}: trained with another vocabulary than --{first.flag} "
                             f"({other} vs {vocabulary})")


@functools.partial(jax.jit, static_argnames=("model", "hidden", "at_positions"))
def _apply(params, tokens_BxL, mask_BxL, positions_B, *, model, hidden: bool, at_positions: bool):
    out_BxLxF = model.apply({"params": params}, tokens_BxL, mask_BxL=mask_BxL, return_hidden=hidden)
    if at_positions:
        out_BxLxF = jnp.take_along_axis(out_BxLxF, positions_B[:, None, None], axis=1)[:, 0]
    return out_BxLxF.astype(jnp.float32)


def forward(run: Run, tokens_NxL, mask_NxL, positions_N=None, *, hidden: bool, batch_size: int = 32) -> np.ndarray:
    """The model's final hidden states (`hidden`; word2vec: the input vectors) or logits of each
    row, [N, L, F], or [N, F] at one position per row, in fixed-size batches (one compile)."""
    dp = sharding.data_parallel_size(run.exp.mesh)
    batch_size = -(-batch_size // dp) * dp
    at_positions = positions_N is not None
    positions_N = np.zeros(len(tokens_NxL), np.int32) if positions_N is None else np.asarray(positions_N, np.int32)
    out = []
    with sharding.mesh_context(run.exp.mesh):
        for start in range(0, len(tokens_NxL), batch_size):
            index = np.arange(start, start + batch_size).clip(max=len(tokens_NxL) - 1)  # pad with copies
            values = _apply(run.params, tokens_NxL[index], mask_NxL[index], positions_N[index], model=run.exp.model,
                            hidden=hidden, at_positions=at_positions)
            out.append(np.asarray(jax.device_get(values))[:min(batch_size, len(tokens_NxL) - start)])
    return np.concatenate(out)


def features(run: Run, rows: Rows, row_N, position_N) -> np.ndarray:
    """[N, D] features at (row, position) pairs; each row needed runs once."""
    needed, inverse = np.unique(row_N, return_inverse=True)
    hidden_RxLxD = forward(run, rows.tokens[needed], rows.mask[needed], hidden=True)
    return hidden_RxLxD[inverse, position_N]


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "learning_rate"))
def _fit(z_NxD, y_N, l2, *, num_classes: int, steps: int, learning_rate: float):
    tx = optax.adam(learning_rate)

    def loss_fn(params):
        logits_NxC = z_NxD @ params["w"] + params["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits_NxC, y_N).mean()
        return ce + l2 * jnp.sum(jnp.square(params["w"]))

    def step(carry, _):
        params, opt_state = carry
        updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    params = {"w": jnp.zeros((z_NxD.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
    return jax.lax.scan(step, (params, tx.init(params)), length=steps)[0][0]


def fit_linear_probe(x_NxD, y_N, num_classes: int, *, l2: float = 1e-3, steps: int = 1000,
                     learning_rate: float = 0.05):
    """Multinomial logistic regression: mean cross-entropy + l2 * |W|^2 on features standardised
    by the training set's statistics, full-batch Adam for a fixed number of steps from zero.
    Returns predict(x_MxD) -> class ids [M]."""
    x_NxD = np.asarray(x_NxD, np.float32)
    mean_D, std_D = x_NxD.mean(axis=0), x_NxD.std(axis=0) + 1e-6
    params = _fit((x_NxD - mean_D) / std_D, np.asarray(y_N, np.int32), l2, num_classes=num_classes, steps=steps,
                  learning_rate=learning_rate)

    def predict(x_MxD):
        z_MxD = (np.asarray(x_MxD, np.float32) - mean_D) / std_D
        return np.asarray(jnp.argmax(z_MxD @ params["w"] + params["b"], axis=-1))

    return predict


def token_identity(train_ids, train_labels, test_ids, num_classes: int) -> np.ndarray:
    """Predictions of each test token's most frequent class among the training tokens with its
    id (the majority class for ids never seen): the best lookup of the id alone."""
    size = int(max(np.max(train_ids), np.max(test_ids))) + 1
    counts_VxC = np.zeros((size, num_classes), np.int64)
    np.add.at(counts_VxC, (train_ids, train_labels), 1)
    majority = np.bincount(train_labels, minlength=num_classes).argmax()
    return np.where(counts_VxC.sum(axis=1) > 0, counts_VxC.argmax(axis=1), majority)[test_ids]


# --------------------------------------------------------------------------------------------
# Fill in the blank
# --------------------------------------------------------------------------------------------

def unigram_log_prior(data_cfg, tokenizer, size: int, *, max_tokens: int, seed: int) -> np.ndarray:
    """log p(w) [size] over the tokenizer's ordinary ids (-inf elsewhere): add-one smoothed counts
    of up to `max_tokens` tokens of the training split, documents in a seeded order."""
    texts = corpora.load_split(data_cfg, data_cfg.train_split)
    counts = np.zeros(size, np.float64)
    remaining = max_tokens
    for i in np.random.default_rng(seed).permutation(len(texts)):
        ids = np.asarray(tokenizer.encode(texts[int(i)]), np.int64)[:remaining]
        counts += np.bincount(ids, minlength=size)
        remaining -= len(ids)
        if remaining <= 0:
            break
    ordinary = ordinary_ids(tokenizer, size)
    log_prior = np.full(size, -np.inf)
    log_prior[ordinary] = np.log(counts[ordinary] + 1) - np.log(np.sum(counts[ordinary] + 1))
    return log_prior


def ordinary_ids(tokenizer, size: int) -> np.ndarray:
    """Which of `size` ids `encode` can produce: no specials, no padding of the model's table."""
    ids = np.arange(size)
    return (ids >= tokenizer.num_special) & (ids < tokenizer.vocab_size)


def spread_sample(rows: Rows, allowed, n: int, rng: np.random.Generator):
    """(rows, positions) of up to `n` allowed tokens, spread over the documents: each document
    gives one random token, then each a second, and so on (ties broken at random), so that one
    large file cannot make up most of a sample (in the stdlib's held-out split one file can hold
    over 40% of its half's tokens)."""
    row, position = np.nonzero(allowed)
    document = rows.document[row, position]
    shuffled = rng.permutation(len(row))
    by_document = shuffled[np.argsort(document[shuffled], kind="stable")]
    grouped = document[by_document]
    rank = np.arange(len(grouped)) - np.searchsorted(grouped, grouped)  # its turn within its document
    pick = np.sort(by_document[np.lexsort((rng.random(len(rank)), rank))[:n]])
    return row[pick], position[pick]


def choose_blanks(rows: Rows, eos_id: int, n: int, rng: np.random.Generator):
    """Up to `n` blanks (`spread_sample`): real tokens, not EOS, not a row's first (GPT needs a
    token to its left)."""
    allowed = (rows.mask == 1) & (rows.tokens != eos_id)
    allowed[:, 0] = False
    return spread_sample(rows, allowed, n, rng)


def blank_scores(run: Run, rows: Rows, row_N, position_N, log_prior_V) -> np.ndarray:
    """[N, V] scores of every id as the token at each blank (see the module docstring)."""
    tokens_NxL, mask_NxL = rows.tokens[row_N], rows.mask[row_N]
    if run.flag == "bert":
        masked_NxL = tokens_NxL.copy()
        masked_NxL[np.arange(len(row_N)), position_N] = run.exp.tokenizer.mask_id
        return forward(run, masked_NxL, mask_NxL, position_N, hidden=False)
    if run.flag == "gpt":
        return forward(run, tokens_NxL, mask_NxL, position_N - 1, hidden=False)
    contexts_NxLxO, weights_NxLxO = word2vec.context_targets(
        tokens_NxL, mask_NxL, window=run.config.word2vec.window, eos_id=run.exp.tokenizer.eos_id)
    at = (np.arange(len(row_N)), position_N)
    scores = word2vec.blank_scores(word2vec.context_log_probs(run.params), jnp.asarray(log_prior_V, jnp.float32),
                                   contexts_NxLxO[at], weights_NxLxO[at])
    return np.asarray(jax.device_get(scores))


def top_k_hits(scores_NxV, targets_N, allowed_V, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 hits, top-k hits) [N] over the allowed ids only."""
    scores_NxV = np.where(allowed_V[None, :scores_NxV.shape[1]], scores_NxV, -np.inf)
    top_NxK = np.argsort(-scores_NxV, axis=1, kind="stable")[:, :k]
    return top_NxK[:, 0] == targets_N, np.any(top_NxK == targets_N[:, None], axis=1)


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------

def evaluate(runs: Sequence[Run], *, train_tokens: int = 4000, test_tokens: int = 20000, blanks: int = 2000,
             classes: str = "coarse", prior_tokens: int = 1_000_000, seed: int = 0, l2: float = 1e-3,
             probe_steps: int = 1000) -> dict:
    """Both measures for the runs (in the order word2vec, BERT, GPT); see the module docstring."""
    if classes not in CLASSES:
        raise ValueError(f"--classes must be one of {sorted(CLASSES)}, got {classes!r}")
    check_same_data(runs)
    first = runs[0]
    data_cfg, tokenizer = first.config.data, first.exp.tokenizer
    rng = np.random.default_rng(seed)
    texts = corpora.load_split(data_cfg, data_cfg.eval_split)
    order = rng.permutation(len(texts))
    halves = {half: pack_documents(tokenizer, [texts[int(i)] for i in order[start::2]], data_cfg.seq_len, classes)
              for half, start in (("train", 0), ("test", 1))}
    train_at, test_at = (spread_sample(halves[half], halves[half].labels != UNLABELLED, n, rng)
                         for half, n in (("train", train_tokens), ("test", test_tokens)))
    if len(train_at[0]) == 0 or len(test_at[0]) == 0:
        raise ValueError(f"data.{data_cfg.eval_split}: no labelled tokens in the probe's "
                         f"{'training' if len(train_at[0]) == 0 else 'test'} half (Python sources that tokenize)")
    names = CLASSES[classes]
    y_train, y_test = halves["train"].labels[train_at], halves["test"].labels[test_at]
    ids_train, ids_test = halves["train"].tokens[train_at], halves["test"].tokens[test_at]

    def accuracy(predictions):
        return float(np.mean(predictions == y_test))

    probe = {"majority class": accuracy(np.full(len(y_test), np.bincount(y_train, minlength=len(names)).argmax())),
             "token identity": accuracy(token_identity(ids_train, y_train, ids_test, len(names))),
             "token identity (fitted on test)": accuracy(token_identity(ids_test, y_test, ids_test, len(names)))}
    blank_rows, blank_positions = choose_blanks(halves["test"], tokenizer.eos_id, blanks, rng)
    targets = halves["test"].tokens[blank_rows, blank_positions]
    size = max(run.exp.model_cfg.vocab_size for run in runs)
    log_prior = unigram_log_prior(data_cfg, tokenizer, size, max_tokens=prior_tokens, seed=seed)
    allowed = ordinary_ids(tokenizer, size)
    fill = {"unigram prior": top_k_hits(np.broadcast_to(log_prior, (len(targets), size)), targets, allowed)}
    for run in runs:
        predict = fit_linear_probe(features(run, halves["train"], *train_at), y_train, len(names), l2=l2,
                                   steps=probe_steps)
        probe[run.flag] = accuracy(predict(features(run, halves["test"], *test_at)))
        scores = blank_scores(run, halves["test"], blank_rows, blank_positions,
                              log_prior[:run.exp.model_cfg.vocab_size])
        fill[run.flag] = top_k_hits(scores, targets, allowed)
    return {
        "classes": list(names),
        "probe": probe,
        "fill_in": {name: {"top1": float(np.mean(h1)), "top5": float(np.mean(h5))} for name, (h1, h5) in fill.items()},
        "counts": {"probe_train_tokens": int(len(y_train)), "probe_test_tokens": int(len(y_test)),
                   "blanks": int(len(targets)), "train_documents": halves["train"].documents,
                   "test_documents": halves["test"].documents, "held_out_documents": len(texts),
                   "test_class_shares": {n: float(np.mean(y_test == i)) for i, n in enumerate(names)}},
        "settings": {"train_tokens": train_tokens, "test_tokens": test_tokens, "blanks": blanks, "classes": classes,
                     "prior_tokens": prior_tokens, "seed": seed, "l2": l2, "probe_steps": probe_steps,
                     "window": next((r.config.word2vec.window for r in runs if r.flag == "word2vec"), None),
                     "seq_len": data_cfg.seq_len},
        "runs": {run.flag: run.workdir for run in runs},
    }


DESCRIPTIONS = {
    "majority class": "the most frequent class",
    "token identity": "each id's most frequent class in the probe's training tokens",
    "token identity (fitted on test)": "the same, fitted on the test tokens: the ceiling of any context-free model",
    "unigram prior": "token frequencies, no context",
    "word2vec": "input vector (no context); blank by Bayes over the skip-gram window",
    "bert": "final hidden state (both sides); blank by the MLM head at [MASK]",
    "gpt": "final hidden state (left context); blank by next-token logits",
}


def format_table(result: dict) -> str:
    """Markdown: one row per model or baseline, probe accuracy and fill-in top-1 / top-5."""
    names = list(dict.fromkeys([*result["probe"], *result["fill_in"]]))
    lines = ["| model | features / prediction | probe accuracy | fill-in top-1 | fill-in top-5 |",
             "|---|---|---:|---:|---:|"]
    for name in names:
        probe = result["probe"].get(name)
        fill = result["fill_in"].get(name, {})
        cells = [f"{value:.3f}" if value is not None else "" for value in (probe, fill.get("top1"), fill.get("top5"))]
        label = {"bert": "BERT", "gpt": "GPT"}.get(name, name)
        lines.append(f"| {label} | {DESCRIPTIONS.get(name, '')} | " + " | ".join(cells) + " |")
    c = result["counts"]
    shares = ", ".join(f"{k} {v:.1%}" for k, v in c["test_class_shares"].items())
    lines.append("")
    lines.append(f"Probe: {c['probe_train_tokens']} training tokens ({c['train_documents']} documents), "
                 f"{c['probe_test_tokens']} test tokens ({c['test_documents']} documents; {shares}). "
                 f"Fill-in: {c['blanks']} blanks.")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llm_jax.probe", description=__doc__.split("\n\n")[0])
    for flag, (task, kind) in EXPECTED.items():
        p.add_argument(f"--{flag}", required=True, help=f"workdir of a task={task} run (model.kind={kind})")
    p.add_argument("--train_tokens", type=int, default=4000, help="labelled tokens the probe is fitted on")
    p.add_argument("--test_tokens", type=int, default=20000, help="labelled tokens it is tested on (at most)")
    p.add_argument("--blanks", type=int, default=2000, help="fill-in-the-blank positions")
    p.add_argument("--classes", default="coarse", choices=sorted(CLASSES), help="coarse: code/string/comment")
    p.add_argument("--prior_tokens", type=int, default=1_000_000, help="training tokens counted for p(w)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parse_args(argv)
    try:
        for flag in ("train_tokens", "test_tokens", "blanks"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        runs = [load_run(flag, getattr(args, flag)) for flag in EXPECTED]
        result = evaluate(runs, train_tokens=args.train_tokens, test_tokens=args.test_tokens, blanks=args.blanks,
                          classes=args.classes, prior_tokens=args.prior_tokens, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
