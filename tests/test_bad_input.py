"""User mistakes answer in one line and exit 2, before any model is loaded where the input can
tell, and nothing is written or lost: the probes of issue 16 (items 4 and 5), one test each."""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

from pdistill_jax.cli import main
from pdistill_jax.files import write_jsonl_atomic

QUESTIONS = [{"id": "q1", "question": "What is the capital of Velloria?", "answers": ["Tarsk"],
              "doc_id": "d1"},
             {"id": "q2", "question": "When was Tarsk founded?", "answers": ["1873"], "doc_id": "d1"}]
DOCS = [{"id": "d1", "text": "The capital of Velloria is Tarsk, founded in 1873."}]
QA = [{"document": DOCS[0]["text"], "question": q["question"], "answer": q["answers"][0]}
      for q in QUESTIONS] * 2


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def one_line_error(capsys, argv: list[str], command: str, after_status: bool = False) -> str:
    """Runs the CLI, which must exit 2 with exactly one stderr line and no traceback.
    after_status: the mistake shows only once work began, after the command's status lines."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if after_status:
        assert all(x.startswith(f"pdistill {command}: ") for x in lines), err
        lines = [x for x in lines if x.startswith(f"pdistill {command}: error: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pdistill {command}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def broken_model(tiny_llama, tmp_path_factory):
    """A copy of the tiny model whose model.safetensors is cut in half. Passing it as --model
    also proves an input error was found before the model was read."""
    d = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_llama, d)
    weights = d / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return d


@pytest.fixture
def inputs(tmp_path):
    return {"q": write(tmp_path / "q.jsonl", QUESTIONS), "d": write(tmp_path / "d.jsonl", DOCS),
            "qa": write(tmp_path / "qa.jsonl", QA)}


# ---------------------------------------------------------------- damaged weights

def test_truncated_safetensors_is_named_in_every_command(broken_model, inputs, tmp_path, capsys):
    damaged = f"{broken_model / 'model.safetensors'}: damaged or truncated safetensors file ("
    out = tmp_path / "p.jsonl"
    line = one_line_error(capsys, ["answer", "--model", str(broken_model), "--questions",
                                   inputs["q"], "--out", str(out)], "answer")
    assert damaged in line and line.endswith("download or save it again") and not out.exists()
    run = tmp_path / "run"
    line = one_line_error(capsys, ["train", "--model", str(broken_model), "--data", inputs["qa"],
                                   "--out", str(run), "--no-progress"], "train")
    assert damaged in line and not run.exists()  # no stub run folder
    gen = tmp_path / "gen"
    line = one_line_error(capsys, ["generate", "--model", str(broken_model), "--docs", inputs["d"],
                                   "--out", str(gen)], "generate")
    assert damaged in line and not gen.exists()  # no stub holding run.json


def _tiny_gguf(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_truncated_gguf_is_named(inputs, tmp_path, capsys):
    path = tmp_path / "m.gguf"
    _tiny_gguf(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4000)  # inside the tensor's data
    line = one_line_error(capsys, ["answer", "--model", str(path), "--questions", inputs["q"],
                                   "--out", str(tmp_path / "p.jsonl")], "answer")
    assert f"{path}: " in line and "truncated" in line and "download it again" in line
    path.write_bytes(path.read_bytes()[:40])  # inside the header
    line = one_line_error(capsys, ["answer", "--model", str(path), "--questions", inputs["q"],
                                   "--out", str(tmp_path / "p.jsonl")], "answer")
    assert f"{path}: not a readable GGUF file, damaged or truncated (" in line
    assert not (tmp_path / "p.jsonl").exists()


def test_truncated_adapter_weights_are_named(tiny_llama, tmp_path, capsys):
    from safetensors.numpy import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    weights = adapter / "adapter_model.safetensors"
    save_file({"x": np.zeros((64, 64), np.float32)}, str(weights))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    out = tmp_path / "export"
    line = one_line_error(capsys, ["export", "--model", str(tiny_llama), "--adapter", str(adapter),
                                   "--out", str(out)], "export")
    assert f"{weights}: damaged or truncated safetensors file (" in line
    assert not out.exists() and not list(tmp_path.glob(".export*"))  # no stub, no temp folder


# ---------------------------------------------------------------- a folder for a file, or the reverse

def test_folder_or_file_of_the_wrong_kind(broken_model, tiny_llama, inputs, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("Just some text, not JSON.\n")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    model = str(broken_model)  # every refusal comes before the model is read
    cases = [
        (["answer", "--model", model, "--questions", str(folder), "--out", str(tmp_path / "p")],
         f"--questions {folder} is a folder; expected a JSONL file ({{\"question\""),
        (["answer", "--model", model, "--questions", inputs["q"], "--docs", str(folder),
          "--context", "gold", "--out", str(tmp_path / "p")],
         f"--docs {folder}: no .txt or .md files in this folder"),  # a folder of documents is fine
        (["answer", "--model", model, "--questions", inputs["q"], "--out", str(folder)],
         f"--out {folder} is a folder; give the path of the JSONL file to write"),
        (["answer", "--model", str(tiny_llama / "model.safetensors"), "--questions", inputs["q"],
          "--out", str(tmp_path / "p")],
         f"--model {tiny_llama / 'model.safetensors'} is one file of a Hugging Face model; pass "
         f"the folder that holds it with its config.json ({tiny_llama})"),
        (["evaluate", "--questions", inputs["q"], "--predictions", str(folder)],
         f"--predictions {folder} is a folder; expected a JSONL file"),
        (["generate", "--model", model, "--docs", str(notes), "--out", str(tmp_path / "g")],
         f"--docs {notes} is one text file; pass the folder that holds it"),
        (["generate", "--model", model, "--docs", inputs["d"], "--out", str(notes)],
         f"--out {notes} is a file; generate writes a folder"),
        (["train", "--model", model, "--data", str(notes), "--out", str(tmp_path / "r")],
         f"{notes}:1: invalid JSON at column 1 (Expecting value); expected {{\"document\", "
         f"\"question\", \"answer\""),
        (["train", "--model", model, "--data", inputs["qa"], "--out", str(tmp_path / "r"),
          "--init-adapter", str(adapter / "adapter_config.json")],
         f"--init-adapter {adapter / 'adapter_config.json'} is a file; pass the folder that holds "
         f"adapter_config.json ({adapter})"),
        (["export", "--model", model, "--adapter", str(adapter / "adapter_config.json"),
          "--out", str(tmp_path / "e")],
         f"--adapter {adapter / 'adapter_config.json'} is a file; pass the folder that holds "
         f"adapter_config.json ({adapter})"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, message in cases:
        line = one_line_error(capsys, argv, argv[0])
        assert message in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written anywhere
    assert notes.read_text() == "Just some text, not JSON.\n"


# ---------------------------------------------------------------- one policy for a bad row

GOOD_DOC = json.dumps(DOCS[0]).encode()
BAD_ROWS = {  # kind -> (a bad line, the words of its message)
    "invalid JSON": (b'{"id": "x", "text": oops}', "invalid JSON at column 21"),
    "not UTF-8": ('{"id": "x", "text": "caf\xe9"}'.encode("latin-1"),
                  "not valid UTF-8 (invalid continuation byte at byte 25 of the line); re-save "
                  "the file as UTF-8"),
    "duplicate id": (GOOD_DOC, "duplicate id 'd1' (also on line 1)"),
    "missing field": (b'{"id": "x"}', 'field "text" is missing'),
}


def _with_bad_line(path, good: list[bytes], bad: bytes) -> tuple[str, int]:
    """The good rows, a blank line, the bad row: (path, the bad row's line number)."""
    path.write_bytes(b"\n".join(good + [b"", bad]) + b"\n")
    return str(path), len(good) + 2


# Q&A rows carry no id (a document's rows share its doc_id): a duplicate is no mistake there.
CASES = [(command, kind) for command in ("generate --docs", "answer --docs", "answer --questions",
                                         "train --data")
         for kind in BAD_ROWS if (command, kind) != ("train --data", "duplicate id")]


@pytest.mark.parametrize("command,kind", CASES)
def test_a_bad_row_is_refused_alike_everywhere(broken_model, inputs, tmp_path, capsys, command,
                                               kind):
    bad, words = BAD_ROWS[kind]
    out = tmp_path / "out"
    if command == "train --data":
        good = [json.dumps(r).encode() for r in QA]
        bad = bad.replace(b'"id": "x", "text"', b'"question": "q", "answer": "a", "document"') \
            if kind != "missing field" else b'{"document": "d", "question": "q"}'
        words = words.replace('"text"', '"answer"').replace("column 21", "column 46") \
            .replace("byte 25", "byte 50")
        path, lineno = _with_bad_line(tmp_path / "qa.jsonl", good, bad)
        argv = ["train", "--model", str(broken_model), "--data", path, "--out", str(out)]
    elif command == "answer --questions":
        good = [json.dumps(q).encode() for q in QUESTIONS]
        bad = {"duplicate id": json.dumps(QUESTIONS[0]).encode(),
               "missing field": b'{"id": "x"}'}.get(kind, bad.replace(b'"text"', b'"question"'))
        words = {"duplicate id": "duplicate id 'q1' (also on line 1)",
                 "missing field": 'field "question" is missing'}.get(
            kind, words.replace("column 21", "column 25").replace("byte 25", "byte 29"))
        path, lineno = _with_bad_line(tmp_path / "q.jsonl", good, bad)
        argv = ["answer", "--model", str(broken_model), "--questions", path, "--out", str(out)]
    else:
        path, lineno = _with_bad_line(tmp_path / "docs.jsonl", [GOOD_DOC], bad)
        argv = ({"generate --docs": ["generate", "--docs", path],
                 "answer --docs": ["answer", "--questions", inputs["q"], "--docs", path,
                                   "--context", "gold"]}[command]
                + ["--model", str(broken_model), "--out", str(out)])
    data = open(path, "rb").read()
    line = one_line_error(capsys, argv, argv[0])
    # file and line, the problem, and (for a malformed row) what the file should hold
    assert f"error: {path}:{lineno}: {words}" in line, line
    assert "damaged" not in line  # refused before the (broken) model was read
    assert not out.exists() and open(path, "rb").read() == data


# ---------------------------------------------------------------- answer --out never destroys input

def test_answer_refuses_to_write_over_its_own_inputs(broken_model, inputs, tmp_path, capsys,
                                                     monkeypatch):
    q, d = tmp_path / "q.jsonl", tmp_path / "d.jsonl"
    original = {q: q.read_bytes(), d: d.read_bytes()}
    (tmp_path / "link.jsonl").symlink_to(q)
    os.link(d, tmp_path / "hard.jsonl")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    base = ["answer", "--model", str(broken_model), "--questions", str(q), "--docs", str(d),
            "--context", "gold", "--out"]
    for out, flag, given in [(str(q), "--questions", q), ("../q.jsonl", "--questions", q),
                             (str(tmp_path / "link.jsonl"), "--questions", q),
                             ("../d.jsonl", "--docs", d), (str(tmp_path / "hard.jsonl"), "--docs", d)]:
        line = one_line_error(capsys, base + [out], "answer")
        assert line.endswith(f"--out {out} is the {flag} input {given}; writing there would "
                             "destroy it: choose another --out"), line
    assert {p: p.read_bytes() for p in original} == original


def test_generate_refuses_docs_it_would_overwrite(broken_model, tmp_path, capsys):
    gen = tmp_path / "gen"
    gen.mkdir()
    docs = write(gen / "documents.jsonl", DOCS)  # e.g. the chunked documents of an earlier run
    original = (gen / "documents.jsonl").read_bytes()
    line = one_line_error(capsys, ["generate", "--model", str(broken_model), "--docs", docs,
                                   "--out", str(gen)], "generate")
    assert line.endswith(f"--docs {docs} is {gen / 'documents.jsonl'}, which generate writes; "
                         "move the documents or choose another --out")
    assert (gen / "documents.jsonl").read_bytes() == original
    assert [p.name for p in gen.iterdir()] == ["documents.jsonl"]


def test_answer_failure_keeps_the_old_predictions(broken_model, inputs, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    out.write_text('{"question": "old", "prediction": "kept"}\n')
    one_line_error(capsys, ["answer", "--model", str(broken_model), "--questions", inputs["q"],
                            "--out", str(out)], "answer")
    assert out.read_text() == '{"question": "old", "prediction": "kept"}\n'
    # A write that fails half-way (an unserialisable row) leaves the old file and no temp file.
    with pytest.raises(TypeError):
        write_jsonl_atomic(out, [{"question": "new", "prediction": "x"}, {"bad": object()}])
    assert out.read_text() == '{"question": "old", "prediction": "kept"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "p.jsonl", "q.jsonl", "qa.jsonl"]


# ---------------------------------------------------------------- no stub folders

def test_failed_train_and_generate_leave_no_stub(tiny_llama, inputs, tmp_path, capsys):
    run = tmp_path / "run"
    # Fails after the model is loaded and the checkpoint folder made: the batch does not split.
    line = one_line_error(capsys, ["train", "--model", str(tiny_llama), "--data", inputs["qa"],
                                   "--out", str(run), "--batch-size", "3", "--mesh",
                                   "data=2,fsdp=1,tensor=1", "--no-progress"], "train", True)
    assert "batch_size 3 does not split" in line and not run.exists()
    mine = tmp_path / "mine"  # a folder the user made: kept, and left as it was
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    one_line_error(capsys, ["train", "--model", str(tiny_llama), "--data", inputs["qa"],
                            "--out", str(mine), "--batch-size", "3", "--mesh",
                            "data=2,fsdp=1,tensor=1", "--no-progress"], "train", True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md"]

    gen = tmp_path / "gen"
    config = tmp_path / "gen.yaml"
    config.write_text("chunk_tokens: 4\nchunk_overlap: 0\n")  # refused only once the tokenizer is there
    line = one_line_error(capsys, ["generate", "--model", str(tiny_llama), "--docs", inputs["d"],
                                   "--out", str(gen), "--config", str(config)], "generate")
    assert "chunk max_tokens=4 is too small" in line and not gen.exists()


# ---------------------------------------------------------------- damaged checkpoints

def test_resume_past_a_damaged_checkpoint_says_so_in_one_line(tiny_llama, inputs, tmp_path, capsys,
                                                              caplog):
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama), "--data", inputs["qa"], "--out", str(run),
            "--batch-size", "2", "--mesh", "data=1", "--epochs", "2", "--save-every", "1",
            "--no-progress"]
    assert main(args + ["--stop-after", "2"]) == 0
    capsys.readouterr()
    (run / "checkpoints" / "2" / "state" / "manifest.ocdbt").unlink()  # a file deleted
    assert main(["train", "--out", str(run), "--resume", "--stop-after", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    noise = [r for r in caplog.records if r.name in ("asyncio", "absl") and r.levelno >= logging.ERROR]
    assert not noise, caplog.text
    damaged = [x for x in err.splitlines() if " is damaged " in x]
    assert len(damaged) == 1, err
    line = damaged[0]
    assert line.startswith("pdistill train: checkpoint step 2 is damaged (ValueError: ")
    assert f"moved to {run / 'checkpoints.damaged' / '2-'}" in line
    assert line.endswith("; resuming from step 1 (epoch 0, batch 1)")

    for step in (1, 2):  # now every checkpoint is damaged
        (run / "checkpoints" / str(step) / "state" / "manifest.ocdbt").unlink()
    line = one_line_error(capsys, ["train", "--out", str(run), "--resume", "--no-progress"],
                          "train", True)
    assert f"--resume: no usable checkpoint in {run / 'checkpoints'}: step(s) 2, 1 are damaged (" \
        in line
    assert line.endswith("rerun with --resume to start this run over from step 0, or train into "
                         "a new --out")
    assert (run / "config.yaml").exists()  # a resumed run's folder is never removed
