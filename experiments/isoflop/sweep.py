"""Study 2, IsoFLOP profiles (Chinchilla's approach 2): 3 compute budgets x 5 model sizes; each
run's steps spend exactly its budget C (`sweep.steps_for_flops`), so a smaller model sees more tokens.

    bash experiments/isoflop/run.sh     # the sweep (~36 min on 2 CPU cores), then the analysis into results_cpu/

`:scale=cpu_width` is the width-only window: one depth, five widths per budget, each at the peak
learning rate study 3 found for its width. `:scale=tpu` (or `gpu`) is the same study at 1e18-1e19
FLOPs; `:scale=smoke` the tests' tiny one.
"""
from llm_jax import sweep

CONFIG = "configs/quickstart.py"
# (d_model, n_layers, n_heads) per budget: a window of sizes around the optimum, which moves up
# with C. At these budgets the optimum is small: a first window of 25k-3.2M parameters
# (first_attempt.csv) had the smallest size best at every budget.
BUDGETS = {
    "smoke": {1e9: [(32, 1, 2), (48, 1, 2), (64, 1, 2)], 2e9: [(32, 1, 2), (48, 1, 2), (64, 1, 2)]},
    "cpu": {
        5e11: [(16, 1, 2), (24, 1, 2), (32, 1, 2), (32, 2, 2), (48, 2, 2)],
        1.5e12: [(24, 1, 2), (32, 1, 2), (32, 2, 2), (48, 2, 2), (64, 2, 2)],
        5e12: [(32, 1, 2), (32, 2, 2), (48, 2, 2), (64, 2, 2), (96, 3, 3)],
    },
    "tpu": {
        1e18: [(256, 4, 4), (384, 6, 6), (512, 8, 8), (640, 10, 10), (768, 12, 12)],
        3e18: [(384, 6, 6), (512, 8, 8), (640, 10, 10), (768, 12, 12), (1024, 16, 16)],
        1e19: [(512, 8, 8), (640, 10, 10), (768, 12, 12), (1024, 16, 16), (1024, 24, 16)],
    },
}
BUDGETS["gpu"] = BUDGETS["tpu"]
# Width only, at the depth the `cpu` window found best (1 layer beat 2 at equal compute at every
# budget): a depth jump between neighbouring sizes made its profiles jagged (README).
WIDTHS = {5e11: (12, 16, 24, 32, 48), 1.5e12: (16, 24, 32, 48, 64), 5e12: (16, 24, 32, 48, 64, 96)}
BUDGETS["cpu_width"] = {flops: [(d, 1, 2) for d in widths] for flops, widths in WIDTHS.items()}


def lr_for_width(d_model: int) -> float:
    """Study 3's best peak rate, 2.5e-3 at d_model 64, falling as d_model^-0.91 (lr_sweep README),
    capped at 1e-2 where its 200-step runs had already degraded at every width."""
    return min(2.5e-3 * (64 / d_model) ** 0.91, 1e-2)


FIXED = {
    "smoke": {"data.seq_len": 32, "data.batch_size": 8, "train.log_every": 1, "train.eval_batches": 2},
    "cpu": {"data.seq_len": 128, "data.batch_size": 32, "train.eval_batches": 32},
    "tpu": {"data.seq_len": 1024, "data.batch_size": 256, "model.dtype": "bfloat16",
            "optimizer.learning_rate": 6e-4, "train.eval_batches": 64},
}
FIXED["gpu"] = FIXED["tpu"]
FIXED["cpu_width"] = FIXED["cpu"]


def get_sweep(arg: str = ""):
    scale = sweep.scale_of(arg, BUDGETS)
    fixed = {"train.progress": False, "train.checkpoint_every": 500, "train.eval_every": 10**9, **FIXED[scale]}
    runs = []
    for flops, shapes in BUDGETS[scale].items():
        for d, layers, heads in shapes:
            shape = {"model.d_model": d, "model.n_layers": layers, "model.n_heads": heads}
            if scale == "cpu_width":
                shape["optimizer.learning_rate"] = round(lr_for_width(d), 6)
            steps = sweep.steps_for_flops(CONFIG, {**fixed, **shape}, flops)
            # The cosine schedule spans each run (Chinchilla: a schedule longer than the run
            # overstates the loss of short runs); the warmup is a tenth of the run, at most 100 steps.
            runs.append({"name": f"C={flops:.2g},d{d}_L{layers}", **shape, "train.num_steps": steps,
                         "optimizer.warmup_steps": min(100, steps // 10)})
    return dict(name=f"isoflop_{scale}", config=CONFIG, runs=runs, fixed=fixed)
