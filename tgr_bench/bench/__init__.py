"""Benchmarks (not used by runs): timing helpers and the `python -m tgr_bench.bench.*` entries
that scripts/ wraps."""
