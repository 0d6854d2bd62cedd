"""Study 4, in-context learning vs scale (GPT-3's "language models are few-shot learners" in
miniature): LLaMA-style decoders of 6 sizes pretrained on the same tokens of a corpus where every
document follows its own random mapping from 8 letters to 10 digits (llm_jax/data/icl.py), then
scored 0/1/4/8/16-shot on 40 held-out mappings.

    bash experiments/icl_scaling/run.sh    # corpus + tasks, the sweep, then the few-shot table and plots

The 1-layer model is the control: one attention layer cannot compose a previous-token head with
a lookup (an induction head), so it should stay near chance at every shot count.
`:scale=tpu` (or `gpu`) runs larger models on 32x the tokens of a larger corpus (run.sh writes
it); `:scale=smoke` is the tests' 3-step runs.
"""
from llm_jax import sweep

# (d_model, n_layers, n_heads)
SHAPES = {
    "smoke": [(32, 1, 2), (32, 2, 2)],
    "cpu": [(64, 1, 2), (32, 2, 2), (48, 2, 2), (64, 2, 2), (96, 3, 3), (128, 4, 4)],
    # 32-token rows (8 demonstrations + the query) and 16M tokens, where 2-layer models leave the
    # plateau: d128 after ~4M tokens, d64 after 10-15M or not at all (README); 16 shots do not fit.
    "cpu_short": [(64, 1, 2), (32, 2, 2), (64, 2, 2), (96, 2, 3), (128, 2, 4)],
    "tpu": [(128, 1, 4), (128, 2, 4), (256, 4, 4), (384, 6, 6), (512, 8, 8), (768, 12, 12)],
}
SHAPES["gpu"] = SHAPES["tpu"]
# 64-token rows hold 16 demonstrations (3 tokens each) and the query; every size sees the same tokens.
FIXED = {
    "smoke": {"train.num_steps": 3, "data.batch_size": 8, "train.log_every": 1, "train.eval_batches": 2,
              "optimizer.warmup_steps": 1},
    "cpu": {"train.num_steps": 4000, "data.batch_size": 32,  # 8.2M tokens
            "optimizer.warmup_steps": 100, "train.eval_every": 1000, "train.eval_batches": 32},
    "cpu_short": {"train.num_steps": 8000, "data.batch_size": 64, "data.seq_len": 32,  # 16.4M tokens
                  "optimizer.warmup_steps": 100, "train.eval_every": 1000, "train.eval_batches": 32},
    "tpu": {"train.num_steps": 6000, "data.batch_size": 512,  # 197M tokens
            "optimizer.warmup_steps": 500, "optimizer.learning_rate": 1e-3, "model.dtype": "bfloat16",
            "train.eval_every": 1000, "train.eval_batches": 32},
}
FIXED["gpu"] = FIXED["tpu"]
# Initialisation seeds per size: whether and when the induction-head phase change happens varies
# from seed to seed at small sizes, so the CPU study repeats each size (data order is the same).
SEEDS = {"cpu_short": (0, 1)}


def data_scale(scale: str) -> str:
    """The corpus a scale reads (run.sh writes it): cpu_short shares cpu's."""
    return "cpu" if scale == "cpu_short" else scale


def get_sweep(arg: str = ""):
    scale = sweep.scale_of(arg, SHAPES)
    runs = [{"name": f"d{d}_L{layers}" + (f"_seed{seed}" if seed else ""), "model.d_model": d,
             "model.n_layers": layers, "model.n_heads": heads, **({"seed": seed} if seed else {})}
            for seed in SEEDS.get(scale, (0,)) for d, layers, heads in SHAPES[scale]]
    return dict(name=f"icl_scaling_{scale}", config="configs/quickstart.py", runs=runs,
                fixed={"data.dataset": "files", "data.files": f"runs/icl_data_{data_scale(scale)}/train/*.txt",
                       "data.seq_len": 64, "model.style": "llama", "optimizer.learning_rate": 2e-3,
                       "train.progress": False, "train.checkpoint_every": 1000, **FIXED[scale]})
