"""Research tools: experiments on the features and their training, not product benchmarks.

``ablation`` (training recipes, probed), ``checkpoints`` (a run's learning curve), ``net_share`` (the
network's share with ``--features both``). Run each from the repository root as a module:
``python -m benchmarks.research.checkpoints --help``. The feature probe they build on is
``benchmarks/features.py``.
"""
