"""One module per `agcl` sub-command, each with `HELP`, `add_arguments(parser)` and `run(args)`;
agcl_ds.cli is the parser and the dispatch."""
