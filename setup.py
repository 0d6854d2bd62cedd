"""Install: pip install -e ".[test]"."""
from setuptools import find_packages, setup

setup(
    name="llm_jax",
    version="0.1.0",
    description="The modern LLM recipe (pretraining, SFT, reward models, DPO) in JAX/Flax.",
    packages=find_packages(include=["llm_jax", "llm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "tensorflow-datasets>=4.9.7",
        "grain>=0.2.10",
        "array_record>=0.7",
        "sentencepiece>=0.2",
        "tokenizers>=0.15",  # data.tokenizer=huggingface (tokenizer.json)
        "safetensors>=0.4",  # llm_jax/convert.py: Hugging Face checkpoints
        "tensorboardX>=2.6",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "numpy>=1.26",
        "scipy>=1.11",  # llm_jax/scaling.py: least squares, L-BFGS
        "matplotlib>=3.8",  # llm_jax/scaling.py: PNG plots
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        # compare_torch.py's peers: CPU torch (pip install torch --index-url
        # https://download.pytorch.org/whl/cpu keeps the download small) and transformers.
        "bench": ["psutil>=5.9", "torch>=2.4", "transformers>=4.44"],
    },
)
