"""Tokenizer and chat template (from transformers), and the prompt layouts of the method."""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from .registry import cache_dir

DOC_SEPARATOR = "\n\n---\n\n"  # teacher/RAG prompt: {document}{DOC_SEPARATOR}{question}


def load_tokenizer(model_path: str | Path):
    """Tokenizer of a Hugging Face directory or a GGUF file.

    Parsing a GGUF vocabulary takes seconds, so the parsed tokenizer is saved to the cache once.
    """
    from transformers import AutoTokenizer

    path = Path(model_path)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    cached = cache_dir() / "tokenizers" / f"{path.stem}-{key}"
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent))
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(cached)  # atomic publish; a concurrent process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def chat_prompt_ids(tokenizer, user: str, system: str | None = None) -> list[int]:
    """Token ids of a chat prompt ending where the assistant's answer begins."""
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": user}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def raw_prompt_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template writes right after an assistant message (e.g. <|im_end|>).

    Found by rendering a conversation rather than by a table of names, so any template works.
    """
    prompt = chat_prompt_ids(tokenizer, "Q")
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], tokenize=True)
    if isinstance(full, dict) or hasattr(full, "keys"):
        full = full["input_ids"]
    special = set(tokenizer.all_special_ids)
    rest = list(full)[len(prompt):] if list(full)[:len(prompt)] == prompt else list(full)
    for tid in rest:
        if tid in special:
            return int(tid)
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither a chat end-of-turn token nor an eos token")
    return int(tokenizer.eos_token_id)


def end_token_ids(tokenizer, cfg=None) -> list[int]:
    """Tokens that end generation: the end-of-turn token and the model's eos id(s)."""
    ids = {end_of_turn_id(tokenizer)} if tokenizer.chat_template else set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if cfg is not None and cfg.eos_token_id is not None:
        ids.update([cfg.eos_token_id] if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id)
    return sorted(ids)
