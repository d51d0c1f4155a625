"""The tools that drive GKT Serve: the `gkt` command, the local stack runner, benchmarks, evaluation, chaos."""
