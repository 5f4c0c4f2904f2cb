import os
import sys
from pathlib import Path

# Fake devices must be configured before JAX initialises; sharding tests use 8.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def _share_compiled_programs() -> None:
    """One XLA compilation cache for the whole test session: the pytest-xdist workers, every
    `pdistill` subprocess, and each test process itself. Compiling is most of the suite's time,
    and many tests compile the same program again from a new jit (each `main([...])` call builds
    its own): measured on tests/pipeline/test_run.py, 23 of its 107 compilations were repeats.
    Set before JAX initialises (it reads the variables then); the controller makes the folder and
    removes it, and the workers it starts inherit the variable. A user's own folder wins."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="pdistill-tests-xla-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    # Tiny models compile in well under JAX's default threshold of 1 s, and still repeat.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


_share_compiled_programs()
# tiny_models and the test modules others borrow helpers from (test_step, test_generate, ...)
# are imported by name: the tests' folders mirror the package's, their file names are unique.
TESTS = Path(__file__).parent
sys.path[:0] = [str(TESTS), *(str(d) for d in sorted(TESTS.iterdir()) if d.is_dir() and not d.name.startswith(("_", ".")))]

import pytest  # noqa: E402

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_models.build_model(d, "llama", tie=False)
    return d


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_qwen2")
    tiny_models.build_model(d, "qwen2", tie=True)
    return d


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """Qwen3: per-head q/k norms, no biases, head_dim apart from hidden_size / heads."""
    d = tmp_path_factory.mktemp("tiny_qwen3")
    tiny_models.build_model(d, "qwen3", tie=True, head_dim=24)
    return d


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    """Phi-3: fused qkv and gate_up weights; a sliding window of 6, shorter than test prompts."""
    d = tmp_path_factory.mktemp("tiny_phi3")
    tiny_models.build_model(d, "phi3", tie=False, sliding_window=6)
    return d


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    """Gemma 3: windowed layers (6 slots, shorter than test prompts) around a full one, each
    type with its own RoPE (the full one linearly scaled), a query scale apart from head_dim."""
    d = tmp_path_factory.mktemp("tiny_gemma3")
    tiny_models.build_model(d, "gemma3", tie=True, **tiny_models.GEMMA3)
    return d


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The real SmolLM2-135M GGUF (fetched on first use); for tests marked slow."""
    from pdistill_jax.weights.registry import fetch

    return fetch("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, request):
    # Tests never write into the user's cache, except slow ones that reuse the fetched model.
    if "slow" not in request.keywords:
        monkeypatch.setenv("PDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
