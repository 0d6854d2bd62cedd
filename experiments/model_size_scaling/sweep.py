"""Study 1, model-size scaling (Kaplan et al. 2020, L(N)): decoders of 6 sizes, 25k to 1.8M
non-embedding parameters (70x), each trained on the same number of tokens of the default corpus.

    python -m llm_jax.sweep run experiments/model_size_scaling/sweep.py             # ~30 min on 2 CPU cores
    python -m llm_jax.scaling params runs/sweeps/model_size_scaling_cpu/results.csv \
        --out=experiments/model_size_scaling                                          # fit L(N) and plot

`:scale=tpu` (or `gpu`) runs the same study at accelerator sizes (10M to 300M non-embedding
parameters, 1024-token contexts, bfloat16); `:scale=smoke` is the tests' two 3-step runs.
"""
from llm_jax import sweep

# (d_model, n_layers, n_heads): widths and depths grow together, as in Kaplan's table of shapes.
SHAPES = {
    "smoke": [(32, 2, 2), (48, 2, 2)],
    "cpu": [(32, 2, 2), (48, 2, 2), (64, 2, 2), (96, 3, 3), (128, 4, 4), (192, 4, 4)],
    "tpu": [(256, 4, 4), (384, 6, 6), (512, 8, 8), (640, 10, 10), (768, 12, 12), (1024, 16, 16),
            (1024, 24, 16)],
}
SHAPES["gpu"] = SHAPES["tpu"]
# Every size sees the same tokens: num_steps x batch_size x seq_len.
FIXED = {
    "smoke": {"train.num_steps": 3, "data.seq_len": 32, "data.batch_size": 8, "train.log_every": 1,
              "train.eval_batches": 2},
    "cpu": {"train.num_steps": 2000, "data.seq_len": 128, "data.batch_size": 16,  # 4.1M tokens
            "optimizer.warmup_steps": 100, "train.eval_every": 500, "train.eval_batches": 64},
    "tpu": {"train.num_steps": 20000, "data.seq_len": 1024, "data.batch_size": 128,  # 2.6B tokens
            "optimizer.warmup_steps": 1000, "optimizer.learning_rate": 6e-4, "model.dtype": "bfloat16",
            "train.eval_every": 2000, "train.eval_batches": 64, "train.checkpoint_every": 2000},
}
FIXED["gpu"] = FIXED["tpu"]


def get_sweep(arg: str = ""):
    scale = sweep.parse_arg(arg, scale="cpu")["scale"]
    if scale not in SHAPES:
        raise ValueError(f"scale must be one of {sorted(SHAPES)}, got {scale!r}")
    runs = [{"name": f"d{d}_L{layers}", "model.d_model": d, "model.n_layers": layers, "model.n_heads": heads}
            for d, layers, heads in SHAPES[scale]]
    return dict(name=f"model_size_scaling_{scale}", config="configs/quickstart.py", runs=runs,
                fixed={"train.progress": False, "train.checkpoint_every": 500, **FIXED[scale]})
