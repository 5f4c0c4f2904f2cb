"""One module per `pdistill` subcommand, each with `add_arguments(parser)` and `main(args)`."""
