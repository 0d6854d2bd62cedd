"""Fake 8 CPU devices for every test, before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# scipy's optimisers (scaling fits) call OpenBLAS, whose thread pool slows ~14x on busy cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# One persistent compilation cache for the session: the xdist workers and every child process
# (they inherit the environment) reuse each other's executables, since most tests compile the
# same tiny models. Executables are keyed by HLO, devices and JAX version, so a hit runs exactly
# what a fresh compile would. Made once by the controller, removed by it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="llm_jax_test_jit_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)


import pytest  # noqa: E402  (after XLA_FLAGS on purpose)


def make_tiny_config(**overrides):
    """A nano decoder on a tiny local corpus: fast enough to train a few steps in a test."""
    from llm_jax import config_lib

    config = config_lib.base_config()
    config.model.size = "nano"
    config.data.seq_len = 32
    config.data.batch_size = 8
    config.data.prefetch = 0
    config.optimizer.warmup_steps = 2
    config.optimizer.learning_rate = 1e-2
    config.train.num_steps = 6
    config.train.log_every = 1
    config.train.eval_every = 3
    config.train.eval_batches = 2
    config.train.checkpoint_every = 3
    config.train.progress = False
    return config_lib.set_fields(config, overrides)


@pytest.fixture
def tiny_config():
    return make_tiny_config


@pytest.fixture
def text_corpus(tmp_path):
    """A few KB of varied text files (real Python sources from this repository)."""
    import pathlib
    import shutil

    root = pathlib.Path(__file__).resolve().parents[1] / "llm_jax"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, path in enumerate(sorted(root.glob("*.py"))):
        shutil.copy(path, corpus / f"{i:02d}_{path.name}.txt")
    return str(corpus / "*.txt")


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(batches_a, batches_b):
    """Two lists of host batches are identical, key by key."""
    import numpy as np

    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def load_benchmark(name: str):
    """A script of benchmarks/ loaded as a module (they are scripts, not a package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def single_device_env(*extra_xla_flags: str) -> dict:
    """The environment without conftest's 8 fake devices, for benchmark child processes: their
    small batches cannot split over 8 devices, and one device gets the host's whole peak."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + list(extra_xla_flags))
    env["JAX_PLATFORMS"] = "cpu"
    return env
