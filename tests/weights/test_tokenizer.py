"""Tokenizers built from a GGUF's metadata without torch: token for token what transformers' GGUF
loader builds (it imports torch, which exists here as the oracle); a model folder without a
tokenizer; and a check, in a process where torch cannot be imported, that nothing needs it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_models
from pdistill_jax.cli import main
from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids, load_tokenizer

DEMO_DOCS = Path(__file__).resolve().parents[2] / "pdistill_jax" / "assets" / "demo" / "documents.jsonl"
CONVERSATIONS = [
    [{"role": "user", "content": "Who founded Tarsk?"}],
    [{"role": "system", "content": "Be brief.\n  Exact names."},
     {"role": "user", "content": "Wer gründete 日本 Tarsk?  "},
     {"role": "assistant", "content": " In 1873, <think>Velloria</think>."}],
]
# (kind, tokenizer.ggml.pre, tokenizer.ggml.add_bos_token): SmolLM2's layout (no split regex of its
# own), Llama 3's and Qwen2's splits with and without BOS, and Llama 2's sentencepiece vocabulary
# with the BOS flag missing (llama.cpp then adds BOS) and off; Phi-3's (that vocabulary, its prefix
# space from a normalizer); Gemma 3's (no prefix space, spaces stored as spaces, merges in file
# order, scores in another).
LAYOUTS = [("gpt2", None, None), ("gpt2", "llama-bpe", True), ("gpt2", "qwen2", False),
           ("llama", None, None), ("llama", None, False), ("phi3", None, False),
           ("gemma", None, None)]
TEMPLATES = {"gpt2": tiny_models.CHATML, "llama": tiny_models.LLAMA2_TEMPLATE,
             "phi3": tiny_models.LLAMA2_TEMPLATE, "gemma": tiny_models.GEMMA_TEMPLATE}


def reference_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def assert_same_tokenizer(ours, ref, texts):
    for text in texts:
        ids = ref(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours(text, add_special_tokens=False)["input_ids"] == \
            ref(text, add_special_tokens=False)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                ref.decode(ids, skip_special_tokens=skip), text
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id",
                 "eos_token_id", "pad_token_id", "all_special_ids", "chat_template"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert len(ours) == len(ref)
    assert ours.get_vocab() == ref.get_vocab()
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages, tokenize=False) == \
            ref.apply_chat_template(messages, tokenize=False)
        assert list(ours.apply_chat_template(messages, tokenize=True)["input_ids"]) == \
            list(ref.apply_chat_template(messages, tokenize=True)["input_ids"])
    for system in (None, "Give short, direct answers."):
        assert chat_prompt_ids(ours, "Where is Tarsk?", system) == \
            chat_prompt_ids(ref, "Where is Tarsk?", system)
    assert end_token_ids(ours) == end_token_ids(ref)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ggufs")
    return {layout: tiny_models.write_tokenizer_gguf(
        d / f"{layout[0]}-{layout[1]}-{layout[2]}.gguf", *layout,
        chat_template=TEMPLATES[layout[0]])
        for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "-".join(map(str, x)))
def test_gguf_tokenizer_matches_transformers_gguf_loader(ggufs, layout):
    gguf = ggufs[layout]
    ours, ref = load_tokenizer(gguf), reference_tokenizer(gguf)
    assert_same_tokenizer(ours, ref, tiny_models.TRICKY_TEXTS)
    # The texts really exercise the vocabulary: the special and added tokens stay whole, and
    # BOS is added exactly when the file says so.
    if layout[0] == "gpt2":
        assert ours("a<|im_end|>b", add_special_tokens=False)["input_ids"].count(2) == 1
        assert ours("<repo_name>", add_special_tokens=False)["input_ids"] == [3]
        assert ours.decode([3, 42], skip_special_tokens=True) == ours.decode([42])
        assert len(ours("<think>", add_special_tokens=False)["input_ids"]) == 1
    if layout[0] == "gemma":  # runs of spaces are single tokens, found under their real spelling
        spaces = ours("a   b", add_special_tokens=False)["input_ids"]
        assert len(spaces) < 5 and ours.decode(spaces) == "a   b"
        assert "\u2581\u2581" in ours.get_vocab()
    adds_bos = layout[0] in ("llama", "gemma") if layout[2] is None else layout[2]
    assert (ours("hello")["input_ids"][0] == ours.bos_token_id) == adds_bos
    text = "line one\nline two  日本 🦊"
    assert ours.decode(ours(text, add_special_tokens=False)["input_ids"]) == text


def test_parsed_gguf_tokenizer_is_cached_once_and_published_whole(ggufs, tmp_path, monkeypatch):
    monkeypatch.setenv("PDISTILL_CACHE", str(tmp_path / "cache"))
    gguf = shutil.copy(ggufs[("gpt2", None, None)], tmp_path / "m.gguf")
    first = load_tokenizer(gguf)
    entries = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert [e.name[:2] for e in entries] == ["m-"]  # one folder, no temporary left behind
    assert {"tokenizer.json", "tokenizer_config.json"} <= {f.name for f in entries[0].iterdir()}
    again = load_tokenizer(gguf)
    assert again(tiny_models.TRICKY_TEXTS[10])["input_ids"] == first(tiny_models.TRICKY_TEXTS[10])["input_ids"]
    assert list((tmp_path / "cache" / "tokenizers").iterdir()) == entries
    # Another file at the same path (new size and time) is parsed anew, not served stale.
    tiny_models.write_tokenizer_gguf(gguf, "llama")
    os.utime(gguf, (1e9, 1e9))
    assert load_tokenizer(gguf).bos_token == "<s>"
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2


def test_unsupported_gguf_tokenizer_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PDISTILL_CACHE", str(tmp_path / "cache"))
    gguf = tiny_models.write_tokenizer_gguf(tmp_path / "bert.gguf", "bert")
    with pytest.raises(ValueError) as e:
        load_tokenizer(gguf)
    assert str(e.value) == (f"{gguf}: GGUF tokenizer.ggml.model='bert' is not supported; use a GGUF "
                            "whose tokenizer is one of ['gpt2', 'llama'], or the model's Hugging "
                            "Face folder")
    assert not (tmp_path / "cache" / "tokenizers").exists()


def test_prefixless_sentencepiece_outside_gemma_is_refused_by_name(tmp_path, monkeypatch):
    # add_space_prefix=false is Gemma's; in a llama-architecture file it is a vocabulary neither
    # builder makes.
    monkeypatch.setenv("PDISTILL_CACHE", str(tmp_path / "cache"))
    gguf = tiny_models.write_tokenizer_gguf(tmp_path / "g.gguf", "llama", add_space_prefix=False)
    with pytest.raises(ValueError, match="add_space_prefix=false in a 'llama' model is not supported"):
        load_tokenizer(gguf)


@pytest.mark.parametrize("model,missing", [
    ("gpt2", "tokenizer.ggml.merges"),
    ("llama", "tokenizer.ggml.merges or tokenizer.ggml.scores")])
def test_gguf_without_merges_is_one_line(tmp_path, monkeypatch, model, missing):
    from gguf import GGUFWriter

    monkeypatch.setenv("PDISTILL_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "nomerges.gguf"
    writer = GGUFWriter(str(gguf), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(["<unk>", "a", "b", "ab"])
    tiny_models._gguf_header(writer, 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError) as e:
        load_tokenizer(gguf)
    assert str(e.value) == (f"{gguf}: GGUF has no {missing}, so its tokenizer cannot be built; "
                            "use the model's Hugging Face folder")
    assert not (tmp_path / "cache" / "tokenizers").exists()


# ---------------------------------------------------------------- a folder without a tokenizer


def _strip_tokenizer(src: Path, dst: Path, keep: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")) and f.name not in keep:
            f.unlink()
    return dst


def test_model_folder_without_tokenizer_is_one_line(tiny_llama, tmp_path, capsys):
    folder = _strip_tokenizer(tiny_llama, tmp_path / "model")
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(folder)
    assert str(e.value) == (f"{folder}: no tokenizer in this model folder (missing tokenizer.json "
                            "and tokenizer_config.json); copy the tokenizer files from the model's "
                            "Hugging Face repository into it")
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "Where is Tarsk?"}\n')
    out = tmp_path / "pred.jsonl"
    assert main(["answer", "--model", str(folder), "--questions", str(q), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"pdistill answer: error: {e.value}\n"
    assert not out.exists()


def test_model_folder_with_only_tokenizer_config_names_tokenizer_json(tiny_llama, tmp_path):
    folder = _strip_tokenizer(tiny_llama, tmp_path / "model", keep=("tokenizer_config.json",))
    with pytest.raises(FileNotFoundError, match=r"model: no tokenizer in this model folder "
                                                r"\(missing tokenizer.json\); copy"):
        load_tokenizer(folder)


# ---------------------------------------------------------------- no torch at run time

NO_TORCH = "import sys; sys.modules['torch'] = None  # any `import torch` now fails\n"


def run_without_torch(code: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "PDISTILL_CACHE": str(tmp_path / "cache")}
    for inherited in ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "JAX_COMPILATION_CACHE_DIR"):
        env.pop(inherited, None)  # set by other tests' calls of main() in this process
    res = subprocess.run([sys.executable, "-c", NO_TORCH + code], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_gguf_tokenizer_needs_no_torch(ggufs, tmp_path):
    expected = {str(p): load_tokenizer(p)(tiny_models.TRICKY_TEXTS[12])["input_ids"]
                for p in ggufs.values()}
    out = run_without_torch(
        "import json\nfrom pdistill_jax.weights.tokenizer import load_tokenizer\n"
        f"paths = {list(expected)!r}\n"
        f"print(json.dumps({{p: load_tokenizer(p)({tiny_models.TRICKY_TEXTS[12]!r})['input_ids'] "
        "for p in paths}))\n", tmp_path).stdout
    assert json.loads(out.splitlines()[-1]) == expected


def test_answer_command_needs_no_torch(tiny_llama, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "Where is Tarsk?"}\n{"question": "Who founded it?"}\n')
    out = tmp_path / "pred.jsonl"
    res = run_without_torch(
        "from pdistill_jax.cli import main\n"
        f"sys.exit(main(['answer', '--model', {str(tiny_llama)!r}, '--questions', {str(q)!r}, "
        f"'--out', {str(out)!r}, '--max-new-tokens', '3']))\n", tmp_path)
    assert len(out.read_text().splitlines()) == 2
    # transformers' notice that its torch models are unavailable would only mislead a user here.
    assert "PyTorch was not found" not in res.stderr


# ---------------------------------------------------------------- the embedded model


def _long_varied_texts() -> list[str]:
    docs = [json.loads(line)["text"] for line in DEMO_DOCS.read_text().splitlines() if line.strip()]
    return tiny_models.TRICKY_TEXTS + docs + ["\n\n".join(docs)]


@pytest.mark.slow
def test_embedded_gguf_tokenizer_matches_transformers_gguf_loader(embedded_model):
    ours, ref = load_tokenizer(embedded_model), reference_tokenizer(embedded_model)
    assert_same_tokenizer(ours, ref, _long_varied_texts())
    assert end_token_ids(ours) == [2]  # <|im_end|>, SmolLM2's end of turn and eos


@pytest.mark.slow
def test_embedded_gguf_tokenizer_needs_no_torch(embedded_model, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n\n".join(_long_varied_texts()), encoding="utf-8")
    ref = reference_tokenizer(embedded_model)
    out = run_without_torch(
        "import json\nfrom pathlib import Path\nfrom pdistill_jax.weights.tokenizer import "
        f"chat_prompt_ids, end_token_ids, load_tokenizer\ntok = load_tokenizer({str(embedded_model)!r})\n"
        f"text = Path({str(text_file)!r}).read_text(encoding='utf-8')\n"
        "print(json.dumps([tok(text)['input_ids'], chat_prompt_ids(tok, 'Where is Tarsk?'), "
        "end_token_ids(tok), tok.decode(tok(text)['input_ids'])]))\n", tmp_path).stdout
    text = text_file.read_text(encoding="utf-8")
    assert json.loads(out.splitlines()[-1]) == [
        ref(text)["input_ids"], chat_prompt_ids(ref, "Where is Tarsk?"), end_token_ids(ref), text]
