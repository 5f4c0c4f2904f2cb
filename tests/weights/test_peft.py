"""PEFT adapter export and import, checked against real `peft` on tiny Llama (untied head) and
Qwen2 (tied head) models: key names and shapes, logits through `PeftModel`, bitwise round trips
of adapters made by peft itself, the promised errors, and atomic writes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from pdistill_jax.config import LoraConfig
from pdistill_jax.weights.load import load_model
from pdistill_jax.model.transformer import causal_inputs
from pdistill_jax.weights.hf import read_model_config
from pdistill_jax.weights.names import HF_MODULE
from pdistill_jax.weights.peft import (load_peft_adapter, lora_to_peft_tensors, resolve_adapter,
                                       save_peft_adapter)

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
TOKENS = [[1, 17, 42, 99, 7, 250, 3, 64, 128, 5, 300, 11]]


def randomize_lora(model, seed: int = 0, std: float = 0.1) -> None:
    """Non-zero random A and B everywhere, so the adapter changes the outputs (B starts at 0)."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [std * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def jax_logits(model, use_lora: bool = True) -> np.ndarray:
    tokens = jnp.asarray(TOKENS, jnp.int32)
    positions, key_valid = causal_inputs(tokens, jnp.ones_like(tokens, bool))
    hidden, _ = model(tokens, positions, key_valid, use_lora=use_lora)
    return np.asarray(model.logits(hidden, use_lora))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def torch_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def peft_reference(model_dir, targets, rank=4, alpha=8):
    """What real peft builds for the same targets."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=[HF_MODULE[t] for t in targets],
                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(torch_base(model_dir), config)


def student(model_dir, targets, rank=4, alpha=8.0, seed=0):
    lm = load_model(model_dir, LoraConfig(rank=rank, alpha=alpha, targets=targets),
                    with_tokenizer=False)
    randomize_lora(lm.model, seed)
    return lm


CASES = [("tiny_llama", PROJECTIONS), ("tiny_llama", PROJECTIONS + ("lm_head",)),
         ("tiny_qwen2", PROJECTIONS), ("tiny_qwen2", PROJECTIONS + ("lm_head",)),
         ("tiny_qwen3", PROJECTIONS), ("tiny_gemma3", PROJECTIONS + ("lm_head",))]


@pytest.mark.parametrize("fixture, targets", CASES)
def test_export_matches_peft_keys_and_logits(fixture, targets, request, tmp_path):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    model_dir = request.getfixturevalue(fixture)
    lm = student(model_dir, targets)
    lora = lm.model.lora_config
    out = save_peft_adapter(tmp_path / "adapter", nnx.state(lm.model, nnx.LoRAParam), lm.cfg,
                            lora, str(model_dir))

    # Key set and shapes equal what peft itself makes for these targets (peft would also add a
    # copy of the base head when lm_head is targeted; we leave it out, as vLLM rejects it).
    ref = get_peft_model_state_dict(peft_reference(model_dir, targets), save_embedding_layers=False)
    ours = load_file(str(out / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8.0 and conf["peft_type"] == "LORA"
    assert sorted(conf["target_modules"]) == sorted(HF_MODULE[t] for t in targets)
    assert conf["base_model_name_or_path"] == str(Path(model_dir).resolve())

    # peft loads it and computes our student's logits, which are far from the base's.
    peft_model = PeftModel.from_pretrained(torch_base(model_dir), str(out)).eval()
    got, want = torch_logits(peft_model), jax_logits(lm.model)
    base = torch_logits(torch_base(model_dir))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(got - base).max() > 0.1
    np.testing.assert_allclose(jax_logits(lm.model, use_lora=False), base, atol=1e-4, rtol=0)

    # And our own import gives back the identical student.
    loaded = load_model(str(model_dir), adapter=out)
    np.testing.assert_array_equal(jax_logits(loaded.model), want)
    assert loaded.tokenizer is not None


def _peft_made_adapter(model_dir, targets, out: Path, seed: int, **save_kw) -> dict:
    """An adapter made and saved by real peft, with random non-zero A and B."""
    model = peft_reference(model_dir, targets, rank=3, alpha=5)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(out), **save_kw)
    return {"model": model}


@pytest.mark.parametrize("fixture, targets, save_kw", [
    ("tiny_llama", PROJECTIONS, {}),
    ("tiny_qwen2", ("q", "v", "down", "lm_head"), {"save_embedding_layers": False}),
])
def test_round_trip_of_peft_made_adapter_is_bitwise(fixture, targets, save_kw, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    made = _peft_made_adapter(model_dir, targets, tmp_path / "peft", seed=1, **save_kw)
    lm_cfg = read_model_config(Path(model_dir))
    lora, pure = load_peft_adapter(tmp_path / "peft", lm_cfg)
    assert (lora.rank, lora.alpha, set(lora.targets)) == (3, 5.0, set(targets))
    again = save_peft_adapter(tmp_path / "ours", pure, lm_cfg, lora, str(model_dir))

    before = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    after = load_file(str(again / "adapter_model.safetensors"))
    assert set(before) == set(after)
    for key in before:
        assert before[key].dtype == after[key].dtype == np.float32
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)

    # Import semantics, not just bytes: our student equals peft's model on the same tokens.
    student_lm = load_model(str(model_dir), adapter=tmp_path / "peft")
    np.testing.assert_allclose(jax_logits(student_lm.model), torch_logits(made["model"].eval()),
                               atol=1e-4, rtol=0)


PHI3_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_phi3_export_is_peft_fused_layout_and_peft_computes_our_student(tiny_phi3, tmp_path):
    """Phi-3 fuses q/k/v and gate/up: our per-part adapters go out as one adapter per fused
    module of rank parts x r (rank_pattern, alpha_pattern), which real peft builds and loads."""
    import peft
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    lm = student(tiny_phi3, ("q", "v", "o", "gate", "up", "down"))  # k: a zero block
    out = save_peft_adapter(tmp_path / "adapter", nnx.state(lm.model, nnx.LoRAParam), lm.cfg,
                            lm.model.lora_config, str(tiny_phi3))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert sorted(conf["target_modules"]) == sorted(PHI3_MODULES)
    assert conf["rank_pattern"] == {"qkv_proj": 12, "gate_up_proj": 8}
    assert conf["alpha_pattern"] == {"qkv_proj": 24.0, "gate_up_proj": 16.0}
    ref = peft.get_peft_model(torch_base(tiny_phi3), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=PHI3_MODULES, rank_pattern=conf["rank_pattern"],
        alpha_pattern=conf["alpha_pattern"], lora_dropout=0.0, task_type="CAUSAL_LM"))
    ours = load_file(str(out / "adapter_model.safetensors"))
    want_shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(ref).items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == want_shapes

    peft_model = PeftModel.from_pretrained(torch_base(tiny_phi3), str(out)).eval()
    got, want = torch_logits(peft_model), jax_logits(lm.model)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(got - torch_logits(torch_base(tiny_phi3))).max() > 0.1

    loaded = load_model(str(tiny_phi3), adapter=out)  # back: the k part adapts nothing
    assert set(loaded.model.lora_config.targets) == set(PROJECTIONS)
    np.testing.assert_allclose(jax_logits(loaded.model), want, atol=1e-6, rtol=0)


def test_phi3_adapter_made_by_peft_loads_as_the_same_student(tiny_phi3, tmp_path):
    """peft's own Phi-3 LoRA (one A shared by q/k/v, rank r) is split exactly into our parts."""
    import peft

    model = peft.get_peft_model(torch_base(tiny_phi3), peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=PHI3_MODULES, lora_dropout=0.0, task_type="CAUSAL_LM"))
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "peft"))
    lm = load_model(str(tiny_phi3), adapter=tmp_path / "peft")
    assert (lm.model.lora_config.rank, set(lm.model.lora_config.targets)) == (3, set(PROJECTIONS))
    want = torch_logits(model.eval())
    np.testing.assert_allclose(jax_logits(lm.model), want, atol=1e-4, rtol=0)
    # Out again in our layout (rank 9 on qkv_proj), which peft computes the same.
    from peft import PeftModel

    again = save_peft_adapter(tmp_path / "ours", nnx.state(lm.model, nnx.LoRAParam), lm.cfg,
                              lm.model.lora_config, str(tiny_phi3))
    reloaded = PeftModel.from_pretrained(torch_base(tiny_phi3), str(again)).eval()
    np.testing.assert_allclose(torch_logits(reloaded), want, atol=1e-4, rtol=0)


def test_phi3_fused_adapter_that_is_no_sum_of_parts_is_refused(tiny_phi3, tmp_path):
    lm = student(tiny_phi3, PROJECTIONS)
    out = save_peft_adapter(tmp_path / "adapter", nnx.state(lm.model, nnx.LoRAParam), lm.cfg,
                            lm.model.lora_config, str(tiny_phi3))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"
    tensors[key][0, -1] = 1.0  # a q row reading v's block
    save_file(tensors, str(out / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="qkv_proj: rank 12 but not block-diagonal over q, k, v"):
        load_peft_adapter(out, lm.cfg)


def test_peft_copy_of_base_head_is_ignored(tiny_qwen2, tmp_path):
    """peft's default save adds `lm_head.base_layer.weight` when lm_head is targeted."""
    targets = ("q", "lm_head")
    _peft_made_adapter(tiny_qwen2, targets, tmp_path / "peft", seed=2)
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.base_layer.weight" in keys
    cfg = read_model_config(Path(tiny_qwen2))
    lora, pure = load_peft_adapter(tmp_path / "peft", cfg)
    np.testing.assert_array_equal(pure["lm_head_lora_b"],
                                  keys["base_model.model.lm_head.lora_B.weight"].T)


@pytest.fixture(scope="module")
def pristine_adapter(tiny_llama, tmp_path_factory) -> tuple[Path, object]:
    lm = student(tiny_llama, ("q", "v", "lm_head"))
    out = save_peft_adapter(tmp_path_factory.mktemp("pristine") / "adapter",
                            nnx.state(lm.model, nnx.LoRAParam), lm.cfg, lm.model.lora_config,
                            str(tiny_llama))
    return out, lm.cfg


@pytest.fixture
def exported(pristine_adapter, tmp_path) -> tuple[Path, object]:
    """A fresh copy of a valid adapter (q, v, lm_head on tiny Llama) for a test to damage."""
    folder, cfg = pristine_adapter
    return Path(shutil.copytree(folder, tmp_path / "adapter")), cfg


@pytest.mark.parametrize("field, value", [
    ("use_rslora", True), ("use_dora", True), ("modules_to_save", ["lm_head"]),
    ("layers_to_transform", [0]), ("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"v_proj": 4}),
    ("bias", "all"),
])
def test_unsupported_peft_features_are_named(exported, field, value):
    folder, cfg = exported
    conf = json.loads((folder / "adapter_config.json").read_text())
    conf[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=f"{field}="):
        load_peft_adapter(folder, cfg)


def test_unsupported_target_module_is_named(exported):
    folder, cfg = exported
    conf = json.loads((folder / "adapter_config.json").read_text())
    conf["target_modules"] = ["q_proj", "embed_tokens"]
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="embed_tokens"):
        load_peft_adapter(folder, cfg)


def test_regex_and_all_linear_target_modules(exported):
    folder, cfg = exported
    conf = json.loads((folder / "adapter_config.json").read_text())
    conf["target_modules"] = r".*\.(q_proj|v_proj)|lm_head"
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    assert load_peft_adapter(folder, cfg)[0].targets == ("q", "v", "lm_head")
    conf["target_modules"] = r"model\.layers\.0\..*q_proj"
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"matches q_proj in layers \[0\]; pdistill adapts a top"):
        load_peft_adapter(folder, cfg)
    conf["target_modules"] = "all-linear"  # 7 projections expected: their tensors are missing
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    k_proj = r"base_model\.model\.model\.layers\.0\.self_attn\.k_proj"
    with pytest.raises(ValueError, match=f"missing tensor '{k_proj}"):
        load_peft_adapter(folder, cfg)


def test_missing_wrong_shape_and_unexpected_tensors_are_named(exported):
    folder, cfg = exported
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    save_file({k: v for k, v in tensors.items() if k != key}, str(path))
    with pytest.raises(ValueError, match=f"missing tensor '{key}'"):
        load_peft_adapter(folder, cfg)

    save_file({**tensors, key: np.zeros((5, 4), np.float32)}, str(path))
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(5, 4\), expected \(32, 4\)"):
        load_peft_adapter(folder, cfg)

    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    save_file({**tensors, extra: np.zeros((4, 64), np.float32)}, str(path))
    with pytest.raises(ValueError, match="unexpected tensor.*up_proj"):
        load_peft_adapter(folder, cfg)


def test_resolve_adapter_accepts_peft_and_run_folders_only(exported, tmp_path):
    folder, _ = exported
    assert resolve_adapter(folder) == folder
    run = tmp_path / "run"
    shutil.copytree(folder, run / "adapter")
    assert resolve_adapter(run) == run / "adapter"
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="neither a PEFT adapter folder"):
        resolve_adapter(tmp_path / "neither")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_adapter(tmp_path / "nowhere")


def test_failed_write_leaves_nothing_and_keeps_existing_adapter(exported, monkeypatch):
    import safetensors.numpy

    folder, cfg = exported
    lora, pure = load_peft_adapter(folder, cfg)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken_writer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken_writer)
    fresh = folder.parent / "fresh"
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(fresh, pure, cfg, lora, "base")
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(folder, pure, cfg, lora, "base")
    assert not fresh.exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["adapter"]  # no stray temp folders

    monkeypatch.undo()
    pure["layers"]["attn"]["q"]["lora_b"] = pure["layers"]["attn"]["q"]["lora_b"] + 1.0
    save_peft_adapter(folder, pure, cfg, lora, "base")  # replacing a complete adapter works
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    np.testing.assert_array_equal(load_peft_adapter(folder, cfg)[1]["layers"]["attn"]["q"]["lora_b"],
                                  pure["layers"]["attn"]["q"]["lora_b"])
    assert sorted(p.name for p in folder.parent.iterdir()) == ["adapter"]


def test_refuses_to_replace_an_unrelated_folder(exported, tmp_path):
    folder, cfg = exported
    lora, pure = load_peft_adapter(folder, cfg)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not an earlier export"):
        save_peft_adapter(precious, pure, cfg, lora, "base")
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_rank_above_vllm_limit_warns(tiny_llama, tmp_path, capsys):
    lm = load_model(tiny_llama, LoraConfig(rank=520, alpha=520.0, targets=("q",)),
                    with_tokenizer=False)
    tensors = lora_to_peft_tensors(nnx.state(lm.model, nnx.LoRAParam), lm.cfg, lm.model.lora_config)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (520, 64)
    save_peft_adapter(tmp_path / "big", nnx.state(lm.model, nnx.LoRAParam), lm.cfg,
                      lm.model.lora_config, "base")
    err = capsys.readouterr().err
    assert "above vLLM's limit of 512" in err and "--format merged" in err


def test_sharded_lora_state_exports_the_same_tensors(tiny_qwen2):
    """Leaves split over 8 (fake CPU) devices are gathered to host before writing."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    lm = student(tiny_qwen2, PROJECTIONS + ("lm_head",))
    state = nnx.state(lm.model, nnx.LoRAParam)
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("x",))

    def spread(x):
        axis = int(np.argmax(x.shape))  # the largest axis, divisible by 8 on these shapes
        spec = [None] * x.ndim
        spec[axis] = "x"
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

    sharded = jax.tree.map(spread, state)
    assert len(jax.tree.leaves(sharded)[0].sharding.device_set) == 8
    plain = lora_to_peft_tensors(state, lm.cfg, lm.model.lora_config)
    gathered = lora_to_peft_tensors(sharded, lm.cfg, lm.model.lora_config)
    assert set(plain) == set(gathered)
    for key in plain:
        np.testing.assert_array_equal(plain[key], gathered[key], err_msg=key)


def test_upper_layer_adapter_is_peft_layers_to_transform(tiny_llama, tmp_path):
    """first_layer=1 exports only layer 1's tensors with layers_to_transform=[1]: the key set of
    peft's own adapter for that setting, peft's logits equal ours, and our import reads it back."""
    import peft
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    lm = load_model(tiny_llama, LoraConfig(rank=4, alpha=8.0, first_layer=1), with_tokenizer=False)
    randomize_lora(lm.model, seed=4)
    # training leaves the frozen layer's B at zero (it gets no gradient); randomize_lora did not
    state = nnx.state(lm.model, nnx.LoRAParam)
    nnx.update(lm.model, jax.tree_util.tree_map_with_path(
        lambda p, a: a.at[0].set(0.0) if "lora_b" in jax.tree_util.keystr(p) else a, state))
    out = save_peft_adapter(tmp_path / "adapter", nnx.state(lm.model, nnx.LoRAParam), lm.cfg,
                            lm.model.lora_config, str(tiny_llama))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["layers_to_transform"] == [1]
    ref_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[HF_MODULE[t] for t in PROJECTIONS],
                                 layers_to_transform=[1], task_type="CAUSAL_LM")
    ref = get_peft_model_state_dict(peft.get_peft_model(torch_base(tiny_llama), ref_config))
    ours = load_file(str(out / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert all(".layers.1." in k for k in ours)

    peft_model = PeftModel.from_pretrained(torch_base(tiny_llama), str(out)).eval()
    want = jax_logits(lm.model)
    np.testing.assert_allclose(torch_logits(peft_model), want, atol=1e-4, rtol=0)
    loaded = load_model(str(tiny_llama), adapter=out, with_tokenizer=False)
    assert loaded.model.lora_config.first_layer == 1
    np.testing.assert_array_equal(jax_logits(loaded.model), want)

    conf["layers_to_transform"] = [0]  # a lower range leaves the top unadapted: refused by name
    (out / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\] is not supported"):
        load_peft_adapter(out, lm.cfg)


def test_upper_layer_adapter_with_the_head_is_a_peft_regex(tiny_qwen2, tmp_path):
    """first_layer=1 with the (tied) head as a target: layers_to_transform would drop the head,
    so target_modules is a regex naming layer 1's modules and lm_head. peft builds the same key
    set from it, computes our student's logits, and our import reads back first_layer and the
    head."""
    import peft
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    targets = PROJECTIONS + ("lm_head",)
    lm = load_model(tiny_qwen2, LoraConfig(rank=4, alpha=8.0, targets=targets, first_layer=1),
                    with_tokenizer=False)
    randomize_lora(lm.model, seed=5)
    state = nnx.state(lm.model, nnx.LoRAParam)  # layer 0's B stays zero, as training leaves it
    nnx.update(lm.model, jax.tree_util.tree_map_with_path(
        lambda p, a: a.at[0].set(0.0) if "layers" in jax.tree_util.keystr(p)
        and "lora_b" in jax.tree_util.keystr(p) else a, state))
    out = save_peft_adapter(tmp_path / "adapter", nnx.state(lm.model, nnx.LoRAParam), lm.cfg,
                            lm.model.lora_config, str(tiny_qwen2))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert isinstance(conf["target_modules"], str) and conf["layers_to_transform"] is None
    ref_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=conf["target_modules"],
                                 task_type="CAUSAL_LM")
    ref = get_peft_model_state_dict(peft.get_peft_model(torch_base(tiny_qwen2), ref_config),
                                    save_embedding_layers=False)
    ours = load_file(str(out / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert "base_model.model.lm_head.lora_B.weight" in ours
    assert not any(".layers.0." in k for k in ours)

    peft_model = PeftModel.from_pretrained(torch_base(tiny_qwen2), str(out)).eval()
    want = jax_logits(lm.model)
    np.testing.assert_allclose(torch_logits(peft_model), want, atol=1e-4, rtol=0)
    loaded = load_model(str(tiny_qwen2), adapter=out, with_tokenizer=False)
    assert loaded.model.lora_config.first_layer == 1
    assert loaded.model.lora_config.targets == targets
    np.testing.assert_array_equal(jax_logits(loaded.model), want)

    # A regex that starts the modules at different layers is refused by name.
    conf["target_modules"] = r"model\.layers\.1\.self_attn\.q_proj|model\.layers\.(0|1)\.mlp\.up_proj"
    (out / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"different layers \(\[0, 1\]\)"):
        load_peft_adapter(out, lm.cfg)


def test_gemma3_adapter_in_peft_generates_what_answer_generates(tiny_gemma3, tmp_path):
    """The exported Gemma 3 adapter on transformers' Gemma3ForCausalLM, through real peft,
    greedily continues a chat prompt exactly as our model loaded with that adapter (what
    `answer --adapter` loads) does, and differently from the base."""
    from peft import PeftModel

    from pdistill_jax.config import SamplingParams
    from pdistill_jax.model.sampler import generate
    from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids

    lm = student(tiny_gemma3, PROJECTIONS, seed=5)
    out = save_peft_adapter(tmp_path / "adapter", nnx.state(lm.model, nnx.LoRAParam), lm.cfg,
                            lm.model.lora_config, str(tiny_gemma3))
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == \
        sorted(HF_MODULE[t] for t in PROJECTIONS)
    loaded = load_model(None, adapter=out)  # the base named in the adapter, as answer does
    prompt = chat_prompt_ids(loaded.tokenizer, "What is the capital of Velloria?")
    end = end_token_ids(loaded.tokenizer, loaded.cfg)
    ours = generate(loaded.model, [prompt], SamplingParams(max_new_tokens=12), end_ids=end,
                    use_lora=True)[0]

    def greedy(model):
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12,
                                 do_sample=False, eos_token_id=end, pad_token_id=end[0])
        out = out[0, len(prompt):].tolist()
        return out[:-1] if out and out[-1] in end else out

    theirs = greedy(PeftModel.from_pretrained(torch_base(tiny_gemma3), str(out)).eval())
    assert theirs == ours.tokens and theirs != greedy(torch_base(tiny_gemma3))
