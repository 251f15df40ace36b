"""The methods benchmark (``benchmarks/bench_methods.py``): profiles, methods, runner, tables."""
