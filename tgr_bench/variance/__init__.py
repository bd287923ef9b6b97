"""Gradient-variance analysis (the TGR paper's Table 4): per block of the source, the variance
of the gradient back-propagated by each attack's own loop (docs/tgr.md section 9).

`tgr-bench-variance` runs it through the same plan, source preparation, progress, run record,
lock and entry wrapper as `tgr-bench` (run.py); what is its own here is the statistics:
`blocks.source_blocks(net)` (the per-family block table), `recorder.GradientRecorder`
(read-only hooks around an attack's loop, `block_statistics(g)`) and `tables.long_frame(...)`.
"""
