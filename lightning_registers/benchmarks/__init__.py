"""Benchmarks run by `make bench`; each section compares against its peer in the same run."""
