"""Bad settings fail before any work, in one line naming the field (and the file and line it was
read from), the valid range and the bad value; YAML values are coerced to the field's type."""
import argparse
import json
import math
import re
from pathlib import Path

import pytest

from pdistill_jax.infer.answer import answer_questions
from pdistill_jax.cli import main
from pdistill_jax.commands.train import add_arguments, resolve_config
from pdistill_jax.config import (AnswerConfig, GenerateConfig, LoraConfig, ModelConfig, RunConfig,
                                 SamplingParams, TrainConfig, load_yaml, to_dict)
from pdistill_jax.pipeline.run import load_run_config

ROOT = Path(__file__).resolve().parents[1]
QA = {"document": "Tarsk was founded in 1873.", "question": "When was Tarsk founded?",
      "answer": "In 1873."}


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("changes, message", [
    ({"lr": 0.0}, "lr must be > 0, got 0.0"),
    ({"lr": -1e-3}, "lr must be > 0, got -0.001"),
    ({"lr": math.nan}, "lr must be a finite number > 0, got nan"),
    ({"lr": math.inf}, "lr must be a finite number > 0, got inf"),
    ({"tau": 0.0}, "tau must be > 0, got 0.0"),
    ({"jsd_beta": 1.5}, "jsd_beta must be in [0, 1], got 1.5"),
    ({"warmup_ratio": 1.0}, "warmup_ratio must be in [0, 1), got 1.0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0, got 0.0"),
    ({"lora_b_lr_ratio": 0.0}, "lora_b_lr_ratio must be > 0, got 0.0"),
    ({"epochs": 0}, "epochs must be >= 1, got 0"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"grad_accum": -1}, "grad_accum must be >= 1, got -1"),
    ({"max_seq_len": 0}, "max_seq_len must be >= 1, got 0"),
    ({"save_every": 0}, "save_every must be >= 1, got 0"),
    ({"keep_checkpoints": 0}, "keep_checkpoints must be >= 1, got 0"),
    ({"log_every": 0}, "log_every must be >= 1, got 0"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
    ({"teacher_cache_gb": -1.0}, "teacher_cache_gb must be >= 0, got -1.0"),
    ({"open_book_share": 1.5}, "open_book_share must be in [0, 1], got 1.5"),
    ({"dev_share": 0.6}, "dev_share must be in [0, 0.5], got 0.6"),
    ({"eval_every": -1}, "eval_every must be >= 0, got -1"),
    ({"early_stop_patience": 2}, "early_stop_patience must be 0 without a dev set"),
    ({"objective": "kld"}, "objective must be one of kl, reverse_kl, jsd, ce, got 'kld'"),
    ({"mesh": (0, 1, 1)}, "mesh must be 3 sizes (data, fsdp, tensor), each >= 1 or one of them -1"),
    ({"mesh": (1, 1)}, "mesh must be a list of 3 integers, got (1, 1)"),
    ({"epochs": 2.5}, "epochs must be an integer, got 2.5"),
    ({"remat": 1}, "remat must be true or false, got 1"),
    ({"remat": "yes"}, "remat must be true or false, got 'yes'"),
    ({"lr": None}, "lr must be a number, got None"),
    ({"system": 5}, "system must be a string or null, got 5"),
    ({"lora": {"alpha": 0}}, "lora.alpha must be > 0, got 0.0"),
    ({"lora": {"rank": 0}}, "lora.rank must be >= 1, got 0"),
    ({"lora": {"targets": ()}}, "lora.targets must be a non-empty list of q, k, v, o, gate, up, "
                                "down, lm_head, got []"),
    ({"lora": {"targets": ["q", "query"]}}, "got ['q', 'query']"),
])
def test_train_config_refuses_a_bad_value_naming_field_range_and_value(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**changes)


def test_values_are_coerced_to_the_field_type():
    cfg = TrainConfig(lr="3e-3", tau=1, epochs="3", max_seq_len=512.0, mesh=[1, 1, 1],
                      lora={"rank": "8", "targets": ["q", "v"]})
    assert (cfg.lr, cfg.tau, cfg.epochs, cfg.max_seq_len) == (0.003, 1.0, 3, 512)
    assert cfg.mesh == (1, 1, 1)
    assert type(cfg.tau) is float and type(cfg.max_seq_len) is int
    assert cfg.lora == LoraConfig(rank=8, alpha=16.0, targets=("q", "v"))
    assert TrainConfig(teacher_cache_gb=math.inf).teacher_cache_gb == math.inf  # no limit


def test_lora_alpha_defaults_to_twice_the_rank_and_saved_configs_show_the_number():
    assert LoraConfig(rank=4).alpha == 8.0 and LoraConfig(rank=4).scale == 2.0
    assert LoraConfig(rank=4, alpha=3).alpha == 3.0
    assert TrainConfig().lora.alpha == 128.0  # the default rank 64: the same update as before
    assert to_dict(TrainConfig(lora=LoraConfig(rank=16)))["lora"]["alpha"] == 32.0
    assert load_yaml(TrainConfig, ROOT / "configs" / "train_default.yaml") == TrainConfig()


def parse_train(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--out", "x", *argv])


def test_alpha_follows_the_rank_unless_set(tmp_path):
    assert resolve_config(parse_train(["--rank", "4"]), None).lora.alpha == 8.0
    default = str(ROOT / "configs" / "train_default.yaml")
    assert resolve_config(parse_train(["--config", default, "--rank", "4"]), None).lora.alpha == 8.0
    (tmp_path / "a.yaml").write_text("lora: {rank: 16, alpha: 32}\n")
    explicit = resolve_config(parse_train(["--config", str(tmp_path / "a.yaml"), "--rank", "4"]),
                              None)
    assert explicit.lora == LoraConfig(rank=4, alpha=32.0)
    saved = {"train": {"lora": {"rank": 8, "alpha": 128.0, "targets": ["q"]}}}  # an explicit alpha
    assert resolve_config(parse_train([]), saved).lora == LoraConfig(8, 128.0, ("q",))


@pytest.mark.parametrize("changes, message", [
    ({"questions_per_doc": 0}, "questions_per_doc must be >= 1, got 0"),
    ({"max_calls_per_doc": 0}, "max_calls_per_doc must be >= 1, got 0"),
    ({"max_answer_tokens": 0}, "max_answer_tokens must be >= 1, got 0"),
    ({"docs_per_commit": 0}, "docs_per_commit must be >= 1, got 0"),
    ({"q_temperature": -0.5}, "q_temperature must be >= 0, got -0.5"),
    ({"a_temperature": math.nan}, "a_temperature must be a finite number >= 0, got nan"),
    ({"a_top_k": -1}, "a_top_k must be >= 0, got -1"),
    ({"chunk_tokens": 0}, "chunk_tokens must be >= 1, got 0"),
    ({"chunk_overlap": 512}, "chunk_overlap must be in [0, chunk_tokens=512), got 512"),
    ({"chunk_overlap": -1}, "chunk_overlap must be in [0, chunk_tokens=512), got -1"),
    ({"teacher_states_gb": -1}, "teacher_states_gb must be >= 0, got -1.0"),
    ({"batch_size": 1.5}, "batch_size must be an integer, got 1.5"),
    ({"question_mode": "paragraphs"}, "question_mode must be one of document, sentences, got "
                                      "'paragraphs'"),
    ({"sentences_per_prompt": 0}, "sentences_per_prompt must be >= 1, got 0"),
    ({"questions_per_span": 0}, "questions_per_span must be >= 1, got 0"),
    ({"max_calls_per_span": 0}, "max_calls_per_span must be >= 1, got 0"),
    ({"paraphrases_per_question": -1}, "paraphrases_per_question must be >= 0, got -1"),
    ({"paraphrases_per_question": "two"}, "paraphrases_per_question must be an integer, got 'two'"),
    ({"max_paraphrase_calls": 0}, "max_paraphrase_calls must be >= 1, got 0"),
    ({"answers_per_question": 0}, "answers_per_question must be >= 1, got 0"),
    ({"restatements_per_doc": 5}, "restatements_per_doc must be in [0, 4], got 5"),
    ({"recitations_per_doc": 3}, "recitations_per_doc must be in [0, 2], got 3"),
    ({"max_restatement_tokens": 0}, "max_restatement_tokens must be >= 1, got 0"),
])
def test_generate_config_refuses_a_bad_value(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GenerateConfig(**changes)


@pytest.mark.parametrize("changes, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"answer_batch_size": 0}, "answer_batch_size must be >= 1, got 0"),
    ({"bm25_top_k": -1}, "bm25_top_k must be >= 0, got -1"),
    ({"pd": {"lr": -1}}, "pd.lr must be > 0, got -1.0"),
])
def test_run_config_refuses_a_bad_value(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig(**changes)


@pytest.mark.parametrize("changes, message", [
    ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
    ({"top_k": -1}, "top_k must be >= 0, got -1"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
])
def test_sampling_params_refuse_a_bad_value(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(**changes)


def test_model_config_refuses_an_impossible_architecture():
    hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 3}
    with pytest.raises(ValueError, match=re.escape(
            "x/config.json: num_kv_heads must be a divisor of num_heads=4, got 3")):
        ModelConfig.from_hf(hf, "x/config.json")
    with pytest.raises(ValueError, match=re.escape("config.json: vocab_size must be >= 1, got 0")):
        ModelConfig.from_hf({**hf, "num_key_value_heads": 2, "vocab_size": 0})


def test_library_answering_refuses_bad_options_before_any_work():
    # No model is needed: the options are checked before the first use of it.
    questions = [{"question": "Who?"}]
    with pytest.raises(ValueError, match=re.escape("batch_size must be an integer >= 1, got 0")):
        answer_questions(None, questions, AnswerConfig(batch_size=0))
    with pytest.raises(ValueError, match=re.escape(
            "top_k must be an integer >= 1 with context bm25 (the documents retrieved per "
            "question), got 0")):
        answer_questions(None, questions, AnswerConfig(context="bm25", top_k=0),
                         docs=[{"id": "a", "text": "t"}])


# ---- the command line: exit 2, one line, nothing written ---------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--lr", "0"], "lr must be > 0, got 0.0"),
    (["--lr=-0.001"], "lr must be > 0, got -0.001"),
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--tau", "0"], "tau must be > 0, got 0.0"),
    (["--tau=-2"], "tau must be > 0, got -2.0"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--save-every", "0"], "save_every must be >= 1, got 0"),
    (["--rank", "0"], "lora.rank must be >= 1, got 0"),
    (["--alpha", "0"], "lora.alpha must be > 0, got 0.0"),
    (["--targets", "q,query"], "lora.targets must be a non-empty list of q, k, v, o, gate, up, "
                               "down, lm_head, got ['q', 'query']"),
])
def test_train_refuses_a_bad_flag_before_writing_anything(tmp_path, capsys, flags, message):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps(QA) + "\n")
    run = tmp_path / "run"
    # The model does not exist: the check must come before any attempt to load it.
    assert main(["train", "--model", str(tmp_path / "no-model"), "--data", str(qa),
                 "--out", str(run), *flags]) == 2
    assert error_line(capsys) == f"pdistill train: error: {message}"
    assert not run.exists()


@pytest.mark.parametrize("text, message", [
    ("objective: kl\nepochs: three\n", "c.yaml:2: epochs must be an integer, got 'three'"),
    ("lr: [1]\n", "c.yaml:1: lr must be a number, got [1]"),
    ("remat: maybe\n", "c.yaml:1: remat must be true or false, got 'maybe'"),
    ("epochs: 2.5\n", "c.yaml:1: epochs must be an integer, got 2.5"),
    ("tau: 1.0\nlora:\n  rank: 4\n  alpha: -8\n", "c.yaml:4: lora.alpha must be > 0, got -8.0"),
    ("lora: 4\n", "c.yaml:1: lora must be a mapping, got 4"),
    ("mesh: [1, 1]\n", "c.yaml:1: mesh must be a list of 3 integers, got [1, 1]"),
    ("warmup_ratio: 1\n", "c.yaml:1: warmup_ratio must be in [0, 1), got 1.0"),
    ("lr: 0.1\n  epochs: 3\n", "c.yaml:2:9: invalid YAML: mapping values are not allowed here"),
    ("targets: [q, v\n", "c.yaml:2:1: invalid YAML: expected ',' or ']', but got '<stream end>'"),
    ("lr: 0.1\nlr: 0.2\n", "c.yaml:2: duplicate key 'lr' (first on line 1)"),
    ("- lr\n", "c.yaml: top level must be a mapping of keys to values"),
])
def test_train_config_file_error_names_file_line_and_field(tmp_path, capsys, text, message):
    (tmp_path / "c.yaml").write_text(text)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps(QA) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "no-model"), "--data", str(qa),
                 "--out", str(run), "--config", str(tmp_path / "c.yaml")]) == 2
    assert error_line(capsys) == f"pdistill train: error: {tmp_path / message}"
    assert not run.exists()


def test_yaml_strings_that_spell_numbers_are_numbers(tmp_path):
    # PyYAML reads `3e-3` (no dot) as a string; optax then crashed deep inside the first step.
    (tmp_path / "c.yaml").write_text("lr: 3e-3\ntau: 1\nepochs: '4'\n"
                                     "lora: {rank: 8, targets: [q]}\n")
    cfg = resolve_config(parse_train(["--config", str(tmp_path / "c.yaml")]), None)
    assert (cfg.lr, cfg.tau, cfg.epochs) == (0.003, 1.0, 4) and type(cfg.tau) is float
    assert cfg.lora == LoraConfig(rank=8, alpha=16.0, targets=("q",))


def test_a_flag_replaces_a_bad_file_value_and_errors_then_do_not_point_at_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: lots\nepochs: 2\n")
    cfg = resolve_config(parse_train(["--config", str(tmp_path / "c.yaml"), "--lr", "0.01"]), None)
    assert (cfg.lr, cfg.epochs) == (0.01, 2)
    with pytest.raises(ValueError) as e:
        resolve_config(parse_train(["--config", str(tmp_path / "c.yaml"), "--lr", "-1"]), None)
    assert str(e.value) == "lr must be > 0, got -1.0"


@pytest.mark.parametrize("text, message", [
    ("max_new_tokens: 0\n", "r.yaml:1: max_new_tokens must be >= 1, got 0"),
    ("answer_batch_size: -4\n", "r.yaml:1: answer_batch_size must be >= 1, got -4"),
    ("bm25_top_k: -2\n", "r.yaml:1: bm25_top_k must be >= 0, got -2"),
    ("model: m\npd:\n  epochs: 1\n  lr: -1\n", "r.yaml:4: pd.lr must be > 0, got -1.0"),
    ("sft:\n  objective: ce\n  tau: 0\n", "r.yaml:3: sft.tau must be > 0, got 0.0"),
    ("pd:\n  lora: {rank: 4, alpha: 0}\n", "r.yaml:2: pd.lora.alpha must be > 0, got 0.0"),
    ("generate:\n  chunk_tokens: 100\n  chunk_overlap: 100\n",
     "r.yaml:3: generate.chunk_overlap must be in [0, chunk_tokens=100), got 100"),
    ("generate: {q_temperature: hot}\n",
     "r.yaml:1: generate.q_temperature must be a number, got 'hot'"),
    ("pd: 5\n", "r.yaml:1: pd must be a mapping, got 5"),
    ("pd:\n  epochs: 3\n pd2: 1\n",
     "r.yaml:3:2: invalid YAML: expected <block end>, but found '<block mapping start>'"),
])
def test_run_config_error_names_file_line_and_field(tmp_path, capsys, text, message):
    out = tmp_path / "out"
    (tmp_path / "r.yaml").write_text(f"out: {out}\n" + text)
    # The first line is `out:`: every line number in the file moves down by one.
    line, rest = re.match(r"r\.yaml:(\d+)(.*)", message).groups()
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    assert error_line(capsys) == f"pdistill run: error: {tmp_path / 'r.yaml'}:{int(line) + 1}{rest}"
    assert not out.exists()


def test_run_config_reads_numbers_written_as_strings(tmp_path):
    (tmp_path / "r.yaml").write_text("pd: {lr: 3e-3, epochs: 2}\nmax_new_tokens: '40'\n")
    cfg = load_run_config(tmp_path / "r.yaml")
    assert (cfg.pd.lr, cfg.pd.epochs, cfg.max_new_tokens) == (0.003, 2, 40)


def test_a_key_a_merge_key_brings_in_may_be_overridden_but_a_repeated_key_is_refused(tmp_path):
    (tmp_path / "r.yaml").write_text("pd: &pd\n  lr: 0.5\n  epochs: 2\n"
                                     "sft:\n  <<: *pd\n  objective: ce\n  epochs: 3\n")
    cfg = load_run_config(tmp_path / "r.yaml")
    assert (cfg.sft.lr, cfg.sft.epochs, cfg.pd.epochs) == (0.5, 3, 2)
    (tmp_path / "r.yaml").write_text("pd:\n  lr: 0.5\n  lr: 0.1\n")
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'r.yaml'}:3: duplicate key 'pd.lr' (first on line 2)")):
        load_run_config(tmp_path / "r.yaml")


@pytest.mark.parametrize("flags, config, message", [
    (["--q-temperature=-1"], None, "q_temperature must be >= 0, got -1.0"),
    (["--questions-per-doc", "0"], None, "questions_per_doc must be >= 1, got 0"),
    (["--batch-size", "0"], None, "batch_size must be >= 1, got 0"),
    ([], "chunk_tokens: 64\nchunk_overlap: 64\n",
     "g.yaml:2: chunk_overlap must be in [0, chunk_tokens=64), got 64"),
    ([], "q_top_k: -5\n", "g.yaml:1: q_top_k must be >= 0, got -5"),
])
def test_generate_refuses_a_bad_setting_before_writing_anything(tmp_path, capsys, flags, config,
                                                                message):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "a", "text": "Tarsk was founded in 1873."}) + "\n")
    if config is not None:
        (tmp_path / "g.yaml").write_text(config)
        flags = flags + ["--config", str(tmp_path / "g.yaml")]
        message = str(tmp_path / message)
    out = tmp_path / "data"
    assert main(["generate", "--model", str(tmp_path / "no-model"), "--docs", str(docs),
                 "--out", str(out), *flags]) == 2
    assert error_line(capsys) == f"pdistill generate: error: {message}"
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["--batch-size=-3"], "batch_size must be an integer >= 1, got -3"),
    (["--context", "bm25", "--top-k", "0"],
     "top_k must be an integer >= 1 with context bm25 (the documents retrieved per question), "
     "got 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
    (["--temperature=-0.5"], "temperature must be >= 0, got -0.5"),
    (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
])
def test_answer_refuses_bad_options_before_loading_a_model(tmp_path, capsys, flags, message):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "When was Tarsk founded?", "doc_id": "a"}) + "\n")
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "a", "text": "Tarsk was founded in 1873."}) + "\n")
    before = files_under(tmp_path)
    # A model that does not exist: loading it first would fail with another message.
    assert main(["answer", "--model", str(tmp_path / "no-model"), "--questions", str(questions),
                 "--docs", str(docs), "--out", str(tmp_path / "pred.jsonl"), *flags]) == 2
    assert error_line(capsys) == f"pdistill answer: error: {message}"
    assert files_under(tmp_path) == before


def test_bm25_top_k_zero_is_fine_without_bm25():
    AnswerConfig(context="none", top_k=0)
    AnswerConfig(context="gold", top_k=0)


def test_read_yaml_numbers_the_mappings_of_a_list_and_keeps_the_other_lines(tmp_path):
    from pdistill_jax.config import read_yaml

    (tmp_path / "s.yaml").write_text("base:\n  train: {lr: 1}\nvariants:\n  - name: a\n"
                                     "  - name: b\n    train:\n      lr: 2\n  - plain\n"
                                     "mesh: [1, 1, 1]\n")
    _, lines = read_yaml(tmp_path / "s.yaml")
    assert lines == {"base": 1, "base.train": 2, "base.train.lr": 2, "variants": 3,
                     "variants.0": 4, "variants.0.name": 4, "variants.1": 5, "variants.1.name": 5,
                     "variants.1.train": 6, "variants.1.train.lr": 7, "mesh": 9}
    (tmp_path / "d.yaml").write_text("variants:\n  - name: a\n    name: b\n")
    with pytest.raises(ValueError, match=r"d\.yaml:3: duplicate key 'variants\.0\.name'"):
        read_yaml(tmp_path / "d.yaml")


@pytest.mark.parametrize("cls, kwargs, message", [
    ("RowsConfig", {"max_per_doc": 0}, "max_per_doc must be >= 1, got 0"),
    ("RowsConfig", {"finished_only": "yes"}, "finished_only must be true or false, got 'yes'"),
    ("StudyConfig", {"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ("StudyConfig", {"answer_batch_size": 0}, "answer_batch_size must be >= 1, got 0"),
    ("StudyConfig", {"train": TrainConfig(system="x")}, "train.system must be unset"),
    ("VariantConfig", {"name": "_data"}, "name must be letters, digits"),
    ("VariantConfig", {"name": "a", "train": TrainConfig(system="x")}, "train.system must be unset"),
])
def test_study_settings_are_checked(cls, kwargs, message):
    import pdistill_jax.config as config

    with pytest.raises(ValueError) as e:
        getattr(config, cls)(**kwargs)
    assert str(e.value).startswith(message)
