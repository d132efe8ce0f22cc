"""Benchmarks: scripts that print tables (and write plots), each run as `python -m benchmarks.<name>` from the
repository root; benchmarks/harness.py is how they launch runs and read what the runs wrote."""
