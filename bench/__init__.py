"""Benchmarks: each script prints a comparison measured side by side in one run. Run them from the
repository root as modules, `python -m bench.chat_quality ckpt/release`; what they measured is in
bench/RESULTS.md."""
