"""Tokenizer and chat template, and the prompt layouts of the method.

A Hugging Face folder's tokenizer is read by transformers. A GGUF file's is built here from the
file's own metadata (llama.cpp's `tokenizer.ggml.*` keys) with `tokenizers`, exactly as
transformers' GGUF loader builds it (tested token for token), but without torch, which that loader
imports.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from pdistill_jax.weights.registry import cache_dir

DOC_SEPARATOR = "\n\n---\n\n"  # teacher/RAG prompt: {document}{DOC_SEPARATOR}{question}

_CACHE_FORMAT = "gguf-v3"  # part of the cache key: a change to the builder never reuses old files
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's tokenizer.ggml.token_type values


def load_tokenizer(model_path: str | Path):
    """Tokenizer of a Hugging Face directory or a GGUF file.

    Parsing a GGUF vocabulary takes seconds, so the parsed tokenizer is saved to the cache once.
    """
    path = Path(model_path)
    if path.is_dir():
        return _hf_tokenizer(path)
    from transformers import PreTrainedTokenizerFast

    stat = path.stat()
    key = hashlib.sha1(f"{_CACHE_FORMAT}:{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
                       .encode()).hexdigest()[:12]
    cached = cache_dir() / "tokenizers" / f"{path.stem}-{key}"
    if not (cached / "tokenizer_config.json").exists():
        tok = gguf_tokenizer(path)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent))
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(cached)  # atomic publish; a concurrent process may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    # Read back from the cache on the first call too, so every call returns the same tokenizer
    # (BOS/EOS adding then lives in tokenizer.json's post-processor, as for a Hugging Face folder).
    return PreTrainedTokenizerFast.from_pretrained(str(cached))


def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    slow_files = ("tokenizer.model", "vocab.json")  # what transformers can convert instead
    if not (path / "tokenizer.json").exists() and not any((path / f).exists() for f in slow_files):
        missing = [f for f in ("tokenizer.json", "tokenizer_config.json") if not (path / f).exists()]
        raise FileNotFoundError(
            f"{path}: no tokenizer in this model folder (missing {' and '.join(missing)}); copy "
            "the tokenizer files from the model's Hugging Face repository into it")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (ValueError, ImportError, OSError) as e:
        if (path / "tokenizer.json").exists():
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"{path}: no tokenizer.json, and transformers could not build the tokenizer from the "
            f"other files ({reason}); copy tokenizer.json from the model's Hugging Face "
            "repository into this folder") from None


# ---------------------------------------------------------------- GGUF


def read_gguf_tokenizer_fields(path: str | Path) -> dict:
    """The file's `tokenizer.*` metadata, as Python values."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()
            if key.startswith("tokenizer.") or key == "general.architecture"}


def gguf_tokenizer(path: str | Path):
    """A `PreTrainedTokenizerFast` built from a GGUF file's tokenizer metadata."""
    from transformers import PreTrainedTokenizerFast

    meta = read_gguf_tokenizer_fields(path)
    model = meta.get("tokenizer.ggml.model")
    builders = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}
    gemma = model == "llama" and meta.get("general.architecture") in _GEMMA_ARCHITECTURES
    if model not in builders:
        raise ValueError(f"{path}: GGUF tokenizer.ggml.model={model!r} is not supported; use a "
                         f"GGUF whose tokenizer is one of {sorted(builders)}, or the model's "
                         "Hugging Face folder")
    # A vocabulary, and the merges (or, for sentencepiece, the scores that imply them).
    needed = ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"] if model == "gpt2" else \
        ["tokenizer.ggml.tokens", "tokenizer.ggml.merges or tokenizer.ggml.scores"]
    for field in needed:
        if not any(meta.get(name) for name in field.split(" or ")):
            raise ValueError(f"{path}: GGUF has no {field}, so its tokenizer cannot be built; "
                             "use the model's Hugging Face folder")
    if model == "llama" and not gemma and meta.get("tokenizer.ggml.add_space_prefix") is False:
        # A sentencepiece vocabulary without the prefix space outside the Gemma family: neither
        # the Llama 2 tokenizer built here nor Gemma's, and either would cut text wrongly.
        raise ValueError(f"{path}: GGUF tokenizer.ggml.add_space_prefix=false in a "
                         f"{meta.get('general.architecture')!r} model is not supported by the "
                         "GGUF tokenizer builder (only Gemma's); use the model's Hugging Face "
                         "folder")
    tokens = meta["tokenizer.ggml.tokens"]
    backend = _gemma_bpe(meta) if gemma else builders[model](meta)
    if model == "llama" and meta.get("general.architecture") == "phi3":
        _prefix_space_by_normalizer(backend)
    _add_marked_tokens(backend, meta, byte_level=model == "gpt2")
    special = {name: tokens[meta[f"tokenizer.ggml.{key}"]]
               for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                 ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
               if meta.get(f"tokenizer.ggml.{key}") is not None}
    if gemma and "<mask>" in tokens:
        special["mask_token"] = "<mask>"  # Gemma's tokenizer names one; llama.cpp keeps no id
    # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    kwargs = {"chat_template": meta["tokenizer.chat_template"]} \
        if meta.get("tokenizer.chat_template") else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=add_bos,
                                   add_eos_token=add_eos, **special, **kwargs)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level vocabularies are spelled in."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def _merges(meta: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]


def _byte_level_bpe(meta: dict):
    """SmolLM2, Llama 3, Qwen2: byte-level BPE; `tokenizer.ggml.pre` names the split regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token spelled outside the byte alphabet (an added token written as plain text) is respelled.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(meta), dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = _PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict):
    """Llama 2, Mistral: a sentencepiece vocabulary as BPE with byte fallback. Files without
    merges get them from the token scores, best first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = _merges(meta)
    else:
        merges = merges_from_scores(vocab, dict(zip(tokens, meta["tokenizer.ggml.scores"])))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                               dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    return tok


def _prefix_space_by_normalizer(tok) -> None:
    """Phi-3: its tokenizer.json prepends the prefix space and spells spaces as \u2581 in a
    normalizer, with no pre-tokenizer (transformers' GGUF loader rebuilds it so too). It differs
    from Llama 2's Metaspace only on text that starts with a space ("  hi": three \u2581, not two)."""
    from tokenizers import normalizers

    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None


# general.architecture values whose sentencepiece vocabulary is Gemma's (transformers' GGUF
# loader chooses its Gemma builder by the same names).
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def _gemma_bpe(meta: dict):
    """Gemma's sentencepiece vocabulary as BPE with byte fallback: no prefix space, every space a
    \u2581 before the merges, nothing split off. llama.cpp writes a token of two or more spaces as
    real spaces ("  "), so those are spelled back as \u2581s. The file lists no merges and Gemma's
    scores do not follow its merge order; the file's order does, so that order ranks the merges."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t
              for t in meta["tokenizer.ggml.tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = _merges(meta)
    else:
        merges = merges_from_scores(vocab, {t: -float(i) for i, t in enumerate(tokens)})
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                               dropout=None, unk_token=None if unk is None else tokens[unk]))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    # As Gemma's own tokenizer.json: a split on " " after the normalizer left none, i.e. none.
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    return tok


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, ordered by the token's score (higher
    first), then by the lengths of the two halves: the merges sentencepiece's scores imply."""
    merges = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    merges.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_marked_tokens(tok, meta: dict, byte_level: bool) -> None:
    """Tokens the file marks as control (`<|im_end|>`) become special tokens and user-defined ones
    (`<think>`) plain added tokens, so the text is never cut through them. A control token spelled
    outside a byte-level alphabet is a converter's mislabel and is left alone."""
    from tokenizers import AddedToken

    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    pairs = list(zip(meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or ()))
    control = [AddedToken(t, normalized=False, special=True) for t, kind in pairs
               if kind == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, kind in pairs
            if kind == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)


# The split regex of each of llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`), as
# transformers' GGUF loader has them; a name not listed keeps ByteLevel's own (GPT-2's) split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}


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
