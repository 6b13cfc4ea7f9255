"""Benchmarks: each module runs with `.venv/bin/python -m benchmarks.<name>` and prints one JSON object as its last line."""
