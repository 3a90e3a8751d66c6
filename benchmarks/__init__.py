"""Side-by-side measurements (``python -m benchmarks.<name>``); figures in docs/benchmarks.md."""

import medvlm  # noqa: F401  (one CPU code path before torch loads: medvlm/__init__.py)
