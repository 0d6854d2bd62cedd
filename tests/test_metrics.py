"""Tests for llm_jax.metrics: FLOP counts, MFU, peak FLOP/s, the metrics writer, progress."""
import io
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import metrics


def model_cfg(**overrides):
    """The attributes of llm_jax.model.TransformerConfig that flops_per_token reads."""
    fields = dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64, d_ff=3072,
                  vocab_size=50304, mlp="gelu", kind="decoder", mlm_head_transform=False)
    return types.SimpleNamespace(**{**fields, **overrides})


# ---------------------------------------------------------------------------- flops_per_token

def test_flops_per_token_matches_nanogpt_for_gpt2():
    cfg = model_cfg()
    T = 1024
    # nanoGPT's N: 12 d^2 per layer (4 d^2 attention + 8 d^2 MLP) plus the tied lm head.
    n_params = cfg.n_layers * 12 * cfg.d_model**2 + cfg.d_model * cfg.vocab_size
    nanogpt = 6 * n_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    assert metrics.flops_per_token(cfg, T) == nanogpt
    assert metrics.flops_per_token(cfg, T, training=False) == nanogpt / 3


def test_flops_per_token_swiglu_gqa_by_hand():
    # d=64, 4 query heads and 2 kv heads of 16, d_ff=128, 2 layers, vocab 256, T=32.
    cfg = model_cfg(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                    vocab_size=256, mlp="swiglu")
    q = 64 * 64  # 4 heads x 16
    k = v = 64 * 32  # 2 kv heads x 16
    out = 64 * 64
    mlp = 3 * 64 * 128
    per_layer = q + k + v + out + mlp  # 4096 + 2048 + 2048 + 4096 + 24576 = 36864
    weights = 2 * per_layer + 64 * 256  # 73728 + 16384 = 90112
    attention = 2 * 2 * 2 * 4 * 16 * 32  # layers x (scores + weighted sum) x H x E x T = 16384
    forward = 2 * weights + attention  # 196608
    assert forward == 196_608
    assert metrics.flops_per_token(cfg, 32, training=False) == forward
    assert metrics.flops_per_token(cfg, 32) == 3 * forward


def test_flops_per_token_counts_mlm_head_transform():
    plain, with_transform = model_cfg(kind="encoder"), model_cfg(kind="encoder",
                                                                 mlm_head_transform=True)
    extra = metrics.flops_per_token(with_transform, 128) - metrics.flops_per_token(plain, 128)
    assert extra == 6 * 768 * 768


def test_flops_per_token_rejects_unknown_mlp():
    with pytest.raises(ValueError, match="model.mlp"):
        metrics.flops_per_token(model_cfg(mlp="relu"), 16)


# ---------------------------------------------------------------------------- mfu

def test_mfu_arithmetic():
    # 1000 tok/s x 1e9 FLOPs/token = 1e12 FLOP/s over 4 devices x 1e12 peak = 25%.
    assert metrics.mfu(1000.0, 1e9, 1e12, 4) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        metrics.mfu(1000.0, 1e9, 0.0, 4)


# ---------------------------------------------------------------------------- peak FLOP/s

@pytest.mark.parametrize("kind, platform, dtype, expected", [
    ("TPU v4", "tpu", "bfloat16", 275e12),
    ("TPU v3", "tpu", "bfloat16", 61.5e12),  # per core: a v3 chip is two JAX devices
    ("TPU v5 lite", "tpu", "bfloat16", 197e12),
    ("TPU v5", "tpu", "bfloat16", 459e12),
    ("TPU v6 lite", "tpu", "bfloat16", 918e12),
    ("NVIDIA H100 80GB HBM3", "gpu", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "gpu", "bfloat16", 756e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", "float32", 156e12),  # TF32
    ("NVIDIA A10G", "gpu", "bfloat16", 70e12),
    ("NVIDIA L4", "gpu", jnp.bfloat16, 121e12),
    ("Tesla V100-SXM2-16GB", "gpu", "float32", 15.7e12),
])
def test_peak_table_lookup(kind, platform, dtype, expected):
    device = types.SimpleNamespace(device_kind=kind, platform=platform)
    flops, source = metrics.peak_flops_per_device(device, dtype=dtype)
    assert flops == expected
    assert source.startswith("table:")


def test_peak_override_wins():
    device = types.SimpleNamespace(device_kind="TPU v4", platform="tpu")
    assert metrics.peak_flops_per_device(device, override=1.5e12) == (1.5e12, "config")


def test_peak_unknown_accelerator_is_measured(monkeypatch):
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda device, n: 3e12)
    device = types.SimpleNamespace(device_kind="Mystery NPU 9", platform="npu")
    flops, source = metrics.peak_flops_per_device(device)
    assert flops == 3e12
    assert "measured" in source and "not in table" in source


def test_peak_cpu_is_measured_and_split_over_fake_devices():
    device = jax.devices("cpu")[0]
    flops, source = metrics.peak_flops_per_device(device, matmul_size=256)
    assert flops > 0
    assert source.startswith("measured (n=256, float32 matmul)")
    assert f"{len(jax.devices('cpu'))} devices" in source
    # Cached per process: a second call does not measure again, so it returns the same figure.
    assert metrics.peak_flops_per_device(device, matmul_size=256)[0] == flops


# ---------------------------------------------------------------------------- MetricsWriter

def test_writer_writes_jsonl_and_tensorboard(tmp_path):
    with metrics.MetricsWriter(str(tmp_path)) as writer:
        writer.write(1, {"train/loss": jnp.float32(2.5), "train/tokens": np.int64(4096)})
        writer.write(2, {"train/loss": float("nan"), "train/grad_norm": jnp.array(float("inf"))})
        writer.flush()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "train/loss": 2.5, "train/tokens": 4096},
        {"step": 2, "train/loss": None, "train/grad_norm": None},  # JSON has no NaN/Infinity
    ]
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    assert metrics.read_metrics(str(tmp_path / "metrics.jsonl"))[0]["train/tokens"] == 4096
    event_files = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in event_files)


def test_writer_rejects_non_scalars(tmp_path):
    with metrics.MetricsWriter(str(tmp_path)) as writer:
        with pytest.raises(ValueError, match="train/loss"):
            writer.write(1, {"train/loss": np.zeros(3)})


def _write_raw(path, records, partial_tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + partial_tail)


def test_resume_drops_later_steps_and_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_raw(path, [{"step": s, "train/loss": 1.0 / s} for s in (10, 20, 30, 40)],
               partial_tail='{"step": 50, "train/lo')
    with metrics.MetricsWriter(str(tmp_path), resume_step=20) as writer:
        writer.write(30, {"train/loss": 0.5})
    assert [r["step"] for r in metrics.read_metrics(str(path))] == [10, 20, 30]
    assert not os.path.exists(str(path) + ".tmp")


def test_partial_line_is_dropped_without_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_raw(path, [{"step": 1, "x": 1.0}], partial_tail='{"step": 2, "x"')
    assert [r["step"] for r in metrics.read_metrics(str(path))] == [1]
    with metrics.MetricsWriter(str(tmp_path)) as writer:
        writer.write(2, {"x": 2.0})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with metrics.MetricsWriter(str(workdir), enabled=False, resume_step=0) as writer:
        writer.write(1, {"train/loss": 1.0})
        writer.flush()
    assert not workdir.exists()


# ---------------------------------------------------------------------------- Progress

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_without_terminal_prints_plain_lines_sparingly():
    stream, clock = io.StringIO(), FakeClock()  # StringIO is not a terminal
    progress = metrics.Progress(95, start_step=0, stream=stream, log_every_secs=10, clock=clock)
    for step in range(1, 96):
        clock.now = step * 1.0  # one step per second
        progress.update(step, loss=2.0, tokens_per_sec=1234.0)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == (
        [f"step {s}/95" for s in range(10, 91, 10)] + ["step 95/95"])  # every 10 s, and the end
    assert lines[0] == "step 10/95, loss 2.0000, 1,234 tok/s, ETA 01:25"


def test_progress_disabled_prints_nothing():
    stream = io.StringIO()
    progress = metrics.Progress(10, enabled=False, stream=stream, log_every_secs=0)
    progress.update(10, loss=1.0)
    progress.close()
    assert stream.getvalue() == ""


def test_progress_on_terminal_uses_tqdm():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = metrics.Progress(10, start_step=2, stream=stream)
    progress.update(5, loss=1.5, tokens_per_sec=100.0)
    progress.close()
    assert "5/10" in stream.getvalue() and "loss 1.5000" in stream.getvalue()
