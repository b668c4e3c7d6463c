"""Benchmarks and the comparison study: scripts, not tests. `python -m bench` runs them all."""
