from pathlib import Path

from . import add_no_progress_argument


def add_arguments(p):
    p.add_argument("config", help="a run config YAML, e.g. configs/demo.yaml")
    p.add_argument("--out", help="output folder (default: the config's `out`)")
    add_no_progress_argument(p)


def main(args):
    import dataclasses

    from pdistill_jax.pipeline.run import load_run_config, run

    cfg = load_run_config(args.config)
    if args.out:
        cfg = dataclasses.replace(cfg, out=args.out)
    run(cfg, config_dir=Path(args.config).resolve().parent, progress=not args.no_progress)
