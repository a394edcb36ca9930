"""``make bench`` (``benchmarks/bench.py``) and ``make gpu-check`` (``benchmarks/gpu_check.py``), split by role."""
