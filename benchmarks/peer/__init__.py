"""shardstep against Ray Train + torch DDP/ZeroRedundancyOptimizer on one model (``compare.py``)."""
