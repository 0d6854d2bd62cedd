"""Example sweep: model size x peak learning rate on the quickstart config.

    python -m llm_jax.sweep run experiments/example_sweep.py --root=runs/sweeps    # 4 runs, 1 min 50 s on 2 CPU cores
    python -m llm_jax.sweep commands experiments/example_sweep.py:scale=tpu        # one command line per run
    python -m llm_jax.sweep slurm experiments/example_sweep.py:scale=gpu --out=example.sbatch --gpus_per_task=1

Results: runs/sweeps/example_sweep_<scale>/results.csv (again with `python -m llm_jax.sweep collect ...`).
The argument picks the scale: `scale=cpu` (default), `scale=tpu` or `scale=gpu` (the same study at
accelerator sizes, in bfloat16), `scale=smoke` (2 seeds of a nano model, 3 steps each: the tests' run).
"""
from llm_jax import sweep

SCALES = {  # the config (with its size/steps presets), the swept values, fields set in every run
    "smoke": dict(config="configs/quickstart.py:size=nano,steps=3", sizes=["nano"], learning_rates=[1e-3],
                  seeds=[0, 1], fixed={"data.seq_len": 32, "data.batch_size": 8, "train.log_every": 1,
                                       "train.eval_batches": 2, "train.progress": False}),
    "cpu": dict(config="configs/quickstart.py:steps=200", sizes=["nano", "micro"], learning_rates=[1e-3, 3e-3],
                seeds=[0], fixed={"train.eval_every": 50}),
    "tpu": dict(config="configs/quickstart.py:steps=2000", sizes=["small", "medium"], learning_rates=[3e-4, 1e-3],
                seeds=[0], fixed={"data.seq_len": 256, "data.batch_size": 128, "model.dtype": "bfloat16"}),
}
SCALES["gpu"] = SCALES["tpu"]


def get_sweep(arg: str = ""):
    scale = sweep.scale_of(arg, SCALES)
    s = SCALES[scale]
    return dict(name=f"example_sweep_{scale}", config=s["config"], fixed=s["fixed"],
                runs=sweep.product({"model.size": s["sizes"], "optimizer.learning_rate": s["learning_rates"],
                                    "seed": s["seeds"]}))
