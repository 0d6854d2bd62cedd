"""Study 1, model-size scaling (Kaplan et al. 2020, L(N)): decoders of 7 sizes, 7k to 336k
non-embedding parameters (48x), each trained on the same 8.2M tokens of the default corpus.

    bash experiments/model_size_scaling/run.sh            # the sweep, then the fit and plot
    bash experiments/model_size_scaling/run.sh cpu_large  # 6 sizes up to 1.8M on 4.1M tokens: data-limited

`:scale=tpu` (or `gpu`) runs the same study at accelerator sizes (10M to 300M non-embedding
parameters, 1024-token contexts, bfloat16); `:scale=smoke` is the tests' two 3-step runs.
"""
from llm_jax import sweep

# (d_model, n_layers, n_heads): widths and depths grow together, as in Kaplan's table of shapes.
SHAPES = {
    "smoke": [(32, 2, 2), (48, 2, 2)],
    # 7 sizes, 7k to 336k (48x), on 8.2M tokens: every model sees at least 24 tokens per parameter
    # (Chinchilla's compute-optimal ratio is ~20), so data does not limit them, as in Kaplan's L(N).
    "cpu": [(24, 1, 2), (32, 1, 2), (32, 2, 2), (48, 2, 2), (64, 2, 2), (80, 3, 2), (96, 3, 3)],
    # 6 sizes, 25k to 1.8M (70x), on 4.1M tokens: the larger models see 2-5 tokens per parameter.
    "cpu_large": [(32, 2, 2), (48, 2, 2), (64, 2, 2), (96, 3, 3), (128, 4, 4), (192, 4, 4)],
    "tpu": [(256, 4, 4), (384, 6, 6), (512, 8, 8), (640, 10, 10), (768, 12, 12), (1024, 16, 16),
            (1024, 24, 16)],
}
SHAPES["gpu"] = SHAPES["tpu"]
# Every size sees the same tokens: num_steps x batch_size x seq_len.
FIXED = {
    "smoke": {"train.num_steps": 3, "data.seq_len": 32, "data.batch_size": 8, "train.log_every": 1,
              "train.eval_batches": 2},
    "cpu": {"train.num_steps": 4000, "data.seq_len": 128, "data.batch_size": 16,  # 8.2M tokens
            "optimizer.warmup_steps": 100, "train.eval_every": 1000, "train.eval_batches": 64},
    "cpu_large": {"train.num_steps": 2000, "data.seq_len": 128, "data.batch_size": 16,  # 4.1M tokens
                  "optimizer.warmup_steps": 100, "train.eval_every": 500, "train.eval_batches": 64},
    "tpu": {"train.num_steps": 20000, "data.seq_len": 1024, "data.batch_size": 128,  # 2.6B tokens
            "optimizer.warmup_steps": 1000, "optimizer.learning_rate": 6e-4, "model.dtype": "bfloat16",
            "train.eval_every": 2000, "train.eval_batches": 64, "train.checkpoint_every": 2000},
}
FIXED["gpu"] = FIXED["tpu"]


def get_sweep(arg: str = ""):
    scale = sweep.scale_of(arg, SHAPES)
    runs = [{"name": f"d{d}_L{layers}", "model.d_model": d, "model.n_layers": layers, "model.n_heads": heads}
            for d, layers, heads in SHAPES[scale]]
    return dict(name=f"model_size_scaling_{scale}", config="configs/quickstart.py", runs=runs,
                fixed={"train.progress": False, "train.checkpoint_every": 500, **FIXED[scale]})
