# Makes conf/ importable as tgr_bench.conf so Hydra can read it with pkg://tgr_bench.conf.
