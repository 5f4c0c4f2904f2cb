"""Weights in: sharded and bf16 safetensors, registry resolution, and the promised errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import build_model

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


def test_sliding_window_attention_is_refused_by_name():
    hf = dict(model_type="qwen3", vocab_size=8, hidden_size=8, intermediate_size=8,
              num_hidden_layers=1, num_attention_heads=2, use_sliding_window=True)
    with pytest.raises(ValueError, match="use_sliding_window=true is not supported"):
        ModelConfig.from_hf(hf)
    cfg = ModelConfig.from_hf({**hf, "use_sliding_window": False})  # Qwen3's own default
    assert cfg.qk_norm and not cfg.attention_bias
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg  # merged export's config.json reads back
    assert cfg.to_hf()["architectures"] == ["Qwen3ForCausalLM"]


def test_phi3_config_reads_its_window_and_refuses_partial_rotary_and_longrope(tiny_phi3):
    hf = json.loads((tiny_phi3 / "config.json").read_text())
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.model_type, cfg.sliding_window) == ("phi3", 6)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg.to_hf()["architectures"] == ["Phi3ForCausalLM"]
    with pytest.raises(ValueError, match="partial_rotary_factor=0.75 is not supported"):
        ModelConfig.from_hf({**hf, "rope_parameters": {**hf["rope_parameters"],
                                                       "partial_rotary_factor": 0.75}})
    with pytest.raises(ValueError, match="rope_type='longrope' is not supported"):
        ModelConfig.from_hf({**hf, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
    # Qwen2/3 carry a sliding_window that does nothing without use_sliding_window.
    assert ModelConfig.from_hf({"model_type": "qwen2", **{k: hf[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads")}, "sliding_window": 4}).sliding_window is None


def test_phi3_fused_weight_of_the_wrong_size_names_it(tiny_phi3, tmp_path):
    d = _copy(tiny_phi3, tmp_path / "m", lambda c: c.update(num_key_value_heads=4))
    with pytest.raises(ValueError, match=r"self_attn\.qkv_proj\.weight' has shape \(128, 64\), "
                                         r"expected \(192, 64\)"):
        load_checkpoint(d)


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


_GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               # Phi-3's fused weights, kept fused by llama.cpp (ffn_up = gate and up stacked).
               "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


# Gemma 3's four norms a layer, as llama.cpp's gemma3 tensor names have them.
_GEMMA3_GGUF_NAMES = {**_GGUF_NAMES, "post_attention_layernorm": "post_attention_norm",
                      "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"}


def _permute_qk_as_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaving of each head's rotary halves (its llama architecture only)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs_as_llama_cpp(hf: dict) -> np.ndarray:
    """llama.cpp's rope_freqs.weight for a Llama 3 rope scaling: one divisor per frequency, from
    float32 frequencies and its fixed original context of 8192 (as its converter computes it)."""
    s, dim = hf["rope_scaling"], hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    freqs = 1.0 / (hf["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    context = hf.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = context / s["low_freq_factor"], context / s["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / float(freq)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(s["factor"])
        else:
            smooth = (context / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.asarray(out, np.float32)


def _write_gguf_as_llama_cpp(model_dir: Path, arch: str, path: Path) -> Path:
    """A GGUF of a Hugging Face folder as llama.cpp's converter writes it: its tensor names; for
    the llama architecture q/k rows permuted and a Llama 3 rope scaling as rope_freqs.weight (the
    parameters dropped). Gemma 3 as its converter writes it: every norm weight stored as 1 + w,
    the full layers' RoPE base and linear scaling, and none of query_pre_attn_scalar,
    layer_types or the local RoPE base (llama.cpp's runtime fixes those)."""
    import gguf
    from safetensors.numpy import load_file

    hf = json.loads((model_dir / "config.json").read_text())
    gemma = arch == "gemma3"
    names = _GEMMA3_GGUF_NAMES if gemma else _GGUF_NAMES
    if gemma:
        full = hf["rope_parameters"]["full_attention"]
        hf["rope_theta"] = full["rope_theta"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf["num_key_value_heads"])
    if hf.get("head_dim"):
        w.add_key_length(hf["head_dim"])
        w.add_value_length(hf["head_dim"])
    if hf.get("sliding_window"):
        w.add_sliding_window(hf["sliding_window"])
    w.add_rope_freq_base(hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_vocab_size(hf["vocab_size"])
    w.add_bos_token_id(hf["bos_token_id"])
    w.add_eos_token_id(hf["eos_token_id"])
    if gemma and full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    if arch == "llama" and (hf.get("rope_scaling") or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_freqs_as_llama_cpp(hf))
    for name, array in load_file(str(model_dir / "model.safetensors")).items():
        module = name.removesuffix(".weight")
        if gemma and name.endswith("norm.weight"):
            array = array + np.float32(1.0)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = hf["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            array = _permute_qk_as_llama_cpp(array, heads)
        if module.startswith("model.layers."):
            _, _, layer, rest = module.split(".", 3)
            w.add_tensor(f"blk.{layer}.{names[rest]}.weight", array)
        elif module in names:
            w.add_tensor(f"{names[module]}.weight", array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("fixture, arch", [("tiny_qwen3", "qwen3"), ("tiny_phi3", "phi3")])
def test_gguf_written_as_llama_cpp_does_loads_as_its_safetensors(fixture, arch, request, tmp_path):
    # Qwen3: q/k norms as attn_q_norm / attn_k_norm. Phi-3: fused attn_qkv and ffn_up, split here,
    # and its sliding window from the metadata.
    model_dir = request.getfixturevalue(fixture)
    path = _write_gguf_as_llama_cpp(model_dir, arch, tmp_path / f"{arch}.gguf")
    cfg, params = load_checkpoint(path)
    want_cfg, want = load_checkpoint(model_dir)
    fields = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
              "num_heads", "num_kv_heads", "head_dim", "rope_theta", "qk_norm",
              "tie_word_embeddings", "attention_bias", "sliding_window")
    assert {f: getattr(cfg, f) for f in fields} == {f: getattr(want_cfg, f) for f in fields}
    assert cfg.rms_norm_eps == pytest.approx(want_cfg.rms_norm_eps, rel=1e-6)  # GGUF's float32
    flat = lambda tree: {jax_path: np.asarray(v) for jax_path, v in _flatten(tree)}  # noqa: E731
    got, expected = flat(params), flat(want)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


@pytest.mark.parametrize("head_dim", [
    16,   # Llama 3.2's scaling at a tiny head_dim: no frequency in the blended band
    64])  # Llama 3.2's own head_dim: three frequencies blended
def test_llama3_gguf_with_rope_freqs_loads_with_the_frequencies_transformers_uses(head_dim, tmp_path):
    """Llama 3.1/3.2 GGUFs carry the rope scaling as per-frequency divisors only: the config
    read back must give transformers' frequencies, and the weights the safetensors' ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pdistill_jax.model.transformer import rope_frequencies

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model_dir = tmp_path / "llama32"
    hf_model = build_model(model_dir, arch="llama", tie=True, head_dim=head_dim,
                           rope_theta=500000.0, rope_scaling=scaling)
    hf = json.loads((model_dir / "config.json").read_text())
    hf.setdefault("rope_theta", 500000.0)
    hf.setdefault("rope_scaling", scaling)
    (model_dir / "config.json").write_text(json.dumps(hf))
    path = _write_gguf_as_llama_cpp(model_dir, "llama", tmp_path / "llama32.gguf")
    cfg, params = load_checkpoint(path)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == scaling["factor"]
    np.testing.assert_allclose(np.asarray(rope_frequencies(cfg)),
                               hf_model.model.rotary_emb.inv_freq.numpy(), rtol=2e-6)
    # The config it exports gives transformers the same frequencies again.
    exported = LlamaForCausalLM(LlamaConfig(**cfg.to_hf()))
    np.testing.assert_allclose(exported.model.rotary_emb.inv_freq.numpy(),
                               hf_model.model.rotary_emb.inv_freq.numpy(), rtol=2e-6)
    _, want = load_checkpoint(model_dir)
    got, expected = dict(_flatten(params)), dict(_flatten(want))
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


@pytest.mark.parametrize("theta, head_dim, factor, low, high, context", [
    (500000.0, 64, 32.0, 1.0, 4.0, 8192),   # Llama 3.2
    (500000.0, 128, 8.0, 1.0, 4.0, 8192),   # Llama 3.1
    (500000.0, 128, 8.0, 2.0, 8.0, 8192),   # not Llama 3's own low/high: fitted from the band
    (10000.0, 16, 32.0, 1.0, 4.0, 16),      # one frequency in the band
    (10000.0, 8, 8.0, 1.0, 4.0, 16)])       # none in the band
def test_llama3_scaling_is_recovered_from_rope_freqs(theta, head_dim, factor, low, high, context):
    from pdistill_jax.model.transformer import llama3_divisors
    from pdistill_jax.weights.hf import llama3_scaling_from_factors

    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    stored = llama3_divisors(inv, factor, low, high, context).astype(np.float32)
    got = llama3_scaling_from_factors(stored.astype(np.float64), theta, head_dim, "m.gguf")
    again = llama3_divisors(inv, got["factor"], got["low_freq_factor"], got["high_freq_factor"],
                           got["original_max_position_embeddings"])
    np.testing.assert_allclose(again, stored, rtol=1e-6)
    if context == 8192:  # the same parameters, not only the same frequencies
        assert (got["low_freq_factor"], got["high_freq_factor"]) == (low, high)


def test_rope_freqs_that_are_no_llama3_scaling_are_refused():
    from pdistill_jax.weights.hf import llama3_scaling_from_factors

    with pytest.raises(ValueError, match="rope_freqs.weight is not a Llama 3 rope scaling"):
        llama3_scaling_from_factors(np.array([1.0, 3.0, 2.0, 8.0]), 10000.0, 8, "m.gguf")
    with pytest.raises(ValueError, match="rope_freqs.weight has 3 values for 4 rotary"):
        llama3_scaling_from_factors(np.ones(3), 10000.0, 8, "m.gguf")


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_gemma3_gguf_as_llama_cpp_writes_it_loads_as_its_safetensors(tiny_gemma3, tmp_path):
    """llama.cpp's Gemma 3 GGUF: the +1 on every norm is undone, the four norms are told apart,
    and the fields it leaves out take the values llama.cpp's runtime uses for gemma3."""
    path = _write_gguf_as_llama_cpp(tiny_gemma3, "gemma3", tmp_path / "gemma3.gguf")
    cfg, params = load_checkpoint(path)
    want_cfg, want = load_checkpoint(tiny_gemma3)
    fields = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
              "num_heads", "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "qk_norm",
              "tie_word_embeddings", "sliding_window", "hidden_act", "scale_embeddings",
              "norm_plus_one", "sandwich_norms")
    assert {f: getattr(cfg, f) for f in fields} == {f: getattr(want_cfg, f) for f in fields}
    assert cfg.layer_types == ("sliding_attention",) * 4  # llama.cpp: every 6th layer is full
    assert (cfg.rope_local_theta, cfg.query_pre_attn_scalar) == (10000.0, 16.0)
    flat = lambda tree: dict(_flatten(tree))  # noqa: E731
    got, expected = flat(params), flat(want)
    assert got.keys() == expected.keys()
    for key in expected:
        if "norm" in key:  # (1 + w) - 1 in float32
            np.testing.assert_allclose(got[key], expected[key], atol=1e-7, rtol=0, err_msg=key)
            assert np.abs(got[key]).max() < 0.6, key  # offsets from 1, not scales
        else:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_gemma3_config_reads_both_layouts_and_refuses_what_it_cannot_compute(tiny_gemma3):
    hf = json.loads((tiny_gemma3 / "config.json").read_text())
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.model_type, cfg.sliding_window, cfg.query_pre_attn_scalar) == ("gemma3_text", 6, 24.0)
    assert cfg.layer_types[2] == "full_attention" and cfg.rope_local_theta == 10000.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0} and cfg.tie_word_embeddings
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg.to_hf()["architectures"] == ["Gemma3ForCausalLM"]
    # transformers v4's layout, as Gemma 3 checkpoints on the Hub still write it.
    v4 = {k: v for k, v in hf.items() if k not in ("rope_parameters", "layer_types")}
    v4.update(rope_theta=1e6, rope_local_base_freq=10000.0, sliding_window_pattern=3,
              rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert ModelConfig.from_hf(v4) == cfg
    for field, value, message in [
            ("attn_logit_softcapping", 50.0, "attn_logit_softcapping=50.0 is not supported"),
            ("final_logit_softcapping", 30.0, "final_logit_softcapping=30.0 is not supported"),
            ("use_bidirectional_attention", True, "use_bidirectional_attention=true is not"),
            ("hidden_activation", "gelu", "hidden_activation='gelu' is not supported"),
            ("layer_types", ["full_attention"], "layer_types must be a list of 4")]:
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_hf({**hf, field: value})
    with pytest.raises(ValueError, match="model_type='gemma3' is not supported"):
        ModelConfig.from_hf({**hf, "model_type": "gemma3"})  # the multimodal wrapper's config
