"""Benchmarks: throughput and peak memory of each stage, printed and as JSON (`python -m benchmarks`)."""
