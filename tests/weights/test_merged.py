"""Merged export: the Hugging Face folder loads with plain transformers and reproduces our
student's logits and greedy tokens; tied heads with an adapter are written untied; bf16 casts
after a float32 merge; sharding; the `pdistill export` command; a GGUF base (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from pdistill_jax import cli
from pdistill_jax.config import LoraConfig
from pdistill_jax.weights.merged import merge_lora, params_to_hf, save_merged
from pdistill_jax.weights.hf import hf_to_params, iter_safetensors, load_checkpoint
from pdistill_jax.weights.load import load_model
from pdistill_jax.model.transformer import causal_inputs
from pdistill_jax.weights.peft import load_peft_adapter, save_peft_adapter
from pdistill_jax.model.sampler import generate
from pdistill_jax.config import SamplingParams
from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids

from test_peft import PROJECTIONS, TOKENS, randomize_lora  # the same tiny adapter set-up


def jax_logits(model, tokens=TOKENS, use_lora: bool = True) -> np.ndarray:
    tokens = jnp.asarray(tokens, jnp.int32)
    positions, key_valid = causal_inputs(tokens, jnp.ones_like(tokens, bool))
    hidden, _ = model(tokens, positions, key_valid, use_lora=use_lora)
    return np.asarray(model.logits(hidden, use_lora))


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def hf_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def trained_adapter(model_spec, out: Path, targets, rank=4, alpha=8.0, seed=0, std=0.1):
    """Our student with a random non-zero adapter, saved as a PEFT folder."""
    lm = load_model(model_spec, LoraConfig(rank=rank, alpha=alpha, targets=targets))
    randomize_lora(lm.model, seed, std)
    save_peft_adapter(out, nnx.state(lm.model, nnx.LoRAParam), lm.cfg, lm.model.lora_config,
                      str(model_spec))
    return lm


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_phi3",
                                     "tiny_gemma3"])
def test_params_to_hf_inverts_the_import_table(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    cfg, params = load_checkpoint(model_dir)
    pairs = list(params_to_hf(cfg, params))
    names = [n for n, _ in pairs]
    assert len(names) == len(set(names))
    on_disk = dict(iter_safetensors(Path(model_dir)))
    if cfg.tie_word_embeddings:
        on_disk.pop("lm_head.weight", None)
    assert set(names) == set(on_disk)
    for name, array in pairs:
        np.testing.assert_array_equal(array, on_disk[name], err_msg=name)
    back = hf_to_params(cfg, pairs)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_merge_lora_folds_the_adapter_in_float32(tiny_qwen2):
    cfg, base = load_checkpoint(tiny_qwen2)
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "down", "lm_head"))
    rng = np.random.default_rng(0)
    rand = lambda *shape: rng.normal(0, 0.1, shape).astype(np.float32)  # noqa: E731
    n, d, f, v = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    pure = {"layers": {"attn": {"q": {"lora_a": rand(n, d, 4), "lora_b": rand(n, 4, d)}},
                       "mlp": {"down": {"lora_a": rand(n, f, 4), "lora_b": rand(n, 4, d)}}},
            "lm_head_lora_a": rand(d, 4), "lm_head_lora_b": rand(4, v)}
    bf16_base = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), base)
    merged = merge_lora(bf16_base, pure, cfg, lora)

    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    q = f64(bf16_base["layers"]["attn"]["q"]["kernel"])
    a, b = (f64(x) for x in pure["layers"]["attn"]["q"].values())
    want = q + lora.scale * np.einsum("lir,lro->lio", a, b)
    got = merged["layers"]["attn"]["q"]["kernel"]
    assert got.dtype == ml_dtypes.bfloat16  # the base dtype is kept
    # Within bf16's unit roundoff (2^-8 relative) of the exact merge: one rounding of a float32 sum,
    # not a sum of bf16-rounded parts. The adapter visibly moved the weight.
    np.testing.assert_allclose(f64(got), want, rtol=2 ** -8 + 1e-6, atol=1e-30)
    assert np.abs(f64(got) - q).max() > 0.01
    # The tied head gets its own merged weight; the embedding itself is unchanged.
    head = f64(merged["lm_head"]["kernel"])
    np.testing.assert_allclose(head, f64(bf16_base["embed"]).T + lora.scale * f64(
        pure["lm_head_lora_a"]) @ f64(pure["lm_head_lora_b"]), rtol=2 ** -8 + 1e-6, atol=1e-30)
    assert "lm_head" not in bf16_base and merged["embed"] is bf16_base["embed"]
    assert merged["layers"]["attn"]["k"]["kernel"] is bf16_base["layers"]["attn"]["k"]["kernel"]
    assert bf16_base["layers"]["attn"]["q"]["kernel"] is not got  # the input tree is untouched


@pytest.mark.parametrize("fixture, targets", [
    ("tiny_llama", PROJECTIONS + ("lm_head",)),
    ("tiny_qwen2", PROJECTIONS + ("lm_head",)),
    ("tiny_qwen2", PROJECTIONS),
    ("tiny_qwen3", PROJECTIONS),
    ("tiny_phi3", PROJECTIONS),
    ("tiny_gemma3", PROJECTIONS),
])
def test_merged_model_matches_student_logits_and_greedy_tokens(fixture, targets, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    lm = trained_adapter(model_dir, tmp_path / "run" / "adapter", targets)
    out = save_merged(tmp_path / "merged", str(model_dir), tmp_path / "run")  # a RUN folder

    config = json.loads((out / "config.json").read_text())
    tied_head_adapter = lm.cfg.tie_word_embeddings and "lm_head" in targets
    assert config["tie_word_embeddings"] == (lm.cfg.tie_word_embeddings and not tied_head_adapter)
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert ("lm_head.weight" in f.keys()) == (not config["tie_word_embeddings"])
    assert not list(out.glob("*.py")) and "auto_map" not in config  # plain transformers only

    merged = hf_model(out)
    got, want = hf_logits(merged), jax_logits(lm.model)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(got - jax_logits(lm.model, use_lora=False)).max() > 0.1

    # Greedy generation from the chat template the folder carries equals our sampler's.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    prompt = chat_prompt_ids(tok, "What is the capital of Velloria?")
    assert prompt == chat_prompt_ids(lm.tokenizer, "What is the capital of Velloria?")
    ours = generate(lm.model, [prompt], SamplingParams(max_new_tokens=12),
                    end_ids=end_token_ids(lm.tokenizer, lm.cfg), use_lora=True)[0]
    with torch.no_grad():
        theirs = merged.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    theirs = theirs[0, len(prompt):].tolist()
    end = set(end_token_ids(lm.tokenizer, lm.cfg))
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert set(eos if isinstance(eos, list) else [eos]) == end
    if theirs and theirs[-1] in end:
        theirs = theirs[:-1]
    assert theirs == ours.tokens


def test_bfloat16_sharded_export(tiny_llama, tmp_path):
    trained_adapter(tiny_llama, tmp_path / "adapter", PROJECTIONS + ("lm_head",))
    limit = 40_000
    f32 = save_merged(tmp_path / "f32", str(tiny_llama), tmp_path / "adapter")
    bf16 = save_merged(tmp_path / "bf16", str(tiny_llama), tmp_path / "adapter",
                       dtype="bfloat16", max_shard_size=f"{limit // 1000}KB")
    index = json.loads((bf16 / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (bf16 / "model.safetensors").exists()
    assert sorted(p.name for p in bf16.glob("model-*.safetensors")) == shards
    reference = dict(iter_safetensors(f32))
    assert set(index["weight_map"]) == set(reference)
    for shard in shards:
        with safe_open(str(bf16 / shard), "flax") as f:
            arrays = {name: np.asarray(f.get_tensor(name)) for name in f.keys()}
        # a shard stays under the limit unless one tensor alone exceeds it (as in transformers)
        assert len(arrays) == 1 or sum(a.nbytes for a in arrays.values()) <= limit
        for name, array in arrays.items():
            assert array.dtype == ml_dtypes.bfloat16
            # bf16 = one rounding of the float32 merge
            np.testing.assert_array_equal(array, reference[name].astype(ml_dtypes.bfloat16))
    config = json.loads((bf16 / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(bf16))
    assert model.dtype == torch.bfloat16
    np.testing.assert_allclose(hf_logits(model.float()), hf_logits(hf_model(f32)), atol=0.1)


def test_export_command(tiny_llama, tmp_path, capsys):
    trained_adapter(tiny_llama, tmp_path / "run" / "adapter", ("q", "v"))
    rc = cli.main(["export", "--model", str(tiny_llama), "--adapter", str(tmp_path / "run"),
                   "--out", str(tmp_path / "peft"), "--format", "peft"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / "peft")
    cfg = load_checkpoint(tiny_llama)[0]
    (lora_a, pure_a), (lora_b, pure_b) = (load_peft_adapter(tmp_path / p, cfg)
                                          for p in ("run/adapter", "peft"))
    assert lora_a == lora_b
    jax.tree.map(np.testing.assert_array_equal, pure_a, pure_b)

    # --model omitted: the base named in the adapter is used.
    rc = cli.main(["export", "--adapter", str(tmp_path / "peft"), "--out",
                   str(tmp_path / "merged"), "--format", "merged", "--dtype", "bfloat16"])
    assert rc == 0 and (tmp_path / "merged" / "model.safetensors").exists()
    capsys.readouterr()

    (tmp_path / "empty").mkdir()
    rc = cli.main(["export", "--model", str(tiny_llama), "--adapter", str(tmp_path / "empty"),
                   "--out", str(tmp_path / "x"), "--format", "merged"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "neither a PEFT adapter folder" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_merged_gguf_export_loads_in_transformers(embedded_model, tmp_path):
    targets = PROJECTIONS + ("lm_head",)
    lm = trained_adapter(embedded_model, tmp_path / "adapter", targets, rank=8, alpha=16.0,
                         seed=3, std=0.02)
    out = save_merged(tmp_path / "merged", str(embedded_model), tmp_path / "adapter")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and not config["tie_word_embeddings"]
    prompt = chat_prompt_ids(lm.tokenizer, "What is the capital of France?")
    got, want = hf_logits(hf_model(out), [prompt]), jax_logits(lm.model, [prompt])
    base = jax_logits(lm.model, [prompt], use_lora=False)
    print(f"max |HF merged - JAX student| = {np.abs(got - want).max():.2e}, "
          f"max |student - base| = {np.abs(want - base).max():.2f}")
    # 30 layers and logits up to ~38: float32 summation order alone differs by ~1.2e-4 between
    # transformers and us (measured with a zero adapter), so 1e-4 is out of reach here; the
    # adapter's own effect is four orders of magnitude larger.
    np.testing.assert_allclose(got, want, atol=5e-4, rtol=0)
    assert np.abs(want - base).max() > 1.0


def test_merge_leaves_the_layers_below_first_layer_unchanged(tiny_llama):
    """An adapter from layer 1 up merges into layer 1 only, whatever layer 0's B holds."""
    lm = load_model(tiny_llama, LoraConfig(rank=4, alpha=8.0, targets=("q", "down"), first_layer=1),
                    with_tokenizer=False)
    base = nnx.to_pure_dict(nnx.state(lm.model, nnx.Param))
    pure = jax.tree.map(lambda a: np.full(a.shape, 0.1, np.float32),
                        nnx.to_pure_dict(nnx.state(lm.model, nnx.LoRAParam)))
    merged = merge_lora(base, pure, lm.cfg, lm.model.lora_config)
    for block, name in (("attn", "q"), ("mlp", "down")):
        before = np.asarray(base["layers"][block][name]["kernel"])
        after = np.asarray(merged["layers"][block][name]["kernel"])
        np.testing.assert_array_equal(after[0], before[0])
        assert np.abs(after[1] - before[1]).max() > 1e-3
