"""Benchmarks run by `k2serve bench ...`: each prints its figures beside a baseline measured in the same run."""
