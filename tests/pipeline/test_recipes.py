"""Recipes: `pdistill generate`/`train` without --config start from the settings chosen for the
model's size; --config replaces the recipe, flags override either, a resumed run keeps its own."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from pdistill_jax.cli import main
from pdistill_jax.commands import generate as generate_command
from pdistill_jax.commands import recipe_layer
from pdistill_jax.commands.train import add_arguments, resolve_config
from pdistill_jax.config import GenerateConfig, TrainConfig, from_dict
from pdistill_jax.pipeline import recipes
from pdistill_jax.weights.hf import read_hf_config


def _parse(add, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_gemma3"])
def test_parameter_count_is_what_transformers_counts(fixture, request):
    transformers = pytest.importorskip("transformers")
    folder = request.getfixturevalue(fixture)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)  # tied embeddings once
    assert recipes.parameter_count(read_hf_config(folder)) == model.num_parameters()


def test_auto_picks_small_for_small_models_and_paper_for_8b(tiny_llama):
    tiny = read_hf_config(tiny_llama)
    assert recipes.choose("auto", tiny)[0] == "small"
    # Llama-3-8B's shapes: 8,030,261,248 parameters, as its model card counts them.
    llama3_8b = dataclasses.replace(tiny, vocab_size=128256, hidden_size=4096,
                                    intermediate_size=14336, num_layers=32, num_heads=32,
                                    num_kv_heads=8, head_dim=128, tie_word_embeddings=False)
    assert recipes.parameter_count(llama3_8b) == 8_030_261_248
    name, why = recipes.choose("auto", llama3_8b)
    assert name == "paper" and "8,030M parameters" in why and "--recipe small" in why
    assert recipes.choose("small", llama3_8b)[0] == "small"


def test_small_recipe_puts_the_adapter_on_the_top_third():
    assert [recipes.top_third(n) for n in (30, 18, 2, 1)] == [20, 12, 1, 0]


def test_train_starts_from_the_recipe_and_flags_override_it(tiny_llama, tmp_path):
    layers = read_hf_config(tiny_llama).num_layers
    cfg = resolve_config(_parse(add_arguments, ["--out", "x"]), None, str(tiny_llama))
    small = recipes.train_settings("small", read_hf_config(tiny_llama))
    assert (cfg.tau, cfg.lr, cfg.epochs, cfg.lora.rank) == (1.0, 3e-3, 10, 32)
    assert cfg.lora.alpha == 64.0 and cfg.lora.first_layer == recipes.top_third(layers)
    assert cfg == from_dict(TrainConfig, small)
    cfg = resolve_config(_parse(add_arguments, ["--out", "x", "--rank", "8", "--objective", "ce"]),
                         None, str(tiny_llama))
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.objective, cfg.tau) == (8, 16.0, "ce", 1.0)
    paper = resolve_config(_parse(add_arguments, ["--out", "x", "--recipe", "paper"]), None,
                           str(tiny_llama))
    assert (paper.lora.rank, paper.lr, paper.compute_dtype) == (1024, 1e-5, "bfloat16")
    assert "lm_head" in paper.lora.targets
    # --config replaces the recipe: its fields over TrainConfig's defaults, nothing of the recipe
    (tmp_path / "t.yaml").write_text("epochs: 2\n")
    own = resolve_config(_parse(add_arguments, ["--out", "x", "--config", str(tmp_path / "t.yaml")]),
                         None, str(tiny_llama))
    assert own == TrainConfig(epochs=2)


def test_generate_starts_from_the_recipe(tiny_llama):
    args = _parse(generate_command.add_arguments,
                  ["--model", str(tiny_llama), "--docs", "d", "--out", "o"])
    cfg = from_dict(GenerateConfig, recipe_layer(args, args.model, "generate"))
    assert (cfg.questions_per_doc, cfg.a_temperature, cfg.restatements_per_doc) == (12, 0.25, 2)
    assert cfg.system == recipes.SMALL_SYSTEM
    assert args.recipe_note.startswith("recipe small (the model has 123,200 parameters, under 1B")


def test_recipe_and_config_together_are_one_line_and_exit_2(tiny_llama, tmp_path, capsys):
    (tmp_path / "g.yaml").write_text("questions_per_doc: 2\n")
    (tmp_path / "docs.jsonl").write_text('{"id": "d1", "text": "Tarsk was founded in 1873."}\n')
    assert main(["generate", "--model", str(tiny_llama), "--docs", str(tmp_path / "docs.jsonl"),
                 "--out", str(tmp_path / "o"), "--config", str(tmp_path / "g.yaml"), "--recipe", "small",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pdistill generate: error: --recipe small and --config {tmp_path / 'g.yaml'}: "
                   "give one (the config file replaces the recipe; flags override either)"]
    assert not (tmp_path / "o").exists()


def test_shipped_run_configs_are_the_recipes(tiny_llama):
    """configs/full.yaml runs the small recipe on the embedded model (30 layers), configs/paper.yaml
    the paper recipe: one set of values, not two that drift apart."""
    from pathlib import Path

    from pdistill_jax.pipeline.run import load_run_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    smollm2 = dataclasses.replace(read_hf_config(tiny_llama), num_layers=30)
    for name, file in (("small", "full.yaml"), ("paper", "paper.yaml")):
        run = load_run_config(configs / file)
        generate = recipes.generate_settings(name)
        assert run.system == generate.pop("system", None)
        assert dataclasses.replace(run.generate, system=None) == from_dict(GenerateConfig, generate)
        train = from_dict(TrainConfig, recipes.train_settings(name, smollm2))
        assert dataclasses.replace(run.pd, system=None) == train, file
        sft = dataclasses.replace(train, objective="ce", tau=run.sft.tau)  # ce reads no tau
        assert dataclasses.replace(run.sft, system=None) == sft, file
