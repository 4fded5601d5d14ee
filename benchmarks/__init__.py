"""Benchmark scripts, run as `python benchmarks/<name>.py` from the repository root; a package so that they share
code through `benchmarks.step_runner`."""
