from pdistill_jax.weights.registry import LIST_HINT, fetch


def add_arguments(p):
    # No argparse `choices`: an unknown name gets fetch()'s error, which points to `pdistill models`.
    p.add_argument("name", help=f"a registered model name ({LIST_HINT})")


def main(args):
    print(fetch(args.name))
