"""Memory: per-rank accounting of a running step (tracker.py), the meta-device planner (planner.py), the
pre-flight fit check (preflight.py) and in-process step measurements (measure.py). Nothing here imports the
training loop."""
