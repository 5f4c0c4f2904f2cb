"""pdistill-jax: prompt distillation (Kujanpää et al., 2024) in JAX/Flax."""
from importlib import metadata

try:  # pyproject.toml's version is the one source of truth
    __version__ = metadata.version("pdistill-jax")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
