"""synthvox's benchmarks, run from the repository root as modules (``python -m benchmarks.registration
--help``); ``benchmarks/README.md`` has what each measures and its current table. Research tools are in
``benchmarks/research/``."""
