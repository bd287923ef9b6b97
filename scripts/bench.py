"""Thin wrapper of `python -m tgr_bench.bench.throughput`."""

from tgr_bench.bench.throughput import main

if __name__ == "__main__":
    main()
