"""`pdistill`: a thin command line over the library. Each subcommand lives in `commands/`."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Iterable

from pdistill_jax.signals import interrupt_exit, stop_cleanly_on_sigterm

# name -> (module under pdistill_jax.commands, one-line help). Imported lazily: jax is slow to load.
COMMANDS = {
    "fetch": ("fetch", "download a registered model into the cache and print its path"),
    "generate": ("generate", "documents -> questions -> teacher answers (training data)"),
    "train": ("train", "train a LoRA student by prompt distillation (or SFT)"),
    "answer": ("answer", "answer questions, closed-book or with documents in the prompt"),
    "evaluate": ("evaluate", "score predictions (normalized match, token F1, LLM judge) in a table"),
    "export": ("export", "export an adapter as a PEFT folder or merged Hugging Face model"),
    "plan": ("plan", "compile the training step and sampler for a model config and mesh on fake "
                     "CPU devices, without weights: per-device memory, FLOPs, weight shardings"),
    "run": ("run", "the whole pipeline from a config: generate, train, answer, evaluate, report"),
    "models": ("models", "list the registered models: what each is, where it comes from, "
                         "whether it is in the cache"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Appends argparse's default to a flag's help. A flag whose default is None takes it from a
    config or from another flag, so its help states it (see commands/__init__.py); switches
    (store_true) are off unless given, which needs no saying."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is argparse.SUPPRESS
                or isinstance(action.default, bool) or "(default" in text):
            return text
        return f"{text} (default: %(default)s)"


def build_parser(load: Iterable[str] = ()) -> argparse.ArgumentParser:
    """The `pdistill` parser; only the commands named in `load` get their flags, because a
    command's module may import jax, which is slow to load."""
    from pdistill_jax import __version__

    parser = argparse.ArgumentParser(
        prog="pdistill", description="Prompt distillation: teach a model your documents, so that it "
        "answers questions about them without them in the prompt.",
        epilog="`pdistill COMMAND --help` lists a command's flags and their defaults.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    load = set(load)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name in load:
            mod = importlib.import_module(f"pdistill_jax.commands.{module}")
            mod.add_arguments(p)
            p.set_defaults(_run=mod.main)
    return parser


def prepare_environment() -> None:
    """What every pdistill process sets before it imports jax (the commands, the scripts)."""
    # Compiled XLA programs persist across runs (a train-step shape costs tens of seconds to
    # compile on a CPU): a resumed or repeated run with the same shapes skips compiling. Set
    # before the command imports jax; a user's own JAX_COMPILATION_CACHE_DIR wins.
    from pdistill_jax.weights.registry import cache_dir

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "xla"))
    # Without torch (a plain install) transformers warns that its models are unavailable; we use
    # only its tokenizers, so the warning would mislead.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _cluster() -> tuple[int, int] | None:
    """(this process's index, process count) in a multi-process JAX run, else None."""
    jax = sys.modules.get("jax")  # a command that never imported jax runs on no cluster
    if jax is None or not jax.distributed.is_initialized() or jax.process_count() < 2:
        return None
    return jax.process_index(), jax.process_count()


def _exit_now(status: int) -> None:
    """Ends a failed process of a cluster at once. A normal exit would wait in JAX's shutdown
    barrier for the other processes: when one of them died (the usual reason a collective fails),
    that waits for its heartbeat timeout (100 s) and then aborts with a C++ stack trace, long after
    the error was printed. Exiting now also ends the peers: their next collective, or the
    coordinator's heartbeat, fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    prepare_environment()
    stop_cleanly_on_sigterm()
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser({chosen}).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Bad input is reported as one line naming the problem; tracebacks are for bugs.
        cluster = _cluster()
        resume = ("with --resume to continue from the last checkpoint" if args.command == "train"
                  else "the same command resumes from what the processes wrote")
        where = "" if cluster is None else (
            f" (process {cluster[0]} of {cluster[1]}: this run of the cluster ends; when a process "
            f"died, relaunch every process, {resume})")
        print(f"pdistill {args.command}: error: {e}{where}", file=sys.stderr)
        if cluster is not None:
            from pdistill_jax.model.sharding import report_failure

            report_failure(str(e))  # the peers waiting at a barrier end at once
            _exit_now(2)
        return 2
    except KeyboardInterrupt as e:
        how, status = interrupt_exit(e)
        print(f"pdistill {args.command}: {how}; rerun the same command to resume", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
