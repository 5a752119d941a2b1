"""Measurement stage: evaluation, timing, benchmarks."""
