"""The results plane: per-group metrics files, summary.json, the run report, comparisons and sweeps.

No torch: it reads what the training plane wrote and the launch plane collected.
"""
