"""An adapter on the upper layers only: the frozen layers' states computed once per run give the
same training as running those layers in every step, and the adapter it writes is PEFT's
layers_to_transform of the upper layers."""
import dataclasses
import json

import numpy as np
import yaml

from pdistill_jax.config import LoraConfig, TrainConfig

from test_loop import metrics
from test_teacher_cache import cached_and_plain_runs


def test_training_with_the_lower_layers_cached_equals_training_without(tiny_llama, tmp_path,
                                                                        monkeypatch):
    """With the retention regulariser on, whose base states and lower layers are cached too."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in (
        "What is the capital of France?", "How many legs does a spider have?",
        "What colour is the sky?", "Who wrote Hamlet?", "What is water made of?")))
    cfg = TrainConfig(lora=LoraConfig(rank=8, alpha=16, first_layer=1), lr=2e-2, batch_size=4,
                      epochs=2, mesh=(2, 1, 1), system="Answer briefly.", retention_weight=0.5,
                      retention_prompts=str(prompts), retention_batch_size=2)
    # plain: neither the teacher, nor the lower layers, nor the retention rows' states are cached
    (cached, cached_dir), (plain, plain_dir), (got, want) = cached_and_plain_runs(
        tiny_llama, tmp_path, monkeypatch, cfg)
    assert cached["lower_cache_s"] is not None and plain["lower_cache_s"] is None
    assert cached["retention_cache_s"] is not None and plain["retention_cache_s"] is None
    assert len(got) == len(want) == 8 and got[0] > 0
    np.testing.assert_allclose(got, want, rtol=1e-4)
    parts = [[r["retention_loss"] for r in metrics(d)] for d in (cached_dir, plain_dir)]
    assert parts[0][-1] > 1e-5
    np.testing.assert_allclose(parts[0], parts[1], rtol=1e-4, atol=1e-7)
    assert got[-1] < got[0]  # the upper layer alone still learns
    assert cached["finished"] and plain["finished"]
    conf = json.loads((cached_dir / "adapter" / "adapter_config.json").read_text())
    assert conf["layers_to_transform"] == [1]
    saved = yaml.safe_load((cached_dir / "config.yaml").read_text())
    assert saved["train"]["lora"]["first_layer"] == 1



def test_context_boost_trains_the_same_from_the_caches_as_without(tiny_llama, tmp_path,
                                                                  monkeypatch):
    """context_boost's closed-book states computed once and mixed into the teacher cache give the
    training the step gives computing both sides itself; and a different one from no boost."""
    cfg = TrainConfig(lora=LoraConfig(rank=8, alpha=16, first_layer=1), lr=2e-2, batch_size=4,
                      epochs=2, mesh=(2, 1, 1), system="Answer briefly.", context_boost=1.0)
    for name in ("boost", "none"):
        (tmp_path / name).mkdir()
    (cached, _), (plain, _), (got, want) = cached_and_plain_runs(
        tiny_llama, tmp_path / "boost", monkeypatch, cfg)
    assert cached["teacher_cache_s"] is not None and plain["teacher_cache_s"] is None
    assert len(got) == len(want) == 8
    np.testing.assert_allclose(got, want, rtol=1e-4)
    (_, _), (_, _), (unboosted, _) = cached_and_plain_runs(
        tiny_llama, tmp_path / "none", monkeypatch, dataclasses.replace(cfg, context_boost=0.0))
    assert got[0] > 1.5 * unboosted[0] > 0
