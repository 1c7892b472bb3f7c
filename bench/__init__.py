"""Benchmarks: run by hand (`python -m bench.NAME`), they print figures; not tests."""
