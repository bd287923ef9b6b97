"""Thin wrapper of `python -m tgr_bench.bench.attack_step`."""

from tgr_bench.bench.attack_step import main

if __name__ == "__main__":
    main()
