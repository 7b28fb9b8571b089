"""Synthetic multi-centre cohort, simulation scenarios and benchmarks."""
