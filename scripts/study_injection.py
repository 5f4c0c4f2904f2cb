"""Train and measure a list of variants on one generation's data (issue 21's study harness).

  python scripts/study_injection.py VARIANTS.yaml [--data runs/demo/data] [--out runs/study]
                                    [--docs N] [--no-progress]

Each variant of VARIANTS.yaml (see configs/study/example.yaml) trains into OUT/<name>/run,
answers the test questions closed-book and the retention questions; its row goes into
OUT/results.jsonl and OUT/results.md, beside the base model closed-book and RAG(gold); with
`seeds:` in its base, once per seed, and results.md adds each variant's mean and range. A rerun
skips the variants already measured, redoes the ones whose settings changed and continues an
interrupted training. The library is pdistill_jax/pipeline/study.py.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="study_injection.py", description=__doc__.splitlines()[0])
    parser.add_argument("variants", help="the study's YAML: base: {...} and variants: [...]")
    parser.add_argument("--data", help="the `pdistill generate` output folder to train on "
                        "(default: base.data of VARIANTS.yaml, itself runs/demo/data by default)")
    parser.add_argument("--out", default="runs/study", help="where the variants, results.jsonl "
                        "and results.md go (default: %(default)s)")
    parser.add_argument("--docs", type=int, help="a fast sweep: train and test on the first N "
                        "documents only (the retention questions stay whole)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from pdistill_jax.cli import prepare_environment
    from pdistill_jax.signals import interrupt_exit, stop_cleanly_on_sigterm

    prepare_environment()
    stop_cleanly_on_sigterm()
    from pdistill_jax.pipeline.study import load_study, run_study

    try:
        study = load_study(args.variants)
        run_study(study, data=args.data, out=args.out, docs=args.docs, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # bad input is one line naming the problem, as `pdistill` reports it; tracebacks are bugs
        print(f"pdistill study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how, status = interrupt_exit(e)
        print(f"pdistill study: {how}; rerun the same command to continue", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
