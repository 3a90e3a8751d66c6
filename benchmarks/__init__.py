"""Side-by-side measurements (``python -m benchmarks.<name>``); figures in docs/benchmarks.md."""
