"""What a training run folder records about how its adapter was trained."""
from __future__ import annotations

from pdistill_jax.train.loop import read_run_config
from pdistill_jax.weights.peft import resolve_adapter


def training_system_message(adapter_path) -> str | None:
    """The system message a training run's adapter was trained with (its run folder's
    config.yaml), None for the chat template's default or a bare PEFT folder. The student learned
    its answers under that message, so it should be asked under the same one."""
    folder = resolve_adapter(adapter_path)
    run = folder.parent if folder.name == "adapter" else folder
    conf = read_run_config(run) or {}
    return (conf.get("train") or {}).get("system")
