"""Study 3, learning-rate sweep across widths: decoders of 3 widths at one depth, each at 5 peak
learning rates half a decade apart, on the same tokens; where the best learning rate sits per width.

    bash experiments/lr_sweep/run.sh    # the sweep (~32 min on 2 CPU cores), then the analysis into results_cpu/

`:scale=tpu` (or `gpu`) sweeps widths 512-2048 at 12 layers; `:scale=smoke` is the tests' tiny one.
"""
from llm_jax import sweep

# Widths at a fixed depth and head size (32 on CPU, 64 on accelerators): only the width moves.
SCALES = {
    "smoke": dict(widths=[32, 64], layers=1, head_dim=32, learning_rates=[1e-3, 1e-2],
                  fixed={"train.num_steps": 3, "data.seq_len": 32, "data.batch_size": 8,
                         "train.log_every": 1, "train.eval_batches": 2}),
    "cpu": dict(widths=[64, 128, 256], layers=4, head_dim=32,
                learning_rates=[3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2],
                fixed={"train.num_steps": 200, "optimizer.warmup_steps": 20, "data.seq_len": 128,
                       "data.batch_size": 16, "train.eval_batches": 64}),  # 0.4M tokens per run
    "tpu": dict(widths=[512, 1024, 2048], layers=12, head_dim=64,
                learning_rates=[1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2],
                fixed={"train.num_steps": 5000, "optimizer.warmup_steps": 500, "data.seq_len": 1024,
                       "data.batch_size": 256, "model.dtype": "bfloat16", "train.eval_batches": 64}),
}
SCALES["gpu"] = SCALES["tpu"]


def get_sweep(arg: str = ""):
    scale = sweep.scale_of(arg, SCALES)
    s = SCALES[scale]
    widths = [{"model.d_model": d, "model.n_heads": d // s["head_dim"]} for d in s["widths"]]
    return dict(name=f"lr_sweep_{scale}", config="configs/quickstart.py",
                runs=sweep.product(widths, {"optimizer.learning_rate": s["learning_rates"]}),
                fixed={"model.n_layers": s["layers"], "train.progress": False, "train.eval_every": 10**9,
                       "train.checkpoint_every": 500, **s["fixed"]})
