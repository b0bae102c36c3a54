"""Benchmarks: speed is measured here, on real models, not in the tests."""
