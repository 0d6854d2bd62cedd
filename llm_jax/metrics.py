"""Training metrics: FLOP counting and MFU, metrics.jsonl + TensorBoard, a progress line.

`flops_per_token` and `peak_flops_per_device` give the numerator and denominator of model FLOPs
utilisation; `MetricsWriter` records scalars so a crash loses at most one line and a resumed run
never repeats a step; `Progress` shows the run's state on a terminal without flooding log files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


# ----------------------------------------------------------------------------------------------
# FLOPs per token
# ----------------------------------------------------------------------------------------------

_MLP_MATRICES = {"gelu": 2, "swiglu": 3}  # up + down; SwiGLU adds the gate.


def _matmul_weights(cfg) -> int:
    """Number of weights that multiply every token's activations (embedding lookups excluded)."""
    if cfg.mlp not in _MLP_MATRICES:
        raise ValueError(f"model.mlp must be one of {tuple(_MLP_MATRICES)}, got {cfg.mlp!r}")
    q_width = cfg.n_heads * cfg.head_dim
    kv_width = cfg.n_kv_heads * cfg.head_dim
    attention = cfg.d_model * q_width + 2 * cfg.d_model * kv_width + q_width * cfg.d_model
    mlp = _MLP_MATRICES[cfg.mlp] * cfg.d_model * cfg.d_ff
    # The output head is a real matmul whether or not it shares the embedding table; BERT's MLM
    # head runs a d_model x d_model transform before it.
    head = cfg.d_model * cfg.vocab_size + (cfg.d_model**2 if cfg.mlm_head_transform else 0)
    return cfg.n_layers * (attention + mlp) + head


def flops_per_token(model_cfg, seq_len: int, *, training: bool = True) -> float:
    """Matmul FLOPs the model spends per token of a `seq_len`-long sequence.

    Counts 2 FLOPs per multiply-add of every weight matrix (q/k/v/output projections, the MLP's 2
    or 3 matrices, the output head, tied or not) plus attention's two T-long contractions per
    layer, scores q.k and the weighted sum of v: 2 * 2 * n_heads * head_dim * seq_len. The full T is
    counted even for causal decoders, whose mask makes half the scores unused: this is the PaLM
    appendix B / nanoGPT `estimate_mfu` convention, so MFU figures compare with theirs, and an
    encoder and a decoder of the same shape get the same count. Norms, softmax and other
    element-wise work are left out, as in those references.

    `training=True` triples the forward count (the backward pass costs twice the forward), giving
    nanoGPT's 6N + 12 L H Q T when N counts the matmul weights above.
    """
    attention_mixing = 2 * 2 * model_cfg.n_layers * model_cfg.n_heads * model_cfg.head_dim * seq_len
    forward = 2 * _matmul_weights(model_cfg) + attention_mixing
    return float(3 * forward if training else forward)


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops_per_device: float,
        num_devices: int) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices, a fraction in 0..1."""
    if peak_flops_per_device <= 0 or num_devices <= 0:
        raise ValueError(f"peak_flops_per_device ({peak_flops_per_device}) and num_devices "
                         f"({num_devices}) must be positive")
    return tokens_per_sec * flops_per_token / (peak_flops_per_device * num_devices)


# ----------------------------------------------------------------------------------------------
# Peak FLOP/s per device
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Peak:
    """Dense (no 2:4 sparsity) matmul peaks of one JAX device, each with the figure it is."""

    kind_contains: tuple[str, ...]  # lower-case substrings that must all be in `device_kind`
    name: str
    half: float  # what bfloat16/float16 matmuls get
    half_figure: str
    float32: float  # what float32 matmuls get at JAX's default precision
    float32_figure: str
    source: str


def _tpu(kind: str, name: str, chip_bf16: float, devices_per_chip: int = 1) -> _Peak:
    # Float32 matmuls at JAX's default precision run as single bf16 passes on the MXU.
    per_device = chip_bf16 / devices_per_chip
    return _Peak((kind,), name, per_device, "bf16", per_device, "bf16 MXU passes",
                 "cloud.google.com/tpu/docs")


def _nvidia(kind_contains: tuple[str, ...], name: str, bf16: float, tf32: float) -> _Peak:
    # From Ampere on, float32 matmuls at JAX's default precision use the TF32 tensor cores.
    return _Peak(kind_contains, name, bf16, "bf16 tensor core", tf32, "tf32 tensor core",
                 f"NVIDIA {name} datasheet")


def _nvidia_fp16_only(kind_contains: tuple[str, ...], name: str, fp16: float, fp32: float) -> _Peak:
    # Volta and Turing have fp16 tensor cores only: no bf16 (XLA emulates it), no TF32.
    return _Peak(kind_contains, name, fp16, "fp16 tensor core", fp32, "fp32",
                 f"NVIDIA {name} datasheet")


# First match wins, so a name comes before the names it contains ("a100" before "a10").
_PEAK_TABLE = (
    # v2/v3 show each of a chip's 2 TensorCores as a JAX device; v4 and v5p (megacore) and the
    # one-core v4i/v5e/v6e show one device per chip.
    _tpu("tpu v2", "TPU v2", 45e12, devices_per_chip=2),
    _tpu("tpu v3", "TPU v3", 123e12, devices_per_chip=2),
    dataclasses.replace(_tpu("tpu v4 lite", "TPU v4i", 138e12), source="TPU v4i paper, ISCA 2021"),
    _tpu("tpu v4", "TPU v4", 275e12),
    _tpu("tpu v5 lite", "TPU v5e", 197e12),
    _tpu("tpu v5e", "TPU v5e", 197e12),
    _tpu("tpu v5", "TPU v5p", 459e12),  # device_kind "TPU v5" (or "TPU v5p")
    _tpu("tpu v6", "TPU v6e", 918e12),  # device_kind "TPU v6 lite" (or "TPU v6e"), Trillium
    _nvidia(("h100", "pcie"), "H100 PCIe", 756e12, 378e12),
    _nvidia(("h100", "nvl"), "H100 NVL", 835e12, 417.5e12),
    _nvidia(("h100",), "H100 SXM", 989e12, 494.5e12),  # device_kind "NVIDIA H100 80GB HBM3"
    _nvidia(("h200", "nvl"), "H200 NVL", 835e12, 417.5e12),
    _nvidia(("h200",), "H200 SXM", 989e12, 494.5e12),  # also GH200: the same H100-class GPU
    _nvidia(("a100",), "A100", 312e12, 156e12),  # SXM and PCIe alike
    # AWS's A10G has no NVIDIA data sheet; these are the figures AWS users commonly quote.
    dataclasses.replace(_nvidia(("a10g",), "A10G", 70e12, 35e12), source="commonly quoted"),
    _nvidia(("a10",), "A10", 125e12, 62.5e12),
    _nvidia(("l40s",), "L40S", 362e12, 183e12),
    _nvidia(("l40",), "L40", 181e12, 90.5e12),
    _nvidia(("l4",), "L4", 121e12, 60e12),
    _nvidia_fp16_only(("v100", "pcie"), "V100 PCIe", 112e12, 14e12),
    _nvidia_fp16_only(("v100",), "V100 SXM2", 125e12, 15.7e12),
    _nvidia_fp16_only(("t4",), "T4", 65e12, 8.1e12),
)

_HALF_DTYPES = ("bfloat16", "float16")

# Large enough to amortise dispatch, small enough to take about a second on a 2-core CPU.
_MEASURE_SIZE = {"cpu": 2048}
_ACCELERATOR_MEASURE_SIZE = 8192
_measured_cache: dict[tuple[str, str, int], float] = {}


def _lookup_peak(device_kind: str) -> _Peak | None:
    kind = device_kind.lower()
    return next((p for p in _PEAK_TABLE if all(s in kind for s in p.kind_contains)), None)


def measure_matmul_flops(device, n: int, *, repeats: int = 5) -> float:
    """FLOP/s of a jitted n x n float32 matmul on `device`: 2 n^3 over the best of `repeats` runs.

    The best run, not the mean: slower runs measure interference, not the device.
    """
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()  # compile and warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _measured_peak(device, n: int) -> float:
    key = (device.platform, device.device_kind, n)
    if key not in _measured_cache:
        _measured_cache[key] = measure_matmul_flops(device, n)
    return _measured_cache[key]


def peak_flops_per_device(device=None, *, dtype: str = "bfloat16", override: float = 0.0,
                          matmul_size: int | None = None) -> tuple[float, str]:
    """Peak matmul FLOP/s of one device and where the figure comes from.

    Order: `override` when > 0 (config `train.peak_flops_per_device`), then the data-sheet table
    by `device.device_kind` (dense figures; `dtype` picks bf16/fp16 or the float32 column), then a
    measurement: a jitted float32 matmul of size `matmul_size` (default 2048 on CPU, 8192
    elsewhere), cached per process. CPUs are always measured, whatever `dtype`: XLA runs bf16 dots
    on CPU as float32 (no faster). Fake CPU devices
    (--xla_force_host_platform_device_count) share the host's cores, so the host's rate is split
    evenly between them and `mfu(..., num_devices)` still compares against the host's peak.
    """
    if override > 0:
        return float(override), "config"
    device = device if device is not None else jax.local_devices()[0]
    dtype_name = jnp.dtype(dtype).name
    if dtype_name not in (*_HALF_DTYPES, "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype_name}")
    if device.platform != "cpu":
        peak = _lookup_peak(device.device_kind)
        if peak is not None:
            if dtype_name in _HALF_DTYPES:
                return peak.half, f"table: {peak.name}, {peak.half_figure} ({peak.source})"
            return peak.float32, f"table: {peak.name}, {peak.float32_figure} ({peak.source})"
    n = matmul_size or _MEASURE_SIZE.get(device.platform, _ACCELERATOR_MEASURE_SIZE)
    source = f"measured (n={n}, float32 matmul)"
    if device.platform == "cpu":
        shared_by = len(jax.local_devices(backend="cpu"))
        return _measured_peak(device, n) / shared_by, f"{source}, host peak / {shared_by} devices"
    return _measured_peak(device, n), f"{source}; device kind {device.device_kind!r} not in table"


# ----------------------------------------------------------------------------------------------
# metrics.jsonl + TensorBoard
# ----------------------------------------------------------------------------------------------

def _scalar(name: str, value: Any) -> int | float | bool:
    """A Python number from a Python, numpy or JAX scalar (JAX arrays are fetched from device)."""
    array = np.asarray(value)
    if array.shape != ():
        raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
    return array.item()


def _json_number(value: int | float | bool) -> int | float | bool | None:
    """JSON has no NaN or Infinity: write them as null so every line stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _split_lines(text: str) -> tuple[list[str], bool]:
    """Complete lines, and whether a last line lacks its newline (a crash cut it short)."""
    *complete, tail = text.split("\n")
    return [line for line in complete if line.strip()], bool(tail.strip())


def _parse(line: str, path: str, line_number: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: not a JSON object ({e})") from e


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl, in file order; a half-written last line is skipped."""
    with open(path, encoding="utf-8") as f:
        lines, _ = _split_lines(f.read())
    return [_parse(line, path, i + 1) for i, line in enumerate(lines)]


def _atomic_write(path: str, text: str) -> None:
    tmp_path = path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def _repair(path: str, resume_step: int | None) -> None:
    """Drops a half-written last line and, when resuming, every line logged after `resume_step`.

    Those lines come from a run killed after logging but before its next checkpoint; the resumed
    run logs those steps again. The file is only rewritten when something is dropped.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines, has_partial_tail = _split_lines(f.read())
    kept = [line for i, line in enumerate(lines)
            if resume_step is None or _parse(line, path, i + 1)["step"] <= resume_step]
    if has_partial_tail or len(kept) < len(lines):
        _atomic_write(path, "".join(line + "\n" for line in kept))


class MetricsWriter:
    """Writes scalars to `workdir/metrics.jsonl` (one JSON object per line) and TensorBoard.

    Each line is flushed as written, so a crash loses at most the line being written; `flush()`
    also fsyncs. Non-finite values are written as JSON `null` (TensorBoard gets the float).
    `resume_step`: the step training restarts from (-1 for a fresh start in a used workdir); lines
    with a later step are dropped and TensorBoard is told to purge its events after it too.
    `enabled=False` (processes other than 0 in a multi-host run) writes nothing.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file = None
        self._tensorboard = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        _repair(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        purge_step = None if resume_step is None else resume_step + 1
        self._tensorboard = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                          purge_step=purge_step)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        if "step" in scalars:
            raise ValueError("'step' is the record's key; pass it as the step argument")
        values = {name: _scalar(name, value) for name, value in scalars.items()}
        record = {"step": int(step), **{k: _json_number(v) for k, v in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, int(step))

    def flush(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._tensorboard.flush()

    def close(self) -> None:
        if self._file is None:
            return
        self.flush()
        self._file.close()
        self._tensorboard.close()
        self._file = self._tensorboard = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Progress line
# ----------------------------------------------------------------------------------------------

def _describe(loss: float | None, tokens_per_sec: float | None) -> str:
    parts = []
    if loss is not None:
        parts.append(f"loss {float(loss):.4f}")
    if tokens_per_sec is not None:
        parts.append(f"{float(tokens_per_sec):,.0f} tok/s")
    return ", ".join(parts)


class Progress:
    """Step/total, loss, tokens/s and ETA: a live tqdm bar on a terminal; otherwise (CI, log
    files, where tqdm's carriage returns pile up into one huge line) a plain line at most every
    `log_every_secs`, and at the last step."""

    def __init__(self, total_steps: int, *, start_step: int = 0, enabled: bool = True,
                 stream=None, log_every_secs: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total_steps = total_steps
        self._stream = stream or sys.stderr
        self._bar = None
        self._enabled = enabled
        self._log_every_secs = log_every_secs
        self._clock = clock
        self._start_step = start_step
        self._start_time = self._last_print = clock()
        if enabled and self._stream.isatty():
            self._bar = tqdm.tqdm(total=total_steps, initial=start_step, file=self._stream,
                                  unit="step", dynamic_ncols=True)

    def update(self, step: int, *, loss: float | None = None,
               tokens_per_sec: float | None = None) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(_describe(loss, tokens_per_sec), refresh=False)
            self._bar.update(step - self._bar.n)
            return
        now = self._clock()
        if now - self._last_print >= self._log_every_secs or step >= self.total_steps:
            self._last_print = now
            print(self._plain_line(step, now, loss, tokens_per_sec), file=self._stream, flush=True)

    def _plain_line(self, step: int, now: float, loss, tokens_per_sec) -> str:
        done = step - self._start_step
        line = f"step {step}/{self.total_steps}"
        details = _describe(loss, tokens_per_sec)
        if details:
            line += f", {details}"
        if done > 0:
            eta = (now - self._start_time) / done * (self.total_steps - step)
            line += f", ETA {tqdm.tqdm.format_interval(eta)}"
        return line

    def write(self, message: str) -> None:
        """A line of its own (eval results) that does not break the live bar."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
