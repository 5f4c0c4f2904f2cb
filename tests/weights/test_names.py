"""The naming table: every name, shape and LoRA target derived from it, spelled out once by hand."""
from __future__ import annotations

import dataclasses

import pytest

from pdistill_jax.config import LORA_TARGETS, ModelConfig
from pdistill_jax.weights.names import (HF_MODULE, LAYER_PATH, LORA_TENSORS, by_path,
                                        expected_shapes, hf_module_paths, match_hf, target_dims,
                                        tensors_of)

CFG = ModelConfig(model_type="qwen2", vocab_size=11, hidden_size=6, intermediate_size=10,
                  num_layers=2, num_heads=3, num_kv_heads=1, head_dim=4, tie_word_embeddings=False,
                  attention_bias=True)


def test_shapes_in_table_order():
    assert list(expected_shapes(CFG).items()) == [
        ("embed", (11, 6)), ("norm.weight", (6,)),
        ("layers.attn_norm.weight", (6,)), ("layers.mlp_norm.weight", (6,)),
        ("layers.attn.q.kernel", (6, 12)), ("layers.attn.k.kernel", (6, 4)),
        ("layers.attn.v.kernel", (6, 4)), ("layers.attn.o.kernel", (12, 6)),
        ("layers.mlp.gate.kernel", (6, 10)), ("layers.mlp.up.kernel", (6, 10)),
        ("layers.mlp.down.kernel", (10, 6)),
        ("layers.attn.q.bias", (12,)), ("layers.attn.k.bias", (4,)), ("layers.attn.v.bias", (4,)),
        ("lm_head.kernel", (6, 11)),
    ]
    tied = dataclasses.replace(CFG, tie_word_embeddings=True, attention_bias=False)
    assert list(expected_shapes(tied)) == list(expected_shapes(CFG))[:11]


@pytest.mark.parametrize("name, path, layer, transpose", [
    ("model.embed_tokens.weight", "embed", None, False),
    ("model.norm.weight", "norm.weight", None, False),
    ("lm_head.weight", "lm_head.kernel", None, True),
    ("model.layers.3.input_layernorm.weight", "layers.attn_norm.weight", 3, False),
    ("model.layers.0.post_attention_layernorm.weight", "layers.mlp_norm.weight", 0, False),
    ("model.layers.12.self_attn.o_proj.weight", "layers.attn.o.kernel", 12, True),
    ("model.layers.1.self_attn.k_proj.bias", "layers.attn.k.bias", 1, False),
    ("model.layers.1.mlp.down_proj.weight", "layers.mlp.down.kernel", 1, True),
])
def test_hf_names_both_ways(name, path, layer, transpose):
    tensor, i = match_hf(name, CFG)
    assert (tensor.ours, i, tensor.transpose) == (path, layer, transpose)
    assert by_path(CFG)[path].hf_name(layer) == name


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.o_proj.bias",
                                  "model.layers.x.mlp.up_proj.weight",
                                  "model.embed_tokens.weight.extra", "embed"])
def test_unknown_hf_names_match_nothing(name):
    assert match_hf(name, CFG) is None


def test_lora_targets_peft_modules_and_dims():
    assert tuple(LORA_TENSORS) == LORA_TARGETS
    assert HF_MODULE == {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                         "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
                         "lm_head": "lm_head"}
    assert LAYER_PATH == {"q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"),
                          "o": ("attn", "o"), "gate": ("mlp", "gate"), "up": ("mlp", "up"),
                          "down": ("mlp", "down")}
    assert hf_module_paths(CFG, "lm_head") == ["lm_head"]
    assert hf_module_paths(CFG, "k") == ["model.layers.0.self_attn.k_proj",
                                         "model.layers.1.self_attn.k_proj"]
    assert hf_module_paths(CFG, "gate") == ["model.layers.0.mlp.gate_proj",
                                            "model.layers.1.mlp.gate_proj"]
    assert [target_dims(CFG, t) for t in LORA_TARGETS] == [
        (6, 12), (6, 4), (6, 4), (12, 6), (6, 10), (6, 10), (10, 6), (6, 11)]
    tied = dataclasses.replace(CFG, tie_word_embeddings=True)
    assert target_dims(tied, "lm_head") == (6, 11)  # a tied head is adapted all the same
    assert len(tensors_of(CFG)) == len(by_path(CFG))


def test_gemma3_rows_name_its_four_norms():
    """Gemma 3's post_attention_layernorm is the norm on the attention output; Llama's is the
    norm before the MLP. Each config reads the name its own way."""
    gemma = dataclasses.replace(CFG, model_type="gemma3_text", attention_bias=False,
                                sandwich_norms=True, qk_norm=True)
    rows = by_path(gemma)
    assert rows["layers.mlp_norm.weight"].hf == "model.layers.{i}.pre_feedforward_layernorm.weight"
    assert rows["layers.attn_post_norm.weight"].hf == \
        "model.layers.{i}.post_attention_layernorm.weight"
    assert rows["layers.mlp_post_norm.weight"].hf == \
        "model.layers.{i}.post_feedforward_layernorm.weight"
    name = "model.layers.1.post_attention_layernorm.weight"
    assert match_hf(name, gemma)[0].ours == "layers.attn_post_norm.weight"
    assert match_hf(name, CFG)[0].ours == "layers.mlp_norm.weight"
    assert "layers.attn_post_norm.weight" not in expected_shapes(CFG)
    assert len(tensors_of(gemma)) == len(rows) == len(expected_shapes(gemma))
