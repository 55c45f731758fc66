"""
Benchmarks of a running gate: C{python -m bench.roundtrip} and C{python -m
bench.pushes}. See C{bench/README.md}.
"""
