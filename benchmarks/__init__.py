"""Speed benchmarks (``python -m benchmarks cpu|gpu``); see ``benchmarks/__main__.py``."""
