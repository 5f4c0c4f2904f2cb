"""Tiny random Hugging Face models with a real (locally trained) BPE tokenizer and chat template.

Nothing here touches the network: the tokenizer is trained on a few sentences, the model is a
random transformers model saved with `save_pretrained`. Every weight (biases and norms included)
is randomised so that parity tests cannot pass by accident.
"""
from __future__ import annotations

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


def build_model(out_dir: Path, arch: str = "llama", tie: bool = False, seed: int = 0, **overrides):
    """Saves a tiny random `arch` model (llama | qwen2 | mistral) plus tokenizer into out_dir."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir)
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=tie,
              max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
              bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(str(out_dir))
    return model
