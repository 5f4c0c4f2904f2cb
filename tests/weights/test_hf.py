"""Weights in: sharded and bf16 safetensors, registry resolution, and the promised errors."""
import json
import shutil

import numpy as np
import pytest
import torch

from pdistill_jax.config import ModelConfig
from pdistill_jax.weights.hf import load_checkpoint, load_hf_checkpoint
from pdistill_jax.weights.registry import resolve_model


def test_sharded_bfloat16_checkpoint_loads_like_the_single_file(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    _, ref = load_hf_checkpoint(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.bfloat16)
    model.save_pretrained(str(tmp_path), max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _, sharded = load_hf_checkpoint(tmp_path)
    np.testing.assert_allclose(sharded["layers"]["attn"]["q"]["kernel"],
                               ref["layers"]["attn"]["q"]["kernel"], atol=1e-2)
    assert sharded["layers"]["attn"]["q"]["kernel"].shape == (2, 64, 64)


def _copy(src, dst, edit_config=None):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_architecture_names_the_field(tiny_llama, tmp_path):
    d = _copy(tiny_llama, tmp_path / "m", lambda c: c.update(model_type="gpt2"))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        load_checkpoint(d)


def test_unsupported_rope_scaling_names_the_field():
    hf = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
              num_hidden_layers=1, num_attention_heads=2, rope_parameters={"rope_type": "yarn",
                                                                          "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        ModelConfig.from_hf(hf)


def test_shape_mismatch_names_the_tensor(tiny_llama, tmp_path):
    d = _copy(tiny_llama, tmp_path / "m", lambda c: c.update(intermediate_size=96))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight' has shape"):
        load_checkpoint(d)


def test_missing_tensor_names_it(tiny_llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(tiny_llama, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor for 'layers\.attn\.v\.kernel' in layer\(s\) \[1\]"):
        load_checkpoint(d)


def test_missing_config_field_is_named(tiny_llama, tmp_path):
    d = _copy(tiny_llama, tmp_path / "m", lambda c: c.pop("hidden_size"))
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        load_checkpoint(d)


def test_resolve_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face directory"):
        resolve_model(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(tmp_path / "empty")
