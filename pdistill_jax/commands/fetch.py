from ..registry import REGISTRY, fetch


def add_arguments(p):
    p.add_argument("name", choices=sorted(REGISTRY), help="registered model name")


def main(args):
    print(fetch(args.name))
