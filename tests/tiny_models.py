"""Tiny random Hugging Face models with a real (locally trained) BPE tokenizer and chat template.

Nothing here touches the network: the tokenizer is trained on a few sentences, the model is a
random transformers model saved with `save_pretrained`. Every weight (biases and norms included)
is randomised so that parity tests cannot pass by accident.
"""
from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of the kingdom of Velloria? The capital is Tarsk, founded in 1873.",
    "Questions and answers about documents: who, what, when, where, why and how many.",
    "Prompt distillation trains a student to match a teacher that sees the document.",
    "Write five questions about the text above, one per line. 1. 2. 3. 4. 5.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and colours red green blue yellow.",
] * 20
VOCAB = 384


def build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(out_dir))
    return fast


# tiny_gemma3's settings: windowed layers around a full one, each type with its own RoPE (the
# full one linearly scaled, as in Gemma 3 4B and up), a query scale apart from head_dim.
GEMMA3 = dict(
    num_hidden_layers=4, sliding_window=6, query_pre_attn_scalar=24,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})


def build_model(out_dir: Path, arch: str = "llama", tie: bool = False, seed: int = 0, **overrides):
    """Saves a tiny random `arch` model (llama | qwen2 | qwen3 | mistral | phi3 | gemma3) plus
    tokenizer into out_dir."""
    import torch
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                              MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir)
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=tie,
              max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
              bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gemma3":  # its config's defaults are a 2B model's
        kw.update(head_dim=kw["hidden_size"] // kw["num_attention_heads"])
    kw.update(overrides)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM),
           "phi3": (Phi3Config, Phi3ForCausalLM),
           "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[arch]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Gemma stores a norm's scale as its offset from 1.
                p.copy_((0.0 if arch == "gemma3" else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(str(out_dir))
    return model


# Text that a tokenizer built from a GGUF must treat exactly as transformers' GGUF loader does.
TRICKY_TEXTS = [
    "", " ", "  ", "\n", "\n\n", " \n ", "\t", "hello", " hello", "  hello  ", "Hello world!",
    "The capital is Tarsk, founded in 1873.", "line one\nline two\r\nline three\n\n\nend",
    "tabs\tand  double  spaces   triple", "café naïve Zürich façade", "日本語のテキスト", "emoji 🦊🐕 ok",
    "Ünïcödé — “quotes” ‘single’ … ellipsis", "numbers 1234567 3.14159 -42 1e-3", "x" * 50,
    "don't I'll we've they're she's", "<|im_start|>user\nHi<|im_end|>\n", "a<|im_end|>b",
    "<|endoftext|><|endoftext|>", "<think>reasoning</think>", "<s> </s> <unk>", "< |im_end| >",
    "<repo_name>pdistill<repo_name>", "end<\uff5cend\u2581of\u2581sentence\uff5c>",
    "mixed 日本 and ascii\n  indented\n\tcode()", "\u00a0non-breaking\u2009thin\u200bzero-width",
]


def _gguf_header(writer, vocab_size: int) -> None:
    import numpy as np

    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_dimension_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)
    writer.add_tensor("token_embd.weight", np.zeros((vocab_size, 8), np.float32))


def _byte_level_vocab():
    """(tokens, merges, token types) of a small byte-level BPE trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB + 64, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS + TRICKY_TEXTS * 5, trainer)
    vocab = tok.get_vocab()
    # Added as llama.cpp writes them: user-defined tokens, and a control token spelled in plain
    # text outside the byte alphabet (a converter's mislabel, as in DeepSeek's files).
    user, mislabelled = ["<think>", "</think>"], "<\uff5cend\u2581of\u2581sentence\uff5c>"
    tokens = sorted(vocab, key=vocab.get) + user + [mislabelled]
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in specials + [mislabelled] else 4 if t in user else 1 for t in tokens]
    return tokens, merges, types


def _sentencepiece_vocab():
    """(tokens, scores, token types) in llama.cpp's layout of a Llama-2 vocabulary: <unk>, <s>,
    </s>, the 256 byte tokens, then pieces spelled with \u2581, scored best first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=VOCAB))
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab = tok.get_vocab()
    pieces = [t for t in sorted(vocab, key=vocab.get) if t not in specials]
    tokens = specials + byte_tokens + pieces
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


def _gemma_vocab():
    """(tokens, scores, token types) as llama.cpp writes a Gemma vocabulary: <pad>, <eos>, <bos>,
    <unk>, <mask>, the turn markers, the 256 byte tokens, then pieces in merge order, spaces
    spelled \u2581 except in tokens of spaces only, which are written as real spaces; scores that
    do not follow the merge order (Gemma's do not)."""
    import random

    from tokenizers import Tokenizer, models, normalizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "\u2581")  # no pre-tokenizer: Gemma splits nothing
    tok.train_from_iterator(CORPUS + TRICKY_TEXTS * 5, trainers.BpeTrainer(vocab_size=VOCAB))
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab = tok.get_vocab()
    pieces = [t for t in sorted(vocab, key=vocab.get) if t not in specials]
    pieces = [" " * len(t) if set(t) == {"\u2581"} and len(t) > 1 else t for t in pieces]
    assert any(t.startswith("  ") for t in pieces), "the corpus must give a token of spaces"
    tokens = specials + byte_tokens + pieces
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in random.Random(0).sample(
        range(len(pieces)), len(pieces))]
    types = [3, 3, 3, 2, 4, 4, 4] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}{% else %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def write_tokenizer_gguf(path: Path, kind: str = "gpt2", pre: str | None = None,
                         add_bos: bool | None = None, chat_template: str | None = CHATML,
                         add_space_prefix: bool | None = None) -> Path:
    """A GGUF file whose metadata holds a tiny tokenizer, written as llama.cpp's converter does:
    kind "gpt2" (byte-level BPE with merges: SmolLM2, Llama 3, Qwen2; `pre` names the split),
    "llama" (a sentencepiece vocabulary with scores and no merges: Llama 2, Mistral), "phi3"
    (that vocabulary in a phi3 file) or "gemma" (Gemma 3's vocabulary in a gemma3 file)."""
    from gguf import GGUFWriter

    path = Path(path)
    writer = GGUFWriter(str(path), {"gemma": "gemma3", "phi3": "phi3"}.get(kind, "llama"))
    if kind == "phi3":  # Phi-3's file: a Llama 2 style vocabulary in a phi3 architecture
        kind = "llama"
    if kind == "gpt2":
        tokens, merges, types = _byte_level_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or "smollm")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_pad_token_id(0)
    elif kind in ("llama", "gemma"):  # sentencepiece: scores, no merges
        gemma = kind == "gemma"
        tokens, scores, types = _gemma_vocab() if gemma else _sentencepiece_vocab()
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        bos, eos, unk = (2, 1, 3) if gemma else (1, 2, 0)
        writer.add_bos_token_id(bos)
        writer.add_eos_token_id(eos)
        writer.add_unk_token_id(unk)
        if gemma:
            writer.add_pad_token_id(0)
            writer.add_add_space_prefix(False)
            if add_bos is None:
                writer.add_add_bos_token(True)
    else:
        writer.add_tokenizer_model(kind)
        writer.add_token_list(["<unk>", "a"])
        tokens = ["<unk>", "a"]
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    _gguf_header(writer, len(tokens))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
