"""The command line's shared set-up: one-line errors and the persistent compilation cache."""
import os

from pdistill_jax.cli import main


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
