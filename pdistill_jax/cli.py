"""`pdistill`: a thin command line over the library. Each subcommand lives in `commands/`."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module under pdistill_jax.commands, one-line help). Imported lazily: jax is slow to load.
COMMANDS = {
    "fetch": ("fetch", "download a registered model into the cache and print its path"),
    "generate": ("generate", "documents -> questions -> teacher answers (training data)"),
    "train": ("train", "train a LoRA student by prompt distillation (or SFT)"),
    "answer": ("answer", "answer questions, closed-book or with documents in the prompt"),
    "evaluate": ("evaluate", "score predictions: normalized match, token F1, LLM judge"),
    "export": ("export", "export an adapter as a PEFT folder or merged Hugging Face model"),
    "run": ("run", "the whole pipeline from a config: generate, train, answer, evaluate, report"),
}


def main(argv: list[str] | None = None) -> int:
    # Compiled XLA programs persist across runs (a train-step shape costs tens of seconds to
    # compile on a CPU): a resumed or repeated run with the same shapes skips compiling. Set
    # before the command imports jax; a user's own JAX_COMPILATION_CACHE_DIR wins.
    from .registry import cache_dir

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "xla"))
    # Without torch (a plain install) transformers warns that its models are unavailable; we use
    # only its tokenizers, so the warning would mislead.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = argparse.ArgumentParser(prog="pdistill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen command's module (and its imports) is loaded
            mod = importlib.import_module(f"pdistill_jax.commands.{module}")
            mod.add_arguments(p)
            p.set_defaults(_run=mod.main)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Bad input is reported as one line naming the problem; tracebacks are for bugs.
        print(f"pdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pdistill {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
