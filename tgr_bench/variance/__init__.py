"""Gradient-variance analysis (the TGR paper's Table 4): per block of the source, the variance
of the gradient back-propagated by each attack's own loop (docs/tgr.md section 9).

`run(cfg, output_dir)` is what `tgr-bench-variance` calls; the pieces are usable alone:
`source_blocks(net)` (the per-family block table `BLOCKS`), `GradientRecorder` (read-only
hooks around an attack's loop), `block_statistics(g)` and `long_frame(...)`.
"""

from tgr_bench.variance.blocks import BLOCKS, source_blocks
from tgr_bench.variance.recorder import BatchStats, GradientRecorder, block_statistics
from tgr_bench.variance.run import run
from tgr_bench.variance.tables import STATISTICS, long_frame

__all__ = [
    "BLOCKS",
    "STATISTICS",
    "BatchStats",
    "GradientRecorder",
    "block_statistics",
    "long_frame",
    "run",
    "source_blocks",
]
